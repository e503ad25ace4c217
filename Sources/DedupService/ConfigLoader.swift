import DedupCore
import Foundation
import Yams

/// Reads the three configuration sources into one validated `WorkerConfiguration`.
/// Precedence: flags > `DEDUPD_*` environment variables > YAML file > defaults.
public enum ConfigLoader {
    public static func load(
        file: String?,
        environment: [String: String] = ProcessInfo.processInfo.environment,
        flags: [String: String] = [:]
    ) throws -> WorkerConfiguration {
        var layers: [[String: ConfigValue]] = []
        if let file { layers.append(try fileLayer(path: file)) }
        layers.append(environmentLayer(environment))
        layers.append(flags.mapValues { ConfigValue($0, origin: "flag") })
        return try WorkerConfiguration(layers: layers)
    }

    /// A YAML file, nested maps flattened to dotted keys (`kafka: {group: x}` → `kafka.group`).
    /// Lists become comma-separated. `kafka.properties` keeps librdkafka's own dotted names.
    public static func fileLayer(path: String) throws -> [String: ConfigValue] {
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

    static func flatten(_ map: [String: Any], prefix: String, origin: String, into out: inout [String: ConfigValue]) throws {
        for (k, v) in map {
            let name = prefix.isEmpty ? k : "\(prefix).\(k)"
            switch v {
            case let nested as [String: Any]:
                try flatten(nested, prefix: name, origin: origin, into: &out)
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
            let text = key.kind == .secret ? ConfigSchema.redact(v.text) : v.text
            lines.append("\(key.name) = \(text)  # \(v.origin)")
        }
        for (name, v) in merged.sorted(by: { $0.key < $1.key }) where name.hasPrefix(ConfigSchema.kafkaPropertiesPrefix) {
            let secret = name.contains("password") || name.contains("secret") || name.contains("jaas")
            lines.append("\(name) = \(secret ? "***" : v.text)  # \(v.origin)")
        }
        return lines
    }
}
