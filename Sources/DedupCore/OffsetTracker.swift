import DequeModule

/// Knows, per partition, which consumed offsets are still unresolved, and so how far the
/// committed offset may advance (docs/architecture.md steps 1 and 7).
///
/// A message is *resolved* once it was dispatched and confirmed, recognised as a duplicate, or
/// dead-lettered. The commit position of a partition is the lowest unresolved offset (or one past
/// the last resolved offset when nothing is outstanding): nothing is committed past a message that
/// is still in the buffer, parked, or in a handler.
public struct OffsetTracker: Sendable {
    struct PartitionState: Sendable {
        /// Tracked offsets in consumption order (increasing), with whether each is resolved.
        var outstanding: Deque<(offset: Int64, resolved: Bool)> = []
        /// The next offset to commit, once something was resolved.
        var position: Int64?
        var dirty = false
        /// The first offset read since the partition was assigned, the last one, and the last
        /// position handed out to be stored: what a revocation makes the next owner read again.
        var firstRead: Int64?
        var lastRead: Int64?
        var stored: Int64?

        mutating func track(_ offset: Int64) {
            if let last = outstanding.last?.offset, offset <= last { return }
            if let position, offset < position { return }
            outstanding.append((offset, false))
            if firstRead == nil { firstRead = offset }
            lastRead = max(lastRead ?? offset, offset)
        }

        /// Offsets read but not stored: the next owner starts from the stored position (or,
        /// with nothing stored, from where this worker started) and reads them again.
        var readPastStored: Int {
            guard let lastRead, let from = stored ?? firstRead else { return 0 }
            return Int(max(0, lastRead + 1 - from))
        }

        mutating func resolve(_ offset: Int64) {
            guard let index = OffsetTracker.search(outstanding, offset) else { return }
            outstanding[index].resolved = true
            while let first = outstanding.first, first.resolved {
                position = first.offset + 1
                dirty = true
                outstanding.removeFirst()
            }
        }
    }

    /// Partition → slot in `states`. The states live in an array, mutated in place through its
    /// element: a dictionary value mutated through `partitions[tp]?.resolve(...)` allocated a
    /// coroutine frame per call, two heap allocations per message.
    private var slots: [TopicPartition: Int] = [:]
    private var states: [PartitionState] = []
    private var names: [TopicPartition] = []
    /// The partition looked up last: messages come in runs of one partition, and comparing the
    /// topic (the same string object each time) is cheaper than hashing it.
    private var last: (tp: TopicPartition, slot: Int)?

    public init() {}

    private mutating func slot(_ tp: TopicPartition, create: Bool) -> Int? {
        slot(topic: tp.topic, partition: tp.partition, create: create)
    }

    /// A message's partition is found by its topic and number, and a `TopicPartition` (a copy of
    /// the topic's string, retained and released per message) is made only for a partition that
    /// is not the last one looked up.
    private mutating func slot(topic: String, partition: Int32, create: Bool) -> Int? {
        if let last, last.tp.partition == partition, last.tp.topic == topic { return last.slot }
        let tp = TopicPartition(topic: topic, partition: partition)
        var found = slots[tp]
        if found == nil, create {
            found = states.count
            slots[tp] = states.count
            states.append(PartitionState())
            names.append(tp)
        }
        if let found { last = (tp, found) }
        return found
    }

    /// Starts tracking a consumed offset. Offsets of a partition arrive in increasing order;
    /// one already tracked (a redelivery) is ignored.
    public mutating func track(_ tp: TopicPartition, offset: Int64) {
        states[slot(tp, create: true)!].track(offset)
    }

    /// `track(_:offset:)` of a message's place.
    public mutating func track(_ message: borrowing InboundMessage) {
        states[slot(topic: message.topic, partition: message.partition, create: true)!].track(message.offset)
    }

    /// Marks an offset resolved and advances the partition's commit position past every
    /// resolved offset at the front.
    public mutating func resolve(_ tp: TopicPartition, offset: Int64) {
        guard let i = slot(tp, create: false) else { return }
        states[i].resolve(offset)
    }

    /// `resolve(_:offset:)` of a message's place.
    public mutating func resolve(_ message: borrowing InboundMessage) {
        guard let i = slot(topic: message.topic, partition: message.partition, create: false) else { return }
        states[i].resolve(message.offset)
    }

    /// Binary search: offsets in `outstanding` are increasing but not always contiguous
    /// (compacted topics, transaction markers).
    static func search(_ d: Deque<(offset: Int64, resolved: Bool)>, _ offset: Int64) -> Int? {
        var lo = 0
        var hi = d.count - 1
        while lo <= hi {
            let mid = (lo + hi) / 2
            let v = d[mid].offset
            if v == offset { return mid }
            if v < offset { lo = mid + 1 } else { hi = mid - 1 }
        }
        return nil
    }

    /// Commit positions that moved since the last call: the next offset to consume, per partition.
    public mutating func takeCommitPositions() -> [TopicPartition: Int64] {
        var out: [TopicPartition: Int64] = [:]
        for i in states.indices where states[i].dirty {
            out[names[i]] = states[i].position
            states[i].dirty = false
            states[i].stored = states[i].position
        }
        return out
    }

    /// The current commit position of a partition, if anything was resolved there.
    public func position(_ tp: TopicPartition) -> Int64? { slots[tp].flatMap { states[$0].position } }

    /// Number of tracked offsets not yet resolved, over all partitions.
    public var unresolvedCount: Int {
        states.reduce(0) { $0 + $1.outstanding.lazy.filter { !$0.resolved }.count }
    }

    /// Forgets a partition that was revoked: its unresolved messages will be read again by its next owner.
    /// Returns how many messages that is (offsets read past the last stored position; librdkafka
    /// commits stored offsets when a partition is unassigned).
    @discardableResult
    public mutating func forget(_ tp: TopicPartition) -> Int {
        guard let gone = slots[tp] else { return 0 }
        let reread = states[gone].readPastStored
        // Rare (a rebalance): the arrays are rebuilt without it.
        states.remove(at: gone)
        names.remove(at: gone)
        slots = Dictionary(uniqueKeysWithValues: names.enumerated().map { ($0.element, $0.offset) })
        last = nil
        return reread
    }
}
