/// Redis Cluster's key → hash slot function: CRC16 (XMODEM) of the key, or of its hash tag, mod
/// 16384. A hash tag is the part between the first `{` and the next `}` when it is not empty; keys
/// with the same tag share a slot, which is what lets one script touch several keys.
public enum ClusterSlot {
    public static let count = 16384

    public static func of(_ key: String) -> UInt16 {
        key.withUTF8InPlace { of(bytes: $0) }
    }

    public static func of(bytes key: UnsafeBufferPointer<UInt8>) -> UInt16 {
        var hashed = key[...]
        if let open = key.firstIndex(of: UInt8(ascii: "{")),
           let close = key[(open + 1)...].firstIndex(of: UInt8(ascii: "}")), close > open + 1 {
            hashed = key[(open + 1)..<close]
        }
        var crc: UInt16 = 0
        for byte in hashed {
            crc = (crc << 8) ^ table[Int(UInt8(truncatingIfNeeded: crc >> 8) ^ byte)]
        }
        return crc & UInt16(count - 1)
    }

    /// CRC16-CCITT (XMODEM: polynomial 0x1021, initial value 0), the one Redis Cluster uses.
    private static let table: [UInt16] = (0..<256).map { index in
        var crc = UInt16(index) << 8
        for _ in 0..<8 { crc = crc & 0x8000 != 0 ? (crc << 1) ^ 0x1021 : crc << 1 }
        return crc
    }
}
