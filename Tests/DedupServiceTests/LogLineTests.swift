import DedupCore
import Foundation
import Testing

@testable import DedupService

/// The `log` handler builds its lines byte by byte; they must be exactly what the string-based
/// version (CanonicalJSON.quote per field) wrote, for awkward input too.
@Suite("log handler lines")
struct LogLineTests {
    /// The previous implementation, kept here as the reference.
    static func reference(_ d: Dispatch) -> String {
        func text(_ bytes: [UInt8]) -> String {
            if let s = String(validating: bytes, as: UTF8.self) { return CanonicalJSON.quote(s) }
            return "{\"base64\":\"\(Data(bytes).base64EncodedString())\"}"
        }
        let m = d.message
        var s = "{\"dedup_key\":\(CanonicalJSON.quote(d.key.raw))"
        s += ",\"topic\":\(CanonicalJSON.quote(m.topic)),\"partition\":\(m.partition),\"offset\":\(m.offset)"
        if let ts = m.timestampMillis { s += ",\"timestamp_ms\":\(ts)" }
        if let key = m.key { s += ",\"key\":\(text(key))" }
        s += ",\"headers\":{"
        s += m.headers.map { h in "\(CanonicalJSON.quote(h.name)):\(h.value.map(text) ?? "null")" }.joined(separator: ",")
        s += "},\"value\":\(text(m.value))}\n"
        return s
    }

    @Test func bytesMatchTheStringVersion() throws {
        let values: [[UInt8]] = [
            Array(#"{"orderNo":"ord-1","note":"say \"hi\"\\ \n\t\r"}"#.utf8),
            Array("größe ✓ 😀 \u{1} \u{1f} \u{7f}".utf8),
            [0xff, 0xfe, 0x00, 0x41],  // not UTF-8: base64
            Array("0123456789".utf8) + [0xff] + Array("abc\"defghij".utf8),  // the same, found in a word while quoting
            [],
        ]
        for (i, value) in values.enumerated() {
            let message = InboundMessage(
                topic: "t\"opic", partition: Int32(i), offset: i == 0 ? 0 : Int64(i) * -7 + Int64.max / Int64(i + 1),
                key: i == 1 ? nil : Array("k\u{0}ey-\(i)".utf8), value: value,
                headers: [
                    MessageHeader(name: "message-id", value: Array("id-\(i)".utf8)),
                    MessageHeader(name: "nul\u{2}l", value: nil),
                    MessageHeader(name: "bin", value: [0xc3]),
                ],
                timestampMillis: i == 2 ? nil : 1_795_756_868_892 - Int64(i))
            let d = Dispatch(key: DedupKey(raw: "k-\"\(i)\"-ü", namespace: "n"), message: message)
            #expect(LogOutputHandler.line(for: d) == Self.reference(d))
            let object = try JSONSerialization.jsonObject(with: Data(LogOutputHandler.line(for: d).utf8)) as? [String: Any]
            #expect(object?["partition"] as? Int == i)
        }
        // Every digit count and its edges (the count is guessed from the bit length and
        // corrected by one comparison, the digits written two at a time).
        var numbers: [Int64] = [-42, .min, .min + 1, 0, 7, 10, 1_764_800_000_000, .max, .max - 1]
        var power: Int64 = 1
        while power <= Int64.max / 10 {
            power *= 10
            let edges: [Int64] = [power - 1, power, power + 1, -power, -(power - 1)]
            numbers += edges
        }
        var written = LineBuffer(capacity: 1)
        for n in numbers {
            written.appendDecimal(n)
            written.append(byte: 32)
        }
        let expected = numbers.map { String($0) + " " }.joined()
        #expect(written.withBytes { String(decoding: $0, as: UTF8.self) } == expected)
    }

    /// One buffer serves the handler's whole life: lines of every size, emptied after each write,
    /// growing past its first allocation.
    @Test func reusedBufferGrowsAndStaysExact() {
        var buffer = LineBuffer(capacity: 64)
        var expected = ""
        for i in 0..<300 {
            let value = Array(String(repeating: "v\"\\\u{1}ä", count: i).utf8)
            let d = Dispatch(
                key: DedupKey(raw: "k\(i)", namespace: "n"),
                message: InboundMessage(topic: "orders", partition: 1, offset: Int64(i), value: value))
            LogOutputHandler.appendLine(for: d, to: &buffer)
            expected += Self.reference(d)
            if i % 100 == 99 {
                #expect(buffer.withBytes { String(decoding: $0, as: UTF8.self) } == expected)
                buffer.removeAll()
                expected = ""
            }
        }
        #expect(buffer.count == 0)
    }

    /// Words holding several bytes to escape, next to each other or apart, borrows between them,
    /// in random values of 0 to 41 bytes (across several eight-byte steps), against the string version.
    @Test func wordsWithSeveralEscapesMatchTheStringVersion() {
        var rng = SystemRandomNumberGenerator()
        let pieces: [[UInt8]] = [[0x00], [0x01], [0x0a], [0x1f], [0x20], [0x21], [0x22], [0x5c], [0x41], [0x7f], [0xc3, 0xa4]]
        for _ in 0..<5_000 {
            var value: [UInt8] = []
            let length = Int.random(in: 0...40, using: &rng)
            while value.count < length { value += pieces.randomElement(using: &rng)! }
            let d = Dispatch(
                key: DedupKey(raw: "k", namespace: "n"),
                message: InboundMessage(topic: "t", partition: 0, offset: 0, value: value))
            #expect(LogOutputHandler.line(for: d) == Self.reference(d), "\(value)")
        }
    }

    /// The word test that lets plain bytes be copied eight at a time flags exactly the bytes
    /// that the byte test escapes, for every byte value in every position of a word, and in
    /// random words (several candidates, carries between them).
    @Test func wordEscapeMaskFlagsExactlyTheBytesTheByteTestEscapes() {
        func needs(_ b: UInt8) -> Bool { b < 0x20 || b == 0x22 || b == 0x5c }
        func reference(_ word: UInt64) -> UInt64 {
            (0..<8).reduce(UInt64(0)) { m, i in
                needs(UInt8(truncatingIfNeeded: word >> UInt64(i * 8))) ? m | 0x80 << UInt64(i * 8) : m
            }
        }
        let plain = UInt64(0x4141_4141_4141_4141)
        #expect(LineBuffer.escapeMask(plain) == 0)
        for position in 0..<8 {
            for value in 0...255 {
                let shift = UInt64(position * 8)
                let word = plain & ~(0xff << shift) | UInt64(value) << shift
                #expect(LineBuffer.escapeMask(word) == (needs(UInt8(value)) ? 0x80 << shift : 0), "byte \(value) at \(position)")
            }
        }
        var rng = SystemRandomNumberGenerator()
        let alphabet: [UInt8] = [0x00, 0x01, 0x0a, 0x1f, 0x20, 0x21, 0x22, 0x23, 0x41, 0x5b, 0x5c, 0x5d, 0x7f, 0x80, 0xa2, 0xdc, 0xff]
        for _ in 0..<20_000 {
            let word = (0..<8).reduce(UInt64(0)) { w, i in w | UInt64(alphabet.randomElement(using: &rng)!) << UInt64(i * 8) }
            #expect(LineBuffer.escapeMask(word) == reference(word), "\(String(word, radix: 16))")
            let random = rng.next() as UInt64
            #expect(LineBuffer.escapeMask(random) == reference(random), "\(String(random, radix: 16))")
        }
    }
}
