import DedupCore
import Foundation
import RedisIO
import Testing

/// The guard's entity records against a real redis-server: judging, holding, moving, giving back,
/// and a hold that runs out on Redis's own clock.
@Suite struct GuardStoreTests {
    func step(_ key: String, _ id: String, to target: String, ttl: Duration = .seconds(10)) -> EntityStep {
        EntityStep(
            entityKey: key, holdID: id, target: target, allowedFrom: orderTable.allowedFrom(target), ttl: ttl,
            records: records)
    }

    let records = CompactRecords(retention: .seconds(60), buckets: 64, readsKeysLayout: false)

    let orderTable = EntityGuard(
        entity: try! KeyTemplate("json:/orderNo"), state: try! KeyTemplate("json:/status"), initial: ["created"],
        transitions: ["created": ["paid", "cancelled"], "paid": ["shipped"]], retention: .seconds(60))

    @Test func holdsAreJudgedAgainstTheRecordedStateAndMovesWriteIt() async throws {
        let f = try await RedisFixture()
        let s = f.store
        let e = "dedupd-entity:orders:" + uniquePrefix() + "o1"
        #expect(try await s.hold([step(e, "m0", to: "paid")], owner: "a") == [.rejected(state: nil)], "no state: only an initial one")
        #expect(try await s.hold([step(e, "m1", to: "created")], owner: "a") == [.held(from: nil)])
        #expect(try await s.hold([step(e, "m1", to: "created")], owner: "a") == [.held(from: nil)], "its own hold is extended")
        #expect(try await s.hold([step(e, "m2", to: "created")], owner: "b") == [.busy(owner: "a")])
        #expect(try await s.move([step(e, "m1", to: "created", ttl: .seconds(60))], owner: "a") == [.moved])
        #expect(try await s.hold([step(e, "m2", to: "created")], owner: "b") == [.rejected(state: "created")])
        #expect(try await s.hold([step(e, "m3", to: "paid")], owner: "b") == [.held(from: "created")])
        #expect(try await s.unhold([step(e, "m2", to: "paid")], owner: "b") == [false], "another hold id gives nothing back")
        #expect(try await s.unhold([step(e, "m3", to: "paid")], owner: "a") == [false], "another owner gives nothing back")
        #expect(try await s.unhold([step(e, "m3", to: "paid")], owner: "b") == [true])
        let state = try await s.inspectEntities([e], records: records)[0]
        #expect(state.state == "created" && state.pending == nil && state.ttlMillis > 50_000, "\(state)")

        // A record with no state left (only a hold, given back) is gone.
        let fresh = "dedupd-entity:orders:" + uniquePrefix() + "o2"
        #expect(try await s.hold([step(fresh, "n1", to: "created")], owner: "a") == [.held(from: nil)])
        #expect(try await s.unhold([step(fresh, "n1", to: "created")], owner: "a") == [true])
        #expect(try await s.inspectEntities([fresh], records: records)[0].ttlMillis == -2)
    }

    @Test func anExpiredHoldFreesTheEntityAndALateMoveStillWrites() async throws {
        let f = try await RedisFixture()
        let s = f.store
        let e = "dedupd-entity:orders:" + uniquePrefix() + "o1"
        #expect(try await s.hold([step(e, "m1", to: "created", ttl: .milliseconds(150))], owner: "a") == [.held(from: nil)])
        try await Task.sleep(for: .milliseconds(300))
        #expect(try await s.hold([step(e, "m2", to: "created")], owner: "b") == [.held(from: nil)], "a's hold ran out")
        #expect(try await s.move([step(e, "m1", to: "created", ttl: .seconds(60))], owner: "a") == [.notOwner(owner: "b")])
        #expect(try await s.move([step(e, "m2", to: "created", ttl: .seconds(60))], owner: "b") == [.moved])
        #expect(try await s.move([step(e, "m1", to: "created")], owner: "a") == [.movedAfterLeaseLost], "already there: a retried move")
        #expect(try await s.hold([step(e, "m3", to: "paid")], owner: "b") == [.held(from: "created")])
        #expect(try await s.move([step(e, "m3", to: "paid")], owner: "b") == [.moved])
        #expect(try await s.move([step(e, "m1", to: "created")], owner: "a") == [.superseded(state: "paid")], "an older move never overwrites a newer state")
        #expect(try await s.inspectEntities([e], records: records)[0].state == "paid")
        let other = "dedupd-entity:orders:" + uniquePrefix() + "o2"
        #expect(try await s.move([step(other, "x", to: "created", ttl: .seconds(60))], owner: "c") == [.movedAfterLeaseLost])
        #expect(try await s.inspectEntities([other], records: records)[0].state == "created")
    }

    @Test func forgetResetsAnEntityButKeepsOneInFlightUnlessForced() async throws {
        let f = try await RedisFixture()
        let s = f.store
        let e = "dedupd-entity:orders:" + uniquePrefix() + "o1"
        _ = try await s.hold([step(e, "m1", to: "created")], owner: "a")
        #expect(try await s.forgetEntities([e], records: records, force: false).map(\.removed) == [false])
        _ = try await s.move([step(e, "m1", to: "created", ttl: .seconds(60))], owner: "a")
        let r = try await s.forgetEntities([e], records: records, force: false)
        #expect(r.map(\.removed) == [true] && r[0].state.state == "created")
        #expect(try await s.hold([step(e, "m2", to: "created")], owner: "a") == [.held(from: nil)], "starts again from guard.initial")
        #expect(try await s.forgetEntities([e], records: records, force: true).map(\.removed) == [true])
    }

    /// Settled entities are fields of listpack buckets, as done records are: a few tens of bytes
    /// each where a hash per entity weighs ~165 (docs/architecture.md, "The entity record").
    @Test func aSettledEntityCostsAFieldNotAKey() async throws {
        let f = try await RedisFixture()
        func usedMemory() async throws -> Int64 { try await RedisInfo.read(f.connection).usedMemory }
        let n = 50_000
        // 512 buckets keep ~98 entities each: listpack encoding, as the sizing guidance intends.
        let records = CompactRecords(retention: .seconds(3600), buckets: 512, readsKeysLayout: false)
        let steps = (0..<n).map {
            EntityStep(entityKey: "dedupd-entity:orders:ord-\($0)", holdID: "m\($0)#1", target: "created",
                       allowedFrom: [EntityGuard.noState], ttl: .seconds(30), records: records)
        }
        let before = try await usedMemory()
        for chunk in stride(from: 0, to: n, by: 1000).map({ Array(steps[$0..<min($0 + 1000, n)]) }) {
            #expect(try await f.store.hold(chunk, owner: "a").allSatisfy { $0 == .held(from: nil) })
            #expect(try await f.store.move(chunk, owner: "a").allSatisfy { $0 == .moved })
        }
        let perEntity = Double(try await usedMemory() - before) / Double(n)
        print("guard: \(String(format: "%.1f", perEntity)) bytes of Redis memory per settled entity (\(n) entities, \(records.buckets) buckets)")
        #expect(perEntity < 48)
    }

    @Test func manyEntitiesInOneRoundTrip() async throws {
        let f = try await RedisFixture(maxKeysPerScript: 7)
        let p = "dedupd-entity:orders:" + uniquePrefix()
        let steps = (0..<50).map { step(p + "o\($0)", "m\($0)", to: $0 % 5 == 0 ? "paid" : "created") }
        let held = try await f.store.hold(steps, owner: "a")
        #expect(held.filter { $0 == .held(from: nil) }.count == 40)
        #expect(held.filter { $0 == .rejected(state: nil) }.count == 10)
    }
}
