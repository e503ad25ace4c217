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
}
