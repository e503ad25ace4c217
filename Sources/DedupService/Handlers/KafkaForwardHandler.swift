import DedupCore
import KafkaIO
import Logging

/// The `kafka` handler: forwards each unique message to `handler.topic` with its original key,
/// value and headers plus `dedupd-dedup-key`, so consumers of that topic can use the dedup key
/// as an idempotency key.
///
/// The producer is idempotent (`enable.idempotence=true`: acks from all in-sync replicas, and
/// the producer's own retries never write a record twice), and `handle` returns only once the
/// broker acknowledged the record (`sendAndWait`): only then is the key confirmed `done` and the
/// offset committed. Throughput comes from `handler.concurrency`: that many records are in
/// flight at once, batched by librdkafka.
public final class KafkaForwardHandler: Handler {
    public let topic: String
    let producer: KafkaProducer

    /// `message.timeout.ms` is set from `handler.timeout` (one attempt); the caller's
    /// `kafka.properties` may override any of these.
    public static func make(
        bootstrapServers: String, topic: String, timeout: Duration, properties: [String: String] = [:], logger: Logger
    ) throws -> KafkaForwardHandler {
        var merged: [String: String] = [
            "enable.idempotence": "true",
            "message.timeout.ms": String(max(1, timeout.milliseconds)),
            "linger.ms": "2",
        ]
        merged.merge(properties) { _, new in new }
        let producer = try KafkaProducer.make(bootstrapServers: bootstrapServers, properties: merged, logger: logger)
        return KafkaForwardHandler(topic: topic, producer: producer)
    }

    init(topic: String, producer: KafkaProducer) {
        self.topic = topic
        self.producer = producer
    }

    public func handle(_ dispatch: Dispatch) async throws {
        let m = dispatch.message
        var headers = m.headers.filter { !$0.name.lowercased().hasPrefix("dedupd-dedup-key") }
        headers.append(MessageHeader(name: DeadLetterHeader.dedupKey, value: Array(dispatch.key.raw.utf8)))
        try await producer.sendAndWait(topic: topic, key: m.key, value: m.value, headers: headers)
    }

    public func close() async {
        try? await producer.flush(timeout: .seconds(5))
    }
}
