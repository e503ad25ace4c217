import DedupCore
import Foundation
import Synchronization
import Testing
@testable import RedisIO
import TestSupport

/// The compact layout (issue 15) against redis-server: claim and confirm semantics, the retention
/// bounds on a moved clock, the upgrade from the keys layout, two workers racing on the same
/// keys, admin commands, and the memory per remembered id.
@Suite("Compact done records against redis-server")
struct CompactLayoutTests {
    static let records = CompactRecords(retention: .seconds(3600), slotsPerRetention: 2, buckets: 64)
    static let layout = DoneLayout.compact(records)

    final class Tally: Sendable {
        let counts = Mutex<[String: Int]>([:])
    }

    /// A store whose wall clock the test sets.
    final class Clock: Sendable {
        let millis = Mutex<Int64>(1_800_000_000_000)
        func advance(_ d: Duration) { millis.withLock { $0 += CompactRecords.millis(d) } }
    }

    static func store(_ fx: RedisFixture, clock: Clock? = nil) -> RedisClaimStore {
        guard let clock else { return RedisClaimStore(connection: fx.connection, logger: quietLogger) }
        return RedisClaimStore(connection: fx.connection, logger: quietLogger, unixMillis: { clock.millis.withLock { $0 } })
    }

    /// The names a `KEYS pattern` reply lists.
    static func keys(_ fx: RedisFixture, _ pattern: String) async throws -> [String] {
        guard case .array(let items) = try await fx.connection.command(["KEYS", RedisArgument(pattern)]) else { return [] }
        return items.compactMap(\.text)
    }

    static func claim(_ s: RedisClaimStore, _ keys: [String], _ owner: String, layout: DoneLayout = layout) async throws -> [ClaimOutcome] {
        try await s.claim([KeyGroup(keys, ttl: .seconds(30), layout: layout)], owner: owner)
    }

    static func confirm(_ s: RedisClaimStore, _ keys: [String], _ owner: String, layout: DoneLayout = layout) async throws -> [ConfirmOutcome] {
        try await s.confirm([KeyGroup(keys, ttl: .seconds(3600), layout: layout)], owner: owner)
    }

    @Test func claimConfirmAndRepeat() async throws {
        let fx = try await RedisFixture()
        let s = Self.store(fx)
        let keys = (0..<50).map { "dedupd:orders:id-\($0)" }
        #expect(try await Self.claim(s, keys, "w1").allSatisfy { $0 == .claimed })
        // Claiming again extends the lease (a renewal). The shortened lease is long enough not to
        // run out before the renewal on a loaded machine (tests run side by side).
        let pending = Self.records.placement(of: keys[0]).pendingKey
        _ = try await fx.connection.command(["PEXPIRE", RedisArgument(pending), 15_000])
        #expect(try await Self.claim(s, keys, "w1").allSatisfy { $0 == .alreadyOwned })
        #expect(try await fx.connection.command(["PTTL", RedisArgument(pending)]).int ?? 0 > 20_000)
        #expect(try await Self.claim(s, keys, "w2").allSatisfy { $0 == .pendingElsewhere(owner: "w1") })
        #expect(try await Self.confirm(s, Array(keys[..<10]), "w1").allSatisfy { $0 == .confirmed })
        // A confirm that finds another worker's claim (its own lease ran out and the other took the
        // key) still records the key: the message was dispatched.
        #expect(try await Self.confirm(s, Array(keys[10...]), "w2").allSatisfy { $0 == .notOwner(owner: "w1") })
        #expect(try await Self.confirm(s, Array(keys[10...]), "w1").allSatisfy { $0 == .confirmedAfterLeaseLost })
        // The pending keys are gone at confirm; what is left is fields in buckets.
        let p = Self.records.placement(of: keys[0])
        #expect(try await fx.connection.command(["EXISTS", RedisArgument(p.pendingKey)]) == .integer(0))
        #expect(try await Self.claim(s, keys, "w2").allSatisfy { $0 == .done })
        #expect(try await Self.claim(s, keys, "w1").allSatisfy { $0 == .done })
        // A repeat's claim takes the free pending key before it finds the field, and gives it back.
        #expect(try await Self.keys(fx, "dedupd:{orders:*}:p:*").isEmpty)
        // A confirm after the lease ran out still records the key (the handler did take it).
        let late = ["dedupd:orders:late"]
        #expect(try await Self.confirm(s, late, "w1") == [.confirmedAfterLeaseLost])
        #expect(try await Self.claim(s, late, "w2") == [.done])
        // Every key a chunk touched carries its item's hash tag.
        let all = try await Self.keys(fx, "*")
        #expect(!all.isEmpty && all.allSatisfy { $0.hasPrefix("dedupd:{orders:") })
    }

    @Test func releaseDeletesThePendingKey() async throws {
        let fx = try await RedisFixture()
        let s = Self.store(fx)
        let key = "dedupd:orders:r"
        let pending = Self.records.placement(of: key).pendingKey
        #expect(try await Self.claim(s, [key], "w1") == [.claimed])
        #expect(try await s.release([pending], owner: "w2") == [false])
        #expect(try await s.release([pending], owner: "w1") == [true])
        #expect(try await Self.claim(s, [key], "w2") == [.claimed])
    }

    /// A done record is recognised for at least the retention, and gone one slot (plus the clock
    /// allowance) later, on the store's clock; the bucket's own TTL agrees.
    @Test func retentionIsAtLeastRAndAtMostOneSlotMore() async throws {
        let fx = try await RedisFixture()
        let clock = Clock()
        let s = Self.store(fx, clock: clock)
        let key = "dedupd:orders:kept"
        _ = try await Self.claim(s, [key], "w1")
        #expect(try await Self.confirm(s, [key], "w1") == [.confirmed])
        let p = Self.records.placement(of: key)
        let slot = Self.records.slot(at: clock.millis.withLock { $0 })
        let ttl = try #require(try await fx.connection.command(["PTTL", RedisArgument(p.bucketKey(slot: slot))]).int)
        let r = CompactRecords.millis(Self.records.retention), l = Self.records.slotMillis, skew = CompactRecords.millis(CompactRecords.clockSkew)
        #expect(ttl >= r - 1000 && ttl <= r + l + skew)

        clock.advance(Self.records.retention - .seconds(1))
        // Nothing pending remains after the confirm, so a claim within the retention says done.
        #expect(try await Self.claim(s, [key], "w3") == [.done])
        clock.advance(.milliseconds(l) + CompactRecords.clockSkew + .seconds(2))
        #expect(try await Self.claim(s, [key], "w4") == [.claimed])
    }

    /// The upgrade: done records of the keys layout are done for a compact worker while they
    /// live (and not when `read_keys_layout` is off), and both layouts' admin commands see them.
    @Test func compactWorkerSeesKeysLayoutRecords() async throws {
        let fx = try await RedisFixture()
        let s = Self.store(fx)
        let old = (0..<20).map { "dedupd:orders:old-\($0)" }
        #expect(try await Self.claim(s, old, "old-worker", layout: .keys).allSatisfy { $0 == .claimed })
        #expect(try await Self.confirm(s, old, "old-worker", layout: .keys).allSatisfy { $0 == .confirmed })
        #expect(try await Self.claim(s, old, "new-worker").allSatisfy { $0 == .done })
        // Side by side, each sees the other's copies in flight: the claim is the same key.
        #expect(try await Self.claim(s, ["dedupd:orders:x"], "old-worker", layout: .keys) == [.claimed])
        #expect(try await Self.claim(s, ["dedupd:orders:x"], "new-worker") == [.pendingElsewhere(owner: "old-worker")])
        #expect(try await Self.claim(s, ["dedupd:orders:y"], "new-worker") == [.claimed])
        #expect(try await Self.claim(s, ["dedupd:orders:y"], "old-worker", layout: .keys) == [.pendingElsewhere(owner: "new-worker")])
        // What they do not share: a compact confirm leaves no record an old worker reads.
        _ = try await Self.confirm(s, ["dedupd:orders:y"], "new-worker")
        #expect(try await Self.claim(s, ["dedupd:orders:y"], "old-worker", layout: .keys) == [.claimed])
        var noLegacy = Self.records
        noLegacy.readsKeysLayout = false
        #expect(try await Self.claim(s, [old[0]], "new-worker", layout: .compact(noLegacy)) == [.claimed])

        #expect(try await s.inspect([old[1]], layout: Self.layout).first.map { if case .done = $0 { true } else { false } } == true)
        let forgotten = try await s.forget([old[1]], force: false, layout: Self.layout)
        #expect(forgotten.first?.removed == true)
        #expect(try await Self.claim(s, [old[1]], "new-worker") == [.claimed])
    }

    @Test func inspectAndForgetACompactRecord() async throws {
        let fx = try await RedisFixture()
        // The test's clock: the bucket named below is the one the confirm wrote, even at a slot's end.
        let s = Self.store(fx, clock: Clock())
        let key = "dedupd:orders:f"
        #expect(try await s.inspect([key], layout: Self.layout) == [.absent])
        _ = try await Self.claim(s, [key], "w1")
        guard case .pending(let owner, _)? = try await s.inspect([key], layout: Self.layout).first else {
            Issue.record("expected pending")
            return
        }
        #expect(owner == "w1")
        let kept = try await s.forget([key], force: false, layout: Self.layout)
        #expect(kept.first?.removed == false)
        _ = try await Self.confirm(s, [key], "w1")
        guard case .done(let ttl)? = try await s.inspect([key], layout: Self.layout).first else {
            Issue.record("expected done")
            return
        }
        #expect(ttl > 0)
        let p = Self.records.placement(of: key)
        let bucket = p.bucketKey(slot: Self.records.slot(at: s.unixMillis()))
        #expect(try await fx.connection.command(["HLEN", RedisArgument(bucket)]) == .integer(1))
        let removed = try await s.forget([key], force: false, layout: Self.layout)
        #expect(removed.first?.removed == true)
        // The field is gone from its bucket (the bucket itself with it, being empty).
        #expect(try await fx.connection.command(["HEXISTS", RedisArgument(bucket), RedisArgument(bytes: p.field)]) == .integer(0))
        #expect(try await Self.claim(s, [key], "w2") == [.claimed])
    }

    /// A server that keeps fewer hash fields in a listpack than buckets are sized for is named at
    /// start (the worker logs it as a warning), with the setting to change.
    @Test func aSmallListpackLimitIsReported() async throws {
        let small = try RedisServerProcess(extraArguments: ["--hash-max-listpack-entries", "16"])
        let connection = try await RedisConnection.connect(try RedisURL(small.url), logger: quietLogger)
        let found = try await RedisRequirements.read(from: connection)
        #expect(found.hashListpackEntries == 16)
        #expect(found.listpackProblem?.contains("dedup.compact.buckets") == true)
        let fx = try await RedisFixture()
        #expect(try await RedisRequirements.read(from: fx.connection).listpackProblem == nil)
        await connection.close()
    }

    /// Two workers (two connections, two owners) claim, "dispatch" and confirm the same keys at
    /// the same time, in different orders and batch sizes, parking what the other holds; every key
    /// is dispatched exactly once.
    @Test func twoWorkersNeverDispatchOneKeyTwice() async throws {
        let fx = try await RedisFixture()
        let second = try await RedisConnection.connect(
            try RedisURL(fx.server.url), connectTimeout: .seconds(2), commandTimeout: .seconds(5), logger: quietLogger)
        let stores = [Self.store(fx), RedisClaimStore(connection: second, logger: quietLogger)]
        let keys = (0..<3000).map { "dedupd:race:\($0)" }
        let dispatched = Tally()
        try await withThrowingTaskGroup(of: Void.self) { group in
            for (w, store) in stores.enumerated() {
                group.addTask {
                    var rng = SystemRandomNumberGenerator()
                    var todo = w == 0 ? keys : keys.reversed().shuffled(using: &rng)
                    while !todo.isEmpty {
                        let n = Int.random(in: 1...300, using: &rng)
                        let batch = Array(todo.prefix(n))
                        todo.removeFirst(batch.count)
                        let outcomes = try await Self.claim(store, batch, "w\(w)")
                        var mine: [String] = []
                        for (key, outcome) in zip(batch, outcomes) {
                            switch outcome {
                            case .claimed, .alreadyOwned: mine.append(key)
                            case .done: break
                            case .pendingElsewhere: todo.append(key)  // parked: looked at again
                            }
                        }
                        dispatched.counts.withLock { d in for key in mine { d[key, default: 0] += 1 } }
                        let confirmed = try await Self.confirm(store, mine, "w\(w)")
                        #expect(confirmed.allSatisfy { $0 == .confirmed })
                        await Task.yield()
                    }
                }
            }
            try await group.waitForAll()
        }
        let counts = dispatched.counts.withLock { $0 }
        #expect(counts.count == keys.count)
        #expect(counts.values.allSatisfy { $0 == 1 }, "dispatched twice: \(counts.filter { $0.value > 1 }.keys.sorted().prefix(5))")
        await second.close()
    }

    /// 100,000 ids claimed and confirmed with the default settings (8,192 buckets: ~12 ids
    /// each, so a bucket's own key still weighs ~8 B per id) leave ≤ 32 B of Redis memory each
    /// once nothing is pending, and the buckets stay listpacks. The keys layout's figure and both layouts' Redis CPU per id
    /// are printed for docs/performance.md.
    @Test func aHundredThousandIdsCostAtMost32BytesEach() async throws {
        let fx = try await RedisFixture()
        let records = try WorkerConfiguration(layers: [["kafka.bootstrap_servers": "k:9092", "kafka.topics": "t"].mapValues {
            ConfigValue($0, origin: "test")
        }]).dedup.doneLayout
        guard case .compact(let defaults) = records else {
            Issue.record("the default layout is compact")
            return
        }
        let ids = (0..<100_000).map { "dedupd:mem:id-\($0)-\(UInt64($0) &* 0x9E37_79B9_7F4A_7C15)" }
        var figures: [String] = []
        for layout in [records, .keys] {
            _ = try await fx.connection.command("FLUSHALL")
            // The test's clock, which stays in one slot: the bound is for ids of one slot.
            let s = Self.store(fx, clock: Clock())
            _ = try await Self.claim(s, ["dedupd:mem:warm-up"], "w", layout: layout)
            _ = try await Self.confirm(s, ["dedupd:mem:warm-up"], "w", layout: layout)
            let before = try await RedisInfo.read(fx.connection)
            for start in stride(from: 0, to: ids.count, by: 1000) {
                let batch = Array(ids[start..<start + 1000])
                _ = try await s.claim([KeyGroup(batch, ttl: .seconds(30), layout: layout)], owner: "w")
                _ = try await s.confirm([KeyGroup(batch, ttl: .seconds(86400), layout: layout)], owner: "w")
            }
            let after = try await RedisInfo.read(fx.connection)
            let bytes = Double(after.usedMemory - before.usedMemory) / Double(ids.count)
            let cpu = (after.cpuSeconds - before.cpuSeconds) * 1e6 / Double(ids.count)
            figures.append(String(format: "%@: %.1f B and %.2f µs of Redis CPU per id", "\(layout)".hasPrefix("compact") ? "compact" : "keys", bytes, cpu))
            if case .compact = layout {
                #expect(bytes <= 32, "compact layout: \(bytes) B per id")
                let buckets = try await Self.keys(fx, "dedupd:{mem:*:d:*")
                #expect(buckets.count > defaults.buckets * 9 / 10)
                for bucket in buckets.prefix(50) {
                    #expect(try await fx.connection.command(["OBJECT", "ENCODING", RedisArgument(bucket)]).text == "listpack")
                }
                #expect(try await Self.keys(fx, "dedupd:{mem:*:p:*").isEmpty)
            } else {
                #expect(bytes > 100, "the keys layout should cost what it always did, got \(bytes) B per id")
            }
        }
        print("memory per remembered id, 100,000 ids, appendfsync always: " + figures.joined(separator: "; "))
    }
}
