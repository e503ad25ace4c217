@testable import DedupCore
import Testing

@Suite struct EntryTableTests {
    let k1 = DedupKey(raw: "a", namespace: "n")
    let k2 = DedupKey(raw: "b", namespace: "n")

    /// A queue may keep a ref to an entry that has left since: the ref must not find the entry
    /// that took the slot after it.
    @Test func aRefStopsMatchingWhenItsEntryIsRemovedEvenIfTheSlotIsReused() {
        var table = EntryTable()
        let i = table.insertNew(.vacant, for: k1)
        let first = table.ref(at: i)
        #expect(table.index(of: first) == i)
        #expect(table.key(at: i) == k1)

        table.remove(at: i)
        #expect(table.index(of: first) == nil)

        let j = table.insertNew(.vacant, for: k2)
        #expect(j == i, "the freed slot is reused")
        #expect(table.index(of: first) == nil)
        #expect(table.index(of: table.ref(at: j)) == j)
        #expect(table.key(at: j) == k2)
        #expect(table.index(forKey: k1) == nil && table.index(forKey: k2) == j)
    }

    /// The index against a dictionary, through enough inserts and removals to grow it several
    /// times and to make long probe runs wrap around its end: every removal shifts buckets back,
    /// and one shifted wrongly leaves a key that can no longer be found.
    @Test func theIndexFindsWhatADictionaryFindsThroughInsertsAndRemovals() {
        var table = EntryTable()
        var model: [DedupKey: Int] = [:]
        var rng = SplitMix64(seed: 7)
        let keys = (0..<3_000).map { DedupKey(raw: "k\($0)", namespace: "n") }
        for step in 0..<40_000 {
            let key = keys[Int(rng.next() % UInt64(keys.count))]
            // Mostly inserts early (growth), balanced later (removals inside long runs).
            let insert = step < 4_000 ? rng.next() % 4 != 0 : rng.next() % 2 == 0
            if insert, model[key] == nil {
                model[key] = table.insertNew(.vacant, for: key)
            } else if !insert, let i = model.removeValue(forKey: key) {
                #expect(table.remove(at: i).key == key)
            }
            if step % 997 == 0 {
                for k in keys { #expect(table.index(forKey: k) == model[k]) }
            }
        }
        #expect(table.count == model.count)
        for k in keys { #expect(table.index(forKey: k) == model[k]) }
        #expect(Set(table.all.map(\.key)) == Set(model.keys))
    }
}
