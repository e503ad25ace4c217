/// What a worker does with the messages of one route (the `handler.*` keys).
public struct HandlerSettings: Sendable, Equatable {
    /// `log`, `kafka`, `http` or `exec`.
    public var type: String
    /// `log`: file to append to, `-` for stdout.
    public var output: String
    /// `kafka`: the topic to forward to.
    public var topic: String?
    /// `http`: the URL to POST to.
    public var url: String?
    /// `exec`: the shell command.
    public var command: String?
    /// `http`: extra headers as written (`NAME=VALUE`, `NAME=env:VAR`, `NAME=file:PATH`), resolved
    /// when the handler is made so a secret never sits in the configuration's printable values.
    public var headers: [String]
    /// `http`: PEM files for TLS (trusted CAs; client certificate and key).
    public var tlsCAFile: String?
    public var tlsCertFile: String?
    public var tlsKeyFile: String?
    public var timeout: Duration
    public var maxElapsed: Duration
    /// Handler calls of this route in flight at once.
    public var concurrency: Int
    public var maxAttempts: Int
    public var backoff: Backoff

    public init(
        type: String = "log", output: String = "-", topic: String? = nil, url: String? = nil, command: String? = nil,
        headers: [String] = [], tlsCAFile: String? = nil, tlsCertFile: String? = nil, tlsKeyFile: String? = nil,
        timeout: Duration = .seconds(10), maxElapsed: Duration = .seconds(120), concurrency: Int = 4, maxAttempts: Int = 5,
        backoff: Backoff = Backoff()
    ) {
        self.type = type
        self.output = output
        self.topic = topic
        self.url = url
        self.command = command
        self.headers = headers
        self.tlsCAFile = tlsCAFile
        self.tlsCertFile = tlsCertFile
        self.tlsKeyFile = tlsKeyFile
        self.timeout = timeout
        self.maxElapsed = maxElapsed
        self.concurrency = concurrency
        self.maxAttempts = maxAttempts
        self.backoff = backoff
    }

    /// Routes whose handlers have the same identity share one handler instance (one file, one
    /// producer, one HTTP client); concurrency and retries stay per route.
    public var identity: String {
        switch type {
        case "kafka": "kafka \(topic ?? "") \(timeout)"
        case "http": "http \(url ?? "") \(timeout) \(headers) \(tlsCAFile ?? "") \(tlsCertFile ?? "") \(tlsKeyFile ?? "")"
        case "exec": "exec \(command ?? "") \(timeout)"
        default: "log \(output)"
        }
    }
}

/// A named route: what it matches, its dedup settings and its handler.
public struct RouteConfiguration: Sendable {
    public var name: String
    public var match: RouteMatch
    public var dedup: DedupSettings
    public var handler: HandlerSettings
}
