import CRdKafka
import DedupCore
import Synchronization

/// Which partitions the application has paused, kept beside librdkafka's own pause flag because that flag can
/// be lost, and kept to the current assignment because librdkafka would otherwise keep it too long.
///
/// **Lost pauses.** librdkafka numbers each partition operation (pause, resume, fetch start, fetch stop) with a
/// per-partition version taken *before* the operation is queued, and drops any operation older than the last
/// one served (librdkafka issues #2190 and #5591). A pause the application queues while librdkafka's main
/// thread is queueing the fetch start of a fresh assignment can therefore be served out of order and dropped:
/// `rd_kafka_pause_partitions` returns as usual and the partition keeps fetching. Two defences:
/// - partitions assigned while `holdNewAssignments` is on are paused in the rebalance callback *before*
///   `rd_kafka_assign`, so the pause is served before the fetch start even exists;
/// - a message delivered from a partition paused here means the pause was lost (after a served pause,
///   librdkafka drops every message fetched under an older version), so the partition is paused again at the
///   end of that poll. The message itself is delivered: the re-pause rewinds the fetch position to just after it.
///
/// The opposite order (a fetch start dropped behind an application pause or resume) leaves a partition not
/// fetching until its next assignment; only the first defence narrows that one.
///
/// **Revoked partitions.** librdkafka keeps a partition's pause flag after it is revoked, so a partition that
/// came back in a later assignment would stay paused. Revoked partitions are resumed after the unassign (which
/// queues their fetch stop first), so the pause belongs to one assignment, as in the Java consumer.
final class PartitionPauses: Sendable {
    private struct State {
        var holdNewAssignments = false
        var paused: Set<TopicPartition> = []
        /// Set by `close()`: the revoke during `rd_kafka_consumer_close` need not resume anything.
        var closing = false
    }

    private let state = Mutex(State())
    /// Lets `pollBatch` skip the lock when nothing is paused (the common case).
    private let anyPaused = Atomic<Bool>(false)

    func setHoldNewAssignments(_ hold: Bool) { state.withLock { $0.holdNewAssignments = hold } }

    func setClosing() { state.withLock { $0.closing = true } }

    /// Pauses `partitions` in librdkafka and records them; the lock is held across the call so a concurrent
    /// re-pause cannot undo a resume.
    func pause(_ rk: OpaquePointer, _ partitions: [TopicPartition]) throws(KafkaError) {
        try state.withLock { s throws(KafkaError) in
            try Self.apply(rk, partitions, pause: true)
            record(&s, partitions, paused: true)
        }
    }

    func resume(_ rk: OpaquePointer, _ partitions: [TopicPartition]) throws(KafkaError) {
        try state.withLock { s throws(KafkaError) in
            record(&s, partitions, paused: false)
            try Self.apply(rk, partitions, pause: false)
        }
    }

    /// Rebalance callback, before `rd_kafka_assign`: pauses the new partitions when holding.
    /// The caller logs a failure; the assignment goes ahead either way.
    func assigning(_ rk: OpaquePointer, _ partitions: [TopicPartition]) throws(KafkaError) {
        try state.withLock { s throws(KafkaError) in
            guard s.holdNewAssignments, !partitions.isEmpty else { return }
            // Before the first assignment librdkafka may have no topic object yet, and a pause skips
            // partitions of unknown topics. Creating the topic handle makes the partitions known;
            // `rd_kafka_assign` then starts the very partition objects that carry the pause.
            let topics = Set(partitions.map(\.topic)).compactMap { rd_kafka_topic_new(rk, $0, nil) }
            defer { topics.forEach { rd_kafka_topic_destroy($0) } }
            try Self.apply(rk, partitions, pause: true)
            record(&s, partitions, paused: true)
        }
    }

    /// Rebalance callback, after the unassign: clears librdkafka's pause flag of the revoked partitions.
    /// The caller logs a failure.
    func revoked(_ rk: OpaquePointer, _ partitions: [TopicPartition]) throws(KafkaError) {
        try state.withLock { s throws(KafkaError) in
            let wasPaused = partitions.filter { s.paused.contains($0) }
            guard !wasPaused.isEmpty else { return }
            record(&s, wasPaused, paused: false)
            if !s.closing { try Self.apply(rk, wasPaused, pause: false) }
        }
    }

    private func record(_ s: inout State, _ partitions: [TopicPartition], paused: Bool) {
        if paused { s.paused.formUnion(partitions) } else { s.paused.subtract(partitions) }
        anyPaused.store(!s.paused.isEmpty, ordering: .releasing)
    }

    /// End of a poll: pauses again every paused partition that delivered one of `events`.
    /// Returns the partitions whose pause had been lost.
    func repauseIfLost(_ rk: OpaquePointer, after events: [KafkaConsumer.ConsumerEvent]) -> [TopicPartition] {
        guard anyPaused.load(ordering: .acquiring) else { return [] }
        return state.withLock { s in
            var lost: Set<TopicPartition> = []
            for case .message(let m) in events {
                let tp = TopicPartition(topic: m.topic, partition: m.partition)
                if s.paused.contains(tp) { lost.insert(tp) }
            }
            guard !lost.isEmpty else { return [] }
            // A failure leaves the partition recorded as paused, so its next message tries again.
            try? Self.apply(rk, Array(lost), pause: true)
            return Array(lost)
        }
    }

    /// `rd_kafka_pause_partitions`/`rd_kafka_resume_partitions` return success even when they skip a
    /// partition; the per-partition error says so.
    static func apply(_ rk: OpaquePointer, _ partitions: [TopicPartition], pause: Bool) throws(KafkaError) {
        guard !partitions.isEmpty else { return }
        let list = PartitionList(partitions)
        let verb = pause ? "pause" : "resume"
        let err = pause ? rd_kafka_pause_partitions(rk, list.list) : rd_kafka_resume_partitions(rk, list.list)
        if err != RD_KAFKA_RESP_ERR_NO_ERROR { throw KafkaError(code: .partitions, err: err, message: "\(verb) \(partitions)") }
        if let (tp, _, perr) = list.entries.first(where: { $0.2 != RD_KAFKA_RESP_ERR_NO_ERROR }) {
            throw KafkaError(code: .partitions, err: perr, message: "\(verb) \(tp)")
        }
    }
}
