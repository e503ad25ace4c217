import DedupCore
import KafkaIO
import Logging

/// `dedupd dlq replay`: reads dead-lettered records from a topic in a consumer group of its own and
/// sends each back (to `--to`, or to the topic it came from) without the `dedupd-*` headers the
/// dead-letter producer added, so the worker takes it as a fresh submission with its original
/// headers and key. Offsets are committed only after every resent record was delivered, so an
/// interrupted replay resends rather than loses; a record replayed twice is a repeat that dedupd
/// itself drops if the first copy was dispatched.
public enum DeadLetterReplay {
    public struct Options: Sendable {
        public var bootstrapServers: String
        public var from: String
        public var to: String?
        public var reason: String?
        public var limit: Int?
        public var group: String
        public var kafkaProperties: [String: String] = [:]
        /// How long to wait for the group assignment, and then for records, before stopping.
        public var timeout: Duration = .seconds(30)

        public init(bootstrapServers: String, from: String, to: String?, reason: String?, limit: Int?, group: String?) {
            self.bootstrapServers = bootstrapServers
            self.from = from
            self.to = to
            self.reason = reason
            self.limit = limit
            self.group = group ?? "dedupd-dlq-replay.\(from)" + (reason.map { ".\($0)" } ?? "")
        }
    }

    public struct Report: Sendable, Equatable {
        public var read = 0
        public var replayed = 0
        public var skippedReason = 0
        public var skippedNoTarget = 0
        public var failed = 0
        public var byTarget: [String: Int] = [:]
    }

    /// The headers a replayed record carries: the original ones, dead-letter headers removed.
    public static func strippedHeaders(_ headers: [MessageHeader]) -> [MessageHeader] {
        let drop = Set(DeadLetterHeader.all)
        return headers.filter { !drop.contains($0.name) }
    }

    public static func run(_ o: Options, logger: Logger) async throws -> Report {
        var consumerProps = o.kafkaProperties
        consumerProps["enable.auto.commit"] = "false"
        let consumer = try KafkaConsumer.make(
            bootstrapServers: o.bootstrapServers, groupID: o.group, topics: [o.from], properties: consumerProps, logger: logger)
        let producer = try KafkaProducer.make(bootstrapServers: o.bootstrapServers, properties: o.kafkaProperties, logger: logger)
        var report = Report()
        var toStore: [TopicPartition: Int64] = [:]
        /// Per assigned partition: the offset after which it is read to its end (its high watermark at assignment).
        var ends: [TopicPartition: Int64] = [:]
        var assigned = false
        let clock = ContinuousClock()
        var lastProgress = clock.now

        func finished() -> Bool {
            if let limit = o.limit, report.replayed >= limit { return true }
            return assigned && ends.allSatisfy { tp, end in (toStore[tp] ?? -1) >= end }
        }

        loop: while !finished() {
            if clock.now - lastProgress > o.timeout {
                logger.notice("no more records within the timeout, stopping", metadata: ["dlq.timeout": "\(WorkerConfiguration.format(o.timeout))"])
                break
            }
            for event in await consumer.poll(maxMessages: 500, timeout: .milliseconds(200)) {
                switch event {
                case .assigned(let partitions):
                    assigned = true
                    lastProgress = clock.now
                    let committed = (try? await consumer.committed(partitions, timeout: .seconds(10))) ?? [:]
                    for tp in partitions {
                        let marks = try await consumer.watermarks(tp, timeout: .seconds(10))
                        let start = max(committed[tp] ?? -1, marks.low)
                        if marks.high > start { ends[tp] = marks.high } else { ends[tp] = nil }
                        if let c = committed[tp], c >= 0 { toStore[tp] = max(toStore[tp] ?? -1, c) }
                    }
                case .revoked(let partitions), .lost(let partitions):
                    for tp in partitions { ends[tp] = nil }
                case .error(let error):
                    logger.warning("kafka error", metadata: ["error": "\(error)"])
                case .message(let m):
                    if let limit = o.limit, report.replayed >= limit { break loop }
                    lastProgress = clock.now
                    report.read += 1
                    defer { toStore[m.topicPartition] = m.offset + 1 }
                    let reason = m.header(DeadLetterHeader.reason)?.value.map { String(decoding: $0, as: UTF8.self) }
                    if let wanted = o.reason, reason != wanted {
                        report.skippedReason += 1
                        continue
                    }
                    let original = m.header(DeadLetterHeader.originalTopic)?.value.map { String(decoding: $0, as: UTF8.self) }
                    guard let target = o.to ?? original, !target.isEmpty else {
                        report.skippedNoTarget += 1
                        logger.warning(
                            "dead-lettered record has no \(DeadLetterHeader.originalTopic) header and no --to was given; skipped",
                            metadata: ["kafka.partition": "\(m.partition)", "kafka.offset": "\(m.offset)"])
                        continue
                    }
                    try producer.send(topic: target, key: m.key, value: m.value, headers: strippedHeaders(m.headers))
                    report.replayed += 1
                    report.byTarget[target, default: 0] += 1
                }
            }
        }
        do { try await producer.flush(timeout: .seconds(30)) } catch {
            logger.error("flushing replayed records failed; offsets not committed", metadata: ["error": "\(error)"])
        }
        report.failed = producer.deliveryCounts.failed
        if report.failed == 0 && producer.pendingCount == 0 {
            try consumer.storeOffsets(toStore.filter { $0.value >= 0 })
            try await consumer.commitSync()
        } else {
            logger.error("some replayed records were not delivered; offsets not committed, run the replay again",
                         metadata: ["dlq.failed": "\(report.failed)"])
        }
        await consumer.close()
        return report
    }
}
