import DedupCore
import Logging
import Synchronization
import Testing
import TestSupport

@testable import KafkaIO

/// Pause and resume against the mock cluster, including the two ways librdkafka's own pause flag goes wrong
/// (see `PartitionPauses`).
@Suite("Pausing partitions against librdkafka's mock cluster", .serialized)
struct PauseTests {
    /// Offsets delivered per partition, in delivery order.
    final class Delivered: Sendable {
        let offsets = Mutex<[Int32: [Int64]]>([:])
        func count(_ partition: Int32) -> Int { offsets.withLock { $0[partition]?.count ?? 0 } }
        var total: Int { offsets.withLock { $0.values.reduce(0) { $0 + $1.count } } }
        func record(_ event: KafkaConsumer.ConsumerEvent) {
            if case .message(let m) = event { offsets.withLock { $0[m.partition, default: []].append(m.offset) } }
        }
    }

    @Test func heldAssignmentsStartPausedAndResumeOnePartitionAtATime() async throws {
        let cluster = try MockKafkaCluster.make(brokers: 1, logger: quietLogger())
        let topic = unique("held")
        try cluster.createTopic(topic, partitions: 2)
        let producer = try KafkaProducer.make(bootstrapServers: cluster.bootstrapServers, logger: quietLogger())
        let consumer = try KafkaConsumer.make(
            bootstrapServers: cluster.bootstrapServers, groupID: unique("g"), topics: [topic], logger: quietLogger())
        defer { Task { await consumer.close() } }
        consumer.holdNewAssignments(true)

        var assigned: [TopicPartition] = []
        await pollUntil(consumer, limit: .seconds(20), { if case .assigned(let tps) = $0 { assigned = tps } }, until: { !assigned.isEmpty })
        try #require(assigned.count == 2)
        consumer.holdNewAssignments(false)

        for i in 0..<40 {
            try await producer.sendAndWait(topic: topic, key: Array("k\(i)".utf8), value: Array("m\(i)".utf8))
        }
        let p0 = TopicPartition(topic: topic, partition: 0)
        let p1 = TopicPartition(topic: topic, partition: 1)
        let (_, high0) = try await consumer.watermarks(p0, timeout: .seconds(5))
        let (_, high1) = try await consumer.watermarks(p1, timeout: .seconds(5))
        try #require(high0 > 0 && high1 > 0 && high0 + high1 == 40)

        // Held from the start: neither partition delivers.
        let delivered = Delivered()
        await pollUntil(consumer, limit: .seconds(1), delivered.record, until: { false })
        #expect(delivered.total == 0)

        try consumer.resume([p1])
        await pollUntil(consumer, limit: .seconds(10), delivered.record, until: { Int64(delivered.count(1)) >= high1 })
        await pollUntil(consumer, limit: .milliseconds(500), delivered.record, until: { false })
        #expect(Int64(delivered.count(1)) == high1)
        #expect(delivered.count(0) == 0)

        try consumer.resume([p0])
        await pollUntil(consumer, limit: .seconds(10), delivered.record, until: { Int64(delivered.count(0)) >= high0 })
        #expect(delivered.offsets.withLock { $0 } == [0: Array(0..<high0), 1: Array(0..<high1)])
    }

    @Test func aPauseLibrdkafkaLostIsRestoredWithoutLosingAMessage() async throws {
        let cluster = try MockKafkaCluster.make(brokers: 1, logger: quietLogger())
        let topic = unique("lost")
        try cluster.createTopic(topic, partitions: 1)
        let producer = try KafkaProducer.make(bootstrapServers: cluster.bootstrapServers, logger: quietLogger())
        // One message (one record batch, since each send waits for its acknowledgement) per fetch, so the
        // partition cannot be drained in the moment between the lost pause and the next poll.
        let total: Int64 = 200
        for i in 0..<total {
            try await producer.sendAndWait(topic: topic, key: nil, value: Array("m\(i)".utf8))
        }
        let log = RecordingLogHandler()
        let consumer = try KafkaConsumer.make(
            bootstrapServers: cluster.bootstrapServers, groupID: unique("g"), topics: [topic],
            properties: ["max.partition.fetch.bytes": "1"], logger: Logger(label: "kafka.test", factory: { _ in log }))
        defer { Task { await consumer.close() } }
        consumer.holdNewAssignments(true)
        var assigned: [TopicPartition] = []
        await pollUntil(consumer, limit: .seconds(20), { if case .assigned(let tps) = $0 { assigned = tps } }, until: { !assigned.isEmpty })
        try #require(assigned.count == 1)

        let delivered = Delivered()
        await pollUntil(consumer, limit: .seconds(1), delivered.record, until: { false })
        #expect(delivered.total == 0)

        // librdkafka forgets the pause; the consumer still has the partition as paused.
        try consumer.clearPauseInLibrdkafkaOnly(assigned)
        await pollUntil(consumer, limit: .seconds(10), delivered.record, until: { delivered.total > 0 })
        await pollUntil(consumer, limit: .seconds(1), delivered.record, until: { false })
        let whileLost = delivered.total
        #expect(whileLost > 0)
        #expect(Int64(whileLost) < total, "the partition was paused again before it was drained")
        #expect(log.records.withLock { $0.contains { $0.level == .warning && $0.message.contains("lost a pause") } })

        // Resumed, it continues right after the last delivered message: every offset exactly once, in order.
        try consumer.resume(assigned)
        await pollUntil(consumer, limit: .seconds(20), delivered.record, until: { Int64(delivered.total) >= total })
        #expect(delivered.offsets.withLock { $0[0] } == Array(0..<total))
    }

    @Test func aRevokedPartitionLosesItsPause() async throws {
        let cluster = try MockKafkaCluster.make(brokers: 1, logger: quietLogger())
        let topic = unique("revoked")
        try cluster.createTopic(topic, partitions: 2)
        let group = unique("g")
        let first = try KafkaConsumer.make(
            bootstrapServers: cluster.bootstrapServers, groupID: group, topics: [topic], logger: quietLogger())
        first.holdNewAssignments(true)
        var firstAssigned: [TopicPartition] = []
        let delivered = Delivered()
        let record: (KafkaConsumer.ConsumerEvent) -> Void = { e in
            if case .assigned(let tps) = e { firstAssigned = tps }
            delivered.record(e)
        }
        await pollUntil(first, limit: .seconds(20), record, until: { firstAssigned.count == 2 })
        try #require(firstAssigned.count == 2)
        // Both partitions are paused now; new assignments are no longer held.
        first.holdNewAssignments(false)

        let second = try KafkaConsumer.make(
            bootstrapServers: cluster.bootstrapServers, groupID: group, topics: [topic], logger: quietLogger())
        let secondAssigned = Mutex<[TopicPartition]>([])
        let secondDelivered = Delivered()
        let stop = Atomic<Bool>(false)
        // Both members must poll for the rebalance to complete.
        async let secondDone: Void = pollUntil(second, limit: .seconds(40), { e in
            if case .assigned(let tps) = e { secondAssigned.withLock { $0 = tps } }
            secondDelivered.record(e)
        }, until: { stop.load(ordering: .relaxed) })
        await pollUntil(first, limit: .seconds(25), record, until: { firstAssigned.count == 1 && secondAssigned.withLock { $0.count == 1 } })
        try #require(firstAssigned.count == 1)

        // The partition the first member kept was revoked and assigned again: it must fetch, not stay paused.
        let producer = try KafkaProducer.make(bootstrapServers: cluster.bootstrapServers, logger: quietLogger())
        for i in 0..<40 {
            try await producer.sendAndWait(topic: topic, key: Array("k\(i)".utf8), value: Array("m\(i)".utf8))
        }
        let (_, mine) = try await first.watermarks(firstAssigned[0], timeout: .seconds(5))
        try #require(mine > 0)
        await pollUntil(first, limit: .seconds(15), record, until: { Int64(delivered.total) >= mine })
        #expect(Int64(delivered.total) == mine)
        await pollUntil(first, limit: .seconds(10), record, until: { delivered.total + secondDelivered.total >= 40 })
        #expect(delivered.total + secondDelivered.total == 40)

        // Closing while a partition is paused returns (the revoke during close resumes nothing).
        try first.pause(firstAssigned)
        stop.store(true, ordering: .relaxed)
        await secondDone
        await first.close()
        await second.close()
    }
}
