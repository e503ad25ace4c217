import DedupCore
import KafkaIO
import Logging

/// Sends generated submissions (with repeats) to a topic: the traffic of `dedupd produce` and the demo.
public enum SubmissionProducer {
    public struct Report: Sendable {
        public var sent: Int
        public var unique: Int
        public var repeats: Int
        public var failed: Int
        public var elapsed: Duration
    }

    public static func run(
        bootstrapServers: String, topic: String, count: Int, duplicateRatio: Double, idPrefix: String = "ord",
        seed: UInt64 = 42, rate: Int? = nil, pauseAfter: Int? = nil,
        pause: @Sendable () async throws -> Void = {}, properties: [String: String] = [:],
        logger: Logger
    ) async throws -> Report {
        let started = ContinuousClock.now
        let producer = try KafkaProducer.make(bootstrapServers: bootstrapServers, properties: properties, logger: logger)
        var generator = SubmissionGenerator(prefix: idPrefix, duplicateRatio: duplicateRatio, seed: seed)
        for i in 0..<count {
            if i == pauseAfter {
                // Later repeats arrive after the dedup window, as client retries do: Redis catches them.
                try await producer.flush(timeout: .seconds(60))
                try await pause()
            }
            if let rate, rate > 0, i % 50 == 0 {
                // Pace in steps of 50 messages: the i-th message is due i/rate seconds after the start.
                let due = started + .milliseconds(Int64(i) * 1000 / Int64(rate))
                if due > ContinuousClock.now { try await Task.sleep(until: due, clock: .continuous) }
            }
            let s = generator.next()
            try producer.send(topic: topic, key: s.message.key, value: s.message.value, headers: s.message.headers)
        }
        try await producer.flush(timeout: .seconds(60))
        let counts = producer.deliveryCounts
        return Report(
            sent: counts.delivered, unique: generator.uniqueCount, repeats: generator.repeatCount,
            failed: counts.failed, elapsed: ContinuousClock.now - started)
    }
}
