@testable import DedupCore
import Testing

@Suite struct KeyHashTests {
    /// Every length takes its own path through the hash (0, 1-3, 4-7, 8-16, longer): keys that
    /// differ in one byte, or only in length, hash apart, and equal bytes hash alike.
    @Test func theKeyHashSeparatesKeysOfEveryLength() {
        var seen = Set<Int>()
        var count = 0
        for n in 0...70 {
            let base = [UInt8](repeating: 0, count: n)
            let h = base.withUnsafeBytes { KeyHash.hash($0) }
            #expect(h == Array(base).withUnsafeBytes { KeyHash.hash($0) })
            seen.insert(h)
            count += 1
            for i in 0..<n {
                for bit in [0, 7] {
                    var b = base
                    b[i] ^= 1 << bit
                    seen.insert(b.withUnsafeBytes { KeyHash.hash($0) })
                    count += 1
                }
            }
        }
        #expect(seen.count == count, "\(count - seen.count) collisions among \(count) keys")
    }
}
