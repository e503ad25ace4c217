import DedupCore
import KafkaIO
import Testing
import TestSupport

@testable import DedupService

/// librdkafka's prefetch queue is memory the buffer's bounds do not count, so the worker keeps it
/// no longer than the buffer could hold: with a small `buffer.max_bytes` and the default-sized
/// queue, a worker whose claims wait on Redis passed its memory bound (MemoryBoundTests).
@Suite struct PrefetchBoundTests {
    func prefetch(_ values: [String: String]) throws -> String? {
        let required = ["kafka.bootstrap_servers": "127.0.0.1:9092", "kafka.topics": "t", "kafka.group": "g"]
        let config = try WorkerConfiguration(
            layers: [required.merging(values) { $1 }.mapValues { ConfigValue($0, origin: "test") }])
        let worker = try Worker(config: config, logger: quietLogger(), exitsOnStall: false)
        return worker.kafkaProperties()[KafkaConsumer.prefetchMessagesProperty]
    }

    @Test func theDefaultBufferKeepsTheDefaultPrefetch() throws {
        #expect(try prefetch([:]) == String(KafkaConsumer.prefetchMessages))
        #expect(try prefetch(["buffer.max_bytes": "1GiB", "buffer.max_messages": "1000000"]) == String(KafkaConsumer.prefetchMessages))
    }

    @Test func aSmallBufferPrefetchesNoMoreThanItCouldHold() throws {
        #expect(try prefetch(["buffer.max_bytes": "8MiB"]) == String((8 << 20) / InboundMessage.bookkeepingBytes))
        #expect(try prefetch(["buffer.max_messages": "5000"]) == "5000")
    }

    @Test func thePrefetchIsNeverShorterThanABatch() throws {
        #expect(try prefetch(["buffer.max_messages": "10"]) == "1000")
        #expect(try prefetch(["buffer.max_messages": "10", "consumer.batch_size": "200"]) == "200")
    }

    @Test func aPrefetchSetByHandIsKept() throws {
        #expect(try prefetch(["buffer.max_bytes": "8MiB", "kafka.properties.queued.min.messages": "50000"]) == "50000")
    }
}
