import Crypto
import Foundation

/// The first 16 bytes of a store key's SHA-256, big-endian: all the compact layout needs of it
/// (`CompactRecords.spot`). SHA-256 is the largest per-key cost on the hot path, so a key's
/// digest is taken once, when its first message arrives, kept in the key's ledger entry, and
/// sent beside the key (`LedgerRequest.digests`, `KeyGroup.digests`) to the claim and the confirm.
public struct KeyDigest: Sendable, Hashable {
    /// Bytes 0..<8 and 8..<16.
    public var head: UInt64
    public var tail: UInt64

    /// The first 16 bytes of a SHA-256 digest, read big-endian.
    public init(head: UInt64, tail: UInt64) {
        self.head = head
        self.tail = tail
    }

    public init(of storeKey: String) {
        var hasher = SHA256()
        storeKey.withUTF8InPlace { hasher.update(bufferPointer: UnsafeRawBufferPointer($0)) }
        (head, tail) = hasher.finalize().withUnsafeBytes { digest in
            (UInt64(bigEndian: digest.loadUnaligned(fromByteOffset: 0, as: UInt64.self)),
             UInt64(bigEndian: digest.loadUnaligned(fromByteOffset: 8, as: UInt64.self)))
        }
    }
}

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

    /// Where one store key's records are, as numbers from its digest. The claim and confirm
    /// requests write the names from it straight into their command buffer
    /// (`appendPendingKey`, `appendBucketKey`, `Spot.appendField`): the hot path builds no string
    /// per key. `Placement` spells the same names out as strings, for the admin commands and tests.
    public struct Spot: Sendable, Hashable {
        /// The hash tag's value: the digest's top `tagBits` bits.
        public var tag: Int
        /// The bucket index within a slot (`buckets` of them).
        public var bucket: Int
        /// Digest bytes 4..<16, the bucket's field: 8 bytes, then 4, big-endian.
        @usableFromInline var fieldHead: UInt64
        @usableFromInline var fieldTail: UInt32

        /// A field's length in bytes.
        public static let fieldLength = 12

        /// The 12 bytes stored as the bucket's field.
        public var field: [UInt8] {
            var bytes: [UInt8] = []
            bytes.reserveCapacity(12)
            appendField(to: &bytes)
            return bytes
        }

        public func appendField(to out: inout [UInt8]) {
            out.append(atMost: Self.fieldLength) { writeField(to: &$0) }
        }

        /// The 12 bytes as one copy: a tuple of the two words is laid out in order without
        /// padding (its size, unlike its stride, is 12).
        @inlinable @inline(__always)
        public func writeField(to out: inout ByteCursor) {
            withUnsafeBytes(of: (fieldHead.bigEndian, fieldTail.bigEndian)) { out.write($0) }
        }
    }

    /// `storeKey` is `DedupKey.storeKey`: `<prefix>:<namespace>:<rest>`.
    public func spot(of storeKey: String) -> Spot { spot(of: KeyDigest(of: storeKey)) }

    /// A key's place from its digest (`KeyGroup.digests`, taken once when the key was first seen):
    /// tag and bucket from its top bits, the field from bytes 4..<16 (96 bits the bucket bits do
    /// not repeat; the false-duplicate bound is in docs/architecture.md).
    public func spot(of digest: KeyDigest) -> Spot {
        let top = digest.head >> 32
        return Spot(
            tag: Int(top >> UInt64(32 - Self.tagBits)), bucket: bucketBits == 0 ? 0 : Int(top >> UInt64(32 - bucketBits)),
            fieldHead: digest.head << 32 | digest.tail >> 32, fieldTail: UInt32(truncatingIfNeeded: digest.tail))
    }

    /// Room enough for a pending key's or a bucket's name of a store key of `storeKey` (its
    /// UTF-8 bytes): the key's bytes, the tag and kind (9), `dedupd` for a key without a prefix,
    /// a slot's and a bucket's digits (20 and 16) and a colon.
    public static func maxNameLength(of storeKey: String) -> Int { storeKey.utf8.count + nameOverhead }
    /// What a name adds at most to its store key's bytes (`maxNameLength`).
    public static let nameOverhead = 64

    /// The pending claim's name: `<prefix>:{<namespace>:<tag>}:p:<rest>`, or the keys layout's key
    /// itself while that layout is read (`readsKeysLayout`: standalone Redis only, so no tag).
    public func appendPendingKey(of storeKey: String, at spot: Spot, to out: inout [UInt8]) {
        out.append(atMost: Self.maxNameLength(of: storeKey)) { writePendingKey(of: storeKey, at: spot, to: &$0) }
    }

    public func writePendingKey(of storeKey: String, at spot: Spot, to out: inout ByteCursor) {
        storeKey.withUTF8InPlace { writePendingKey(of: $0, at: spot, to: &out) }
    }

    /// `writePendingKey` of a store key's UTF-8 bytes.
    public func writePendingKey(of key: UnsafeBufferPointer<UInt8>, at spot: Spot, to out: inout ByteCursor) {
        if readsKeysLayout {
            out.write(key)
            return
        }
        let rest = Self.writeTagged(key, tag: spot.tag, kind: UInt8(ascii: "p"), to: &out)
        out.write(UnsafeBufferPointer(rebasing: key[rest...]))
    }

    /// A bucket's name: `<prefix>:{<namespace>:<tag>}:d:<slot>:<bucket in hex>`.
    public func appendBucketKey(of storeKey: String, at spot: Spot, slot: Int64, to out: inout [UInt8]) {
        out.append(atMost: Self.maxNameLength(of: storeKey)) { writeBucketKey(of: storeKey, at: spot, slot: slot, to: &$0) }
    }

    public func writeBucketKey(of storeKey: String, at spot: Spot, slot: Int64, to out: inout ByteCursor) {
        storeKey.withUTF8InPlace { writeBucketKey(of: $0, at: spot, slot: slot, to: &out) }
    }

    /// `writeBucketKey` of a store key's UTF-8 bytes.
    public func writeBucketKey(of key: UnsafeBufferPointer<UInt8>, at spot: Spot, slot: Int64, to out: inout ByteCursor) {
        _ = Self.writeTagged(key, tag: spot.tag, kind: UInt8(ascii: "d"), to: &out)
        out.writeDigits(slot)
        out.write(UInt8(ascii: ":"))
        out.writeDigits(Int64(spot.bucket), radix: 16)
    }

    /// The pending keys and bucket names of one group's keys in a request. A route's store keys
    /// all start `<prefix>:<namespace>:`, so their names differ only in tag, bucket and rest:
    /// what they share (the head, each slot's digits) is spelled once per request, not once per
    /// name (`appendPendingKey` and `appendBucketKey` find the colons and write the slot for
    /// every key). A key that does not start like the first one is named by those functions.
    public struct GroupNames: Sendable {
        public let records: CompactRecords
        public let slots: [Int64]
        /// `<prefix>:<namespace>:` as the group's store keys start (empty: no shortcut).
        let keyHead: [UInt8]
        /// `<prefix>:{<namespace>:`, then per slot `}:d:<slot>:`.
        let nameHead: [UInt8]
        let bucketMiddles: [[UInt8]]

        public init(_ records: CompactRecords, slots: [Int64], firstKey: String?) {
            self.records = records
            self.slots = slots
            var keyHead: [UInt8] = [], nameHead: [UInt8] = []
            if let firstKey {
                firstKey.withUTF8InPlace { key in
                    var rest = 0
                    nameHead.append(atMost: CompactRecords.maxNameLength(of: firstKey)) {
                        rest = CompactRecords.writeTagged(key, tag: 0, kind: 0, to: &$0)
                    }
                    if rest > 0 { keyHead = Array(key[..<rest]) }
                }
                // Up to the tag: `appendTagged` wrote `<tag>}:<kind>:` after it (2 + 4 bytes).
                nameHead.removeLast(6)
            }
            self.keyHead = keyHead
            self.nameHead = nameHead
            self.bucketMiddles = slots.map { slot in
                var middle = Array("}:d:".utf8)
                middle.appendDigits(slot)
                middle.append(UInt8(ascii: ":"))
                return middle
            }
        }

        /// What `records.appendPendingKey(of: storeKey, at: spot, to: &out)` appends.
        public func appendPendingKey(of storeKey: String, at spot: Spot, to out: inout [UInt8]) {
            out.append(atMost: CompactRecords.maxNameLength(of: storeKey)) { writePendingKey(of: storeKey, at: spot, to: &$0) }
        }

        /// What `records.writePendingKey(of: storeKey, at: spot, to: &out)` writes.
        public func writePendingKey(of storeKey: String, at spot: Spot, to out: inout ByteCursor) {
            storeKey.withUTF8InPlace { writePendingKey(of: $0, at: spot, to: &out) }
        }

        /// `writePendingKey` of a store key's UTF-8 bytes (the command writer lends them once for
        /// the name and its size).
        public func writePendingKey(of key: UnsafeBufferPointer<UInt8>, at spot: Spot, to out: inout ByteCursor) {
            guard !records.readsKeysLayout, shares(key) else { return records.writePendingKey(of: key, at: spot, to: &out) }
            writeHead(tag: spot.tag, to: &out)
            out.write("}:p:")
            out.write(UnsafeBufferPointer(rebasing: key[keyHead.count...]))
        }

        /// What `records.appendBucketKey(of: storeKey, at: spot, slot: slots[slot], to: &out)` appends.
        public func appendBucketKey(of storeKey: String, at spot: Spot, slotAt slot: Int, to out: inout [UInt8]) {
            out.append(atMost: CompactRecords.maxNameLength(of: storeKey)) { writeBucketKey(of: storeKey, at: spot, slotAt: slot, to: &$0) }
        }

        /// What `records.writeBucketKey(of: storeKey, at: spot, slot: slots[slot], to: &out)` writes.
        public func writeBucketKey(of storeKey: String, at spot: Spot, slotAt slot: Int, to out: inout ByteCursor) {
            storeKey.withUTF8InPlace { writeBucketKey(of: $0, at: spot, slotAt: slot, to: &out) }
        }

        /// `writeBucketKey` of a store key's UTF-8 bytes (as `writePendingKey(of:at:to:)`).
        public func writeBucketKey(of key: UnsafeBufferPointer<UInt8>, at spot: Spot, slotAt slot: Int, to out: inout ByteCursor) {
            guard shares(key) else {
                return records.writeBucketKey(of: key, at: spot, slot: slots[slot], to: &out)
            }
            writeHead(tag: spot.tag, to: &out)
            out.write(bucketMiddles[slot])
            out.writeDigits(Int64(spot.bucket), radix: 16)
        }

        private func shares(_ key: UnsafeBufferPointer<UInt8>) -> Bool {
            !keyHead.isEmpty && key.count >= keyHead.count
                && keyHead.withUnsafeBufferPointer { memcmp($0.baseAddress!, key.baseAddress!, keyHead.count) == 0 }
        }

        /// `<prefix>:{<namespace>:<tag in two hex digits>`.
        @inline(__always)
        private func writeHead(tag: Int, to out: inout ByteCursor) {
            out.write(nameHead)
            out.write(Self.hex(tag >> 4))
            out.write(Self.hex(tag & 15))
        }

        private static func hex(_ digit: Int) -> UInt8 {
            digit < 10 ? UInt8(ascii: "0") &+ UInt8(digit) : UInt8(ascii: "a") &+ UInt8(digit - 10)
        }
    }

    /// Writes `<prefix>:{<namespace>:<tag>}:<kind>:` for the store key `key` and returns where
    /// its `<rest>` starts (a key without two colons is all rest, under prefix `dedupd` and an
    /// empty namespace).
    fileprivate static func writeTagged(_ key: UnsafeBufferPointer<UInt8>, tag: Int, kind: UInt8, to out: inout ByteCursor) -> Int {
        let colon = UInt8(ascii: ":")
        var namespace = 0..<0, rest = 0
        if let first = key.firstIndex(of: colon), let second = key[(first + 1)...].firstIndex(of: colon) {
            out.write(UnsafeBufferPointer(rebasing: key[..<first]))
            namespace = (first + 1)..<second
            rest = second + 1
        } else {
            out.write("dedupd")
        }
        out.write(":{")
        out.write(UnsafeBufferPointer(rebasing: key[namespace]))
        out.write(colon)
        if tag < 16 { out.write(UInt8(ascii: "0")) }
        out.writeDigits(Int64(tag), radix: 16)
        out.write("}:")
        out.write(kind)
        out.write(colon)
        return rest
    }

    /// Where one store key's records live, spelled out as strings (`Spot` and the `append`
    /// functions are the same names without strings).
    public struct Placement: Sendable, Hashable {
        let records: CompactRecords
        /// `dedupd:<namespace>:<rest>`: the `keys` layout's key, read during an upgrade.
        public let keysLayoutKey: String
        public let spot: Spot

        /// `{<namespace>:<tag>}`: the hash tag every key of this store key carries.
        public var tag: String {
            let name = bucketKey(slot: 0)
            return String(name[name.firstIndex(of: "{")!...name.firstIndex(of: "}")!])
        }
        /// The pending claim (`appendPendingKey`).
        public var pendingKey: String { Self.string { records.appendPendingKey(of: keysLayoutKey, at: spot, to: &$0) } }
        /// The bucket index within a slot (`buckets` of them).
        public var bucket: Int { spot.bucket }
        /// The 12 bytes stored as the bucket's field.
        public var field: [UInt8] { spot.field }

        public func bucketKey(slot: Int64) -> String {
            Self.string { records.appendBucketKey(of: keysLayoutKey, at: spot, slot: slot, to: &$0) }
        }

        private static func string(_ write: (inout [UInt8]) -> Void) -> String {
            var bytes: [UInt8] = []
            write(&bytes)
            return String(decoding: bytes, as: UTF8.self)
        }
    }

    /// `storeKey` is `DedupKey.storeKey`: `<prefix>:<namespace>:<rest>`.
    public func placement(of storeKey: String) -> Placement {
        Placement(records: self, keysLayoutKey: storeKey, spot: spot(of: storeKey))
    }

    /// Every bucket key of one slot (all tags), for setting their TTL.
    public func bucketKeys(prefix: String, namespace: String, slot: Int64) -> [String] {
        let storeKey = prefix + ":" + namespace + ":"
        return (0..<buckets).map { b in
            var name: [UInt8] = []
            appendBucketKey(of: storeKey, bucket: b, slot: slot, to: &name)
            return String(decoding: name, as: UTF8.self)
        }
    }

    /// Bucket `bucket` (of `buckets`) of slot `slot`, for the store keys that start with
    /// `scope` (`<prefix>:<namespace>:`), written to `out` (`bucketKeys`, one at a time).
    public func appendBucketKey(of scope: String, bucket: Int, slot: Int64, to out: inout [UInt8]) {
        appendBucketKey(of: scope, at: spot(ofBucket: bucket), slot: slot, to: &out)
    }

    /// The spot of bucket `bucket` (of `buckets`), for naming the bucket alone (no field).
    public func spot(ofBucket bucket: Int) -> Spot {
        Spot(tag: bucket >> (bucketBits - Self.tagBits), bucket: bucket, fieldHead: 0, fieldTail: 0)
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
