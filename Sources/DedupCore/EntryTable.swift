/// Where one entry of the ledger's `EntryTable` is: its slot, and which of the slot's occupants.
/// What keeps a place for an entry (the delay buffer, the lease queue, the queues to claim and
/// to confirm, a request's keys) holds this instead of looking the key up: finding the entry is
/// an array read, not a dictionary look-up, and a ref outlives its entry safely
/// (`EntryTable.index(of:)` no longer finds it once the entry is removed, even if the slot was
/// reused).
public struct EntryRef: Sendable, Equatable {
    public var slot: Int32
    public var generation: UInt32

    public init(slot: Int32, generation: UInt32) {
        self.slot = slot
        self.generation = generation
    }
}

/// The ledger's entries: a dictionary from key to a slot, and the entries themselves in a plain
/// array of slots.
///
/// Reading one field of an entry stored as a dictionary value (`values[i].place`) copied the
/// whole entry, retaining and releasing every buffer of its message, several times per message:
/// about a tenth of the worker's CPU. An array element's field is read in place. Freed slots are
/// reused, so the array grows only to the most entries held at once.
struct EntryTable: Sendable {
    typealias Entry = DedupLedger.Entry

    private var slots: [DedupKey: Int] = [:]
    /// Entries by slot; a free slot holds `Entry.vacant` (no buffers) and is listed in `free`.
    var values: [Entry] = []
    private var keys: [DedupKey?] = []
    /// Per slot, how many entries it has held and let go: a removal moves it on, so every
    /// `EntryRef` to the removed entry stops matching. It wraps; a ref would have to wait in a
    /// queue through four billion uses of its slot to match again.
    private var generations: [UInt32] = []
    private var free: [Int] = []

    var isEmpty: Bool { slots.isEmpty }
    var count: Int { slots.count }
    /// The sizes of every entry's message (`Entry.size`): what the worker holds, wherever in the
    /// flow each message is.
    private(set) var bytes = 0

    /// The slot of `key`'s entry.
    func index(forKey key: DedupKey) -> Int? { slots[key] }

    /// The slot of the entry `ref` was taken from, if it is still there.
    func index(of ref: EntryRef) -> Int? {
        generations[Int(ref.slot)] == ref.generation ? Int(ref.slot) : nil
    }

    /// A ref to the entry in slot `i`.
    func ref(at i: Int) -> EntryRef { EntryRef(slot: Int32(truncatingIfNeeded: i), generation: generations[i]) }

    /// The key of the entry in slot `i`.
    func key(at i: Int) -> DedupKey { keys[i]! }

    /// Adds an entry for a key that has none (one hash operation: the caller looked already).
    /// The entry is moved in, not copied: a copy retains each of its buffers and the caller's
    /// then releases them.
    @discardableResult
    mutating func insertNew(_ entry: consuming Entry, for key: DedupKey) -> Int {
        bytes += entry.size
        let i: Int
        if let reused = free.popLast() {
            i = reused
            values[i] = entry
            keys[i] = key
        } else {
            i = values.count
            values.append(entry)
            keys.append(key)
            generations.append(0)
        }
        slots[key] = i
        return i
    }

    /// Removes the entry in slot `i` and returns it.
    @discardableResult
    mutating func remove(at i: Int) -> (key: DedupKey, value: Entry) {
        let key = keys[i].take()!
        bytes -= values[i].size
        slots[key] = nil
        generations[i] &+= 1
        free.append(i)
        var entry = Entry.vacant
        swap(&entry, &values[i])
        return (key, entry)
    }

    /// `keep: last` swapped the message in slot `i` for one of `size`.
    mutating func resize(at i: Int, to size: Int) {
        bytes += size - values[i].size
        values[i].size = size
    }

    mutating func removeValue(forKey key: DedupKey) {
        if let i = slots[key] { remove(at: i) }
    }

    /// Every entry with its key.
    var all: [(key: DedupKey, value: Entry)] {
        slots.map { (key: $0.key, value: values[$0.value]) }
    }

    /// Every entry.
    var entries: some Sequence<Entry> {
        slots.values.lazy.map { values[$0] }
    }
}
