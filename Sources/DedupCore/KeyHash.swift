/// The hash a `DedupKey` caches: wyhash (final version 4) over the key's bytes, seeded once per
/// process from the system's random source.
///
/// Every message's key is hashed once, repeats included, and `Hasher` (SipHash-1-3, through its
/// general streaming interface) was the larger part of making a key. wyhash reads a short key in
/// two or four loads and mixes it with two 64-bit multiplications. The seed is random per
/// process, as `Hasher`'s is, so a producer cannot choose keys that collide in the worker's
/// tables; equality is always decided on the bytes, so the hash only places keys.
enum KeyHash {
    private static let secret: (UInt64, UInt64, UInt64) = (0x2d35_8dcc_aa6c_78a5, 0x8bb8_4b93_962e_acc9, 0x4b33_a62e_d433_d4a3)
    /// The process's seed, mixed with the first secret as wyhash does once per call.
    private static let seed: UInt64 = {
        var rng = SystemRandomNumberGenerator()
        let s = rng.next() as UInt64
        return s ^ mix(s ^ secret.0, secret.1)
    }()

    @inline(__always)
    private static func mix(_ a: UInt64, _ b: UInt64) -> UInt64 {
        let r = a.multipliedFullWidth(by: b)
        return r.high ^ r.low
    }

    @inline(__always)
    private static func read4(_ p: UnsafeRawBufferPointer, _ at: Int) -> UInt64 {
        UInt64(UInt32(littleEndian: p.loadUnaligned(fromByteOffset: at, as: UInt32.self)))
    }

    @inline(__always)
    private static func read8(_ p: UnsafeRawBufferPointer, _ at: Int) -> UInt64 {
        UInt64(littleEndian: p.loadUnaligned(fromByteOffset: at, as: UInt64.self))
    }

    static func hash(_ p: UnsafeRawBufferPointer) -> Int {
        var s = seed
        let n = p.count
        var a: UInt64, b: UInt64
        if n <= 16 {
            if n >= 4 {
                let q = (n >> 3) << 2
                a = read4(p, 0) << 32 | read4(p, q)
                b = read4(p, n - 4) << 32 | read4(p, n - 4 - q)
            } else if n > 0 {
                a = UInt64(p[0]) << 16 | UInt64(p[n >> 1]) << 8 | UInt64(p[n - 1])
                b = 0
            } else {
                a = 0
                b = 0
            }
        } else {
            var i = 0
            while n - i > 16 {
                s = mix(read8(p, i) ^ secret.1, read8(p, i + 8) ^ s)
                i += 16
            }
            a = read8(p, n - 16)
            b = read8(p, n - 8)
        }
        let r = (a ^ secret.1).multipliedFullWidth(by: b ^ s)
        return Int(truncatingIfNeeded: mix(r.low ^ secret.0 ^ UInt64(n), r.high ^ secret.1))
    }
}
