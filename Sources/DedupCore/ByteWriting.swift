extension Array where Element == UInt8 {
    /// Appends `value`'s digits in `radix` (2 to 36, lowercase), as `String(value, radix:)` spells
    /// them, without building the string: Redis key names are written this way on the hot path.
    public mutating func appendDigits(_ value: Int64, radix: Int64 = 10) {
        // One or two digits (RESP's argument counts and most lengths) byte by byte: appending a
        // buffer costs more than the digits.
        if value >= 0 && value < radix && radix <= 10 {
            append(UInt8(ascii: "0") &+ UInt8(truncatingIfNeeded: value))
            return
        }
        if radix == 10 && value >= 10 && value < 100 {
            append(UInt8(ascii: "0") &+ UInt8(truncatingIfNeeded: value / 10))
            append(UInt8(ascii: "0") &+ UInt8(truncatingIfNeeded: value % 10))
            return
        }
        if radix == 16 && value >= 0 {
            // Bucket numbers in every compact key name: the digit count from the leading zeros,
            // then each digit from the top, with no room on the stack and no second pass.
            let v = UInt64(value)
            var shift = Swift.max(0, (63 - v.leadingZeroBitCount) / 4) * 4
            while shift >= 0 {
                let digit = UInt8(truncatingIfNeeded: (v >> UInt64(shift)) & 15)
                append(digit < 10 ? UInt8(ascii: "0") &+ digit : UInt8(ascii: "a") &+ digit &- 10)
                shift -= 4
            }
            return
        }
        let negative = value < 0
        var rest = value.magnitude
        // Written backwards into room on the stack (64 digits: base 2 of the largest magnitude),
        // then appended at once. Base 10 and 16 by constants, which the compiler turns into
        // multiplications and shifts.
        Swift.withUnsafeTemporaryAllocation(of: UInt8.self, capacity: 65) { digits in
            var at = digits.count
            func put(_ digit: UInt64) {
                at -= 1
                digits[at] = digit < 10 ? UInt8(ascii: "0") &+ UInt8(truncatingIfNeeded: digit) : UInt8(ascii: "a") &+ UInt8(truncatingIfNeeded: digit) &- 10
            }
            switch radix {
            case 10: repeat { put(rest % 10); rest /= 10 } while rest > 0
            case 16: repeat { put(rest & 15); rest >>= 4 } while rest > 0
            default:
                let base = UInt64(radix)
                repeat { put(rest % base); rest /= base } while rest > 0
            }
            if negative {
                at -= 1
                digits[at] = UInt8(ascii: "-")
            }
            // A handful of bytes: one at a time is cheaper than a generic buffer append.
            for i in at..<digits.count { append(digits[i]) }
        }
    }
}

extension UnsafeRawBufferPointer {
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
