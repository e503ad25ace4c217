/// The parsed, validated configuration of a worker.
public struct WorkerConfiguration: Sendable {
    public var bootstrapServers: String
    public var topics: [String]
    public var group: String
    public var groupInstanceID: String?
    /// `kafka.rebalance`. Default: cooperative.
    public var rebalance: RebalanceMode = .cooperative
    public var kafkaProperties: [String: String]
    /// Where the seen-set is and how to reach it (`redis.url`, `redis.mode`, credentials, TLS).
    public var redis: RedisAccess
    /// `redis.wait_replicas` (0: no WAIT) and `redis.wait_timeout`.
    public var redisWaitReplicas = 0
    public var redisWaitTimeout: Duration = .milliseconds(100)
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
    public var logLevel: LogLevel
    public var logFormat: LogFormat
    public var statsInterval: Duration
    public var httpPort: Int?
    public var loopStallTimeout: Duration
    /// `http.bind`: an IPv4 or IPv6 address; `::` is dual stack.
    public var httpBind: String = "::"

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
        rebalance = RebalanceMode(rawValue: try r.choice("kafka.rebalance"))!
        try rebalance.check(assignmentStrategy: props[RebalanceMode.strategyProperty], origin: merged[ConfigSchema.kafkaPropertiesPrefix + RebalanceMode.strategyProperty]?.origin)
        redis = try RedisAccess(r)
        guard let replicas = Int(try r.string("redis.wait_replicas")), (0...64).contains(replicas) else {
            throw r.fail("redis.wait_replicas", "must be a whole number from 0 to 64")
        }
        redisWaitReplicas = replicas
        redisWaitTimeout = try r.duration("redis.wait_timeout")
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
        if failOpen, let guarded = ([("", dedup)] + routes.map { ("routes.\($0.name).", $0.dedup) }).first(where: { $0.1.entityGuard != nil }) {
            throw ConfigError(key: "dedup.on_store_error", value: "fail_open", origin: merged["dedup.on_store_error"]?.origin,
                              problem: "cannot be fail_open with a guard (\(guarded.0)guard.entity): without Redis no transition can be checked")
        }
        if redis.cluster {
            // The keys layout's key has no hash tag, so it cannot share a script with a claim's
            // buckets in a cluster; 0.1.0 had no cluster support, so there is nothing to read.
            for (name, value) in merged where name.hasSuffix("dedup.compact.read_keys_layout") && value.text == "true" {
                throw ConfigError(key: name, value: value.text, origin: value.origin,
                                  problem: "must be false with redis.mode: cluster (the keys layout's keys have no hash tag)")
            }
            dedup.readsKeysLayout = false
            for i in routes.indices { routes[i].dedup.readsKeysLayout = false }
        }
        stopWhenIdle = try r.optionalDuration("run.stop_when_idle")
        shutdownDeadline = try r.duration("run.shutdown_deadline")
        logLevel = LogLevel(rawValue: try r.choice("log.level"))!
        logFormat = LogFormat(rawValue: try r.choice("log.format"))!
        statsInterval = try r.duration("log.stats_interval", allowZero: true)
        httpPort = try r.optional("http.port").map { _ throws(ConfigError) in try r.count("http.port") }
        if let port = httpPort, port > 65535 { throw r.fail("http.port", "must be a port number from 1 to 65535") }
        loopStallTimeout = try r.duration("http.loop_stall_timeout")
        httpBind = try r.string("http.bind").trimmingSpaces()
        if httpBind.hasPrefix("[") && httpBind.hasSuffix("]") { httpBind = String(httpBind.dropFirst().dropLast()) }
        guard httpBind.contains(":") || httpBind.split(separator: ".", omittingEmptySubsequences: false)
            .map({ UInt8($0) }).filter({ $0 != nil }).count == 4 else {
            throw r.fail("http.bind", "must be an IPv4 or IPv6 address such as 0.0.0.0, ::, 127.0.0.1 or ::1")
        }
    }

    /// The handler kind with what it needs; a key another kind needs is not an error (switching
    /// `handler.type` back and forth keeps working).
    static func parseHandlerKind(_ r: Reader) throws(ConfigError) -> HandlerSettings.Kind {
        func required(_ key: String, _ type: String) throws(ConfigError) -> String {
            guard let value = r.optional(key) else {
                throw ConfigError(key: r.name(key), value: nil, problem: "is required when handler.type is \(type)")
            }
            return value
        }
        switch try r.choice("handler.type") {
        case "kafka": return .kafka(topic: try required("handler.topic", "kafka"))
        case "http": return .http(url: try required("handler.url", "http"))
        case "exec": return .exec(command: try required("handler.command", "exec"))
        default: return .log(output: try r.string("handler.output"))
        }
    }

    static func validateHandler(_ h: HandlerSettings, r: Reader) throws(ConfigError) {
        switch h.kind {
        case .http(let url):
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
        case .log, .kafka, .exec:
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
        dedup.layout = DedupSettings.LayoutKind(rawValue: try r.choice("dedup.layout"))!
        dedup.compactBuckets = try r.count("dedup.compact.buckets")
        dedup.compactSlots = try r.count("dedup.compact.slots")
        dedup.readsKeysLayout = try r.choice("dedup.compact.read_keys_layout") == "true"
        if case .compact(let records) = dedup.doneLayout, let (key, problem) = records.problem() {
            throw r.fail(key, problem)
        }
        if let tokenText = r.optional("dedup.token") {
            do { dedup.token = try KeyTemplate(tokenText) } catch {
                throw r.fail("dedup.token", "\(error)")
            }
        }
        dedup.entityGuard = try parseGuard(r, dedup: dedup)
        let handler = HandlerSettings(
            kind: try parseHandlerKind(r),
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

    /// The route's guard (`guard.*`), nil when `guard.entity` is not set. A route's guard is its
    /// own: keys are read under the route only, never inherited from the top level.
    static func parseGuard(_ r: Reader, dedup: DedupSettings) throws(ConfigError) -> EntityGuard? {
        let g = Reader(values: r.values, routeName: r.routeName, inherits: false)
        let prefix = r.routeName.map { "routes.\($0)." } ?? ""
        let tableKeys = r.values.keys.filter { $0.hasPrefix(prefix + ConfigSchema.guardTransitionsPrefix) }.sorted()
        guard g.optional("guard.entity") != nil else {
            for key in ["guard.state", "guard.initial", "guard.transitions", "guard.retention"] where g.optional(key) != nil {
                throw g.fail(key, "has no effect without guard.entity (the guard is off)")
            }
            if let key = tableKeys.first {
                throw ConfigError(key: key, value: nil, origin: r.values[key]?.origin, problem: "has no effect without guard.entity (the guard is off)")
            }
            return nil
        }
        func template(_ key: String) throws(ConfigError) -> KeyTemplate {
            guard let text = g.optional(key) else { throw g.fail(key, "is required when guard.entity is set") }
            do { return try KeyTemplate(text) } catch { throw g.fail(key, "\(error)") }
        }
        let entity = try template("guard.entity"), state = try template("guard.state")
        let initial = g.optional("guard.initial") == nil ? [] : try g.list("guard.initial")
        var transitions: [String: Set<String>] = [:]
        var tableOrigin = r.values[g.name("guard.transitions")]?.origin
        if let text = g.optional("guard.transitions") {
            guard let parsed = EntityGuard.parseTransitions(text) else {
                throw g.fail("guard.transitions", "must be a mapping (in the file) or FROM=TO|TO;FROM=TO (one value), e.g. created=paid|cancelled;paid=shipped")
            }
            transitions = parsed
        }
        for key in tableKeys {
            let from = String(key.dropFirst(prefix.count + ConfigSchema.guardTransitionsPrefix.count))
            let value = r.values[key]!
            tableOrigin = tableOrigin ?? value.origin
            transitions[from, default: []].formUnion(
                value.text.split(separator: ",").map { $0.trimmingSpaces() }.filter { !$0.isEmpty })
        }
        let onReject = EntityGuard.OnReject(rawValue: try g.choice("guard.on_reject"))!
        let rule = EntityGuard(
            entity: entity, state: state, initial: Set(initial), transitions: transitions, onReject: onReject,
            retention: try g.optionalDuration("guard.retention") ?? dedup.retention)
        if let (key, problem) = rule.problem() {
            if key == "guard.transitions" {
                throw ConfigError(key: g.name(key), value: nil, origin: tableOrigin ?? r.values[g.name("guard.entity")]?.origin, problem: problem)
            }
            throw g.fail(key, problem)
        }
        if CompactRecords.millis(rule.retention) / Int64(max(1, dedup.compactSlots)) < 1000 {
            throw g.fail("guard.retention", "makes slots shorter than 1s (it is cut into dedup.compact.slots slots); use a longer guard.retention")
        }
        if dedup.keep != .first {
            throw g.fail("guard.entity", "needs dedup.keep: first (the guard judges the message the window keeps; with keep: last the state it asks for could change after it was judged)")
        }
        return rule
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
        /// A route's reader falls back to the top-level key; the guard's does not.
        var inherits = true

        /// The full name of `key` as this reader sees it, for messages.
        func name(_ key: String) -> String { routeName.map { "routes.\($0).\(key)" } ?? key }

        func raw(_ key: String) -> ConfigValue? {
            if routeName != nil, let v = values[name(key)] { return v }
            if routeName != nil, !inherits { return ConfigSchema.byName[key]?.defaultValue.map { ConfigValue($0, origin: "default") } }
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
            return ConfigError(key: named, value: v.map { ConfigSchema.shown(key, $0.text) }, origin: v?.origin, problem: problem)
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

/// `kafka.rebalance`: how the consumer group moves partitions.
public enum RebalanceMode: String, Sendable, CaseIterable {
    /// KIP-429 incremental rebalancing: only partitions that move are revoked.
    case cooperative
    /// Every rebalance revokes every partition of every member, then assigns anew.
    case eager

    /// The librdkafka property that picks the assignor, and so the protocol.
    public static let strategyProperty = "partition.assignment.strategy"

    /// The assignor dedupd sets when `kafka.properties` does not name one (eager: librdkafka's
    /// own default).
    public var defaultStrategy: String {
        switch self {
        case .cooperative: "cooperative-sticky"
        case .eager: "range,roundrobin"
        }
    }

    /// A `partition.assignment.strategy` given by hand must speak this protocol: librdkafka
    /// picks the protocol from the assignors, so a mismatch would silently run the other one.
    /// (librdkafka itself refuses a list that mixes cooperative and eager assignors.)
    public func check(assignmentStrategy: String?, origin: String? = nil) throws(ConfigError) {
        guard let assignmentStrategy else { return }
        let names = assignmentStrategy.split(separator: ",").map { $0.trimmingSpaces().lowercased() }
        let cooperativeNames = names.filter { $0 == "cooperative-sticky" }
        let key = ConfigSchema.kafkaPropertiesPrefix + Self.strategyProperty
        switch self {
        case .cooperative where cooperativeNames.count != names.count || names.isEmpty:
            throw ConfigError(
                key: key, value: assignmentStrategy, origin: origin,
                problem: "kafka.rebalance is cooperative, which needs cooperative-sticky (the eager assignors range and roundrobin revoke every partition on every rebalance); remove this property, set it to cooperative-sticky, or set kafka.rebalance: eager")
        case .eager where !cooperativeNames.isEmpty:
            throw ConfigError(
                key: key, value: assignmentStrategy, origin: origin,
                problem: "kafka.rebalance is eager, but cooperative-sticky is a cooperative assignor; remove this property, name eager assignors (range, roundrobin), or set kafka.rebalance: cooperative")
        default:
            return
        }
    }
}
