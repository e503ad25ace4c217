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

        mutating func track(_ offset: Int64) {
            if let last = outstanding.last?.offset, offset <= last { return }
            if let position, offset < position { return }
            outstanding.append((offset, false))
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
        if let last, last.tp == tp { return last.slot }
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

    /// Marks an offset resolved and advances the partition's commit position past every
    /// resolved offset at the front.
    public mutating func resolve(_ tp: TopicPartition, offset: Int64) {
        guard let i = slot(tp, create: false) else { return }
        states[i].resolve(offset)
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
    public mutating func forget(_ tp: TopicPartition) {
        guard let gone = slots[tp] else { return }
        // Rare (a rebalance): the arrays are rebuilt without it.
        states.remove(at: gone)
        names.remove(at: gone)
        slots = Dictionary(uniqueKeysWithValues: names.enumerated().map { ($0.element, $0.offset) })
        last = nil
    }
}
