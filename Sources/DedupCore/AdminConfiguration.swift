import Foundation

/// What the admin commands (`inspect`, `forget`, `dlq replay`) need from the same sources as the
/// worker (file, `DEDUPD_*`, flags): the Redis connection, the namespace and the Kafka connection,
/// without requiring the worker's own required keys.
public struct AdminConfiguration: Sendable {
    /// Where the seen-set is and how to reach it, as the worker reads it.
    public var redis: RedisAccess
    public var namespace: String
    public var bootstrapServers: String?
    public var kafkaProperties: [String: String]
    /// Each configured route's key namespace (`routes.<name>.dedup.namespace`, else the name).
    public var routeNamespaces: [String: String] = [:]
    /// Where the top-level route keeps its done records (`dedup.layout` and its settings).
    public var doneLayout: DoneLayout = .keys
    /// Each configured route's done-record layout.
    public var routeLayouts: [String: DoneLayout] = [:]
    /// Guard: where the top-level route keeps entity states (`DedupSettings.entityRecords`).
    public var entityRecords: CompactRecords
    /// Each configured route's entity records.
    public var routeEntityRecords: [String: CompactRecords] = [:]

    public init(layers: [[String: ConfigValue]]) throws(ConfigError) {
        var merged: [String: ConfigValue] = [:]
        for layer in layers { merged.merge(layer) { _, new in new } }
        try ConfigSchema.rejectUnknownKeys(merged)
        let r = WorkerConfiguration.Reader(values: merged)
        redis = try RedisAccess(r)
        namespace = try r.string("dedup.namespace")
        guard !namespace.isEmpty, !namespace.contains(":") else {
            throw ConfigError(key: "dedup.namespace", value: namespace, problem: "must be non-empty and contain no ':'")
        }
        bootstrapServers = r.optional("kafka.bootstrap_servers")
        var props: [String: String] = [:]
        for (name, value) in merged where name.hasPrefix(ConfigSchema.kafkaPropertiesPrefix) {
            props[String(name.dropFirst(ConfigSchema.kafkaPropertiesPrefix.count))] = value.text
        }
        kafkaProperties = props
        for name in r.optional("routes").map({ _ in (try? r.list("routes")) ?? [] }) ?? [] {
            routeNamespaces[name] = merged["routes.\(name).dedup.namespace"]?.text ?? name
            routeLayouts[name] = try Self.layout(WorkerConfiguration.Reader(values: merged, routeName: name))
            routeEntityRecords[name] = try Self.entityRecords(WorkerConfiguration.Reader(values: merged, routeName: name))
        }
        doneLayout = try Self.layout(r)
        entityRecords = try Self.entityRecords(r)
        if redis.cluster {
            // As the worker reads it: a cluster never holds the keys layout (see WorkerConfiguration).
            func untagged(_ layout: DoneLayout) -> DoneLayout {
                guard case .compact(var records) = layout else { return layout }
                records.readsKeysLayout = false
                return .compact(records)
            }
            doneLayout = untagged(doneLayout)
            routeLayouts = routeLayouts.mapValues(untagged)
        }
    }

    /// Entity records as the worker keeps them: the compact settings with `guard.retention`
    /// (a route's own, never inherited), else `dedup.retention`.
    static func entityRecords(_ r: WorkerConfiguration.Reader) throws(ConfigError) -> CompactRecords {
        let g = WorkerConfiguration.Reader(values: r.values, routeName: r.routeName, inherits: false)
        var retention = try r.duration("dedup.retention")
        if let own = try g.optionalDuration("guard.retention") { retention = own }
        return CompactRecords(
            retention: retention,
            slotsPerRetention: try r.count("dedup.compact.slots"), buckets: try r.count("dedup.compact.buckets"), readsKeysLayout: false)
    }

    /// The layout settings as the worker reads them (the admin commands must find what it wrote).
    static func layout(_ r: WorkerConfiguration.Reader) throws(ConfigError) -> DoneLayout {
        guard try r.choice("dedup.layout") == "compact" else { return .keys }
        let lease: Duration
        if let given = try r.optionalDuration("dedup.lease") { lease = given } else { lease = try r.duration("dedup.window") + .seconds(30) }
        let records = CompactRecords(
            retention: try r.duration("dedup.retention"), slotsPerRetention: try r.count("dedup.compact.slots"),
            buckets: try r.count("dedup.compact.buckets"), readsKeysLayout: try r.choice("dedup.compact.read_keys_layout") == "true", lease: lease)
        if let (key, problem) = records.problem() { throw r.fail(key, problem) }
        return .compact(records)
    }
}
