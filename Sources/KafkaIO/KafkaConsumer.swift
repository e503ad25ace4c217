import CRdKafka
import DedupCore
import Dispatch
import Logging
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A librdkafka group consumer (`rd_kafka_t` of type consumer, subscribed to topics).
///
/// Blocking calls (poll, commit, committed, watermarks, close) run on the consumer's own serial queue, one hop
/// per call; `poll` returns a whole batch per hop.
///
/// `@unchecked Sendable`: `rk` is thread-safe in librdkafka; `closed` is behind a `Mutex`, and `rk` is
/// destroyed only while holding it (after which every call sees `closed`); `names` is only used by
/// `pollBatch`, which runs on the executor's serial queue.
public final class KafkaConsumer: @unchecked Sendable {
    /// What a poll returns, in the order it happened.
    public enum ConsumerEvent: Sendable {
        case message(InboundMessage)
        /// Partitions added to this member's assignment: eager, the whole new assignment;
        /// cooperative (incremental), only the partitions that moved here, possibly none.
        case assigned([TopicPartition])
        /// Partitions taken away in a rebalance: eager, the whole old assignment; cooperative,
        /// only the partitions that move elsewhere.
        case revoked([TopicPartition])
        /// Partitions taken away without a rebalance (`rd_kafka_assignment_lost`: the session
        /// timed out or the member was fenced); another member may own them already.
        case lost([TopicPartition])
        case error(KafkaError)
    }

    /// The prefetch queue's bound in messages (`queued.min.messages`), for a worker whose buffer
    /// is at least the default size; a worker with a smaller buffer prefetches less.
    public static let prefetchMessages = 35000
    public static let prefetchMessagesProperty = "queued.min.messages"

    /// Properties dedupd sets before applying the caller's overrides: offsets are stored only for resolved
    /// messages and committed automatically every second, a new group starts at the earliest offset, and the
    /// group timeouts are short so a dead worker's partitions move within seconds (librdkafka's own defaults
    /// are 45 s and 300 s), and prefetch is bounded so memory follows the configured buffer.
    public static let defaultProperties: [String: String] = [
        "enable.auto.offset.store": "false",
        "enable.auto.commit": "true",
        "auto.commit.interval.ms": "1000",
        "auto.offset.reset": "earliest",
        "session.timeout.ms": "6000",
        "heartbeat.interval.ms": "500",
        "max.poll.interval.ms": "20000",
        "enable.partition.eof": "false",
        // Prefetch counts toward the worker's memory: librdkafka's default queue size would double
        // the footprint of a full delay buffer, so the queue is bounded to a fraction of a second
        // of messages, and 256 KiB per partition and fetch keeps the overshoot of one fetch
        // response small. The message count is the tighter bound for small messages, whose
        // memory in librdkafka is mostly its per-message overhead, which the kbytes bound does
        // not count: lower, and the prefetch queue runs empty between polls; higher, and
        // MemoryBoundTests' bound is passed (the figures: docs/performance.md). A worker with a
        // buffer smaller than the default prefetches fewer (`prefetchMessages`). The price of
        // the bound: once the queue reaches it, librdkafka 2.0 stops fetching until its broker
        // thread next wakes, up to a second later (its fetch.queue.backoff.ms, from 2.2 on,
        // shortens that), so a worker that is behind reads about one queue's worth per second.
        // A fetch error backs a partition off for fetch.error.backoff.ms; librdkafka's 500 ms
        // is shortened too.
        "queued.max.messages.kbytes": "8192",
        prefetchMessagesProperty: String(prefetchMessages),
        "max.partition.fetch.bytes": "262144",
        "fetch.error.backoff.ms": "20",
    ]

    private let rk: OpaquePointer
    private let context: ClientContext
    private let executor: BlockingExecutor
    private let closed = Mutex<Bool>(false)
    private let blocksCaller = Atomic<Bool>(false)
    /// Only used inside `pollBatch`, on `executor`'s serial queue (see `NameCache`).
    private var names = NameCache()
    public let groupID: String
    public let topics: [String]

    private init(rk: OpaquePointer, context: ClientContext, executor: BlockingExecutor, groupID: String, topics: [String]) {
        self.rk = rk
        self.context = context
        self.executor = executor
        self.groupID = groupID
        self.topics = topics
    }

    /// Creates a consumer in group `groupID` subscribed to `topics`. The group is joined by the first `poll`.
    /// - Parameter properties: librdkafka properties overriding `defaultProperties`.
    /// - Throws: `KafkaError.Code.config` naming a rejected property.
    public static func make(
        bootstrapServers: String,
        groupID: String,
        topics: [String],
        properties: [String: String] = [:],
        logger: Logger
    ) throws(KafkaError) -> KafkaConsumer {
        var defaults = defaultProperties
        defaults["bootstrap.servers"] = bootstrapServers
        defaults["group.id"] = groupID
        let conf = try KafkaConfig.makeConf(defaults: defaults, overrides: properties)
        rd_kafka_conf_set_rebalance_cb(conf, kafkaRebalanceCallback)
        var logger = logger
        logger[metadataKey: "kafka.group"] = .string(groupID)
        let context = ClientContext(logger: logger, recordErrors: true)
        let rk = try KafkaConfig.makeHandle(type: RD_KAFKA_CONSUMER, conf: conf, context: context)
        // The main queue (errors, rebalances, logs) is served by the consumer poll from here on.
        rd_kafka_poll_set_consumer(rk)
        let sub = PartitionList(topics.map { TopicPartition(topic: $0, partition: RD_KAFKA_PARTITION_UA) })
        let err = rd_kafka_subscribe(rk, sub.list)
        if err != RD_KAFKA_RESP_ERR_NO_ERROR {
            rd_kafka_destroy_flags(rk, RD_KAFKA_DESTROY_F_NO_CONSUMER_CLOSE)
            throw KafkaError(code: .config, err: err, message: "subscribe to \(topics) failed")
        }
        let label = "kafka.consumer.\(groupID)"
        return KafkaConsumer(rk: rk, context: context, executor: BlockingExecutor(label: label), groupID: groupID, topics: topics)
    }

    deinit {
        // `close()` was not called: leave the group on the way out (blocking, but nothing else can use `rk`).
        let wasClosed = closed.withLock { $0 }
        if !wasClosed {
            if context.isFatal.load(ordering: .acquiring) {
                rd_kafka_destroy_flags(rk, RD_KAFKA_DESTROY_F_NO_CONSUMER_CLOSE)  // as in `closeOnQueue`
            } else {
                rd_kafka_consumer_close(rk)
                rd_kafka_destroy(rk)
            }
        }
    }

    // MARK: Polling

    /// Whether `poll` may block the thread it is called from: set by a caller that polls from a
    /// thread of its own rather than the cooperative pool, so that a poll that waits for the
    /// broker needs no hop to the consumer's queue and back. Default: false.
    public var pollsBlockCaller: Bool {
        get { blocksCaller.load(ordering: .relaxed) }
        set { blocksCaller.store(newValue, ordering: .relaxed) }
    }

    /// Waits up to `timeout` for the first message or event, then takes what else is immediately available, up to
    /// `maxMessages` events. A rebalance ends the batch. Returns `[]` on timeout or after `close()`.
    public func poll(maxMessages: Int, timeout: Duration) async -> [ConsumerEvent] {
        // Checked before the queue too: a close that timed out may still hold it.
        if context.isClosing { return [] }
        let timeoutMs = timeout.kafkaMilliseconds
        if pollsBlockCaller {
            return executor.runHere { [self] in pollBatch(maxMessages: max(1, maxMessages), timeoutMs: timeoutMs) }
        }
        // A zero-timeout poll does not block, so it runs on the caller's own thread while the
        // queue is idle, without the two thread hops of `executor.run`. Most passes of a loop
        // that is waiting for Redis poll this way.
        if timeoutMs == 0 {
            return await executor.runNonBlocking { [self] in pollBatch(maxMessages: max(1, maxMessages), timeoutMs: 0) }
        }
        return await executor.run { [self] in pollBatch(maxMessages: max(1, maxMessages), timeoutMs: timeoutMs) }
    }

    /// Runs on `executor`.
    private func pollBatch(maxMessages: Int, timeoutMs: Int32) -> [ConsumerEvent] {
        var out: [ConsumerEvent] = []
        out.reserveCapacity(min(maxMessages, 4096))
        var wait = timeoutMs
        // `close()` destroys `rk` on this same serial queue, so it cannot happen during this call:
        // one check per batch, not per message.
        if closed.withLock({ $0 }) { return out }
        // Moved out for the batch and back after it: passed `inout` as the class's property, it
        // would be checked for exclusive access once per message.
        var names = NameCache()
        swap(&names, &self.names)
        defer { swap(&names, &self.names) }
        while out.count < maxMessages {
            let rkm = rd_kafka_consumer_poll(rk, wait)
            // Events are rare: an atomic load per message, the lock only when one was recorded.
            let events = context.hasEvents ? context.takeEvents() : []
            var rebalanced = false
            for e in events {
                out.append(e)
                switch e {
                case .assigned, .revoked, .lost: rebalanced = true
                default: break
                }
            }
            if let rkm {
                defer { rd_kafka_message_destroy(rkm) }
                if let event = Self.convert(rkm, names: &names) {
                    if case .error(let error) = event { consumeErrorArrived(error) }
                    out.append(event)
                }
            } else if events.isEmpty {
                break  // nothing more right now
            }
            if rebalanced { break }
            wait = 0
        }
        let lost = context.pauses.repauseIfLost(rk, after: out)
        if !lost.isEmpty {
            context.logger.warning(
                "librdkafka lost a pause: a paused partition delivered messages; pausing it again",
                metadata: ["kafka.partitions": .string(lost.map(\.description).sorted().joined(separator: ","))])
        }
        return out
    }

    /// Why librdkafka gave this consumer up (a fatal error: a static member fenced by another with
    /// the same `group.instance.id`, for one), or `nil`. It consumes nothing more; the worker
    /// stops and exits non-zero, to be restarted with a new client.
    public var unrecoverableError: String? {
        context.isFatal.load(ordering: .acquiring) ? context.fatalReason.withLock { $0 } : nil
    }

    /// Raises a fatal error as librdkafka would (`rd_kafka_test_fatal_error`): there is no other
    /// way to cause one against the mock cluster. For tests.
    package func raiseFatalErrorForTesting(_ reason: String) {
        _ = rd_kafka_test_fatal_error(rk, RD_KAFKA_RESP_ERR_FENCED_INSTANCE_ID, reason)
    }

    /// An error the consumer delivers in place of a message: a subscribed topic that does not
    /// exist or that the user may not read (librdkafka says so at each metadata refresh), a
    /// partition's fetch error. The client-wide ones come through the error callback instead.
    private func consumeErrorArrived(_ error: KafkaError) {
        // A consumer learns of a fatal error this way, not through the error callback.
        if error.errorNumber == RD_KAFKA_RESP_ERR__FATAL.rawValue { context.recordFatal(rk) }
        var metadata: Logger.Metadata = [
            "kafka.error": .string(error.errorName ?? "\(error.errorNumber ?? 0)"),
            "kafka.reason": .string(error.message),
        ]
        let topicMissing = [RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART, RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED].map(\.rawValue)
        if let number = error.errorNumber, topicMissing.contains(number) {
            metadata["hint"] = "check kafka.topics and the user's Describe and Read permissions on the topic; the other topics are consumed meanwhile"
        }
        context.logger.error("kafka consumer error", metadata: metadata)
    }

    /// Copies a C message into a Swift event; `nil` for partition EOF.
    private static func convert(_ rkm: UnsafeMutablePointer<rd_kafka_message_t>, names: inout NameCache) -> ConsumerEvent? {
        let m = rkm.pointee
        let topic = m.rkt.map { names.topic($0) } ?? ""
        if m.err != RD_KAFKA_RESP_ERR_NO_ERROR {
            if m.err == RD_KAFKA_RESP_ERR__PARTITION_EOF { return nil }
            var detail = ""
            if let p = rd_kafka_message_errstr(rkm) { detail = String(cString: p) }
            var error = KafkaError(code: .consume, err: m.err)
            if !detail.isEmpty { error.message = topic.isEmpty ? detail : "\(topic)[\(m.partition)]: \(detail)" }
            return .error(error)
        }
        // Value, key and headers go into one array (`MessageBytes`): sized first, so it is
        // allocated once.
        let value = m.payload.map { UnsafeRawBufferPointer(start: $0, count: m.len) } ?? UnsafeRawBufferPointer(start: nil, count: 0)
        let key = m.key.map { UnsafeRawBufferPointer(start: $0, count: m.key_len) }
        var hdrs: OpaquePointer? = nil
        if rd_kafka_message_headers(rkm, &hdrs) != RD_KAFKA_RESP_ERR_NO_ERROR { hdrs = nil }
        let headerCount = hdrs.map { rd_kafka_header_cnt($0) } ?? 0
        // The headers are read from librdkafka once (each name's `strlen` too) into a temporary
        // buffer (on the stack for a usual message's few headers): the array is sized from them
        // before they are written into it.
        let bytes = withUnsafeTemporaryAllocation(of: RawHeader.self, capacity: headerCount) { headers in
            var capacity = value.count + (key?.count ?? 0)
            var name: UnsafePointer<CChar>? = nil
            var val: UnsafeRawPointer? = nil
            var size = 0
            var count = 0
            while count < headerCount, rd_kafka_header_get_all(hdrs, count, &name, &val, &size) == RD_KAFKA_RESP_ERR_NO_ERROR {
                let header = RawHeader(
                    name: name.map { UnsafeRawBufferPointer(start: $0, count: strlen($0)) } ?? UnsafeRawBufferPointer(start: nil, count: 0),
                    value: val.map { UnsafeRawBufferPointer(start: $0, count: size) })
                capacity += MessageBytes.headerCost(nameCount: header.name.count, valueCount: header.value?.count)
                headers.initializeElement(at: count, to: header)
                count += 1
            }
            return MessageBytes(capacity: capacity) { writer in
                writer.value(value)
                if let key { writer.key(key) }
                for i in 0..<count { writer.header(name: headers[i].name, value: headers[i].value) }
            }
        }
        var tsType = RD_KAFKA_TIMESTAMP_NOT_AVAILABLE
        let ts = rd_kafka_message_timestamp(rkm, &tsType)
        return .message(
            InboundMessage(
                topic: topic, partition: m.partition, offset: m.offset, bytes: bytes, timestampMillis: ts >= 0 ? ts : nil)
        )
    }

    // MARK: Flow control and offsets (non-blocking in librdkafka)

    /// Stops fetching from `partitions` until `resume`. Messages fetched before the call are not returned after
    /// it (librdkafka drops them and fetches them again on resume). A pause that librdkafka loses is restored
    /// by the next poll that sees the partition's message (see `PartitionPauses`). A revoked partition loses
    /// its pause.
    public func pause(_ partitions: [TopicPartition]) throws(KafkaError) {
        try withOpenHandle { rk throws(KafkaError) in try context.pauses.pause(rk, partitions) }
    }

    /// Fetches again from partitions paused with `pause` or held by `holdNewAssignments`.
    public func resume(_ partitions: [TopicPartition]) throws(KafkaError) {
        try withOpenHandle { rk throws(KafkaError) in try context.pauses.resume(rk, partitions) }
    }

    /// While on, partitions that a rebalance assigns start paused: they are paused before librdkafka starts
    /// fetching them, which a `pause` after the `.assigned` event cannot promise. The caller resumes them.
    public func holdNewAssignments(_ hold: Bool) {
        context.pauses.setHoldNewAssignments(hold)
    }

    /// Tests only: clears librdkafka's pause flag and nothing else, as a pause that librdkafka lost would.
    func clearPauseInLibrdkafkaOnly(_ partitions: [TopicPartition]) throws(KafkaError) {
        try withOpenHandle { rk throws(KafkaError) in try PartitionPauses.apply(rk, partitions, pause: false) }
    }

    /// Stores offsets for the next commit. `next` is the offset of the NEXT message to consume per partition
    /// (last resolved + 1). Partitions no longer assigned to this member are skipped (logged at debug).
    public func storeOffsets(_ next: [TopicPartition: Int64]) throws(KafkaError) {
        guard !next.isEmpty else { return }
        try withOpenHandle { rk throws(KafkaError) in
            let list = PartitionList(Array(next.keys), offsets: next)
            let err = rd_kafka_offsets_store(rk, list.list)
            var partitionErrors = 0
            for (tp, offset, perr) in list.entries where perr != RD_KAFKA_RESP_ERR_NO_ERROR {
                partitionErrors += 1
                context.logger.debug(
                    "offset not stored for partition",
                    metadata: [
                        "kafka.topic": .string(tp.topic), "kafka.partition": .stringConvertible(tp.partition),
                        "kafka.offset": .stringConvertible(offset),
                        "kafka.error": .string(String(cString: rd_kafka_err2name(perr))),
                    ]
                )
            }
            // librdkafka fails the whole call when no partition could be stored; that is the "all revoked" case.
            if err != RD_KAFKA_RESP_ERR_NO_ERROR && partitionErrors == 0 {
                throw KafkaError(code: .offsets, err: err, message: "store offsets")
            }
        }
    }

    /// Commits the stored offsets and waits for the broker's answer, at most `timeout` when given
    /// (a commit to a coordinator that stopped answering waits as long as librdkafka's request
    /// timeout otherwise). Nothing stored is not an error.
    public func commitSync(timeout: Duration? = nil) async throws(KafkaError) {
        try await executor.run { [self] () throws(KafkaError) in
            try onQueueWithOpenHandle { rk throws(KafkaError) in
                let err = timeout.map { Self.commit(rk, within: $0) } ?? rd_kafka_commit(rk, nil, 0)
                if err != RD_KAFKA_RESP_ERR_NO_ERROR && err != RD_KAFKA_RESP_ERR__NO_OFFSET {
                    throw KafkaError(code: .commit, err: err, message: "commit")
                }
            }
        }
    }

    /// The commit's answer arrives as an event on a queue of its own, waited for up to `timeout`;
    /// an answer after that goes to the destroyed queue and is dropped.
    private static func commit(_ rk: OpaquePointer, within timeout: Duration) -> rd_kafka_resp_err_t {
        let queue = rd_kafka_queue_new(rk)
        defer { rd_kafka_queue_destroy(queue) }
        let err = rd_kafka_commit_queue(rk, nil, queue, nil, nil)
        guard err == RD_KAFKA_RESP_ERR_NO_ERROR else { return err }
        guard let event = rd_kafka_queue_poll(queue, timeout.kafkaMilliseconds) else { return RD_KAFKA_RESP_ERR__TIMED_OUT }
        defer { rd_kafka_event_destroy(event) }
        return rd_kafka_event_error(event)
    }

    /// The partitions currently assigned to this member.
    public func assignment() async -> [TopicPartition] {
        (try? withOpenHandle { rk throws(KafkaError) -> [TopicPartition] in
            var list: UnsafeMutablePointer<rd_kafka_topic_partition_list_t>? = nil
            let err = rd_kafka_assignment(rk, &list)
            guard err == RD_KAFKA_RESP_ERR_NO_ERROR, let list else { return [] }
            defer { rd_kafka_topic_partition_list_destroy(list) }
            return PartitionList.read(list).map(\.0)
        }) ?? []
    }

    /// Consumer lag summed over `partitions`: the high watermark librdkafka last saw in a fetch
    /// response minus this consumer's position. Both are cached locally (`rd_kafka_get_watermark_offsets`,
    /// `rd_kafka_position`), so this never waits for a broker; partitions without a fetched position or
    /// watermark yet are left out. `nil` when none is known.
    public func cachedLag(_ partitions: [TopicPartition]) -> Int64? {
        guard !partitions.isEmpty else { return nil }
        return try? withOpenHandle { rk throws(KafkaError) -> Int64? in
            let list = PartitionList(partitions)
            guard rd_kafka_position(rk, list.list) == RD_KAFKA_RESP_ERR_NO_ERROR else { return nil }
            var total: Int64 = 0
            var known = false
            for (tp, position, err) in list.entries where err == RD_KAFKA_RESP_ERR_NO_ERROR && position >= 0 {
                var low: Int64 = -1, high: Int64 = -1
                guard rd_kafka_get_watermark_offsets(rk, tp.topic, tp.partition, &low, &high) == RD_KAFKA_RESP_ERR_NO_ERROR,
                    high >= 0
                else { continue }
                total += max(0, high - position)
                known = true
            }
            return known ? total : nil
        }
    }

    /// The group's committed offsets for `partitions` (the next offset to consume); -1001 when none is committed.
    public func committed(_ partitions: [TopicPartition], timeout: Duration) async throws(KafkaError) -> [TopicPartition: Int64] {
        let ms = timeout.kafkaMilliseconds
        return try await executor.run { [self] () throws(KafkaError) in
            try onQueueWithOpenHandle { rk throws(KafkaError) in try KafkaConsumer.committed(rk, partitions, timeoutMs: ms) }
        }
    }

    /// The low and high watermark (offset after the last message) of a partition, asked from its leader.
    public func watermarks(_ tp: TopicPartition, timeout: Duration) async throws(KafkaError) -> (low: Int64, high: Int64) {
        let ms = timeout.kafkaMilliseconds
        let r: (Int64, Int64) = try await executor.run { [self] () throws(KafkaError) in
            try onQueueWithOpenHandle { rk throws(KafkaError) in try KafkaConsumer.watermarks(rk, tp, timeoutMs: ms) }
        }
        return (low: r.0, high: r.1)
    }

    /// Leaves the group (revokes, commits per `enable.auto.commit`, sends LeaveGroup) and frees the
    /// handle. Calling it again does nothing.
    ///
    /// Leaving waits for whatever the group protocol has in flight: a JoinGroup of a rebalance
    /// that waits for a dead member's session, a commit to a coordinator that moved. librdkafka
    /// bounds none of that, so with a `timeout` the wait stops there: the handle is then left
    /// open, with its callbacks' context (destroying it would wait as well), and the group drops
    /// this member when its session runs out. Returns whether the group was left in time.
    ///
    /// The timeout holds even when a call into librdkafka never returns: the final revocation's
    /// `rd_kafka_assign` waits without a limit for the group's main thread, which drops the request
    /// unanswered when the group finishes terminating at that moment. The close then goes on
    /// on the handle's queue, and so would any later call that needs that queue.
    @discardableResult
    public func close(timeout: Duration? = nil) async -> Bool {
        guard let timeout else { return await executor.run { [self] in closeOnQueue(timeout: nil, deadline: nil) } }
        let deadline = ContinuousClock.now + timeout
        // leaveGroup looks at the deadline at least every 100 ms; past this margin it is stuck.
        if let left = await executor.run(until: deadline + .milliseconds(250), { [self] in closeOnQueue(timeout: timeout, deadline: deadline) }) {
            return left
        }
        logLeftWithoutLeaving(timeout: timeout, stuck: true)
        return false
    }

    /// Runs on `executor`.
    private func closeOnQueue(timeout: Duration?, deadline: ContinuousClock.Instant?) -> Bool {
        let shouldClose = closed.withLock { c in
            if c { return false }
            c = true
            return true
        }
        guard shouldClose else { return true }
        context.setClosing()
        // A consumer given up by a fatal error cannot leave its group, and librdkafka 2.0.2's
        // close of one does not return: destroyed without it, it is dropped after its session.
        if context.isFatal.load(ordering: .acquiring) {
            rd_kafka_destroy_flags(rk, RD_KAFKA_DESTROY_F_NO_CONSUMER_CLOSE)
            return false
        }
        let left = leaveGroup(deadline: deadline)
        if left {
            rd_kafka_destroy(rk)
        } else {
            // librdkafka's threads go on calling back into the context: it must outlive this object.
            _ = Unmanaged.passRetained(context)
            logLeftWithoutLeaving(timeout: timeout ?? .zero, stuck: false)
        }
        return left
    }

    private func logLeftWithoutLeaving(timeout: Duration, stuck: Bool) {
        var metadata: Logger.Metadata = ["timeout": "\(timeout)"]
        if stuck { metadata["kafka.stuck"] = "a librdkafka call during the close did not return" }
        context.logger.warning(
            "leaving the group did not finish in time; exiting without it (the group drops this member after session.timeout.ms)",
            metadata: metadata)
    }

    /// `rd_kafka_consumer_close`, with a deadline: the close runs on the consumer queue, served
    /// here (the rebalance callback of the final revocation runs inside `rd_kafka_consume_queue`)
    /// until librdkafka reports the consumer closed. Messages still arriving are dropped: their
    /// offsets were never stored.
    private func leaveGroup(deadline: ContinuousClock.Instant?) -> Bool {
        let queue = rd_kafka_queue_get_consumer(rk)
        defer { rd_kafka_queue_destroy(queue) }
        if let error = rd_kafka_consumer_close_queue(rk, queue) {
            context.logger.info("consumer close reported an error", metadata: ["kafka.error": .string(String(cString: rd_kafka_error_string(error)))])
            rd_kafka_error_destroy(error)
        }
        while rd_kafka_consumer_closed(rk) == 0 {
            var waitMs: Int32 = 100
            if let deadline {
                let left = deadline - ContinuousClock.now
                guard left > .zero else { return false }
                waitMs = min(waitMs, max(1, left.kafkaMilliseconds))
            }
            if let rkm = rd_kafka_consume_queue(queue, waitMs) { rd_kafka_message_destroy(rkm) }
        }
        return true
    }

    /// Runs `body` with the handle while holding the lock that `close()` takes before destroying it.
    private func withOpenHandle<T>(_ body: (OpaquePointer) throws(KafkaError) -> T) throws(KafkaError) -> T {
        try closed.withLock { c throws(KafkaError) -> T in
            if c { throw KafkaError(code: .closed, message: "consumer for group \(groupID) is closed") }
            return try body(rk)
        }
    }

    /// For blocking calls on `executor`: `close()` destroys `rk` on the same serial queue, so checking the flag
    /// is enough and the lock is not held across the blocking call (which would stall `pause`/`storeOffsets`).
    private func onQueueWithOpenHandle<T>(_ body: (OpaquePointer) throws(KafkaError) -> T) throws(KafkaError) -> T {
        dispatchPrecondition(condition: .onQueue(executor.queue))
        if closed.withLock({ $0 }) { throw KafkaError(code: .closed, message: "consumer for group \(groupID) is closed") }
        return try body(rk)
    }

    // MARK: Shared blocking helpers (caller is on a dedicated queue)

    static func committed(_ rk: OpaquePointer, _ partitions: [TopicPartition], timeoutMs: Int32) throws(KafkaError) -> [TopicPartition: Int64] {
        guard !partitions.isEmpty else { return [:] }
        let list = PartitionList(partitions)
        let err = rd_kafka_committed(rk, list.list, timeoutMs)
        if err != RD_KAFKA_RESP_ERR_NO_ERROR { throw KafkaError(code: .offsets, err: err, message: "read committed offsets") }
        var result: [TopicPartition: Int64] = [:]
        for (tp, offset, perr) in list.entries {
            if perr != RD_KAFKA_RESP_ERR_NO_ERROR {
                throw KafkaError(code: .offsets, err: perr, message: "read committed offset of \(tp)")
            }
            result[tp] = offset
        }
        return result
    }

    static func watermarks(_ rk: OpaquePointer, _ tp: TopicPartition, timeoutMs: Int32) throws(KafkaError) -> (Int64, Int64) {
        var low: Int64 = -1
        var high: Int64 = -1
        let err = rd_kafka_query_watermark_offsets(rk, tp.topic, tp.partition, &low, &high, timeoutMs)
        if err != RD_KAFKA_RESP_ERR_NO_ERROR { throw KafkaError(code: .offsets, err: err, message: "watermarks of \(tp)") }
        return (low, high)
    }

    /// Partition ids of `topic`, from the cluster's metadata.
    static func partitionIDs(_ rk: OpaquePointer, topic: String, timeoutMs: Int32) throws(KafkaError) -> [Int32] {
        guard let rkt = rd_kafka_topic_new(rk, topic, nil) else {
            throw KafkaError(code: .metadata, message: "cannot create topic handle for \(topic)")
        }
        defer { rd_kafka_topic_destroy(rkt) }
        var md: UnsafePointer<rd_kafka_metadata>? = nil
        let err = rd_kafka_metadata(rk, 0, rkt, &md, timeoutMs)
        if err != RD_KAFKA_RESP_ERR_NO_ERROR { throw KafkaError(code: .metadata, err: err, message: "metadata of \(topic)") }
        guard let md else { throw KafkaError(code: .metadata, message: "no metadata for \(topic)") }
        defer { rd_kafka_metadata_destroy(md) }
        for i in 0..<Int(md.pointee.topic_cnt) {
            let t = md.pointee.topics[i]
            guard String(cString: t.topic) == topic else { continue }
            if t.err != RD_KAFKA_RESP_ERR_NO_ERROR {
                throw KafkaError(code: .metadata, err: t.err, message: "metadata of \(topic)")
            }
            return (0..<Int(t.partition_cnt)).map { t.partitions[$0].id }.sorted()
        }
        throw KafkaError(code: .metadata, err: RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART, message: "metadata of \(topic)")
    }
}

/// A header as librdkafka lends it: its name's and value's bytes, valid until the message is
/// destroyed.
private struct RawHeader {
    var name: UnsafeRawBufferPointer
    var value: UnsafeRawBufferPointer?
}

/// Topic names seen by the consumer, so a message's topic is a Swift string that already
/// exists rather than a new one: a name over 15 bytes is a heap string, and every copy of a
/// message (buffer, dispatch, dead letter) retains it. (Header names are bytes in the
/// message's `MessageBytes`.)
///
/// Only touched on the consumer's serial queue (inside `pollBatch`).
struct NameCache {
    private var lastTopic: (handle: OpaquePointer, name: String)?
    private var topics: [OpaquePointer: String] = [:]

    /// The topic handle is the same pointer for every message of a topic: one comparison for a
    /// run of messages from the same topic, a dictionary for the rest.
    mutating func topic(_ rkt: OpaquePointer) -> String {
        if let last = lastTopic, last.handle == rkt { return last.name }
        let name: String
        if let known = topics[rkt] {
            name = known
        } else {
            name = String(cString: rd_kafka_topic_name(rkt))
            topics[rkt] = name
        }
        lastTopic = (rkt, name)
        return name
    }
}

// MARK: - Reading a group's progress without joining it

/// Committed offsets and watermarks of one partition, for "has the group consumed everything?" checks.
public struct PartitionProgress: Sendable, Hashable {
    public var partition: Int32
    /// The group's committed offset (next offset to consume), or -1001 when none is committed.
    public var committed: Int64
    public var low: Int64
    /// The offset after the partition's last message.
    public var high: Int64

    /// Whether everything the partition holds is committed.
    public var isCaughtUp: Bool { committed >= high || (committed < 0 && high <= low) }
    /// Messages not yet committed.
    public var lag: Int64 { committed < 0 ? high - low : max(0, high - committed) }
}

extension KafkaConsumer {
    /// Reads `groupID`'s committed offsets and the watermarks of every partition of `topic` without joining the
    /// group: a consumer handle with the group's id that never subscribes does not become a member.
    public static func groupProgress(
        bootstrapServers: String,
        groupID: String,
        topic: String,
        timeout: Duration = .seconds(10),
        logger: Logger = Logger(label: "kafka.probe", factory: { _ in SwiftLogNoOpLogHandler() })
    ) async throws(KafkaError) -> [PartitionProgress] {
        let ms = timeout.kafkaMilliseconds
        let executor = BlockingExecutor(label: "kafka.probe.\(groupID)")
        return try await executor.run { () throws(KafkaError) -> [PartitionProgress] in
            let conf = try KafkaConfig.makeConf(
                defaults: [:],
                overrides: [
                    "bootstrap.servers": bootstrapServers, "group.id": groupID,
                    "enable.auto.commit": "false", "enable.auto.offset.store": "false",
                ]
            )
            let context = ClientContext(logger: logger)
            let rk = try KafkaConfig.makeHandle(type: RD_KAFKA_CONSUMER, conf: conf, context: context)
            defer {
                rd_kafka_destroy_flags(rk, RD_KAFKA_DESTROY_F_NO_CONSUMER_CLOSE)
                withExtendedLifetime(context) {}
            }
            let ids = try partitionIDs(rk, topic: topic, timeoutMs: ms)
            let tps = ids.map { TopicPartition(topic: topic, partition: $0) }
            let committed = try committed(rk, tps, timeoutMs: ms)
            return try tps.map { tp throws(KafkaError) in
                let (low, high) = try watermarks(rk, tp, timeoutMs: ms)
                return PartitionProgress(partition: tp.partition, committed: committed[tp] ?? -1001, low: low, high: high)
            }
        }
    }

    /// `groupID`'s committed offsets (next offset to consume) per partition of `topic`, -1001 where none.
    public static func committedOffsets(
        bootstrapServers: String, groupID: String, topic: String, timeout: Duration = .seconds(10)
    ) async throws(KafkaError) -> [Int32: Int64] {
        let progress = try await groupProgress(bootstrapServers: bootstrapServers, groupID: groupID, topic: topic, timeout: timeout)
        return Dictionary(uniqueKeysWithValues: progress.map { ($0.partition, $0.committed) })
    }

    /// The end offset (high watermark) of every partition of `topic`.
    public static func endOffsets(
        bootstrapServers: String, topic: String, timeout: Duration = .seconds(10)
    ) async throws(KafkaError) -> [Int32: Int64] {
        let progress = try await groupProgress(
            bootstrapServers: bootstrapServers, groupID: "dedupd-probe-unused", topic: topic, timeout: timeout)
        return Dictionary(uniqueKeysWithValues: progress.map { ($0.partition, $0.high) })
    }
}

/// Applies a rebalance and records it as an event for `poll`. The protocol follows the
/// assignor (`partition.assignment.strategy`): eager replaces the whole assignment
/// (`rd_kafka_assign`), cooperative adds or removes only the partitions listed
/// (`rd_kafka_incremental_assign`/`_unassign`), so the partitions a member keeps go on
/// fetching from where they are, with their pause flag. Runs inside `rd_kafka_consumer_poll`,
/// i.e. on the consumer's queue.
private let kafkaRebalanceCallback: @convention(c) (
    OpaquePointer?, rd_kafka_resp_err_t, UnsafeMutablePointer<rd_kafka_topic_partition_list_t>?, UnsafeMutableRawPointer?
) -> Void = { rk, err, partitions, _ in
    guard let rk, let context = ClientContext.of(rk) else { return }
    let tps = PartitionList.read(partitions).map(\.0)
    let cooperative = context.rebalanceIsCooperative(rk)
    let list = tps.map(\.description).joined(separator: ",")
    if err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS {
        context.logger.info(
            "partitions assigned",
            metadata: ["kafka.partitions": .string(list), "kafka.rebalance": .string(cooperative ? "cooperative" : "eager")])
        do { try context.pauses.assigning(rk, tps) } catch {
            context.logger.warning("holding new partitions failed", metadata: ["error": "\(error)"])
        }
        if cooperative {
            if let e = rd_kafka_incremental_assign(rk, partitions) {
                context.logger.warning("incremental assign failed", metadata: ["kafka.error": .string(String(cString: rd_kafka_error_string(e)))])
                rd_kafka_error_destroy(e)
            }
        } else {
            rd_kafka_assign(rk, partitions)
        }
        context.record(.assigned(tps))
    } else {
        if err != RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS {
            context.logger.info("rebalance error", metadata: ["kafka.error": .string(String(cString: rd_kafka_err2name(err)))])
        }
        // Lost (session timeout, fenced): the partitions may be someone else's already; the
        // engine drops them as for a revocation, and librdkafka commits nothing for them.
        let lost = rd_kafka_assignment_lost(rk) != 0
        context.logger.info(
            lost ? "partitions lost" : "partitions revoked",
            metadata: ["kafka.partitions": .string(list), "kafka.rebalance": .string(cooperative ? "cooperative" : "eager")])
        context.record(lost ? .lost(tps) : .revoked(tps))
        if cooperative {
            if let e = rd_kafka_incremental_unassign(rk, partitions) {
                context.logger.warning("incremental unassign failed", metadata: ["kafka.error": .string(String(cString: rd_kafka_error_string(e)))])
                rd_kafka_error_destroy(e)
            }
        } else {
            rd_kafka_assign(rk, nil)
        }
        do { try context.pauses.revoked(rk, tps) } catch {
            context.logger.warning("clearing the pause of revoked partitions failed", metadata: ["error": "\(error)"])
        }
    }
    // Make the current poll return so the event reaches the caller without waiting for a message.
    rd_kafka_yield(rk)
}
