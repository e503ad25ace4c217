import DedupCore
import Testing

/// RESP and Redis key names are written through `ByteCursor` into room reserved beforehand:
/// every length of copy (the word-sized paths and the call), the digit writers, and the bound.
@Suite("Writing bytes through a cursor")
struct ByteCursorTests {
    @Test func copiesOfEveryShortLengthLandWhole() {
        for length in 0...40 {
            let part = (0..<length).map { UInt8(truncatingIfNeeded: $0 &* 37 &+ 11) }
            var out: [UInt8] = [0xAA]
            out.append(atMost: 2 * length + 2) { cursor in
                part.withUnsafeBufferPointer { cursor.write($0) }
                cursor.write(0xBB)
                part.withUnsafeBufferPointer { cursor.write($0) }
            }
            #expect(out == [0xAA] + part + [0xBB] + part, "length \(length)")
        }
    }

    @Test func smallDigitsAreSpelledAsStringSpellsThem() {
        for value in [0, 1, 9, 10, 11, 42, 99, 100, 101, 999, 1000, 123_456_789, Int.max] {
            var out: [UInt8] = []
            out.append(atMost: 20) { $0.writeSmallDigits(value) }
            #expect(String(decoding: out, as: UTF8.self) == String(value))
        }
    }

    @Test func aWritePastTheRoomStopsTheProcess() async {
        await #expect(processExitsWith: .failure) {
            var out: [UInt8] = []
            out.append(atMost: 3) { $0.write("four") }
        }
    }
}
