import DedupCore
import KafkaIO
import Logging
import RedisIO

/// `dedupd check-config --connect`: reaches every server a valid configuration names, as the
/// worker does at start, and says what it found, so a wrong address, password, certificate or
/// topic shows before the first deploy and not in a worker's log. Redis is judged as the worker
/// judges it (`WorkerConfiguration.judge`); Kafka is asked for the metadata of every topic the
/// worker reads or writes. Nothing is written, consumed or joined.
public enum ConnectionCheck {
    /// One finding: a `problem` when the worker would stop on it or could not work with it; a
    /// `warning` the worker logs and runs with.
    public struct Finding: Sendable, CustomStringConvertible {
        public enum Level: String, Sendable { case ok, warning, problem }
        public var level: Level
        public var text: String
        public var problem: Bool { level == .problem }
        public var description: String { "\(level.rawValue): \(text)" }

        init(_ level: Level, _ text: String) {
            self.level = level
            self.text = text
        }
    }

    public static func run(_ config: WorkerConfiguration, timeout: Duration) async -> [Finding] {
        await redis(config) + kafka(config, timeout: timeout)
    }

    static func redis(_ config: WorkerConfiguration) async -> [Finding] {
        let target = "redis (redis.url = \(ConfigSchema.redact(config.redis.url)))"
        var quiet = Logger(label: "dedupd.check")
        quiet.logLevel = .critical
        let redis: RedisTarget
        do {
            redis = try await RedisTarget.connect(config.redis, logger: quiet)
        } catch let error as RedisError {
            return [Finding(.problem, "\(target): \(error.message)")]
        } catch {
            return [Finding(.problem, "\(target): \(error)")]
        }
        let primaries: [(node: String, found: RedisRequirements)]
        do { primaries = try await RedisRequirements.read(from: redis) } catch {
            await redis.close()
            return [Finding(.problem, "\(target): connected, but reading its settings failed: \((error as? RedisError)?.message ?? "\(error)")")]
        }
        await redis.close()
        var findings = primaries.map { node, found in
            Finding(.ok, "redis \(node): answered; maxmemory-policy \(found.maxmemoryPolicy ?? "unknown"), persistence \(found.persistenceOff.map { $0 ? "off" : "on" } ?? "unknown")")
        }
        let verdict = config.judge(primaries, cluster: redis.isCluster)
        findings += verdict.warnings.map { w in
            Finding(.warning, "\(w.message)" + (w.metadata["redis.node"].map { " (\($0))" } ?? ""))
        }
        findings += verdict.refusals.map { Finding(.problem, "\($0)") }
        return findings
    }

    /// The topics a worker reads (`kafka.topics`) and writes (`dead_letter.topic`, `kafka`
    /// handlers' `handler.topic`), each with the setting that names it, grouped by cluster.
    static func kafka(_ config: WorkerConfiguration, timeout: Duration) -> [Finding] {
        var clusters: [(servers: String, setting: String, topics: [(name: String, setting: String)])] = []
        func add(_ topic: String, setting: String, servers: String, serversSetting: String) {
            if let i = clusters.firstIndex(where: { $0.servers == servers }) {
                if !clusters[i].topics.contains(where: { $0.name == topic }) { clusters[i].topics.append((topic, setting)) }
            } else {
                clusters.append((servers, serversSetting, [(topic, setting)]))
            }
        }
        for topic in config.topics { add(topic, setting: "kafka.topics", servers: config.bootstrapServers, serversSetting: "kafka.bootstrap_servers") }
        if let topic = config.deadLetterTopic {
            add(topic, setting: "dead_letter.topic", servers: config.deadLetterBootstrapServers,
                serversSetting: config.deadLetterBootstrapServers == config.bootstrapServers ? "kafka.bootstrap_servers" : "dead_letter.bootstrap_servers")
        }
        for (route, handler) in zip([nil] + config.routes.map(\.name), config.handlersByRoute) {
            guard case .kafka(let topic) = handler.kind else { continue }
            add(topic, setting: route.map { "routes.\($0).handler.topic" } ?? "handler.topic",
                servers: config.bootstrapServers, serversSetting: "kafka.bootstrap_servers")
        }
        var findings: [Finding] = []
        for cluster in clusters {
            let target = "kafka (\(cluster.setting) = \(cluster.servers))"
            do {
                let found = try KafkaProbe.topics(
                    cluster.topics.map(\.name), bootstrapServers: cluster.servers, properties: config.kafkaProperties, timeout: timeout)
                for (topic, state) in zip(cluster.topics, found) {
                    switch state {
                    case .partitions(let n):
                        findings.append(Finding(.ok, "\(target): topic \(topic.name) (\(topic.setting)): \(n) partition\(n == 1 ? "" : "s")"))
                    case .refused(let why):
                        findings.append(Finding(.problem, "\(target): topic \(topic.name) (\(topic.setting)): \(why)"))
                    }
                }
            } catch {
                findings.append(Finding(.problem, "\(target): \(error.message)"))
            }
        }
        return findings
    }
}
