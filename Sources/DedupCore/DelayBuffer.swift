import DequeModule

/// Which copy of a key the delay buffer dispatches (docs/architecture.md step 4).
public enum KeepPolicy: String, Sendable, CaseIterable {
    /// Dispatch the first copy; later copies within the window are duplicates.
    case first
    /// Dispatch the newest copy seen within the window (debounce); older copies are dropped.
    case last
}

/// The delay queue (docs/architecture.md step 4): the order in which buffered keys become due, and
/// how many messages and bytes are in the window (for the stats; the bounds that pause the
/// consumer count every message held, `DedupLedger.shouldPause`).
///
/// The messages themselves stay in the engine's one entry per key; this holds only
/// `(entry, deadline)` slots, so a message is never copied between places on its way through.
/// Each lane has one window (a route's), so within a lane the deadline order is nearly the
/// arrival order and a FIFO suffices: a slot added with a deadline before the lane's last (a
/// key claimed again after a failed round trip, its window counted from its poll) is due with
/// that last one. With several routes the earliest of the lanes' heads is due first.
///
/// A slot goes stale when its entry leaves the window some other way (revocation, a lost lease);
/// the owner says which slots are live, and stale ones are skipped when they reach the front.
public struct DelayBuffer: Sendable {
    public struct Slot: Sendable {
        public var entry: EntryRef
        /// When it is due: a `Moment`, so that a slot has a layout fixed at compile time.
        public var due: Moment
    }

    /// Live messages and their bytes, kept by the owner through `added`/`removed`/`resized`.
    public private(set) var count = 0
    public private(set) var bytes = 0

    private var lanes: [Deque<Slot>]

    public init(lanes: Int = 1) {
        self.lanes = Array(repeating: [], count: max(1, lanes))
    }

    public var isEmpty: Bool { count == 0 }

    /// An entry enters the window of `lane`; it becomes due at `deadline`.
    public mutating func add(_ entry: EntryRef, lane: Int, deadline: ContinuousClock.Instant, size: Int) {
        add(entry, lane: lane, due: Moment(deadline), size: size)
    }

    /// Returns when the entry becomes due: `due`, or the lane's last deadline if that is later.
    @discardableResult
    public mutating func add(_ entry: EntryRef, lane: Int, due: Moment, size: Int) -> Moment {
        var due = due
        if let last = lanes[lane].last?.due, due < last { due = last }
        lanes[lane].append(Slot(entry: entry, due: due))
        count += 1
        bytes += size
        return due
    }

    /// An entry left the window (due, revoked, lease lost): only the bounds change, its slot goes stale.
    public mutating func removed(size: Int) {
        count -= 1
        bytes -= size
    }

    /// `keep: last` swapped the buffered message for one of another size.
    public mutating func resized(by delta: Int) { bytes += delta }

    /// The earliest live deadline, to bound how long the consumer may block in poll.
    public func nextDeadline(isLive: (Slot) -> Bool) -> ContinuousClock.Instant? {
        var best: Moment?
        for lane in lanes {
            guard let head = lane.first(where: isLive) else { continue }
            if best == nil || head.due < best! { best = head.due }
        }
        return best?.instant
    }

    /// Removes and returns the slots whose deadline has passed, earliest first, at most `limit`
    /// live ones; stale slots met on the way are dropped.
    public mutating func popDue(now: ContinuousClock.Instant, limit: Int = .max, isLive: (Slot) -> Bool) -> [Slot] {
        let now = Moment(now)
        var due: [Slot] = []
        if lanes.count == 1 {
            while due.count < limit, let head = lanes[0].first, head.due <= now {
                lanes[0].removeFirst()
                if isLive(head) { due.append(head) }
            }
            return due
        }
        while due.count < limit {
            var pick: Int?
            for i in lanes.indices {
                while let head = lanes[i].first, !isLive(head) { lanes[i].removeFirst() }
                guard let head = lanes[i].first, head.due <= now else { continue }
                if pick == nil || head.due < lanes[pick!].first!.due { pick = i }
            }
            guard let i = pick else { break }
            due.append(lanes[i].removeFirst())
        }
        return due
    }

    /// Forgets every slot (the window was emptied: shutdown, or the last revocation).
    public mutating func clearSlots() {
        for i in lanes.indices { lanes[i].removeAll() }
    }
}
