/// A write position in memory reserved beforehand, with its end: the hot paths spell RESP and
/// Redis key names through it, a store per byte and a copy per part, where an array append
/// checks uniqueness and capacity on every call (per byte for the `$`, digits and CRLF of
/// every argument). Every write checks the end, so a wrong reservation stops the process
/// instead of writing past it.
///
/// The small writers are `@inlinable`: the command writer (RedisIO) and the `log` handler's
/// lines (DedupService) call them from other modules, where a call per literal or per length
/// cost more than the copy it makes.
public struct ByteCursor {
    /// Where the next byte goes (read-only outside; the writers move it).
    public var position: UnsafeMutablePointer<UInt8> { next }
    @usableFromInline var next: UnsafeMutablePointer<UInt8>
    public let end: UnsafeMutablePointer<UInt8>

    /// Writes go to `start` and on, up to `end` (exclusive).
    @inlinable
    public init(_ start: UnsafeMutablePointer<UInt8>, end: UnsafeMutablePointer<UInt8>) {
        next = start
        self.end = end
    }

    @inlinable @inline(__always)
    mutating func advance(_ n: Int) -> UnsafeMutablePointer<UInt8> {
        precondition(n <= end - next, "a write past the room reserved for it")
        defer { next += n }
        return next
    }

    @inlinable @inline(__always)
    public mutating func write(_ byte: UInt8) { advance(1).initialize(to: byte) }

    /// A name's parts are a few to a few dozen bytes: up to 16 are copied as two words that may
    /// overlap (no call to memcpy, which costs more than such a copy).
    @inlinable @inline(__always)
    public mutating func write(_ bytes: UnsafeBufferPointer<UInt8>) {
        guard let from = bytes.baseAddress else { return }
        let n = bytes.count
        let to = UnsafeMutableRawPointer(advance(n))
        let source = UnsafeRawPointer(from)
        if n >= 8 && n <= 16 {
            let first = source.loadUnaligned(as: UInt64.self), last = source.loadUnaligned(fromByteOffset: n - 8, as: UInt64.self)
            to.storeBytes(of: first, as: UInt64.self)
            to.storeBytes(of: last, toByteOffset: n - 8, as: UInt64.self)
        } else if n >= 4 && n < 8 {
            let first = source.loadUnaligned(as: UInt32.self), last = source.loadUnaligned(fromByteOffset: n - 4, as: UInt32.self)
            to.storeBytes(of: first, as: UInt32.self)
            to.storeBytes(of: last, toByteOffset: n - 4, as: UInt32.self)
        } else {
            to.copyMemory(from: source, byteCount: n)
        }
    }

    @inlinable @inline(__always)
    public mutating func write(_ bytes: UnsafeRawBufferPointer) { write(bytes.assumingMemoryBound(to: UInt8.self)) }

    @inlinable @inline(__always)
    public mutating func write(_ bytes: [UInt8]) { bytes.withUnsafeBufferPointer { write($0) } }

    @inlinable @inline(__always)
    public mutating func write(_ literal: StaticString) {
        write(UnsafeBufferPointer(start: literal.utf8Start, count: literal.utf8CodeUnitCount))
    }

    /// `\r\n`, RESP's line end.
    @inlinable @inline(__always)
    public mutating func writeCRLF() {
        let at = advance(2)
        at[0] = 13
        at[1] = 10
    }

    /// A count or a length in decimal: one or two digits (most of RESP's) without a call.
    @inlinable @inline(__always)
    public mutating func writeSmallDigits(_ value: Int) {
        if value >= 0 && value < 10 {
            write(UInt8(ascii: "0") &+ UInt8(truncatingIfNeeded: value))
        } else if value >= 10 && value < 100 {
            let at = advance(2)
            at[0] = UInt8(ascii: "0") &+ UInt8(truncatingIfNeeded: value / 10)
            at[1] = UInt8(ascii: "0") &+ UInt8(truncatingIfNeeded: value % 10)
        } else {
            writeDigits(Int64(value))
        }
    }

    /// Writes `value`'s digits in `radix` (2 to 36, lowercase), as `String(value, radix:)` spells
    /// them, without building the string (at most 65 bytes: a sign and 64 binary digits).
    public mutating func writeDigits(_ value: Int64, radix: Int64 = 10) {
        precondition((2...36).contains(radix), "radix \(radix) is not between 2 and 36")
        if value < 0 { write(UInt8(ascii: "-")) }
        let magnitude = value.magnitude
        // One or two decimal digits (RESP's argument counts and most lengths) need no loop.
        if magnitude < 10 && radix >= 10 {
            write(UInt8(ascii: "0") &+ UInt8(truncatingIfNeeded: magnitude))
            return
        }
        // The digit count first, then each digit from the last: no room on the stack, no second
        // copy. Base 10 and 16 by constants, which the compiler turns into multiplications and
        // shifts.
        var digits = 1
        switch radix {
        case 16: digits = Swift.max(1, (67 - magnitude.leadingZeroBitCount) / 4)
        case 10:
            var rest = magnitude
            while rest >= 10 { rest /= 10; digits += 1 }
        default:
            var rest = magnitude
            while rest >= UInt64(radix) { rest /= UInt64(radix); digits += 1 }
        }
        let start = advance(digits)
        var rest = magnitude
        for i in stride(from: digits - 1, through: 0, by: -1) {
            let digit: UInt64
            switch radix {
            case 10: (rest, digit) = rest.quotientAndRemainder(dividingBy: 10)
            case 16: (rest, digit) = (rest >> 4, rest & 15)
            default: (rest, digit) = rest.quotientAndRemainder(dividingBy: UInt64(radix))
            }
            start[i] = digit < 10 ? UInt8(ascii: "0") &+ UInt8(truncatingIfNeeded: digit) : UInt8(ascii: "a") &+ UInt8(truncatingIfNeeded: digit) &- 10
        }
    }
}

extension Array where Element == UInt8 {
    /// Appends what `write` writes through a cursor, at most `maxCount` bytes: the byte writers'
    /// array form (names spelled as strings, tests), written on the stack and appended once.
    public mutating func append(atMost maxCount: Int, _ write: (inout ByteCursor) -> Void) {
        Swift.withUnsafeTemporaryAllocation(of: UInt8.self, capacity: Swift.max(1, maxCount)) { room in
            let start = room.baseAddress!
            var cursor = ByteCursor(start, end: start + maxCount)
            write(&cursor)
            append(contentsOf: UnsafeBufferPointer(start: start, count: cursor.position - start))
        }
    }

    /// Appends `value`'s digits in `radix` (`ByteCursor.writeDigits`).
    public mutating func appendDigits(_ value: Int64, radix: Int64 = 10) {
        append(atMost: 65) { $0.writeDigits(value, radix: radix) }
    }
}

extension UnsafeRawBufferPointer {
    /// Whether `other` holds the same bytes, compared eight at a time.
    public func hasSameBytes(as other: UnsafeRawBufferPointer) -> Bool {
        guard count == other.count else { return false }
        var i = 0
        while i + 8 <= count {
            if loadUnaligned(fromByteOffset: i, as: UInt64.self) != other.loadUnaligned(fromByteOffset: i, as: UInt64.self) { return false }
            i += 8
        }
        while i < count {
            if self[i] != other[i] { return false }
            i += 1
        }
        return true
    }

    /// Whether every byte is below 0x80, checked eight bytes at a time: keys and header names
    /// take this path before falling back to UTF-8 validation.
    public var isASCII: Bool {
        var i = 0
        while i + 8 <= count {
            if loadUnaligned(fromByteOffset: i, as: UInt64.self) & 0x8080_8080_8080_8080 != 0 { return false }
            i += 8
        }
        while i < count {
            if self[i] & 0x80 != 0 { return false }
            i += 1
        }
        return true
    }
}

extension String {
    /// The UTF-8 bytes lent in place. `withUTF8` is mutating (it makes a bridged string native
    /// first), so calling it on a `let` needs a copy of the string, which retains its storage
    /// and releases it after; a native string (every string here) lends its storage through its
    /// UTF-8 view without that copy. The hot path reads a key's and a header name's bytes
    /// several times per message this way.
    @inlinable @inline(__always)
    public func withUTF8InPlace<R>(_ body: (UnsafeBufferPointer<UInt8>) -> R) -> R {
        if let result = utf8.withContiguousStorageIfAvailable(body) { return result }
        var copy = self
        return copy.withUTF8(body)
    }
}
