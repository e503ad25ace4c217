import DedupCore
import KafkaIO
import Logging

/// Sends dead letters (bad input, handler gave up) to `dead_letter.topic` and returns only once
/// the broker acknowledged them, so the worker can resolve their offsets afterwards and never
/// before: a dead letter that was not acknowledged stays unresolved and is sent again later.
///
/// The record keeps the original key, value and headers and adds the `dedupd-*` headers of
/// `DeadLetterHeader` (reason code, error text, original topic/partition/offset, dedup key,
/// attempts).
public final class DeadLetterProducer: Sendable {
    public let topic: String
    let producer: KafkaProducer

    /// Set before the caller's `kafka.properties`: `enable.idempotence` (acks=all, no duplicates
    /// from the producer's own retries) and `message.timeout.ms` from `dead_letter.timeout`,
    /// which bounds one send: the worker awaits the acks in its loop, which must come back to
    /// poll well within `max.poll.interval.ms` (20 s by default here); a send that timed out is
    /// tried again on a later pass.
    public static func properties(timeout: Duration) -> [String: String] {
        ["enable.idempotence": "true", "message.timeout.ms": String(max(1, timeout.milliseconds))]
    }

    init(topic: String, producer: KafkaProducer) {
        self.topic = topic
        self.producer = producer
    }

    public static func make(
        bootstrapServers: String, topic: String, timeout: Duration = .seconds(10), properties: [String: String] = [:],
        logger: Logger
    ) throws -> DeadLetterProducer {
        var merged = Self.properties(timeout: timeout)
        merged.merge(properties) { _, new in new }
        let producer = try KafkaProducer.make(bootstrapServers: bootstrapServers, properties: merged, logger: logger)
        return DeadLetterProducer(topic: topic, producer: producer)
    }

    /// Sends one dead letter and waits for the broker's acknowledgement.
    public func send(_ letter: DeadLetter) async throws {
        try await producer.sendAndWait(
            topic: topic, key: letter.message.key, value: letter.message.value, headers: letter.headers)
    }

    /// Sends all of them at once (one enqueue each, acknowledged in the producer's batches) and
    /// says per letter whether the broker acknowledged it.
    public func send(_ letters: [DeadLetter]) async -> [Result<Void, any Error>] {
        await withTaskGroup(of: (Int, Result<Void, any Error>).self) { group in
            for (i, letter) in letters.enumerated() {
                group.addTask {
                    do {
                        try await self.send(letter)
                        return (i, .success(()))
                    } catch {
                        return (i, .failure(error))
                    }
                }
            }
            var results = [Result<Void, any Error>](repeating: .success(()), count: letters.count)
            for await (i, r) in group { results[i] = r }
            return results
        }
    }
}
