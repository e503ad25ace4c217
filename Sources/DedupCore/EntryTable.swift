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

/// The ledger's entries: an index from key to slot, and the entries themselves in a plain array
/// of slots.
///
/// Reading one field of an entry stored as a dictionary value (`values[i].place`) copied the
/// whole entry, retaining and releasing every buffer of its message, several times per message:
/// about a tenth of the worker's CPU. An array element's field is read in place. Freed slots are
/// reused, so the array grows only to the most entries held at once.
struct EntryTable: Sendable {
    typealias Entry = DedupLedger.Entry

    private var index = SlotIndex()
    /// Entries by slot; a free slot holds `Entry.vacant` (no buffers) and is listed in `free`.
    var values: [Entry] = []
    private var keys: [DedupKey?] = []
    /// Per slot, how many entries it has held and let go: a removal moves it on, so every
    /// `EntryRef` to the removed entry stops matching. It wraps; a ref would have to wait in a
    /// queue through four billion uses of its slot to match again.
    private var generations: [UInt32] = []
    private var free: [Int] = []

    var isEmpty: Bool { index.count == 0 }
    var count: Int { index.count }
    /// The sizes of every entry's message (`Entry.size`): what the worker holds, wherever in the
    /// flow each message is.
    private(set) var bytes = 0

    /// The slot of `key`'s entry.
    func index(forKey key: DedupKey) -> Int? {
        index.find(key.rawHash) { keys[$0]! == key }
    }

    /// The slot of the entry `ref` was taken from, if it is still there.
    func index(of ref: EntryRef) -> Int? {
        generations[Int(ref.slot)] == ref.generation ? Int(ref.slot) : nil
    }

    /// A ref to the entry in slot `i`.
    func ref(at i: Int) -> EntryRef { EntryRef(slot: Int32(truncatingIfNeeded: i), generation: generations[i]) }

    /// The key of the entry in slot `i`.
    func key(at i: Int) -> DedupKey { keys[i]! }

    /// Adds an entry for a key that has none (the caller looked already).
    /// The entry is moved in, not copied: a copy retains each of its buffers and the caller's
    /// then releases them.
    @discardableResult
    mutating func insertNew(_ entry: consuming Entry, for key: consuming DedupKey) -> Int {
        bytes += entry.size
        let hash = key.rawHash
        let i: Int
        // Moved in with `consume`: left to the optimizer, the key was copied (its string
        // retained) and the caller's released.
        if let reused = free.popLast() {
            i = reused
            values[i] = consume entry
            keys[i] = consume key
        } else {
            i = values.count
            values.append(consume entry)
            keys.append(consume key)
            generations.append(0)
        }
        index.insert(hash, slot: i)
        return i
    }

    /// Removes the entry in slot `i` and returns it.
    @discardableResult
    mutating func remove(at i: Int) -> (key: DedupKey, value: Entry) {
        let key = keys[i].take()!
        bytes -= values[i].size
        index.remove(key.rawHash, slot: i)
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
        if let i = index(forKey: key) { remove(at: i) }
    }

    /// Every entry with its key, in slot order.
    var all: [(key: DedupKey, value: Entry)] {
        keys.indices.compactMap { i in keys[i].map { (key: $0, value: values[i]) } }
    }

    /// Every entry.
    var entries: some Sequence<Entry> {
        keys.indices.lazy.filter { keys[$0] != nil }.map { values[$0] }
    }
}

/// An open-addressing hash index from a key's hash to the slot holding the key: what a
/// `[DedupKey: Int]` did, without a copy of each key in the dictionary's own storage. A
/// dictionary's key is a second owner of the key's string (a retain at insert, a release at
/// removal) and 64 bytes per bucket; an index bucket is 8: the hash's top 32 bits and the slot.
/// A look-up compares the 32 bits before it reads a key, so a probe past another key rarely
/// touches that key's memory.
///
/// Linear probing; a removal shifts the following buckets back (no tombstones), so a look-up
/// stops at the first empty bucket. The bucket of a hash is its top bits, which are also the
/// stored bits (up to 2^32 buckets, far past any buffer's bound): the table grows without
/// reading a key. The hashes come from `KeyHash`, seeded per process, so clustering cannot be
/// forced from outside.
struct SlotIndex: Sendable {
    /// 0: empty. Otherwise the hash's top 32 bits above the slot + 1.
    private var buckets = [UInt64](repeating: 0, count: 16)
    /// 64 − log2(buckets.count): a hash's bucket is `hash >> shift`.
    private var shift = 60
    private(set) var count = 0

    private static let tagMask: UInt64 = 0xffff_ffff_0000_0000

    private func home(_ tagged: UInt64) -> Int { Int(truncatingIfNeeded: tagged >> UInt64(shift)) }

    /// The bucket word for `slot` under `hash`.
    private static func word(_ hash: Int, slot: Int) -> UInt64 {
        UInt64(bitPattern: Int64(hash)) & tagMask | UInt64(slot + 1)
    }

    /// The slot whose key has `hash` and for which `matches` holds.
    func find(_ hash: Int, matches: (Int) -> Bool) -> Int? {
        let tag = UInt64(bitPattern: Int64(hash)) & Self.tagMask
        let mask = buckets.count - 1
        var b = home(tag)
        while true {
            let e = buckets[b]
            if e == 0 { return nil }
            if e & Self.tagMask == tag {
                let slot = Int(truncatingIfNeeded: e & ~Self.tagMask) - 1
                if matches(slot) { return slot }
            }
            b = (b + 1) & mask
        }
    }

    /// Adds `slot` under `hash` (the caller knows its key is not in the index).
    mutating func insert(_ hash: Int, slot: Int) {
        // At most three quarters full: linear probing's runs stay short.
        if (count + 1) * 4 > buckets.count * 3 { grow() }
        place(Self.word(hash, slot: slot))
        count += 1
    }

    private mutating func place(_ e: UInt64) {
        let mask = buckets.count - 1
        var b = home(e)
        while buckets[b] != 0 { b = (b + 1) & mask }
        buckets[b] = e
    }

    private mutating func grow() {
        let old = buckets
        buckets = [UInt64](repeating: 0, count: old.count * 2)
        shift -= 1
        for e in old where e != 0 { place(e) }
    }

    /// Removes `slot`, which is in the index under `hash`.
    mutating func remove(_ hash: Int, slot: Int) {
        let mask = buckets.count - 1
        let stored = Self.word(hash, slot: slot)
        var hole = home(stored)
        while buckets[hole] != stored { hole = (hole + 1) & mask }
        // Move back every bucket of the run after the hole whose home is not between the hole
        // and itself, so no look-up meets an empty bucket before its key.
        var j = (hole + 1) & mask
        while true {
            let e = buckets[j]
            if e == 0 { break }
            if (j &- home(e)) & mask >= (j &- hole) & mask {
                buckets[hole] = e
                hole = j
            }
            j = (j + 1) & mask
        }
        buckets[hole] = 0
        count -= 1
    }
}
