import DedupCore
import DedupService
import Foundation
import KafkaIO
import LocalServers
import Logging
import ServiceLifecycle

/// `dedupd demo`: the whole flow on this machine with nothing installed but the two Debian
/// libraries and redis-server. A mock Kafka cluster in this process (real Kafka protocol, the
/// same librdkafka client as production), a redis-server on a free port in a temp dir, 10,000
/// submissions with 30% repeats, the worker run until idle, and a summary a person can check.
enum LocalDemo {
    public struct Options: Sendable {
        public var count = 10_000
        public var duplicateRatio = 0.3
        public var partitions: Int32 = 6
        public var window: Duration = .seconds(1)
        public var redisURL: String?
        public init() {}
    }

    public struct Summary: Sendable {
        public var produced: SubmissionProducer.Report
        public var counters: DedupCounters
        public var dispatchedIDs: Int
        public var distinctDispatchedIDs: Int
        public var elapsed: Duration
        public var sampleLine: String?

        public var isExact: Bool { dispatchedIDs == produced.unique && distinctDispatchedIDs == produced.unique }
    }

    public static func run(_ options: Options, logger: Logger) async throws -> Summary {
        let scratch = try TemporaryDirectory(prefix: "dedupd-demo")
        let cluster = try MockKafkaCluster.make(brokers: 3, logger: logger)
        let topic = "submissions"
        try cluster.createTopic(topic, partitions: options.partitions)

        var redis: RedisServerProcess?
        let redisURL: String
        if let url = options.redisURL {
            redisURL = url
        } else {
            let server = try RedisServerProcess()
            redis = server
            redisURL = server.url
        }
        defer { redis?.stop() }
        logger.notice("demo: mock kafka and redis up", metadata: [
            "kafka.bootstrap_servers": "\(cluster.bootstrapServers)", "redis.url": "\(ConfigSchema.redact(redisURL))"])

        let output = scratch.file("dispatched.jsonl").path
        let config = try WorkerConfiguration(layers: [[
            "kafka.bootstrap_servers": .init(cluster.bootstrapServers, origin: "demo"),
            "kafka.topics": .init(topic, origin: "demo"),
            "kafka.group": .init("dedupd-demo", origin: "demo"),
            "redis.url": .init(redisURL, origin: "demo"),
            "dedup.namespace": .init("demo-\(UInt32.random(in: 0...UInt32.max))", origin: "demo"),
            "dedup.window": .init(WorkerConfiguration.format(options.window), origin: "demo"),
            "handler.output": .init(output, origin: "demo"),
            "run.stop_when_idle": .init("3s", origin: "demo"),
            "log.stats_interval": .init("2s", origin: "demo"),
        ]])
        let started = ContinuousClock.now
        let worker = try Worker(config: config, logger: logger)
        var groupConfig = ServiceGroupConfiguration(
            services: [.init(service: worker, successTerminationBehavior: .gracefullyShutdownGroup)],
            gracefulShutdownSignals: [.sigterm, .sigint], logger: logger)
        groupConfig.maximumGracefulShutdownDuration = .seconds(10)
        // The worker runs while the submissions arrive: 90% at once (repeats among them are
        // caught in the window), then, once the worker has read those and the window has
        // passed, the last 10%, whose repeats of earlier ids are caught by Redis.
        let firstWave = options.count * 9 / 10
        let serviceGroup = ServiceGroup(configuration: groupConfig)
        let bootstrap = cluster.bootstrapServers
        let produced = try await withThrowingTaskGroup(of: SubmissionProducer.Report?.self) { group in
            group.addTask {
                try await serviceGroup.run()
                return nil
            }
            group.addTask {
                try await SubmissionProducer.run(
                    bootstrapServers: bootstrap, topic: topic, count: options.count,
                    duplicateRatio: options.duplicateRatio, pauseAfter: firstWave,
                    pause: {
                        while worker.counters.withLock({ $0.consumed }) < firstWave {
                            try await Task.sleep(for: .milliseconds(50))
                        }
                        try await Task.sleep(for: options.window + .milliseconds(500))
                    }, logger: logger)
            }
            var report: SubmissionProducer.Report?
            for try await r in group { if let r { report = r } }
            return report!
        }
        let elapsed = ContinuousClock.now - started

        let lines = (try? String(contentsOfFile: output, encoding: .utf8))?.split(separator: "\n") ?? []
        var ids: [String] = []
        for line in lines {
            guard let object = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any],
                let headers = object["headers"] as? [String: Any], let id = headers["message-id"] as? String
            else { continue }
            ids.append(id)
        }
        return Summary(
            produced: produced, counters: worker.counters.withLock { $0 }, dispatchedIDs: ids.count,
            distinctDispatchedIDs: Set(ids).count, elapsed: elapsed, sampleLine: lines.first.map(String.init))
    }

    public static func render(_ s: Summary) -> String {
        let seconds = max(Double(s.elapsed.milliseconds) / 1000, 0.001)
        let c = s.counters
        return """

            dedupd demo
              produced          \(s.produced.sent) submissions, \(s.produced.unique) unique ids, \(s.produced.repeats) repeats
              consumed          \(c.consumed)
              dispatched        \(c.dispatched)   (handler: log, one JSON line each)
              duplicates        \(c.duplicates)   (\(c.duplicatesLocal) caught in the window, \(c.duplicatesStore) by Redis)
              invalid           \(c.invalid)
              elapsed           \(WorkerConfiguration.format(s.elapsed)) (includes joining the group, a pause before the late repeats, and the 3s idle wait)
              rate              \(Int(Double(c.consumed) / seconds)) msg/s consumed over the whole run
              sample output     \(s.sampleLine ?? "(none)")

              dispatched == unique ids sent: \(s.isExact ? "yes" : "NO") (\(s.distinctDispatchedIDs) distinct ids in \(s.dispatchedIDs) dispatched lines, \(s.produced.unique) sent)

            """
    }
}
