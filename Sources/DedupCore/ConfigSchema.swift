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
              doc: "Static membership id (group.instance.id), e.g. the pod name: a restarted worker takes its place back without a rebalance. Passed to librdkafka as is; needs stable names (a StatefulSet) and a broker that supports it, and a static member does not leave the group on shutdown (its partitions wait for session.timeout.ms)."),
        .init(name: "kafka.rebalance", kind: .choice(RebalanceMode.allCases.map(\.rawValue)), defaultValue: "cooperative",
              doc: "cooperative: incremental rebalancing (partition.assignment.strategy cooperative-sticky): a worker keeps the partitions it retains, with their window, claims and pause, and only partitions that move are revoked. eager: every rebalance revokes every partition of every worker (range,roundrobin). Every worker of a group must use the same protocol: see docs/operations.md for moving a running group from eager to cooperative."),
        .init(name: "redis.url", kind: .secret, defaultValue: "redis://127.0.0.1:6379/0",
              doc: "redis://[user:password@]host:port/db of the seen-set; rediss:// for TLS (see redis.tls.*). In cluster mode: redis://[user:password@]host:port[,host:port...], seed nodes of the cluster, no db. In sentinel mode: redis://[user:password@]host:port[,host:port...]/db, the Sentinels; user, password, db and scheme are the primary's."),
        .init(name: "redis.mode", kind: .choice(["standalone", "cluster", "sentinel"]), defaultValue: "standalone",
              doc: "standalone: one Redis server (or a primary behind a failover address). cluster: a Redis Cluster; keys go to the primary serving their slot, MOVED and ASK are followed. sentinel: a primary watched by Redis Sentinel; the Sentinels in redis.url are asked where it is at every connect, so a failover is followed."),
        .init(name: "redis.sentinel_master", kind: .string, defaultValue: nil,
              doc: "sentinel mode: the name the Sentinels monitor the primary under (their `sentinel monitor <name> ...` line). Required with redis.mode: sentinel."),
        .init(name: "redis.sentinel_username", kind: .string, defaultValue: nil,
              doc: "sentinel mode: the ACL user dedupd authenticates as at the Sentinels, with redis.sentinel_password. It needs one command: `+sentinel|get-master-addr-by-name`."),
        .init(name: "redis.sentinel_password", kind: .secret, defaultValue: nil,
              doc: "sentinel mode: the Sentinels' own password (their requirepass, or redis.sentinel_username's), when it is not the primary's; best given as DEDUPD_REDIS_SENTINEL_PASSWORD or through redis.sentinel_password_file. Unset: the Sentinels are offered the primary's user and password, which a Sentinel without a password ignores."),
        .init(name: "redis.sentinel_password_file", kind: .string, defaultValue: nil,
              doc: "sentinel mode: file holding redis.sentinel_password; one trailing newline is ignored."),
        .init(name: "redis.wait_replicas", kind: .string, defaultValue: "0",
              doc: "After each batch's confirms, wait until this many replicas of each primary written to have them (WAIT), so a failover cannot lose them; 0 does not wait. Costs the replication delay on every confirm."),
        .init(name: "redis.wait_timeout", kind: .duration, defaultValue: "100ms",
              doc: "Longest wait for redis.wait_replicas per batch; when fewer replicas answer in time the batch goes on and a warning is logged."),
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
        .init(name: "dedup.layout", kind: .choice(DedupSettings.LayoutKind.allCases.map(\.rawValue)), defaultValue: "compact",
              doc: "How done records are kept in Redis. compact: a 12-byte digest field in a time-bucketed hash (~20 B per remembered id; kept at least dedup.retention, at most one slot longer); keys: one string key per id (~180 B), the layout of 0.1.0. Switch with a stop-and-start of the group, not a rolling restart (docs/operations.md)."),
        .init(name: "dedup.compact.buckets", kind: .count, defaultValue: "8192",
              doc: "compact layout: hashes per slot and route, a power of two from 64. Size it so one slot's unique ids / buckets stays under ~100 (Redis keeps a hash of up to 128 fields as a listpack): unique ids per second × retention / dedup.compact.slots / 100."),
        .init(name: "dedup.compact.slots", kind: .count, defaultValue: "1",
              doc: "compact layout: slots per retention. A slot is retention / slots long; a done record lives at least dedup.retention and at most one slot (+30s) more; a claim looks in slots + 1 buckets (each one more lookup in Redis per claim; docs/performance.md has the cost)."),
        .init(name: "dedup.compact.read_keys_layout", kind: .choice(["true", "false"]), defaultValue: "true",
              doc: "compact layout: also recognise done records written by the keys layout (the pending claim then lives at that layout's key, dedupd:<namespace>:<key>). Turn off once dedup.retention has passed since the switch; always off with redis.mode: cluster."),
        .init(name: "dedup.token", kind: .string, defaultValue: nil,
              doc: "Token mode: where a message's one-time token is, e.g. header:form-token. Only a message whose token was issued (dedupd token issue) and not yet used is dispatched; unknown, expired and reused tokens are bad input."),
        .init(name: "dedup.keep", kind: .choice(KeepPolicy.allCases.map(\.rawValue)), defaultValue: "first",
              doc: "first: dispatch the first copy; last: dispatch the newest copy seen within the window."),
        .init(name: "guard.entity", kind: .string, defaultValue: nil,
              doc: "Guard: which entity a message is about, a key template such as json:/orderNo. Setting it turns the guard on (with guard.state, guard.initial, guard.transitions): a unique message is dispatched only if its entity's recorded state allows the state it asks for. Routes do not inherit the top-level guard; set it under the route."),
        .init(name: "guard.state", kind: .string, defaultValue: nil,
              doc: "Guard: the state the message asks its entity to enter, a key template such as json:/status."),
        .init(name: "guard.initial", kind: .list, defaultValue: nil,
              doc: "Guard: states an entity with no recorded state may enter, e.g. [created]."),
        .init(name: "guard.transitions", kind: .string, defaultValue: nil,
              doc: "Guard: from each state, the states allowed next. In the file a mapping, e.g. {created: [paid, cancelled], paid: [shipped, refunded]}; as one value (environment, flags): created=paid|cancelled;paid=shipped|refunded."),
        .init(name: "guard.on_reject", kind: .choice(EntityGuard.OnReject.allCases.map(\.rawValue)), defaultValue: "drop",
              doc: "Guard: a message whose transition is not allowed is never dispatched. drop: counted and logged; dead_letter: also sent to dead_letter.topic with reason rejected_transition."),
        .init(name: "guard.retention", kind: .duration, defaultValue: nil,
              doc: "Guard: how long an entity's state is kept after its last move. Default: dedup.retention."),
        .init(name: "dedup.on_store_error", kind: .choice(["fail_closed", "fail_open"]), defaultValue: "fail_closed",
              doc: "fail_closed: while Redis is unreachable, pause and dispatch nothing unclaimed; fail_open: dispatch without a claim (dedup by the window only)."),
        .init(name: "dedup.max_message_bytes", kind: .size, defaultValue: "1MiB",
              doc: "Larger messages are bad input (counted and logged, not dispatched)."),
        .init(name: "buffer.max_messages", kind: .count, defaultValue: "100000",
              doc: "Bound on the messages the worker holds (in the window, and being claimed, dispatched or confirmed); when reached the consumer pauses until half drained."),
        .init(name: "buffer.max_bytes", kind: .size, defaultValue: "64MiB", doc: "Bound on the bytes of the messages the worker holds (in the window, and being claimed, dispatched or confirmed): each counts its value, key and headers plus \(InboundMessage.bookkeepingBytes) bytes of bookkeeping. When reached the consumer pauses until half drained; the worker's resident set stays under 64 MiB + this. A buffer smaller than the default also shortens librdkafka's prefetch queue to what it could hold (queued.min.messages, see Kafka defaults)."),
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
              doc: "http handler: extra request headers, NAME=VALUE[,NAME=VALUE]; a VALUE of env:VAR or file:PATH is read from that environment variable or file at start (for Authorization and API keys)."),
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
              doc: "On SIGTERM/SIGINT: how long the worker may take to stop. For the first half the window keeps running (what becomes due is dispatched, not left for the next owner to read again); handlers still running at the end are cancelled."),
        .init(name: "log.level", kind: .choice(LogLevel.allCases.map(\.rawValue)),
              defaultValue: "info", doc: "Operational log level (stderr)."),
        .init(name: "log.format", kind: .choice(LogFormat.allCases.map(\.rawValue)), defaultValue: "logfmt",
              doc: "Operational log format (stderr)."),
        .init(name: "log.stats_interval", kind: .duration, defaultValue: "10s",
              doc: "How often a stats line is logged; 0 turns it off."),
        .init(name: "http.port", kind: .count, defaultValue: nil,
              doc: "Port of the HTTP endpoint serving /metrics (Prometheus), /healthz and /readyz; unset: no HTTP server."),
        .init(name: "http.bind", kind: .string, defaultValue: "::",
              doc: "Address the HTTP endpoint listens on. :: is every IPv6 and IPv4 address (dual stack; 0.0.0.0 when the host has no IPv6); 0.0.0.0 every IPv4 address; or one address such as 127.0.0.1 or ::1."),
        .init(name: "http.loop_stall_timeout", kind: .duration, defaultValue: "30s",
              doc: "/healthz answers 503, and the stall watchdog exits 70, once the worker loop has not completed a pass, or no task has run on the pool where handlers run, for this long."),
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
        "dedup.layout", "dedup.compact.buckets", "dedup.compact.slots", "dedup.compact.read_keys_layout",
        "handler.type", "handler.output", "handler.topic", "handler.url", "handler.command", "handler.timeout",
        "handler.headers", "handler.tls_ca_file", "handler.tls_cert_file", "handler.tls_key_file",
        "handler.max_elapsed", "handler.concurrency", "handler.max_attempts", "handler.backoff",
        "guard.entity", "guard.state", "guard.initial", "guard.transitions", "guard.on_reject", "guard.retention",
    ]

    public static let routeKeysByName: [String: ConfigKey] = Dictionary(uniqueKeysWithValues: routeKeys.map { ($0.name, $0) })

    /// `routes.payments.dedup.window` → (`payments`, `dedup.window`); nil for other keys.
    public static func splitRouteKey(_ name: String) -> (route: String, key: String)? {
        guard name.hasPrefix("routes.") else { return nil }
        let rest = name.dropFirst("routes.".count)
        guard let dot = rest.firstIndex(of: ".") else { return nil }
        return (String(rest[..<dot]), String(rest[rest.index(after: dot)...]))
    }

    /// The file's `guard.transitions` mapping flattens to one key per state under this prefix
    /// (`guard.transitions.created`), the state names as written.
    public static let guardTransitionsPrefix = "guard.transitions."

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

/// A certificate or key file that its client cannot load: the setting that names it
/// (`redis.tls.ca_file`, `handler.tls_key_file`, ...), the file, and why.
public struct TLSFileProblem: Error, Sendable {
    public var setting: String
    public var file: String
    public var reason: String

    public init(setting: String, file: String, reason: String) {
        self.setting = setting
        self.file = file
        self.reason = reason
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

extension ConfigSchema {
    /// Rejects keys dedupd does not know, naming the nearest known one.
    static func rejectUnknownKeys(_ merged: [String: ConfigValue]) throws(ConfigError) {
        for (name, value) in merged where byName[name] == nil {
            if name.hasPrefix(kafkaPropertiesPrefix), name.count > kafkaPropertiesPrefix.count { continue }
            if name.hasPrefix(guardTransitionsPrefix), name.count > guardTransitionsPrefix.count { continue }
            var problem = "unknown key"
            if let (route, key) = splitRouteKey(name) {
                if routeKeysByName[key] != nil { continue }
                if key.hasPrefix(guardTransitionsPrefix), key.count > guardTransitionsPrefix.count { continue }
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

    /// A value as dedupd shows it (`check-config`, errors): a secret as `***`, the password in
    /// `redis.url` hidden.
    public static func shown(_ key: String, _ text: String) -> String {
        guard byName[key]?.kind == .secret else { return text }
        return key == "redis.url" ? redact(text) : "***"
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

extension ConfigSchema {
    // A key's default as a typed value, for the initializers whose parameters default to it: each
    // default is written once, in `keys`.

    public static func defaultText(_ key: String) -> String { byName[key]!.defaultValue! }
    public static func defaultDuration(_ key: String) -> Duration { DurationParser.parse(defaultText(key))! }
    public static func defaultSize(_ key: String) -> Int { SizeParser.parse(defaultText(key))! }
    public static func defaultCount(_ key: String) -> Int { Int(defaultText(key).replacingUnderscores())! }
}
