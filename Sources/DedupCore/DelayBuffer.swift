import DequeModule

/// Which copy of a key the delay buffer dispatches (DESIGN.md step 4).
public enum KeepPolicy: String, Sendable, CaseIterable {
    /// Dispatch the first copy; later copies within the window are duplicates.
    case first
    /// Dispatch the newest copy seen within the window (debounce); older copies are dropped.
    case last
}

/// Holds each new message for the dedup window `W` so that repeats arriving meanwhile are absorbed
/// without a round trip to Redis (DESIGN.md step 4, "the delay queue").
///
/// Entries leave in deadline order. The window is the same for every entry of one buffer, and
/// arrivals are monotonic, so the deadline order is the arrival order and a FIFO suffices.
/// The buffer is bounded in messages and bytes: `isFull` tells the consumer to pause its
/// partitions until it drains (backpressure, not memory growth).
public struct DelayBuffer: Sendable {
    public struct Entry: Sendable {
        public var key: DedupKey
        public var message: InboundMessage
        public var deadline: ContinuousClock.Instant
        public var size: Int
    }

    public let window: Duration
    public let maxMessages: Int
    public let maxBytes: Int

    /// Keys in deadline order. A key removed out of order (revocation) is skipped when popped.
    private var order: Deque<(key: DedupKey, deadline: ContinuousClock.Instant)> = []
    private var entries: [DedupKey: Entry] = [:]
    public private(set) var bytes = 0

    public init(window: Duration, maxMessages: Int, maxBytes: Int) {
        self.window = window
        self.maxMessages = maxMessages
        self.maxBytes = maxBytes
    }

    public var count: Int { entries.count }
    public var isEmpty: Bool { entries.isEmpty }
    /// At or over a bound: pause consumption.
    public var isFull: Bool { entries.count >= maxMessages || bytes >= maxBytes }
    /// Drained to half of both bounds: resume consumption. The gap avoids pausing and resuming on every batch.
    public var hasRoom: Bool { entries.count <= maxMessages / 2 && bytes <= maxBytes / 2 }

    public func contains(_ key: DedupKey) -> Bool { entries[key] != nil }

    /// The partitions that have messages waiting here.
    public var partitions: Set<TopicPartition> { Set(entries.values.map(\.message.topicPartition)) }

    /// Adds a newly claimed message; it becomes due at `now + window`.
    public mutating func insert(_ key: DedupKey, _ message: InboundMessage, now: ContinuousClock.Instant) {
        precondition(entries[key] == nil, "a key is buffered at most once")
        let size = message.approximateSize
        let deadline = now + window
        entries[key] = Entry(key: key, message: message, deadline: deadline, size: size)
        order.append((key, deadline))
        bytes += size
    }

    /// `keep: last`: the newer copy replaces the buffered one, keeping the original deadline (the
    /// window runs from the first copy). Returns the replaced message, which is now a duplicate.
    public mutating func replace(_ key: DedupKey, with message: InboundMessage) -> InboundMessage? {
        guard var entry = entries[key] else { return nil }
        let old = entry.message
        let size = message.approximateSize
        bytes += size - entry.size
        entry.message = message
        entry.size = size
        entries[key] = entry
        return old
    }

    /// The earliest deadline still waiting, to bound how long the consumer may block in poll.
    public var nextDeadline: ContinuousClock.Instant? {
        var i = order.startIndex
        while i < order.endIndex {
            let head = order[i]
            if let e = entries[head.key], e.deadline == head.deadline { return head.deadline }
            i += 1
        }
        return nil
    }

    /// Removes and returns every entry whose window has passed, in deadline order.
    public mutating func popDue(now: ContinuousClock.Instant, limit: Int = .max) -> [Entry] {
        var due: [Entry] = []
        while due.count < limit, let head = order.first, head.deadline <= now {
            order.removeFirst()
            guard let e = entries[head.key], e.deadline == head.deadline else { continue }
            entries[head.key] = nil
            bytes -= e.size
            due.append(e)
        }
        return due
    }

    /// Removes one entry (its claim was lost: another worker holds or finished the key).
    public mutating func remove(_ key: DedupKey) -> Entry? {
        guard let e = entries.removeValue(forKey: key) else { return nil }
        bytes -= e.size
        return e
    }

    /// Removes and returns every entry whose message belongs to one of `partitions` (revocation, shutdown).
    public mutating func removeAll(in partitions: Set<TopicPartition>) -> [Entry] {
        let removed = entries.values.filter { partitions.contains($0.message.topicPartition) }
        for e in removed {
            entries[e.key] = nil
            bytes -= e.size
        }
        if entries.isEmpty { order.removeAll() }
        return removed.sorted { $0.deadline < $1.deadline }
    }

    /// Removes and returns everything.
    public mutating func removeAll() -> [Entry] {
        let all = entries.values.sorted { $0.deadline < $1.deadline }
        entries.removeAll()
        order.removeAll()
        bytes = 0
        return all
    }
}
