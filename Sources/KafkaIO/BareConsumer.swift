import CRdKafka
import DedupCore
import Logging

/// The physical limit of consuming: a librdkafka group consumer in a tight `rd_kafka_consumer_poll`
/// loop that only counts messages (no copies, no Swift values, no processing). `dedupd bench`
/// compares dedupd's own pipeline against it ("baseline K").
///
/// It uses dedupd's own `KafkaConsumer.defaultProperties` (the same prefetch and group settings
/// as the worker), so the two differ only in what happens to a message once librdkafka handed it
/// over. Blocking: call it from a thread of its own.
public enum BareConsumer {
    public struct Result: Sendable {
        /// Messages counted (errors and partition EOFs are not messages).
        public var messages: Int
        /// Monotonic time of the first and the last message.
        public var first: ContinuousClock.Instant?
        public var last: ContinuousClock.Instant?
        public var errors: Int
    }

    /// Joins `groupID`, consumes `topics` until `target` messages were counted or `timeout`
    /// passed. `progress` is called with the running count for the first message, every 1024
    /// messages and at the end (from this thread), e.g. to pace a producer or to see that the
    /// consumer has its partitions.
    ///
    /// `header`, when given, is looked up in every message and `onHeader` called with its value
    /// (messages without it are counted but not reported): the bench's baseline latency reads a
    /// send timestamp this way, at the moment librdkafka hands the message over. Without it the
    /// loop does not touch headers at all.
    public static func count(
        bootstrapServers: String, groupID: String, topics: [String], target: Int,
        properties: [String: String] = [:], timeout: Duration,
        logger: Logger, progress: (Int) -> Void = { _ in },
        header: String? = nil, onHeader: (UnsafeRawBufferPointer) -> Void = { _ in }
    ) throws(KafkaError) -> Result {
        var defaults = KafkaConsumer.defaultProperties
        defaults["bootstrap.servers"] = bootstrapServers
        defaults["group.id"] = groupID
        // No offsets are stored: let librdkafka commit what it hands out, as a plain consumer would.
        defaults["enable.auto.offset.store"] = "true"
        let conf = try KafkaConfig.makeConf(defaults: defaults, overrides: properties)
        let context = ClientContext(logger: logger)
        let rk = try KafkaConfig.makeHandle(type: RD_KAFKA_CONSUMER, conf: conf, context: context)
        defer {
            rd_kafka_consumer_close(rk)
            rd_kafka_destroy(rk)
            withExtendedLifetime(context) {}
        }
        rd_kafka_poll_set_consumer(rk)
        let sub = PartitionList(topics.map { TopicPartition(topic: $0, partition: RD_KAFKA_PARTITION_UA) })
        let err = rd_kafka_subscribe(rk, sub.list)
        if err != RD_KAFKA_RESP_ERR_NO_ERROR {
            throw KafkaError(code: .config, err: err, message: "subscribe to \(topics) failed")
        }
        let clock = ContinuousClock()
        let deadline = clock.now + timeout
        var result = Result(messages: 0, first: nil, last: nil, errors: 0)
        // The clock is read per message only for the first one; the last is read when the count
        // is reached (or on each empty poll), so the loop itself stays bare.
        while result.messages < target {
            guard let rkm = rd_kafka_consumer_poll(rk, 100) else {
                if clock.now >= deadline { break }
                continue
            }
            if rkm.pointee.err == RD_KAFKA_RESP_ERR_NO_ERROR {
                if result.messages == 0 { result.first = clock.now }
                result.messages += 1
                if let header { observe(rkm, header: header, onHeader) }
                if result.messages & 1023 == 0 || result.messages == 1 { progress(result.messages) }
            } else if rkm.pointee.err != RD_KAFKA_RESP_ERR__PARTITION_EOF {
                result.errors += 1
            }
            rd_kafka_message_destroy(rkm)
        }
        result.last = clock.now
        progress(result.messages)
        return result
    }

    /// Calls `body` with the value of the last `name` header of `rkm`, if it has one.
    private static func observe(
        _ rkm: UnsafeMutablePointer<rd_kafka_message_t>, header name: String, _ body: (UnsafeRawBufferPointer) -> Void
    ) {
        var hdrs: OpaquePointer? = nil
        guard rd_kafka_message_headers(rkm, &hdrs) == RD_KAFKA_RESP_ERR_NO_ERROR, let hdrs else { return }
        var value: UnsafeRawPointer? = nil
        var size = 0
        guard rd_kafka_header_get_last(hdrs, name, &value, &size) == RD_KAFKA_RESP_ERR_NO_ERROR, let value else { return }
        body(UnsafeRawBufferPointer(start: value, count: size))
    }
}
