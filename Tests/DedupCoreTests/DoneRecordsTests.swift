import DedupCore
import Testing

/// The compact layout's arithmetic (`CompactRecords`): names, hash tags, slots and bounds.
@Suite struct DoneRecordsTests {
    let records = CompactRecords(retention: .seconds(86_400), slotsPerRetention: 2, buckets: 8192, readsKeysLayout: false)

    @Test func everyKeyOfAnItemCarriesItsHashTag() {
        let p = records.placement(of: "dedupd:orders:ord-13")
        #expect(p.tag.hasPrefix("{orders:") && p.tag.hasSuffix("}") && p.tag.count == "{orders:00}".count)
        #expect(p.pendingKey == "dedupd:\(p.tag):p:ord-13")
        #expect(p.keysLayoutKey == "dedupd:orders:ord-13")
        #expect(p.bucketKey(slot: 42).hasPrefix("dedupd:\(p.tag):d:42:"))
        #expect(p.field.count == 12)
        #expect(p.bucket >= 0 && p.bucket < 8192)
        // The tag is the bucket's top 6 bits: a bucket's keys all share one tag.
        #expect(Int(p.tag.dropFirst("{orders:".count).dropLast(), radix: 16) == p.bucket >> (13 - CompactRecords.tagBits))
        // Deterministic, and the namespace separates routes.
        #expect(records.placement(of: "dedupd:orders:ord-13") == p)
        #expect(records.placement(of: "dedupd:refunds:ord-13").pendingKey.contains("{refunds:"))
        // While the keys layout is read, the pending claim is that layout's key (standalone only).
        var upgrading = records
        upgrading.readsKeysLayout = true
        #expect(upgrading.placement(of: "dedupd:orders:ord-13").pendingKey == "dedupd:orders:ord-13")
        #expect(upgrading.placement(of: "dedupd:orders:ord-13").bucketKey(slot: 42) == p.bucketKey(slot: 42))
    }

    /// The names and the field are what records already in Redis were written under: a changed
    /// spelling would make every record written before an upgrade unseen (its repeats dispatched
    /// again). Expected values from SHA-256 of the store key, computed outside dedupd.
    @Test func namesAndFieldsStayWhatEarlierVersionsWrote() {
        let p = records.placement(of: "dedupd:orders:ord-13")
        #expect(p.tag == "{orders:01}")
        #expect(p.pendingKey == "dedupd:{orders:01}:p:ord-13")
        #expect(p.bucketKey(slot: 42) == "dedupd:{orders:01}:d:42:dc")
        #expect(p.bucketKey(slot: 20_454) == "dedupd:{orders:01}:d:20454:dc")
        let hex: [String] = p.field.map { byte in String(byte >> 4, radix: 16) + String(byte & 15, radix: 16) }
        #expect(hex.joined() == "b4230ef42f9698ed2bec0e74")
        // A key that is not `<prefix>:<namespace>:<rest>` is all rest.
        #expect(records.placement(of: "plain").pendingKey.hasPrefix("dedupd:{:"))
        #expect(records.placement(of: "plain").pendingKey.hasSuffix("}:p:plain"))
        // The buckets a sweep sets TTLs for are the ones keys are written to.
        let all = records.bucketKeys(prefix: "dedupd", namespace: "orders", slot: 42)
        #expect(all.count == 8192 && all[0xdc] == p.bucketKey(slot: 42) && all[0] == "dedupd:{orders:00}:d:42:0")
        #expect(all[8191] == "dedupd:{orders:3f}:d:42:1fff")
    }

    /// A request names its pending keys and buckets through `GroupNames` (what a group's keys
    /// share written once): the same bytes as `appendPendingKey` and `appendBucketKey`, for keys
    /// that start like the first key and for keys that do not (another namespace or prefix, no
    /// colons, a longer or shorter head), and while the keys layout is read.
    @Test func groupNamesAreTheKeysOwnNames() {
        let keys = (0..<300).map { "dedupd:orders:id-\($0)" } + [
            "dedupd:refunds:id-1", "other:orders:id-1", "plain", "dedupd:", "dedupd:orders", "dedupd:orders:",
            "dedupd:orders:with:colons", "dedupd:ordersX:id-1", "dedupd:order:id-1", "dédupd:orders:ü",
        ]
        for records in [CompactRecords(retention: .seconds(3600), buckets: 8192, readsKeysLayout: false),
                        CompactRecords(retention: .seconds(3600), buckets: 64, readsKeysLayout: true)] {
            for first in [keys[0], "plain", "dedupd:refunds:id-9", nil] {
                let slots: [Int64] = [0, 7, 20_454, 1_764_000_000]
                let names = CompactRecords.GroupNames(records, slots: slots, firstKey: first)
                for key in keys {
                    let spot = records.spot(of: key)
                    var expected: [UInt8] = [], got: [UInt8] = [1, 2]
                    records.appendPendingKey(of: key, at: spot, to: &expected)
                    names.appendPendingKey(of: key, at: spot, to: &got)
                    #expect(got == [1, 2] + expected, "pending key of \(key), first key \(first ?? "none")")
                    for (i, slot) in slots.enumerated() {
                        expected = []
                        got = [1, 2]
                        records.appendBucketKey(of: key, at: spot, slot: slot, to: &expected)
                        names.appendBucketKey(of: key, at: spot, slotAt: i, to: &got)
                        #expect(got == [1, 2] + expected, "bucket of \(key), first key \(first ?? "none"), slot \(slot)")
                    }
                }
            }
        }
    }

    @Test func keysSpreadOverAllTagsAndBuckets() {
        let placements = (0..<20_000).map { records.placement(of: "dedupd:n:id-\($0)") }
        #expect(Set(placements.map(\.tag)).count == 1 << CompactRecords.tagBits)
        #expect(Set(placements.map(\.bucket)).count > 7000)
        #expect(Set(placements.map(\.field)).count == placements.count)
    }

    /// A record confirmed at any time is in a slot every later claim reads until the retention
    /// has passed, whatever the clocks differ by within the allowance; and it is gone by one slot
    /// (plus the allowance) after.
    @Test func claimsReadTheConfirmedSlotForTheWholeRetention() {
        let r = CompactRecords.millis(records.retention), l = records.slotMillis
        let skew = CompactRecords.millis(CompactRecords.clockSkew)
        #expect(l == r / 2)
        var rng = SplitMix64(seed: 7)
        for _ in 0..<2000 {
            let confirmedAt = 1_800_000_000_000 + Int64(rng.next() % UInt64(3 * l))
            let confirmerSkew = Int64(rng.next() % UInt64(2 * skew)) - skew
            let slot = records.slot(at: confirmedAt + confirmerSkew)
            let ttl = records.bucketTTLMillis(slot: slot, at: confirmedAt + confirmerSkew)
            #expect(ttl >= r && ttl <= r + l + 2 * skew)
            let claimAt = confirmedAt + Int64(rng.next() % UInt64(r))
            let claimerSkew = Int64(rng.next() % UInt64(2 * skew)) - skew
            let live = records.liveSlots(at: claimAt + claimerSkew)
            #expect(live.contains(slot), "confirmed \(confirmedAt), claimed \(claimAt)")
            #expect(live.count == 3 || live.count == 4)
            #expect(live == live.sorted(by: >))
            // Past the longest life, no claim reads the slot any more.
            #expect(!records.liveSlots(at: (slot + 1) * l + r + 2 * skew).contains(slot))
        }
    }

    @Test func badSettingsNameTheKey() {
        func problem(_ pairs: [String: String]) -> String? {
            let values = ["kafka.bootstrap_servers": "k:9092", "kafka.topics": "t"].merging(pairs) { $1 }
            do {
                _ = try WorkerConfiguration(layers: [values.mapValues { ConfigValue($0, origin: "file") }])
                return nil
            } catch { return "\(error)" }
        }
        #expect(problem(["dedup.compact.buckets": "1000"])?.contains("dedup.compact.buckets") == true)
        #expect(problem(["dedup.compact.buckets": "32"])?.contains("power of two from 64") == true)
        #expect(problem(["dedup.compact.slots": "100"])?.contains("dedup.compact.slots") == true)
        #expect(problem(["dedup.retention": "2s", "dedup.window": "1s", "dedup.compact.slots": "4"])?.contains("shorter than 1s") == true)
        #expect(problem(["dedup.layout": "tree"])?.contains("dedup.layout") == true)
        #expect(problem(["dedup.retention": "1s", "dedup.window": "5s"])?.contains("dedup.retention") == true)
        // The keys layout ignores the compact settings' values.
        #expect(problem(["dedup.layout": "keys", "dedup.compact.buckets": "4096"]) == nil)
    }

    @Test func defaultsAreCompact() throws {
        let c = try WorkerConfiguration(layers: [["kafka.bootstrap_servers": "k:9092", "kafka.topics": "t"].mapValues { ConfigValue($0, origin: "file") }])
        #expect(c.dedup.doneLayout == .compact(CompactRecords(retention: .seconds(86_400), slotsPerRetention: 1, buckets: 8192, readsKeysLayout: true, lease: .seconds(35))))
    }
}

@Suite struct ByteWritingTests {
    /// Keys and log lines skip UTF-8 validation when this says ASCII: a byte ≥ 0x80 at any
    /// position, in the words or the tail, must be seen.
    @Test func asciiCheckCoversEveryPosition() {
        for length in 0..<20 {
            let ascii = [UInt8](repeating: 0x41, count: length)
            #expect(ascii.withUnsafeBytes { $0.isASCII })
            for position in 0..<length {
                for high: UInt8 in [0x80, 0xc3, 0xff] {
                    var bytes = ascii
                    bytes[position] = high
                    #expect(!bytes.withUnsafeBytes { $0.isASCII }, "length \(length), 0x\(String(high, radix: 16)) at \(position)")
                }
            }
        }
    }

    /// Key names and RESP lengths are spelled by `appendDigits`; it must spell what `String` does.
    @Test func digitsAreSpelledAsStringSpellsThem() {
        var values: [Int64] = [0, 1, 9, 10, 15, 16, 99, 100, 255, 256, 4095, 4096, -1, -10, -255, Int64.max, Int64.min, Int64.max - 1]
        var power: Int64 = 1
        while power < Int64.max / 10 { values += [power - 1, power, power + 1, -power]; power *= 10 }
        // Every hex digit count (radix 16 has a path of its own).
        for shift in stride(from: 4, to: 64, by: 4) { values += [(1 << shift) - 1, 1 << shift, (1 << shift) + 1] }
        for value in values {
            for radix in [10, 16] as [Int64] {
                var out: [UInt8] = [UInt8(ascii: ">")]
                out.appendDigits(value, radix: radix)
                #expect(String(decoding: out, as: UTF8.self) == ">" + String(value, radix: Int(radix)), "\(value) in radix \(radix)")
            }
        }
    }
}
