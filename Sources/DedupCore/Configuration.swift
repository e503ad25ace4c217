#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Every configuration key dedupd knows, with its default and meaning. This one table drives
/// validation (unknown keys are rejected with the nearest known key), environment variable names,
/// `check-config` output and the README's reference.
public struct ConfigKey: Sendable {
    public enum Kind: Sendable, Equatable {
        case string, duration, size, count, list, secret
        case choice([String])
    }

    public let name: String
    public let kind: Kind
    /// `nil` when the key has no default (required, or optional and off).
    public let defaultValue: String?
    public let doc: String

    /// `kafka.bootstrap_servers` → `DEDUPD_KAFKA_BOOTSTRAP_SERVERS`.
    public var environmentName: String {
        "DEDUPD_" + name.uppercased().map { $0 == "." ? "_" : $0 }.map(String.init).joined()
    }
}

public enum ConfigSchema {
    public static let keys: [ConfigKey] = [
        .init(name: "kafka.bootstrap_servers", kind: .string, defaultValue: nil,
              doc: "Kafka bootstrap servers, host:port[,host:port]. Required."),
        .init(name: "kafka.topics", kind: .list, defaultValue: nil,
              doc: "Topics to consume, comma-separated in flags and env. Required."),
        .init(name: "kafka.group", kind: .string, defaultValue: "dedupd",
              doc: "Consumer group id; workers with the same group share the partitions."),
        .init(name: "kafka.group_instance_id", kind: .string, defaultValue: nil,
              doc: "Static membership id (group.instance.id), e.g. the pod name: a restarted worker takes its place back without a rebalance."),
        .init(name: "redis.url", kind: .secret, defaultValue: "redis://127.0.0.1:6379/0",
              doc: "redis://[user:password@]host:port/db of the seen-set; rediss:// for TLS (see redis.tls.*)."),
        .init(name: "redis.password", kind: .secret, defaultValue: nil,
              doc: "Redis password (AUTH), instead of one in redis.url; best given as DEDUPD_REDIS_PASSWORD or through redis.password_file."),
        .init(name: "redis.password_file", kind: .string, defaultValue: nil,
              doc: "File holding the Redis password (a mounted Secret, a credentials file); one trailing newline is ignored."),
        .init(name: "redis.tls.ca_file", kind: .string, defaultValue: nil,
              doc: "rediss:// URLs: PEM file of the certificate authorities that verify the server, instead of the system's trust store."),
        .init(name: "redis.tls.cert_file", kind: .string, defaultValue: nil,
              doc: "rediss:// URLs: PEM client certificate, for servers that ask for one (with redis.tls.key_file)."),
        .init(name: "redis.tls.key_file", kind: .string, defaultValue: nil,
              doc: "rediss:// URLs: PEM private key of redis.tls.cert_file."),
        .init(name: "redis.tls.server_name", kind: .string, defaultValue: nil,
              doc: "rediss:// URLs: the name the server's certificate must carry (and SNI). Default: the URL's host."),
        .init(name: "redis.allow_eviction", kind: .choice(["false", "true"]), defaultValue: "false",
              doc: "true: start even when Redis's maxmemory-policy evicts keys with a TTL (every dedupd key has one; an evicted done record lets a duplicate through). false: such a Redis stops start-up with an error."),
        .init(name: "redis.connect_timeout", kind: .duration, defaultValue: "2s", doc: "Redis connect timeout."),
        .init(name: "redis.command_timeout", kind: .duration, defaultValue: "2s",
              doc: "Redis reply timeout for one pipelined round trip."),
        .init(name: "dedup.key", kind: .string, defaultValue: "header:message-id",
              doc: "Key template: header:NAME, key, json:/pointer, sha256:value, sha256:json:/a,/b, or a composite {..}:{..}."),
        .init(name: "dedup.namespace", kind: .string, defaultValue: "default",
              doc: "Prefix that separates this stream's keys in Redis (dedupd:<namespace>:<key>)."),
        .init(name: "dedup.window", kind: .duration, defaultValue: "5s",
              doc: "Dedup window W: a new message waits this long for repeats before dispatch."),
        .init(name: "dedup.retention", kind: .duration, defaultValue: "24h",
              doc: "How long a dispatched key is remembered (repeats within it are dropped)."),
        .init(name: "dedup.lease", kind: .duration, defaultValue: nil,
              doc: "Lease of a pending claim; a dead worker's keys free up after it. Default: window + 30s."),
        .init(name: "dedup.token", kind: .string, defaultValue: nil,
              doc: "Token mode: where a message's one-time token is, e.g. header:form-token. Only a message whose token was issued (dedupd token issue) and not yet used is dispatched; unknown, expired and reused tokens are bad input."),
        .init(name: "dedup.keep", kind: .choice(KeepPolicy.allCases.map(\.rawValue)), defaultValue: "first",
              doc: "first: dispatch the first copy; last: dispatch the newest copy seen within the window."),
        .init(name: "dedup.on_store_error", kind: .choice(["fail_closed", "fail_open"]), defaultValue: "fail_closed",
              doc: "fail_closed: while Redis is unreachable, pause and dispatch nothing unclaimed; fail_open: dispatch without a claim (dedup by the window only)."),
        .init(name: "dedup.max_message_bytes", kind: .size, defaultValue: "1MiB",
              doc: "Larger messages are bad input (counted and logged, not dispatched)."),
        .init(name: "buffer.max_messages", kind: .count, defaultValue: "100000",
              doc: "Delay buffer bound in messages; when reached the consumer pauses until half drained."),
        .init(name: "buffer.max_bytes", kind: .size, defaultValue: "64MiB", doc: "Delay buffer bound in bytes."),
        .init(name: "consumer.batch_size", kind: .count, defaultValue: "1000",
              doc: "Most messages taken per poll; one Redis round trip claims a whole batch."),
        .init(name: "handler.type", kind: .choice(["log", "kafka", "http", "exec"]), defaultValue: "log",
              doc: "Handler for unique messages. log: one JSON line per message; kafka: forward to handler.topic; http: POST to handler.url; exec: run handler.command."),
        .init(name: "handler.output", kind: .string, defaultValue: "-",
              doc: "log handler: file to append JSON lines to; - is stdout."),
        .init(name: "handler.topic", kind: .string, defaultValue: nil,
              doc: "kafka handler: topic to forward to (same cluster and kafka.properties as the consumer; idempotent producer)."),
        .init(name: "handler.url", kind: .string, defaultValue: nil,
              doc: "http handler: http:// or https:// URL to POST each message to, with an Idempotency-Key header."),
        .init(name: "handler.headers", kind: .secret, defaultValue: nil,
              doc: "http handler: extra request headers, NAME=VALUE[,NAME=VALUE]; a VALUE of env:VAR or file:PATH is read from that environment variable or file at start (for Authorization and API keys). Never printed."),
        .init(name: "handler.tls_ca_file", kind: .string, defaultValue: nil,
              doc: "http handler: PEM file of the certificate authorities that verify an https:// server, instead of the system's."),
        .init(name: "handler.tls_cert_file", kind: .string, defaultValue: nil,
              doc: "http handler: PEM client certificate for servers that ask for one (with handler.tls_key_file)."),
        .init(name: "handler.tls_key_file", kind: .string, defaultValue: nil,
              doc: "http handler: PEM private key of handler.tls_cert_file."),
        .init(name: "handler.command", kind: .string, defaultValue: nil,
              doc: "exec handler: command run by /bin/sh -c, the message value on stdin, DEDUPD_KEY/TOPIC/PARTITION/OFFSET in the environment."),
        .init(name: "handler.timeout", kind: .duration, defaultValue: "10s",
              doc: "kafka, http, exec handlers: time one attempt may take (broker ack, HTTP response, command exit)."),
        .init(name: "handler.max_elapsed", kind: .duration, defaultValue: "2m",
              doc: "No retry of a message starts later than this after its first attempt."),
        .init(name: "dead_letter.topic", kind: .string, defaultValue: nil,
              doc: "Topic for bad input and given-up messages (original record plus dedupd-* headers), acknowledged before the offset is committed. Unset: logged and counted only."),
        .init(name: "dead_letter.bootstrap_servers", kind: .string, defaultValue: nil,
              doc: "Cluster of the dead-letter topic. Default: kafka.bootstrap_servers (with kafka.properties)."),
        .init(name: "dead_letter.timeout", kind: .duration, defaultValue: "10s",
              doc: "How long one send to the dead-letter topic may wait for the broker's ack before it is retried later; keep it well under max.poll.interval.ms."),
        .init(name: "handler.concurrency", kind: .count, defaultValue: "4",
              doc: "Handler calls in flight at once."),
        .init(name: "handler.max_batch", kind: .count, defaultValue: "500",
              doc: "Most messages dispatched per round before their keys are confirmed in one round trip; bounds what the crash window can repeat."),
        .init(name: "handler.max_attempts", kind: .count, defaultValue: "5",
              doc: "Tries per message before it is given up (logged as failed, claim released)."),
        .init(name: "handler.backoff", kind: .duration, defaultValue: "100ms",
              doc: "First retry delay; doubles per try, with jitter, up to 5s."),
        .init(name: "routes", kind: .list, defaultValue: nil,
              doc: "Names of the routes, tried in order; written as the file's routes: list, each item with a name, a match and its own dedup and handler keys (see routeKeys). Unset: one route, the top-level dedup and handler keys."),
        .init(name: "routing.unmatched", kind: .choice(Routing.Unmatched.allCases.map(\.rawValue)), defaultValue: "default",
              doc: "What happens to a message no route matches. default: the top-level dedup and handler keys take it; dead_letter: bad input no_route (dead-lettered when dead_letter.topic is set)."),
        .init(name: "run.stop_when_idle", kind: .duration, defaultValue: nil,
              doc: "Exit 0 once nothing arrived for this long and nothing is waiting (batch runs, tests, demo)."),
        .init(name: "run.shutdown_deadline", kind: .duration, defaultValue: "10s",
              doc: "On SIGTERM/SIGINT: how long in-flight handlers may finish before exit."),
        .init(name: "log.level", kind: .choice(["trace", "debug", "info", "notice", "warning", "error", "critical"]),
              defaultValue: "info", doc: "Operational log level (stderr)."),
        .init(name: "log.format", kind: .choice(["logfmt", "json"]), defaultValue: "logfmt",
              doc: "Operational log format (stderr)."),
        .init(name: "log.stats_interval", kind: .duration, defaultValue: "10s",
              doc: "How often a stats line is logged; 0 turns it off."),
        .init(name: "http.port", kind: .count, defaultValue: nil,
              doc: "Port of the HTTP endpoint serving /metrics (Prometheus), /healthz and /readyz; unset: no HTTP server."),
        .init(name: "http.loop_stall_timeout", kind: .duration, defaultValue: "30s",
              doc: "/healthz answers 503 once the worker loop has not completed a pass for this long."),
    ]

    /// The keys a route may set, as `routes.<name>.<key>`: what it matches, and the dedup and
    /// handler keys. A dedup or handler key a route does not set is the top-level one, except
    /// `dedup.namespace`, which defaults to the route's name so that routes keep apart in Redis.
    public static let routeKeys: [ConfigKey] = [
        .init(name: "match.topic", kind: .string, defaultValue: nil, doc: "The route takes messages of this topic."),
        .init(name: "match.header", kind: .string, defaultValue: nil,
              doc: "NAME=VALUE: the route takes messages whose header NAME has this value."),
        .init(name: "match.json", kind: .string, defaultValue: nil,
              doc: "/pointer=VALUE: the route takes JSON messages whose field has this value (numbers and booleans as written)."),
    ] + keys.filter { routeInheritedKeys.contains($0.name) }

    /// Top-level keys a route can set for itself.
    public static let routeInheritedKeys: Set<String> = [
        "dedup.key", "dedup.namespace", "dedup.window", "dedup.retention", "dedup.lease", "dedup.token", "dedup.keep",
        "handler.type", "handler.output", "handler.topic", "handler.url", "handler.command", "handler.timeout",
        "handler.headers", "handler.tls_ca_file", "handler.tls_cert_file", "handler.tls_key_file",
        "handler.max_elapsed", "handler.concurrency", "handler.max_attempts", "handler.backoff",
    ]

    public static let routeKeysByName: [String: ConfigKey] = Dictionary(uniqueKeysWithValues: routeKeys.map { ($0.name, $0) })

    /// `routes.payments.dedup.window` → (`payments`, `dedup.window`); nil for other keys.
    public static func splitRouteKey(_ name: String) -> (route: String, key: String)? {
        guard name.hasPrefix("routes.") else { return nil }
        let rest = name.dropFirst("routes.".count)
        guard let dot = rest.firstIndex(of: ".") else { return nil }
        return (String(rest[..<dot]), String(rest[rest.index(after: dot)...]))
    }

    /// Keys under this prefix pass through to librdkafka unchanged, e.g. `kafka.properties.security.protocol`.
    public static let kafkaPropertiesPrefix = "kafka.properties."

    public static let byName: [String: ConfigKey] = Dictionary(uniqueKeysWithValues: keys.map { ($0.name, $0) })
}

/// A configuration problem, naming the key, the value, where it came from and what is allowed.
public struct ConfigError: Error, Sendable, CustomStringConvertible {
    public var key: String
    public var value: String?
    public var origin: String?
    public var problem: String

    public init(key: String, value: String?, origin: String? = nil, problem: String) {
        self.key = key
        self.value = value
        self.origin = origin
        self.problem = problem
    }

    public var description: String {
        var s = "config key \(key)"
        if let value { s += " = \"\(value)\"" }
        if let origin { s += " (from \(origin))" }
        return s + ": " + problem
    }
}

/// A value as given, with where it came from (file, environment variable or flag) for error messages.
public struct ConfigValue: Sendable, Equatable {
    public var text: String
    public var origin: String
    public init(_ text: String, origin: String) {
        self.text = text
        self.origin = origin
    }
}

/// The parsed, validated configuration of a worker.
public struct WorkerConfiguration: Sendable {
    public var bootstrapServers: String
    public var topics: [String]
    public var group: String
    public var groupInstanceID: String?
    public var kafkaProperties: [String: String]
    public var redisURL: String
    public var redisConnectTimeout: Duration
    public var redisCommandTimeout: Duration
    /// `redis.tls.*`, for a `rediss://` URL.
    public var redisTLS = RedisTLSSettings()
    /// `redis.allow_eviction`: start on a Redis whose maxmemory-policy evicts keys.
    public var redisAllowEviction = false
    /// The default route's dedup settings (the top-level `dedup.*` keys); its message size and
    /// buffer bounds hold for the whole worker.
    public var dedup: DedupSettings
    /// The default route's handler (the top-level `handler.*` keys).
    public var handler: HandlerSettings
    /// Named routes, in the order they are tried.
    public var routes: [RouteConfiguration]
    public var unmatched: Routing.Unmatched
    public var batchSize: Int
    public var handlerMaxBatch: Int
    public var failOpen: Bool
    /// `nil`: bad input and given-up messages are logged and counted only.
    public var deadLetterTopic: String?
    /// Default: `bootstrapServers`.
    public var deadLetterBootstrapServers: String
    public var deadLetterTimeout: Duration
    public var stopWhenIdle: Duration?
    public var shutdownDeadline: Duration
    public var logLevel: String
    public var logFormat: String
    public var statsInterval: Duration
    /// `redis.password`, or the contents of `redis.password_file` once `ConfigLoader` read it.
    public var redisPassword: String?
    public var redisPasswordFile: String?
    public var httpPort: Int?
    public var loopStallTimeout: Duration

    /// Merges sources (later ones win: pass file, then environment, then flags) and validates
    /// every value once, at start, with a message naming the key.
    public init(layers: [[String: ConfigValue]]) throws(ConfigError) {
        var merged: [String: ConfigValue] = [:]
        for layer in layers { merged.merge(layer) { _, new in new } }

        try ConfigSchema.rejectUnknownKeys(merged)
        let r = Reader(values: merged)

        bootstrapServers = try r.required("kafka.bootstrap_servers")
        topics = try r.list("kafka.topics")
        guard !topics.isEmpty else {
            throw ConfigError(key: "kafka.topics", value: nil, problem: "at least one topic is required")
        }
        group = try r.string("kafka.group")
        groupInstanceID = r.optional("kafka.group_instance_id")
        var props: [String: String] = [:]
        for (name, value) in merged where name.hasPrefix(ConfigSchema.kafkaPropertiesPrefix) {
            props[String(name.dropFirst(ConfigSchema.kafkaPropertiesPrefix.count))] = value.text
        }
        kafkaProperties = props
        redisURL = try r.string("redis.url")
        redisTLS = try RedisTLSSettings(r, url: redisURL)
        redisConnectTimeout = try r.duration("redis.connect_timeout")
        redisCommandTimeout = try r.duration("redis.command_timeout")
        redisAllowEviction = try r.choice("redis.allow_eviction") == "true"

        let top = try Self.parseRoute(r)
        batchSize = try r.count("consumer.batch_size")
        handlerMaxBatch = try r.count("handler.max_batch")
        failOpen = try r.choice("dedup.on_store_error") == "fail_open"
        handler = top.handler
        dedup = top.dedup
        dedup.maxMessageBytes = try r.size("dedup.max_message_bytes")
        dedup.bufferMaxMessages = try r.count("buffer.max_messages")
        dedup.bufferMaxBytes = try r.size("buffer.max_bytes")
        deadLetterTopic = r.optional("dead_letter.topic")
        deadLetterBootstrapServers = r.optional("dead_letter.bootstrap_servers") ?? bootstrapServers
        deadLetterTimeout = try r.duration("dead_letter.timeout")
        dedup.holdsDeadLetters = deadLetterTopic != nil
        unmatched = Routing.Unmatched(rawValue: try r.choice("routing.unmatched"))!
        routes = try Self.parseRoutes(r, defaults: dedup)
        stopWhenIdle = try r.optionalDuration("run.stop_when_idle")
        shutdownDeadline = try r.duration("run.shutdown_deadline")
        logLevel = try r.choice("log.level")
        logFormat = try r.choice("log.format")
        statsInterval = try r.duration("log.stats_interval", allowZero: true)
        redisPassword = r.optional("redis.password")
        redisPasswordFile = r.optional("redis.password_file")
        if redisPassword != nil, redisPasswordFile != nil {
            throw ConfigError(key: "redis.password_file", value: redisPasswordFile, origin: merged["redis.password_file"]?.origin,
                              problem: "set either redis.password or redis.password_file, not both")
        }
        if redisPassword != nil || redisPasswordFile != nil, ConfigSchema.urlHasPassword(redisURL) {
            throw ConfigError(key: "redis.url", value: ConfigSchema.redact(redisURL), origin: merged["redis.url"]?.origin,
                              problem: "holds a password and redis.password or redis.password_file is set too; give the password once")
        }
        httpPort = try r.optional("http.port").map { _ throws(ConfigError) in try r.count("http.port") }
        if let port = httpPort, port > 65535 { throw r.fail("http.port", "must be a port number from 1 to 65535") }
        loopStallTimeout = try r.duration("http.loop_stall_timeout")
    }

    /// Each handler kind names what it needs; a key another kind needs is not an error (switching
    /// `handler.type` back and forth keeps working).
    static func validateHandler(_ h: HandlerSettings, r: Reader) throws(ConfigError) {
        switch h.type {
        case "kafka" where h.topic == nil:
            throw ConfigError(key: r.name("handler.topic"), value: nil, problem: "is required when handler.type is kafka")
        case "http":
            guard let url = h.url else {
                throw ConfigError(key: r.name("handler.url"), value: nil, problem: "is required when handler.type is http")
            }
            let lower = url.lowercased()
            guard lower.hasPrefix("http://") || lower.hasPrefix("https://"), url.count > "https://".count else {
                throw r.fail("handler.url", "must be an http:// or https:// URL")
            }
            for header in h.headers {
                let parts = header.split(separator: "=", maxSplits: 1)
                guard parts.count == 2, !parts[0].trimmingSpaces().isEmpty, !parts[0].contains(" ") else {
                    throw ConfigError(key: r.name("handler.headers"), value: "***", problem: "each header must be NAME=VALUE, NAME=env:VAR or NAME=file:PATH")
                }
            }
            if (h.tlsCertFile == nil) != (h.tlsKeyFile == nil) {
                throw ConfigError(key: r.name(h.tlsCertFile == nil ? "handler.tls_cert_file" : "handler.tls_key_file"), value: nil,
                                  problem: "is required when \(h.tlsCertFile == nil ? "handler.tls_key_file" : "handler.tls_cert_file") is set")
            }
        case "exec" where h.command == nil:
            throw ConfigError(key: r.name("handler.command"), value: nil, problem: "is required when handler.type is exec")
        default:
            break
        }
    }

    /// The dedup and handler keys of one route: the top level (`r` without a prefix) or a named
    /// route (`r` reading `routes.<name>.` first, then the top level).
    static func parseRoute(_ r: Reader) throws(ConfigError) -> (dedup: DedupSettings, handler: HandlerSettings) {
        let templateText = try r.string("dedup.key")
        let template: KeyTemplate
        do { template = try KeyTemplate(templateText) } catch {
            throw r.fail("dedup.key", "\(error)")
        }
        let window = try r.duration("dedup.window")
        let retention = try r.duration("dedup.retention")
        let lease = try r.optionalDuration("dedup.lease")
        if retention < window {
            throw r.fail("dedup.retention", "must be at least dedup.window (\(Self.format(window)))")
        }
        if let lease, lease <= window {
            throw r.fail("dedup.lease", "must be longer than dedup.window (\(Self.format(window))) plus handler time")
        }
        var namespace = try r.string("dedup.namespace")
        if let route = r.routeName, r.values[r.name("dedup.namespace")] == nil { namespace = route }
        guard !namespace.isEmpty, !namespace.contains(":") else {
            throw r.fail("dedup.namespace", "must be non-empty and contain no ':'")
        }
        var dedup = DedupSettings(
            template: template, namespace: namespace, window: window, retention: retention, lease: lease,
            keep: KeepPolicy(rawValue: try r.choice("dedup.keep"))!)
        if let tokenText = r.optional("dedup.token") {
            do { dedup.token = try KeyTemplate(tokenText) } catch {
                throw r.fail("dedup.token", "\(error)")
            }
        }
        let handler = HandlerSettings(
            type: try r.choice("handler.type"),
            output: try r.string("handler.output"),
            topic: r.optional("handler.topic"),
            url: r.optional("handler.url"),
            command: r.optional("handler.command"),
            headers: r.optional("handler.headers") == nil ? [] : try r.list("handler.headers"),
            tlsCAFile: r.optional("handler.tls_ca_file"),
            tlsCertFile: r.optional("handler.tls_cert_file"),
            tlsKeyFile: r.optional("handler.tls_key_file"),
            timeout: try r.duration("handler.timeout"),
            maxElapsed: try r.duration("handler.max_elapsed"),
            concurrency: try r.count("handler.concurrency"),
            maxAttempts: try r.count("handler.max_attempts"),
            backoff: Backoff(initial: try r.duration("handler.backoff"), maximum: .seconds(5)))
        try validateHandler(handler, r: r)
        return (dedup, handler)
    }

    /// The named routes, each with the worker-wide settings of `defaults` (size and buffer
    /// bounds, dead-letter holding) and its own dedup and handler keys.
    static func parseRoutes(_ r: Reader, defaults: DedupSettings) throws(ConfigError) -> [RouteConfiguration] {
        let names = r.optional("routes") == nil ? [] : try r.list("routes")
        for (key, value) in r.values {
            guard let (route, _) = ConfigSchema.splitRouteKey(key), !names.contains(route) else { continue }
            throw ConfigError(key: key, value: nil, origin: value.origin, problem: "route \"\(route)\" is not in routes (\(names.joined(separator: ", ")))")
        }
        var seen: Set<String> = []
        var routes: [RouteConfiguration] = []
        for name in names {
            guard !name.isEmpty, name.unicodeScalars.allSatisfy({ $0.isASCII && ($0.properties.isAlphabetic || ("0"..."9").contains($0) || $0 == "_" || $0 == "-") }) else {
                throw r.fail("routes", "route name \"\(name)\" must be letters, digits, _ or -")
            }
            guard name != "default" else { throw r.fail("routes", "\"default\" is the top-level route; give this route another name") }
            guard seen.insert(name).inserted else { throw r.fail("routes", "route \"\(name)\" is named twice") }
            let rr = Reader(values: r.values, routeName: name)
            let match: RouteMatch
            do {
                match = try RouteMatch(
                    topic: rr.values[rr.name("match.topic")]?.text, header: rr.values[rr.name("match.header")]?.text,
                    json: rr.values[rr.name("match.json")]?.text)
            } catch {
                let key = error.text.isEmpty ? "match" : error.text.first == "/" ? "match.json" : "match.header"
                throw ConfigError(key: rr.name(key), value: error.text.isEmpty ? nil : error.text,
                                  origin: rr.values[rr.name(key)]?.origin, problem: error.problem)
            }
            var (dedup, handler) = try parseRoute(rr)
            dedup.maxMessageBytes = defaults.maxMessageBytes
            dedup.bufferMaxMessages = defaults.bufferMaxMessages
            dedup.bufferMaxBytes = defaults.bufferMaxBytes
            dedup.holdsDeadLetters = defaults.holdsDeadLetters
            routes.append(RouteConfiguration(name: name, match: match, dedup: dedup, handler: handler))
        }
        return routes
    }

    /// The engine's view of the routes.
    public var routing: Routing {
        Routing(routes: routes.map { Route(name: $0.name, match: $0.match, settings: $0.dedup) }, unmatched: unmatched)
    }

    /// Some route uses tokens (token mode), so each pass has a token round trip.
    public var usesTokens: Bool { dedup.token != nil || routes.contains { $0.dedup.token != nil } }

    /// Handler settings by route index (0: the default route), as `Dispatch.route` counts.
    public var handlersByRoute: [HandlerSettings] { [handler] + routes.map(\.handler) }

    /// `90s` → `1m30s`, `0.5s` → `500ms`: durations printed the way they are written.
    public static func format(_ d: Duration) -> String {
        var ms = d.milliseconds
        if ms == 0 { return "0s" }
        if ms % 1000 != 0 && ms < 1000 { return "\(ms)ms" }
        var out = ""
        for (unit, size) in [("h", Int64(3_600_000)), ("m", 60_000), ("s", 1000)] where ms >= size {
            out += "\(ms / size)\(unit)"
            ms %= size
        }
        if ms > 0 { out += "\(ms)ms" }
        return out
    }

    /// Reads typed values with errors naming the key. A route's reader reads `routes.<name>.KEY`
    /// first and falls back to the top-level KEY, then its default.
    struct Reader {
        let values: [String: ConfigValue]
        var routeName: String? = nil

        /// The full name of `key` as this reader sees it, for messages.
        func name(_ key: String) -> String { routeName.map { "routes.\($0).\(key)" } ?? key }

        func raw(_ key: String) -> ConfigValue? {
            if routeName != nil, let v = values[name(key)] { return v }
            if let v = values[key] { return v }
            if let d = ConfigSchema.byName[key]?.defaultValue { return ConfigValue(d, origin: "default") }
            return nil
        }
        func optional(_ key: String) -> String? {
            guard let v = raw(key)?.text, !v.isEmpty else { return nil }
            return v
        }
        func string(_ key: String) throws(ConfigError) -> String {
            raw(key)?.text ?? ""
        }
        func required(_ key: String) throws(ConfigError) -> String {
            guard let v = optional(key) else {
                throw ConfigError(key: key, value: nil, problem: "is required (set it in the file, as \(ConfigSchema.byName[key]!.environmentName), or by flag)")
            }
            return v
        }
        func list(_ key: String) throws(ConfigError) -> [String] {
            try required(key).split(separator: ",").map { $0.trimmingSpaces() }.filter { !$0.isEmpty }
        }
        func fail(_ key: String, _ problem: String) -> ConfigError {
            let v = raw(key)
            // A route's error names the route's key when the route set it, else the inherited one.
            let named = routeName != nil && values[name(key)] != nil ? name(key) : key
            return ConfigError(key: named, value: v?.text, origin: v?.origin, problem: problem)
        }
        func choice(_ key: String) throws(ConfigError) -> String {
            let v = try string(key)
            guard case .choice(let allowed) = ConfigSchema.byName[key]!.kind, allowed.contains(v) else {
                guard case .choice(let allowed) = ConfigSchema.byName[key]!.kind else { return v }
                throw fail(key, "must be one of: \(allowed.joined(separator: ", "))")
            }
            return v
        }
        func duration(_ key: String, allowZero: Bool = false) throws(ConfigError) -> Duration {
            guard let text = optional(key), let d = DurationParser.parse(text) else {
                throw fail(key, "must be a duration such as 500ms, 2s, 5m, 24h")
            }
            if d <= .zero && !allowZero { throw fail(key, "must be greater than 0") }
            return d
        }
        func optionalDuration(_ key: String) throws(ConfigError) -> Duration? {
            guard optional(key) != nil else { return nil }
            return try duration(key)
        }
        func count(_ key: String) throws(ConfigError) -> Int {
            guard let text = optional(key), let n = Int(text.replacingUnderscores()), n > 0 else {
                throw fail(key, "must be a whole number greater than 0")
            }
            return n
        }
        func size(_ key: String) throws(ConfigError) -> Int {
            guard let text = optional(key), let n = SizeParser.parse(text), n > 0 else {
                throw fail(key, "must be a size such as 65536, 512KiB, 64MiB")
            }
            return n
        }
    }
}

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

extension ConfigSchema {
    /// Rejects keys dedupd does not know, naming the nearest known one.
    static func rejectUnknownKeys(_ merged: [String: ConfigValue]) throws(ConfigError) {
        for (name, value) in merged where byName[name] == nil {
            if name.hasPrefix(kafkaPropertiesPrefix), name.count > kafkaPropertiesPrefix.count { continue }
            var problem = "unknown key"
            if let (route, key) = splitRouteKey(name) {
                if routeKeysByName[key] != nil { continue }
                if let near = nearest(to: key, in: routeKeys) { problem += "; did you mean routes.\(route).\(near)?" }
            } else if let near = nearest(to: name) {
                problem += "; did you mean \(near)?"
            }
            throw ConfigError(key: name, value: nil, origin: value.origin, problem: problem)
        }
    }

    /// The known key closest to a misspelt one (edit distance), if it is close enough to be a typo.
    public static func nearest(to name: String, in candidates: [ConfigKey] = keys) -> String? {
        let scored = candidates.map { ($0.name, editDistance(name, $0.name)) }.min { $0.1 < $1.1 }
        guard let (best, d) = scored, d <= max(3, name.count / 3) else { return nil }
        return best
    }

    static func editDistance(_ a: String, _ b: String) -> Int {
        let a = Array(a.utf8), b = Array(b.utf8)
        var prev = Array(0...b.count)
        for i in 1...max(1, a.count) where !a.isEmpty {
            var cur = [i] + Array(repeating: 0, count: b.count)
            for j in 1...max(1, b.count) where !b.isEmpty {
                cur[j] = Swift.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1))
            }
            prev = cur
        }
        return a.isEmpty ? b.count : prev[b.count]
    }

    /// Whether a redis:// URL carries a password (`user:password@` or `:password@`).
    public static func urlHasPassword(_ url: String) -> Bool { !passwordInURL(url).isEmpty }

    static func passwordInURL(_ url: String) -> String {
        guard let schemeEnd = url.range(of: "://"), let at = url.range(of: "@", options: .backwards),
            at.lowerBound > schemeEnd.upperBound
        else { return "" }
        let userinfo = url[schemeEnd.upperBound..<at.lowerBound]
        guard let colon = userinfo.firstIndex(of: ":") else { return "" }
        return String(userinfo[userinfo.index(after: colon)...])
    }

    /// Hides the password in a redis:// URL.
    public static func redact(_ url: String) -> String {
        guard let schemeEnd = url.range(of: "://"), let at = url.range(of: "@", options: .backwards),
            at.lowerBound > schemeEnd.upperBound
        else { return url }
        let userinfo = url[schemeEnd.upperBound..<at.lowerBound]
        let user = userinfo.split(separator: ":", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init) ?? ""
        let redactedInfo = userinfo.contains(":") ? "\(user):***" : "***"
        return url[..<schemeEnd.upperBound] + redactedInfo + url[at.lowerBound...]
    }
}

/// The `redis.tls.*` keys, checked with `redis.url`: a `redis://` or `rediss://` URL, TLS files
/// only with `rediss://`, a client certificate with its key, and files that exist.
public struct RedisTLSSettings: Sendable, Equatable {
    public var caFile: String?
    public var certFile: String?
    public var keyFile: String?
    public var serverName: String?

    public init(caFile: String? = nil, certFile: String? = nil, keyFile: String? = nil, serverName: String? = nil) {
        self.caFile = caFile
        self.certFile = certFile
        self.keyFile = keyFile
        self.serverName = serverName
    }

    init(_ r: WorkerConfiguration.Reader, url: String) throws(ConfigError) {
        let lower = url.lowercased()
        guard lower.hasPrefix("redis://") || lower.hasPrefix("rediss://") else {
            throw ConfigError(key: "redis.url", value: ConfigSchema.redact(url), origin: r.values["redis.url"]?.origin,
                              problem: "must look like redis://[user:password@]host:port/db, or rediss://... for TLS")
        }
        caFile = r.optional("redis.tls.ca_file")
        certFile = r.optional("redis.tls.cert_file")
        keyFile = r.optional("redis.tls.key_file")
        serverName = r.optional("redis.tls.server_name")
        let given: [(String, String?)] = [
            ("redis.tls.ca_file", caFile), ("redis.tls.cert_file", certFile), ("redis.tls.key_file", keyFile),
            ("redis.tls.server_name", serverName),
        ]
        if !lower.hasPrefix("rediss://"), let (key, _) = given.first(where: { $0.1 != nil }) {
            throw r.fail(key, "is set but redis.url is not a rediss:// (TLS) URL")
        }
        if (certFile == nil) != (keyFile == nil) {
            let missing = certFile == nil ? "redis.tls.cert_file" : "redis.tls.key_file"
            throw ConfigError(key: missing, value: nil, problem: "is required when \(certFile == nil ? "redis.tls.key_file" : "redis.tls.cert_file") is set")
        }
        for (key, path) in given.prefix(3) {
            if let path, access(path, R_OK) != 0 {
                throw r.fail(key, "cannot read the file")
            }
        }
    }
}

public enum DurationParser {
    /// `250ms`, `2s`, `1.5s`, `5m`, `24h`, `7d`, `1h30m`, and `0`.
    public static func parse(_ text: String) -> Duration? {
        let s = text.trimmingSpaces()
        if s == "0" { return .zero }
        var total = 0.0
        var number = ""
        var unit = ""
        var sawAny = false
        func flush() -> Bool {
            guard let n = Double(number) else { return false }
            let scale: Double
            switch unit {
            case "ms": scale = 0.001
            case "s": scale = 1
            case "m": scale = 60
            case "h": scale = 3600
            case "d": scale = 86400
            default: return false
            }
            total += n * scale
            number = ""
            unit = ""
            sawAny = true
            return true
        }
        for c in s {
            if c.isNumber || c == "." {
                if !unit.isEmpty { guard flush() else { return nil } }
                number.append(c)
            } else if c.isLetter {
                guard !number.isEmpty else { return nil }
                unit.append(c)
            } else {
                return nil
            }
        }
        guard !number.isEmpty, flush(), sawAny else { return nil }
        return .milliseconds(Int64((total * 1000).rounded()))
    }
}

public enum SizeParser {
    /// `65536`, `512KiB`, `64MiB`, `1GiB`, also `KB`/`MB`/`GB` (decimal).
    public static func parse(_ text: String) -> Int? {
        let s = text.trimmingSpaces().replacingUnderscores()
        let digits = s.prefix { $0.isNumber }
        guard let n = Int(digits) else { return nil }
        let unit = s.dropFirst(digits.count).lowercased()
        let scale: Int
        switch unit {
        case "", "b": scale = 1
        case "kib", "k": scale = 1 << 10
        case "mib", "m": scale = 1 << 20
        case "gib", "g": scale = 1 << 30
        case "kb": scale = 1000
        case "mb": scale = 1_000_000
        case "gb": scale = 1_000_000_000
        default: return nil
        }
        return n * scale
    }
}

extension StringProtocol {
    func trimmingSpaces() -> String {
        String(self.drop { $0.isWhitespace }.reversed().drop { $0.isWhitespace }.reversed())
    }
    func replacingUnderscores() -> String { String(self.filter { $0 != "_" }) }
}
