extension Array where Element == UInt8 {
    /// Appends `value`'s digits in `radix` (lowercase), as `String(value, radix:)` spells them,
    /// without building the string: Redis key names are written this way on the hot path.
    public mutating func appendDigits(_ value: Int64, radix: Int64 = 10) {
        if value < 0 { append(UInt8(ascii: "-")) }
        let base = UInt64(radix), n = value.magnitude
        // The largest power of the base that is at most n: the first digit's place.
        var place: UInt64 = 1
        while place <= n / base { place &*= base }
        var rest = n
        repeat {
            let digit = UInt8(truncatingIfNeeded: rest / place)
            append(digit < 10 ? UInt8(ascii: "0") &+ digit : UInt8(ascii: "a") &+ digit &- 10)
            rest %= place
            place /= base
        } while place > 0
    }
}
