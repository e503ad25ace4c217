import Crypto

/// How `done` records are kept in the store (`dedup.layout`, docs/architecture.md step 3).
public enum DoneLayout: Sendable, Hashable {
    /// One string key per remembered id, `dedupd:<namespace>:<key>` holding `d:<owner>` for the
    /// retention (the layout before issue 15; its memory per id is in docs/performance.md).
    case keys
    /// A field of a time-bucketed hash per remembered id: several times smaller than a key.
    case compact(CompactRecords)
}

/// The compact layout of one route: which bucket a confirmed key goes to, and which buckets a
/// claim must look in. Pure arithmetic, shared by the Redis store and the model test's fake store
/// so both answer the same questions the same way.
///
/// A key's SHA-256 digest decides everything: its hash tag (the top `tagBits`), its bucket within
/// a slot (the top `log2(buckets)` bits) and its field (digest bytes 4..<16, 96 bits that the
/// bucket bits do not repeat). A slot is `slot` long (retention / `slotsPerRetention`); bucket
/// `(j, b)` holds the keys confirmed during slot `j` and lives until slot `j` ended plus the
/// retention, so a done record lives at least the retention and at most one slot more.
public struct CompactRecords: Sendable, Hashable {
    /// How long a confirmed key is recognised at least.
    public var retention: Duration
    /// Slots per retention: a claim looks in this many buckets plus one. Default: 1.
    public var slotsPerRetention: Int
    /// Buckets per slot and route, a power of two ≥ 2^tagBits. Default: 8192.
    public var buckets: Int
    /// Also recognise done records of the `keys` layout (the upgrade; standalone Redis only): the
    /// pending claim then lives at the keys layout's key, whose done records answer the claim's
    /// `SET NX GET`. Default: true.
    public var readsKeysLayout: Bool
    /// The route's lease: a foreign claim a confirm took by mistake is put back with it.
    public var lease: Duration

    /// Bits of the digest in the hash tag: 64 tags per route, so a Redis Cluster spreads a route
    /// over 64 slots while a batch of 1,000 keys still makes chunks of ~16 keys per slot.
    public static let tagBits = 6
    /// Field bytes: 96 bits; the false-duplicate bound is in docs/architecture.md.
    public static let fieldRange = 4..<16
    /// A worker whose clock is ahead of another's by less than this still finds the other's
    /// records (and the other its own): claims look this far beyond the current slot's edges.
    public static let clockSkew: Duration = .seconds(30)

    public init(
        retention: Duration, slotsPerRetention: Int = 1, buckets: Int = 8192, readsKeysLayout: Bool = true,
        lease: Duration = .seconds(35)
    ) {
        self.retention = retention
        self.lease = lease
        self.slotsPerRetention = slotsPerRetention
        self.buckets = buckets
        self.readsKeysLayout = readsKeysLayout
    }

    /// Slot length in milliseconds (at least 1 s).
    public var slotMillis: Int64 {
        max(1000, Self.millis(retention) / Int64(max(1, slotsPerRetention)))
    }

    var bucketBits: Int { buckets.trailingZeroBitCount }

    /// Where one store key's records live.
    public struct Placement: Sendable, Hashable {
        /// `{<namespace>:<tag>}`: the hash tag every key of this store key carries.
        public var tag: String
        /// The pending claim: `dedupd:{<namespace>:<tag>}:p:<rest>`, or the keys layout's key while
        /// that layout is read (`readsKeysLayout`: standalone Redis only, its name has no tag).
        public var pendingKey: String
        /// `dedupd:<namespace>:<rest>`: the `keys` layout's key, read during an upgrade.
        public var keysLayoutKey: String
        /// The bucket index within a slot (`buckets` of them).
        public var bucket: Int
        /// The 12 bytes stored as the bucket's field.
        public var field: [UInt8]
        /// `dedupd:{<namespace>:<tag>}:d:`: bucket keys are this, the slot number, `:`, the bucket in hex.
        public var bucketPrefix: String

        public func bucketKey(slot: Int64) -> String {
            bucketPrefix + String(slot) + ":" + String(bucket, radix: 16)
        }
    }

    /// `storeKey` is `DedupKey.storeKey`: `<prefix>:<namespace>:<rest>`.
    public func placement(of storeKey: String) -> Placement {
        let digest = Array(SHA256.hash(data: Array(storeKey.utf8)))
        let top = UInt32(digest[0]) << 24 | UInt32(digest[1]) << 16 | UInt32(digest[2]) << 8 | UInt32(digest[3])
        let tagValue = Int(top >> UInt32(32 - Self.tagBits))
        let bucket = bucketBits == 0 ? 0 : Int(top >> UInt32(32 - bucketBits))
        let parts = storeKey.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
        let prefix = parts.count == 3 ? String(parts[0]) : "dedupd"
        let namespace = parts.count == 3 ? String(parts[1]) : ""
        let rest = parts.count == 3 ? String(parts[2]) : storeKey
        let hex = String(tagValue, radix: 16)
        let tag = "{" + namespace + ":" + (hex.count == 1 ? "0" + hex : hex) + "}"
        return Placement(
            tag: tag, pendingKey: readsKeysLayout ? storeKey : prefix + ":" + tag + ":p:" + rest, keysLayoutKey: storeKey, bucket: bucket,
            field: Array(digest[Self.fieldRange]), bucketPrefix: prefix + ":" + tag + ":d:")
    }

    /// Every bucket key of one slot (all tags), for setting their TTL.
    public func bucketKeys(prefix: String, namespace: String, slot: Int64) -> [String] {
        let shift = bucketBits - Self.tagBits
        return (0..<buckets).map { b in
            let hex = String(b >> shift, radix: 16)
            return prefix + ":{" + namespace + ":" + (hex.count == 1 ? "0" + hex : hex) + "}:d:" + String(slot) + ":" + String(b, radix: 16)
        }
    }

    /// The slot a key confirmed at `unixMillis` goes to.
    public func slot(at unixMillis: Int64) -> Int64 { Self.floorDiv(unixMillis, slotMillis) }

    /// How long (ms, relative) the bucket of slot `slot` must still live at `unixMillis`: to the
    /// slot's end plus the retention, plus the clock-skew allowance so a claimer whose clock is
    /// behind still finds it.
    public func bucketTTLMillis(slot: Int64, at unixMillis: Int64) -> Int64 {
        max(1, (slot + 1) * slotMillis + Self.millis(retention) + Self.millis(Self.clockSkew) - unixMillis)
    }

    /// The slots a claim at `unixMillis` must look in, newest first: every slot whose bucket may
    /// still hold a record younger than the retention, and the next slot when the clock is within
    /// the skew allowance of it (a worker whose clock runs ahead may already confirm into it).
    public func liveSlots(at unixMillis: Int64) -> [Int64] {
        let skew = Self.millis(Self.clockSkew)
        let newest = slot(at: unixMillis + skew)
        // A record of slot j is younger than the retention while now < (j + 1) * L + R.
        let oldest = Self.floorDiv(unixMillis - Self.millis(retention) - skew, slotMillis)
        return Array(stride(from: newest, through: oldest, by: -1))
    }

    public static func millis(_ d: Duration) -> Int64 {
        let (s, atto) = d.components
        return s * 1000 + atto / 1_000_000_000_000_000
    }

    static func floorDiv(_ a: Int64, _ b: Int64) -> Int64 {
        let q = a / b
        return (a % b != 0 && (a < 0) != (b < 0)) ? q - 1 : q
    }

    /// A reason these settings cannot work, naming the setting, or nil.
    public func problem() -> (key: String, problem: String)? {
        if buckets < 1 << Self.tagBits || buckets > 1 << 24 || buckets & (buckets - 1) != 0 {
            return ("dedup.compact.buckets", "must be a power of two from \(1 << Self.tagBits) to \(1 << 24)")
        }
        if slotsPerRetention < 1 || slotsPerRetention > 64 {
            return ("dedup.compact.slots", "must be from 1 to 64")
        }
        if Self.millis(retention) / Int64(slotsPerRetention) < 1000 {
            return ("dedup.compact.slots", "makes slots shorter than 1s; use fewer slots or a longer dedup.retention")
        }
        return nil
    }
}
