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

/// The worker's dead letters not yet acknowledged, and the retry state of the topic. Messages
/// here are unresolved in the engine (`DedupSettings.holdsDeadLetters`), so their offsets are
/// not committed until the topic took them.
struct DeadLetterQueue {
    var pending: [DeadLetter] = []
    var retryAt: ContinuousClock.Instant?
    var failures = 0
    var downSince: ContinuousClock.Instant?

    var isEmpty: Bool { pending.isEmpty }

    /// A partition was revoked: its messages will be read again by its next owner, which
    /// dead-letters them itself.
    mutating func drop(partitions: Set<TopicPartition>) {
        pending.removeAll { partitions.contains($0.message.topicPartition) }
    }
}

extension Worker {
    /// Bad input: dead-lettered when a topic is configured (resolved only once acknowledged),
    /// otherwise logged and counted as before.
    func badInput(_ bad: BadInput, _ message: InboundMessage, state: inout LoopState) {
        logger.warning(
            "bad input, not dispatched",
            metadata: [
                "dedup.reason": "\(bad.reason.code)", "error": "\(bad.detail)",
                "kafka.topic": "\(message.topic)", "kafka.partition": "\(message.partition)",
                "kafka.offset": "\(message.offset)",
            ])
        if deadLetters != nil {
            state.deadLetters.pending.append(DeadLetter(badInput: bad, message: message))
        }
    }

    /// The handler gave up: the message goes to the dead-letter topic with `handler_failed`.
    func handlerGaveUp(_ dispatch: Dispatch, error: any Error, attempts: Int, state: inout LoopState) {
        logger.error(
            deadLetters == nil
                ? "handler gave up; message not dispatched, claim released"
                : "handler gave up; message dead-lettered, claim released",
            metadata: [
                "dedup.key": "\(dispatch.key.raw)", "kafka.topic": "\(dispatch.message.topic)",
                "kafka.partition": "\(dispatch.message.partition)", "kafka.offset": "\(dispatch.message.offset)",
                "handler.attempts": "\(attempts)", "error": "\(error)",
            ])
        if deadLetters != nil {
            state.deadLetters.pending.append(DeadLetter(
                message: dispatch.message, reason: DeadLetter.handlerFailed, error: "\(error)",
                dedupKey: dispatch.key.raw, attempts: attempts))
        }
    }

    /// Sends what waits for the dead-letter topic and resolves what the broker acknowledged. A
    /// failed send keeps its message unresolved (its offset uncommitted) and is retried with
    /// backoff; the outage is logged once, and its end once.
    func deadLetterRound(state: inout LoopState, force: Bool = false) async {
        guard let producer = deadLetters, !state.deadLetters.isEmpty else { return }
        let now = ContinuousClock.now
        if !force, let retryAt = state.deadLetters.retryAt, now < retryAt { return }
        let letters = state.deadLetters.pending
        let results = await producer.send(letters)
        var failed: [DeadLetter] = []
        var firstError: (any Error)?
        for (letter, result) in zip(letters, results) {
            switch result {
            case .success: state.engine.deadLettered(letter.message)
            case .failure(let error):
                failed.append(letter)
                if firstError == nil { firstError = error }
            }
        }
        // Letters queued while this round was in flight cannot exist (the loop is single-owner),
        // so the failed ones are all that is left.
        state.deadLetters.pending = failed
        if let firstError {
            state.deadLetters.failures += 1
            if state.deadLetters.downSince == nil {
                state.deadLetters.downSince = now
                logger.error(
                    "dead-letter topic did not acknowledge; keeping those messages unresolved and retrying",
                    metadata: ["dead_letter.topic": "\(producer.topic)", "dead_letter.pending": "\(failed.count)",
                               "error": "\(firstError)"])
            }
            var rng = SystemRandomNumberGenerator()
            state.deadLetters.retryAt = ContinuousClock.now
                + Backoff(initial: .milliseconds(200), maximum: .seconds(5)).jittered(attempt: state.deadLetters.failures, using: &rng)
        } else {
            if let since = state.deadLetters.downSince {
                logger.notice("dead-letter topic acknowledging again", metadata: [
                    "dead_letter.topic": "\(producer.topic)",
                    "dead_letter.down_for": "\(WorkerConfiguration.format(ContinuousClock.now - since))"])
            }
            state.deadLetters.downSince = nil
            state.deadLetters.retryAt = nil
            state.deadLetters.failures = 0
        }
    }
}
