import DedupCore
import Foundation
import KafkaIO
import RedisIO
import Yams

/// Reads the three configuration sources into one validated `WorkerConfiguration`.
/// Precedence: flags > `DEDUPD_*` environment variables > YAML file > defaults.
public enum ConfigLoader {
    public static func load(
        file: String?,
        environment: [String: String] = ProcessInfo.processInfo.environment,
        flags: [String: String] = [:]
    ) throws -> WorkerConfiguration {
        try resolve(layers(file: file, environment: environment, flags: flags))
    }

    /// The three sources as layers, lowest precedence first.
    public static func layers(
        file: String?,
        environment: [String: String] = ProcessInfo.processInfo.environment,
        flags: [String: String] = [:]
    ) throws(ConfigError) -> [[String: ConfigValue]] {
        var layers: [[String: ConfigValue]] = []
        if let file { layers.append(try fileLayer(path: file)) }
        layers.append(environmentLayer(environment))
        layers.append(flags.mapValues { ConfigValue($0, origin: "flag") })
        return layers
    }

    /// Validates the merged layers completely without connecting anywhere: dedupd's own keys, the
    /// Redis URL and password files, every `kafka.properties.*` entry against librdkafka's own
    /// configuration parser, and the certificates and keys of Redis, Kafka and `http` handlers,
    /// loaded as their clients load them.
    public static func resolve(_ layers: [[String: ConfigValue]]) throws(ConfigError) -> WorkerConfiguration {
        var config = try WorkerConfiguration(layers: layers)
        try resolveRedis(&config.redis, layers: layers)
        guard HTTPEndpoint.isValidBindAddress(config.httpBind) else {
            throw ConfigError(key: "http.bind", value: config.httpBind, origin: origin(of: "http.bind", in: layers),
                              problem: "must be an IPv4 or IPv6 address such as 0.0.0.0, ::, 127.0.0.1 or ::1")
        }
        var properties = config.kafkaProperties
        if let id = config.groupInstanceID { properties["group.instance.id"] = id }
        if let rejected = KafkaConfig.firstRejectedProperty(properties) {
            let key = rejected.name == "group.instance.id" && config.kafkaProperties[rejected.name] == nil
                ? "kafka.group_instance_id" : ConfigSchema.kafkaPropertiesPrefix + rejected.name
            throw ConfigError(key: key, value: rejected.value, origin: origin(of: key, in: layers),
                              problem: "librdkafka rejects it: \(rejected.reason)")
        }
        try validateKafkaFiles(properties, layers: layers)
        try validateHTTPHandlers(config, layers: layers)
        return config
    }

    /// Each `http` handler's TLS files loaded as the handler loads them, a bad one named by the key
    /// of the route that sets it.
    static func validateHTTPHandlers(_ config: WorkerConfiguration, layers: [[String: ConfigValue]]) throws(ConfigError) {
        for (route, h) in zip([nil] + config.routes.map(\.name), config.handlersByRoute) {
            guard case .http = h.kind else { continue }
            do {
                _ = try HTTPHandler.TLS(caFile: h.tlsCAFile, certificateFile: h.tlsCertFile, keyFile: h.tlsKeyFile).load()
            } catch {
                // The route's own key when the route sets it, else the top level's it inherits.
                let routed = route.map { "routes.\($0).\(error.setting)" }
                throw configError(error, key: routed.flatMap { origin(of: $0, in: layers) != nil ? $0 : nil }, layers: layers)
            }
        }
    }

    /// The certificates, keys and keytab that `kafka.properties` names: readable, and loaded by
    /// librdkafka the way a client starting with them would (`KafkaConfig.startRefusal`), so that a
    /// bad one fails here, naming its setting, and not when the worker first connects.
    static func validateKafkaFiles(_ properties: [String: String], layers: [[String: ConfigValue]]) throws(ConfigError) {
        let prefix = ConfigSchema.kafkaPropertiesPrefix
        for name in KafkaConfig.fileProperties {
            guard let path = properties[name], !(name == "ssl.ca.location" && path == "probe") else { continue }
            guard FileManager.default.isReadableFile(atPath: path) else {
                throw ConfigError(key: prefix + name, value: path, origin: origin(of: prefix + name, in: layers), problem: "cannot read the file")
            }
        }
        guard let refusal = KafkaConfig.startRefusal(properties) else { return }
        let key = refusal.name.map { prefix + $0 } ?? "kafka.properties"
        let value = refusal.name.flatMap { name in properties[name].map { KafkaConfig.displayValue(name, $0) } }
        throw ConfigError(key: key, value: value, origin: origin(of: key, in: layers),
                          problem: "librdkafka cannot start a client with it: \(refusal.reason)")
    }

    /// The admin commands' view of the same sources (Redis and Kafka connection, namespace).
    public static func resolveAdmin(_ layers: [[String: ConfigValue]]) throws(ConfigError) -> AdminConfiguration {
        var config = try AdminConfiguration(layers: layers)
        try resolveRedis(&config.redis, layers: layers)
        return config
    }

    /// `redis.url` parsed by the connection's parser, the password files read (so a missing one
    /// fails at start, not at first connect), and the `redis.tls.*` files loaded as a connection
    /// loads them, so that a certificate or key that is not one fails here.
    static func resolveRedis(_ redis: inout RedisAccess, layers: [[String: ConfigValue]]) throws(ConfigError) {
        try validateRedisURL(
            redis.url, cluster: redis.cluster, sentinel: redis.sentinelMaster != nil,
            passwordGivenApart: redis.password != nil || redis.passwordFile != nil, layers: layers)
        if let path = redis.passwordFile {
            redis.password = try readPasswordFile(path, key: "redis.password_file", layers: layers)
        }
        if let path = redis.sentinelPasswordFile {
            redis.sentinelPassword = try readPasswordFile(path, key: "redis.sentinel_password_file", layers: layers)
        }
        if let problem = RedisTLSOptions(redis.tls).fileProblem() { throw configError(problem, layers: layers) }
    }

    /// A file that does not load, under `key` (default: the problem's own setting).
    static func configError(_ problem: TLSFileProblem, key: String? = nil, layers: [[String: ConfigValue]]) -> ConfigError {
        let key = key ?? problem.setting
        return ConfigError(key: key, value: problem.file, origin: origin(of: key, in: layers), problem: problem.reason)
    }

    /// `redis.url` parsed by the parser the connection uses (`RedisURL`), so what passes here
    /// connects; its password given only once; a list of nodes only in cluster mode (seed nodes)
    /// and sentinel mode (the Sentinels).
    static func validateRedisURL(
        _ text: String, cluster: Bool, sentinel: Bool = false, passwordGivenApart: Bool, layers: [[String: ConfigValue]]
    ) throws(ConfigError) {
        func fail(_ problem: String) -> ConfigError {
            ConfigError(key: "redis.url", value: ConfigSchema.redact(text), origin: origin(of: "redis.url", in: layers), problem: problem)
        }
        let url: RedisURL
        do {
            if sentinel {
                url = try RedisSentinels.parse(text, master: "-").primary
            } else {
                url = cluster ? try RedisURL.clusterSeeds(text)[0] : try RedisURL(text)
            }
        } catch {
            let lower = text.lowercased()
            let detail = lower.hasPrefix("redis://") || lower.hasPrefix("rediss://") ? " (\((error as? RedisError)?.message ?? "\(error)"))" : ""
            if !cluster, !sentinel, (try? RedisURL.clusterSeeds(text)) != nil {
                throw fail("lists several nodes, which only redis.mode: cluster or sentinel accepts (set redis.mode: cluster for a Redis Cluster, sentinel for Sentinels)")
            }
            throw fail(
                sentinel ? "must look like redis://[user:password@]host:port[,host:port...]/db (the Sentinels), or rediss://... for TLS\(detail)"
                : cluster ? "must look like redis://[user:password@]host:port[,host:port...] (seed nodes of the cluster, no db), or rediss://... for TLS\(detail)"
                : "must look like redis://[user:password@]host:port/db, or rediss://... for TLS\(detail)")
        }
        if passwordGivenApart, url.password != nil {
            throw fail("holds a password and redis.password or redis.password_file is set too; give the password once")
        }
    }

    static func origin(of key: String, in layers: [[String: ConfigValue]]) -> String? {
        layers.reversed().lazy.compactMap { $0[key]?.origin }.first
    }

    /// The password in a file, without one trailing newline (`echo secret > file` writes one).
    static func readPasswordFile(_ path: String, key: String, layers: [[String: ConfigValue]]) throws(ConfigError) -> String {
        let origin = Self.origin(of: key, in: layers)
        guard let data = FileManager.default.contents(atPath: path) else {
            throw ConfigError(key: key, value: path, origin: origin, problem: "cannot read the file")
        }
        var text = String(decoding: data, as: UTF8.self)
        if text.hasSuffix("\r\n") { text.removeLast(2) } else if text.hasSuffix("\n") { text.removeLast() }
        guard !text.isEmpty else {
            throw ConfigError(key: key, value: path, origin: origin, problem: "the file is empty")
        }
        return text
    }

    /// A YAML file, nested maps flattened to dotted keys (`kafka: {group: x}` → `kafka.group`).
    /// Lists become comma-separated. `kafka.properties` keeps librdkafka's own dotted names.
    public static func fileLayer(path: String) throws(ConfigError) -> [String: ConfigValue] {
        let text: String
        do { text = try String(contentsOfFile: path, encoding: .utf8) } catch {
            throw ConfigError(key: "--config", value: path, problem: "cannot read the file: \(error.localizedDescription)")
        }
        let node: Any?
        do { node = try Yams.load(yaml: text) } catch {
            throw ConfigError(key: "--config", value: path, problem: "not valid YAML: \(error)")
        }
        guard let node else { return [:] }
        guard let root = node as? [String: Any] else {
            throw ConfigError(key: "--config", value: path, problem: "the top level must be a mapping of sections (kafka:, redis:, dedup:, ...)")
        }
        var out: [String: ConfigValue] = [:]
        try flatten(root, prefix: "", origin: path, into: &out)
        return out
    }

    static func flatten(_ map: [String: Any], prefix: String, origin: String, into out: inout [String: ConfigValue]) throws(ConfigError) {
        for (k, v) in map {
            let name = prefix.isEmpty ? k : "\(prefix).\(k)"
            switch v {
            case let nested as [String: Any]:
                try flatten(nested, prefix: name, origin: origin, into: &out)
            case let list as [Any] where name == "routes":
                // An ordered list (routes are tried in order): each item's keys go under
                // routes.<name>., and `routes` itself becomes the list of names.
                var names: [String] = []
                for item in list {
                    guard var route = item as? [String: Any], let routeName = route.removeValue(forKey: "name").map(scalar) else {
                        throw ConfigError(key: "routes", value: nil, origin: origin,
                                          problem: "each item of routes must be a mapping with a name, e.g. - name: payments")
                    }
                    names.append(routeName)
                    try flatten(route, prefix: "routes.\(routeName)", origin: origin, into: &out)
                }
                out[name] = ConfigValue(names.joined(separator: ","), origin: origin)
            case let list as [Any]:
                out[name] = ConfigValue(list.map { scalar($0) }.joined(separator: ","), origin: origin)
            default:
                out[name] = ConfigValue(scalar(v), origin: origin)
            }
        }
    }

    static func scalar(_ v: Any) -> String {
        switch v {
        case let s as String: s
        case let b as Bool: b ? "true" : "false"
        case let i as Int: String(i)
        case let d as Double: d == d.rounded() ? String(Int(d)) : String(d)
        case is NSNull: ""
        default: "\(v)"
        }
    }

    /// `DEDUPD_DEDUP_WINDOW=2s` → `dedup.window`. Only names of known keys are read; an unknown
    /// `DEDUPD_*` variable is rejected like an unknown key, so a typo is not silently ignored.
    public static func environmentLayer(_ env: [String: String]) -> [String: ConfigValue] {
        let byEnv = Dictionary(uniqueKeysWithValues: ConfigSchema.keys.map { ($0.environmentName, $0.name) })
        var out: [String: ConfigValue] = [:]
        for (name, value) in env where name.hasPrefix("DEDUPD_") {
            if let key = byEnv[name] {
                out[key] = ConfigValue(value, origin: "environment \(name)")
            } else {
                out[name] = ConfigValue(value, origin: "environment \(name)")
            }
        }
        return out
    }

    /// The effective configuration as `key = value (origin)` lines, secrets redacted.
    public static func describe(_ layers: [[String: ConfigValue]]) -> [String] {
        var merged: [String: ConfigValue] = [:]
        for layer in layers { merged.merge(layer) { _, new in new } }
        var lines: [String] = []
        for key in ConfigSchema.keys {
            let v = merged[key.name] ?? key.defaultValue.map { ConfigValue($0, origin: "default") }
            guard let v else { lines.append("\(key.name) = (unset)"); continue }
            let text = ConfigSchema.shown(key.name, v.text)
            lines.append("\(key.name) = \(text)  # \(v.origin)")
        }
        // Routes: the keys each route sets itself; the others are the top-level ones above.
        for (name, v) in merged.sorted(by: { $0.key < $1.key }) where ConfigSchema.splitRouteKey(name) != nil {
            lines.append("\(name) = \(v.text)  # \(v.origin)")
        }
        for (name, v) in merged.sorted(by: { $0.key < $1.key }) where name.hasPrefix(ConfigSchema.kafkaPropertiesPrefix) {
            let secret = KafkaConfig.isSecretProperty(String(name.dropFirst(ConfigSchema.kafkaPropertiesPrefix.count)))
            lines.append("\(name) = \(secret ? "***" : v.text)  # \(v.origin)")
        }
        return lines
    }
}
