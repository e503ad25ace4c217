/// What a worker does with the messages of one route (the `handler.*` keys).
public struct HandlerSettings: Sendable, Equatable {
    /// The built-in handler kinds (`handler.type`), each with what it cannot do without.
    public enum Kind: Sendable, Equatable {
        /// Appends a JSON line per message to `output` (`-`: stdout).
        case log(output: String)
        /// Forwards each message to `topic` on the worker's cluster.
        case kafka(topic: String)
        /// POSTs each message's value to `url`.
        case http(url: String)
        /// Runs `command` with `/bin/sh -c`, the message on stdin.
        case exec(command: String)

        /// The `handler.type` value.
        public var name: String {
            switch self {
            case .log: "log"
            case .kafka: "kafka"
            case .http: "http"
            case .exec: "exec"
            }
        }
    }

    public var kind: Kind
    /// `handler.type`: `log`, `kafka`, `http` or `exec`.
    public var type: String { kind.name }
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

    /// Every value is given: the defaults are the schema's (`ConfigSchema.keys`), applied when
    /// the configuration is read.
    public init(
        kind: Kind, headers: [String], tlsCAFile: String?, tlsCertFile: String?, tlsKeyFile: String?,
        timeout: Duration, maxElapsed: Duration, concurrency: Int, maxAttempts: Int, backoff: Backoff
    ) {
        self.kind = kind
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
        switch kind {
        case .kafka(let topic): "kafka \(topic) \(timeout)"
        case .http(let url): "http \(url) \(timeout) \(headers) \(tlsCAFile ?? "") \(tlsCertFile ?? "") \(tlsKeyFile ?? "")"
        case .exec(let command): "exec \(command) \(timeout)"
        case .log(let output): "log \(output)"
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
