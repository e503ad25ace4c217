import DedupCore
import Foundation
import Synchronization
import Testing
@testable import RedisIO
import TestSupport

@Suite("Cluster slots and seed lists")
struct ClusterSlotTests {
    @Test func slotsMatchRedis() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        #expect(ClusterSlot.of("123456789") == 0x31C3 & 16383)
        #expect(ClusterSlot.of("foo") == 12182)
        #expect(ClusterSlot.of("bar") == 5061)
        #expect(ClusterSlot.of("{user1000}.following") == ClusterSlot.of("{user1000}.followers"))
        #expect(ClusterSlot.of("{user1000}.following") == ClusterSlot.of("user1000"))
        // An empty tag does not count: the whole key is hashed.
        #expect(ClusterSlot.of("foo{}{bar}") != ClusterSlot.of("bar"))
        #expect(ClusterSlot.of("foo{{bar}}zap") == ClusterSlot.of("{bar"))
    }

    @Test func seedListKeepsCredentialsAndScheme() throws {
        let seeds = try RedisURL.clusterSeeds("rediss://app:s%40cret@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002")
        #expect(seeds.map(\.host) == ["10.0.0.1", "10.0.0.2", "::1"])
        #expect(seeds.map(\.port) == [7000, 7001, 7002])
        #expect(seeds.allSatisfy { $0.user == "app" && $0.password == "s@cret" && $0.tls })
        #expect(try RedisURL.clusterSeeds("redis://h:1/0").count == 1)
    }

    @Test func seedListRefusesDatabasesAndEmptyNodes() throws {
        let db = try #require(throws: RedisError.self) { try RedisURL.clusterSeeds("redis://h:1,h:2/3") }
        #expect(db.message.contains("only database 0"))
        let empty = try #require(throws: RedisError.self) { try RedisURL.clusterSeeds("redis://h:1,,h:2") }
        #expect(empty.message.contains("empty node"))
    }
}

/// Against a real six-node cluster (three primaries, three replicas) started by the test.
@Suite("RedisClaimStore against a Redis Cluster", .serialized)
struct RedisClusterTests {
    /// With `inline`, round trips are read on the sending thread as the worker's loop reads them
    /// (its budget and size), so a redirection or a failed node may arrive in that first hop.
    static func store(_ cluster: RedisClusterProcess, maxKeysPerScript: Int = 1000, inline: Bool = false) async throws -> RedisClaimStore {
        let redis = try await RedisTarget.connect(url: cluster.url, cluster: true, commandTimeout: .seconds(3), logger: quietLogger)
        let store = RedisClaimStore(redis: redis, maxKeysPerScript: maxKeysPerScript, logger: quietLogger)
        if inline { store.readInline(inlineReads) }
        return store
    }

    static let inlineReads = RedisConnection.InlineReads(budget: .milliseconds(2), maxBytes: 64 * 1024) { true }

    @Test func claimsAndConfirmsSpreadOverEveryPrimary() async throws {
        let cluster = try RedisClusterProcess()
        let store = try await Self.store(cluster, maxKeysPerScript: 50)
        let p = uniquePrefix()
        let keys = (0..<3000).map { "\(p)\($0)" }
        #expect(try await store.claim(keys, owner: "w1", lease: .seconds(30)).allSatisfy { $0 == .claimed })
        #expect(try await store.claim(keys, owner: "w2", lease: .seconds(30)) == Array(repeating: .pendingElsewhere(owner: "w1"), count: keys.count))
        // Results stay in key order although the keys were grouped by slot: mixed states.
        _ = try await store.confirm(Array(keys[..<1000]), owner: "w1", retention: .seconds(60))
        let mixed = try await store.claim(keys, owner: "w1", lease: .seconds(30))
        #expect(mixed[..<1000].allSatisfy { $0 == .done })
        #expect(mixed[1000...].allSatisfy { $0 == .alreadyOwned })
        #expect(try await store.release(Array(keys[1000...]), owner: "w1").allSatisfy { $0 })

        // Every primary holds some of the keys, and together exactly the confirmed ones.
        var total: Int64 = 0
        for port in try cluster.primaryPorts() {
            let connection = try await RedisConnection.connect(try RedisURL("redis://127.0.0.1:\(port)/0"), logger: quietLogger)
            let size = try #require(try await connection.command("DBSIZE").int)
            #expect(size > 0, "primary \(port) holds none of the keys")
            total += size
        }
        #expect(total == 1000)

        // redis.wait_replicas: confirms wait for each written primary's replica; asking for more
        // replicas than exist only waits out redis.wait_timeout and logs, the confirms stand.
        let redis = store.redis
        for (replicas, timeout) in [(1, Duration.seconds(2)), (2, .milliseconds(50))] {
            let waiting = RedisClaimStore(redis: redis, logger: quietLogger, waitReplicas: (replicas, timeout))
            let batch = (0..<300).map { "\(p)wait\(replicas):\($0)" }
            _ = try await waiting.claim(batch, owner: "w1", lease: .seconds(30))
            let started = ContinuousClock.now
            #expect(try await waiting.confirm(batch, owner: "w1", retention: .seconds(60)).allSatisfy { $0 == .confirmed })
            if replicas == 2 { #expect(ContinuousClock.now - started >= .milliseconds(50), "WAIT ran its timeout out") }
            let slots = batch.map(ClusterSlot.of)
            #expect(try await redis.waitForReplicas(replicas, timeout: timeout, slots: slots) == min(replicas, 1))
            _ = try await waiting.forget(batch, force: true)
        }

        let forgotten = try await store.forget([keys[0], keys[2000]], force: false)
        #expect(forgotten.map(\.removed) == [true, false])
        #expect(try await store.claim([keys[0]], owner: "w3", lease: .seconds(30)) == [.claimed])
    }

    /// The compact layout on a cluster: every chunk's keys share a slot (the pending key and its
    /// buckets carry one hash tag), claims, confirms, repeats, the bucket TTL sweep and
    /// inspect/forget all route; the routes' 64 tags spread the buckets over every primary.
    @Test func compactLayoutRoutesByHashTag() async throws {
        let cluster = try RedisClusterProcess()
        let store = try await Self.store(cluster, maxKeysPerScript: 100)
        let records = CompactRecords(retention: .seconds(3600), buckets: 1024, readsKeysLayout: false)
        let layout = DoneLayout.compact(records)
        let keys = (0..<2000).map { "dedupd:orders:\(uniquePrefix())\($0)" }
        #expect(try await store.claim([KeyGroup(keys, ttl: .seconds(30), layout: layout)], owner: "w1").allSatisfy { $0 == .claimed })
        #expect(try await store.claim([KeyGroup(keys, ttl: .seconds(30), layout: layout)], owner: "w2").allSatisfy { $0 == .pendingElsewhere(owner: "w1") })
        #expect(try await store.confirm([KeyGroup(Array(keys[..<1500]), ttl: .seconds(3600), layout: layout)], owner: "w1").allSatisfy { $0 == .confirmed })
        let again = try await store.claim([KeyGroup(keys, ttl: .seconds(30), layout: layout)], owner: "w2")
        #expect(again[..<1500].allSatisfy { $0 == .done })
        #expect(again[1500...].allSatisfy { $0 == .pendingElsewhere(owner: "w1") })
        // Buckets on every primary, each with its TTL from the sweep; no pending key of a confirmed id left.
        for port in try cluster.primaryPorts() {
            let connection = try await RedisConnection.connect(try RedisURL("redis://127.0.0.1:\(port)/0"), logger: quietLogger)
            guard case .array(let names) = try await connection.command("KEYS", "dedupd:{orders:*:d:*") else {
                Issue.record("KEYS failed on \(port)")
                continue
            }
            #expect(!names.isEmpty, "primary \(port) holds no bucket")
            if let first = names.first?.text {
                #expect(try await connection.command("PTTL", RedisArgument(first)).int ?? -1 > 0)
            }
            await connection.close()
        }
        let forgotten = try await store.forget([keys[0]], force: false, layout: layout)
        #expect(forgotten.first?.removed == true)
        #expect(try await store.claim([KeyGroup([keys[0]], ttl: .seconds(30), layout: layout)], owner: "w3") == [.claimed])
        #expect(try await store.inspect([keys[1]], layout: layout).first.map { if case .done = $0 { true } else { false } } == true)

        // Guard entities: each its own key and slot; a batch's holds and moves are grouped by slot.
        let entities = (0..<300).map { EntityGuard.storeName("\(uniquePrefix())o\($0)", namespace: "orders").storeKey }
        func step(_ e: String, _ to: String) -> EntityStep {
            EntityStep(
                entityKey: e, holdID: e + "#1", target: to, allowedFrom: to == "created" ? [EntityGuard.noState] : ["created"], ttl: .seconds(30),
                records: CompactRecords(retention: .seconds(3600), buckets: 1024, readsKeysLayout: false))
        }
        #expect(try await store.hold(entities.map { step($0, "created") }, owner: "w1").allSatisfy { $0 == .held(from: nil) })
        #expect(try await store.move(entities.map { step($0, "created") }, owner: "w1").allSatisfy { $0 == .moved })
        #expect(try await store.hold(entities.map { step($0, "created") }, owner: "w1").allSatisfy { $0 == .rejected(state: "created") })
        #expect(try await store.inspectEntities([entities[7]], records: CompactRecords(retention: .seconds(3600), buckets: 1024, readsKeysLayout: false)).first?.state == "created")
    }

    /// `readInline` on a cluster: once every primary a round trip goes to is connected, a small
    /// round trip from the chosen thread is written to each, read there and answered before
    /// `send` returns. A node slower than the budget is finished on its queue, and a `MOVED` in
    /// that first hop is followed in a task; either way the replies come back whole, in order.
    @Test func aSmallRoundTripFromTheChosenThreadIsReadThere() async throws {
        let cluster = try RedisClusterProcess()
        let redis = try await RedisTarget.connect(url: cluster.url, cluster: true, commandTimeout: .seconds(3), logger: quietLogger)
        guard case .cluster(let client) = redis else { Issue.record("not a cluster"); return }
        let p = uniquePrefix()
        let keys = (0..<60).map { "\(p)\($0)" }
        #expect(Set(keys.map { client.primary(for: ClusterSlot.of($0)) }).count == 3, "the keys go to every primary")
        func send(_ command: String, _ keys: [String], on client: RedisCluster, threads: ThreadLog = ThreadLog()) -> RedisPending<[String]> {
            client.send({
                RedisCommandBatch(keys.map { key in
                    [RedisArgument(command), RedisArgument(key)] + (command == "SET" ? [RedisArgument("v:" + key)] : [])
                })
            }, slots: keys.map(ClusterSlot.of), parse: { reply in
                threads.note()
                return RedisReply(reply).text ?? "nil"
            })
        }
        func inline(_ budget: Duration) -> RedisConnection.InlineReads {
            RedisConnection.InlineReads(budget: budget, maxBytes: 64 * 1024) { true }
        }
        client.readInline(inline(.milliseconds(500)))
        // Not every primary is connected yet: a task sends, the nodes' queues read.
        let setThreads = ThreadLog()
        var caller = pthread_self()  // the test's thread until its next await
        let set = send("SET", keys, on: client, threads: setThreads)
        #expect(try await set.value() == Array(repeating: "OK", count: keys.count))
        #expect(setThreads.none(on: caller, count: keys.count))

        let values = keys.map { "v:" + $0 }
        let getThreads = ThreadLog()
        caller = pthread_self()
        let get = send("GET", keys, on: client, threads: getThreads)
        #expect(get.answeredAt != nil)
        #expect(getThreads.all(on: caller, count: keys.count))
        #expect(try await get.value() == values)

        // One primary answers only after a second.
        client.readInline(inline(.milliseconds(50)))
        let paused = try #require(client.primary(for: ClusterSlot.of(keys[0])))
        let other = try await RedisConnection.connect(try RedisURL("redis://\(paused.host):\(paused.port)"), logger: quietLogger)
        _ = try await other.command("CLIENT", "PAUSE", "1000", "ALL").throwingOnError("CLIENT PAUSE")
        let slow = send("GET", keys, on: client)
        #expect(slow.answeredAt == nil)
        #expect(try await slow.value() == values)
        let next = send("GET", keys, on: client)
        #expect(next.answeredAt != nil)
        #expect(try await next.value() == values)

        // Slots move behind the client's back: the inline hop's MOVED replies are sent again, in a task.
        let primaries = try cluster.primaryPorts()
        try cluster.reshard(from: primaries[0], to: primaries[1], slots: 20)
        let fresh = try await RedisCluster.connect(seeds: client.seeds, logger: quietLogger)
        let moved = (0..<16_384).filter { client.primary(for: UInt16($0)) != fresh.primary(for: UInt16($0)) }
        #expect(moved.count == 20)
        let movedKeys = (0..<200_000).lazy.map { "\(p)m\($0)" }.filter { moved.contains(Int(ClusterSlot.of($0))) }.prefix(10)
        let mixed = Array(movedKeys) + keys
        #expect(try await send("SET", Array(movedKeys), on: fresh).value().allSatisfy { $0 == "OK" })
        client.readInline(inline(.milliseconds(500)))
        let redirected = send("GET", mixed, on: client)
        #expect(redirected.answeredAt == nil)
        #expect(try await redirected.value() == mixed.map { "v:" + $0 })
        // The ten, and any of the first keys whose slot moved too.
        #expect(client.redirections.moved == mixed.filter { moved.contains(Int(ClusterSlot.of($0))) }.count)
        // The map is stale until a task reads it again; then round trips are read inline once more.
        #expect(try await send("GET", mixed, on: client).value() == mixed.map { "v:" + $0 })
        let after = send("GET", mixed, on: client)
        #expect(after.answeredAt != nil)
        #expect(try await after.value() == mixed.map { "v:" + $0 })
        await fresh.close()
        await other.close()
        await redis.close()
    }

    @Test(arguments: [false, true])
    func followsMovedAndAskDuringAReshard(inline: Bool) async throws {
        let cluster = try RedisClusterProcess()
        let store = try await Self.store(cluster, maxKeysPerScript: 100, inline: inline)
        let primaries = try cluster.primaryPorts()
        let p = uniquePrefix()
        // Keys claimed before, during and after a migration of 500 slots: each key is claimed
        // once by its first worker, seen as pending by the second, confirmed, then seen done.
        let finished = Finished()
        let reshard = Task.detached {
            defer { finished.set() }
            try cluster.reshard(from: primaries[0], to: primaries[1], slots: 500)
        }
        var round = 0
        while round < 400 {
            let keys = (0..<200).map { "\(p)\(round):\($0)" }
            #expect(try await store.claim(keys, owner: "a", lease: .seconds(30)).allSatisfy { $0 == .claimed })
            #expect(try await store.claim(keys, owner: "b", lease: .seconds(30)).allSatisfy { $0 == .pendingElsewhere(owner: "a") })
            #expect(try await store.confirm(keys, owner: "a", retention: .seconds(60)).allSatisfy { $0 == .confirmed })
            #expect(try await store.claim(keys, owner: "b", lease: .seconds(30)).allSatisfy { $0 == .done })
            round += 1
            if round >= 20, finished.isSet { break }
        }
        try await reshard.value
        // After the migration the old keys are still found, on their new primary.
        let first = (0..<200).map { "\(p)0:\($0)" }
        #expect(try await store.claim(first, owner: "c", lease: .seconds(30)).allSatisfy { $0 == .done })
        guard case .cluster(let client) = store.redis else { Issue.record("not a cluster"); return }
        let redirections = client.redirections
        #expect(redirections.moved > 0, "the migrated slots answered MOVED")
        print("cluster reshard (inline reads: \(inline)): \(round) rounds of 200 keys during the migration of 500 slots; redirected by MOVED \(redirections.moved), by ASK \(redirections.ask)")
    }

    /// One slot put in migration by hand (`MIGRATING` on its primary, `IMPORTING` on another),
    /// so every key of it the source does not hold is answered `ASK`: the claim goes to the
    /// importing node after `ASKING`, and the second owner finds it there. An ACL user without
    /// `ASKING` (docs/operations.md lists it for a cluster) gets a refusal that names it, not
    /// an endless redirection.
    @Test func followsAskToTheImportingNodeAndNeedsAsking() async throws {
        let cluster = try RedisClusterProcess()
        let key = uniquePrefix() + "ask"
        let slot = Int(ClusterSlot.of(key))
        let primaries = try cluster.topology().filter(\.isPrimary)
        let source = try #require(primaries.first { $0.slots.contains { $0.contains(slot) } })
        let target = try #require(primaries.first { $0.id != source.id })
        #expect(try RedisClusterProcess.cli(["-p", "\(target.port)", "CLUSTER", "SETSLOT", "\(slot)", "IMPORTING", source.id]).status == 0)
        #expect(try RedisClusterProcess.cli(["-p", "\(source.port)", "CLUSTER", "SETSLOT", "\(slot)", "MIGRATING", target.id]).status == 0)

        let store = try await Self.store(cluster)
        #expect(try await store.claim([key], owner: "a", lease: .seconds(30)) == [.claimed])
        #expect(try await store.claim([key], owner: "b", lease: .seconds(30)) == [.pendingElsewhere(owner: "a")])
        guard case .cluster(let client) = store.redis else { Issue.record("not a cluster"); return }
        #expect(client.redirections.ask >= 2, "\(client.redirections)")

        for node in cluster.nodes {
            try RedisClusterProcess.cli(["-p", "\(node.port)", "ACL", "SETUSER", "noasking", "on", ">pw", "~*", "&*", "+@all", "-asking"])
        }
        let url = cluster.url.replacingOccurrences(of: "redis://", with: "redis://noasking:pw@")
        let limited = RedisClaimStore(
            redis: try await RedisTarget.connect(url: url, cluster: true, commandTimeout: .seconds(3), logger: quietLogger), logger: quietLogger)
        let another = try #require((0..<200_000).lazy.map { "\(key)-\($0)" }.first { Int(ClusterSlot.of($0)) == slot })
        let refused = await #expect(throws: RedisError.self) { try await limited.claim([another], owner: "c", lease: .seconds(30)) }
        #expect(refused?.storeFailure == .refused && refused?.message.contains("'asking'") == true, "\(refused.map { "\($0)" } ?? "")")
    }

    @Test(arguments: [false, true])
    func speaksTLSToEveryNodeAsAnACLUser(inline: Bool) async throws {
        let certs = try TLSTestCertificates()
        let cluster = try TLSRedisCluster(certs)
        let tls = RedisTLSOptions(caFile: certs.path("ca.pem"), certificateFile: certs.path("client.pem"), keyFile: certs.path("client.key"))
        // Every node gets the ACL user, and the default user is switched off.
        let cli = ["--tls", "--cacert", certs.path("ca.pem"), "--cert", certs.path("client.pem"), "--key", certs.path("client.key")]
        for node in cluster.nodes {
            try RedisClusterProcess.cli(cli + ["-p", "\(node.port)", "ACL", "SETUSER", "dedupd", "on", ">pw-acl-9", "~*", "+@all"])
            try RedisClusterProcess.cli(cli + ["-p", "\(node.port)", "ACL", "SETUSER", "default", "off"])
        }
        let seeds = cluster.url.replacingOccurrences(of: "rediss://", with: "rediss://dedupd@")
        let refused = try await #require(throws: RedisError.self) {
            _ = try await RedisTarget.connect(url: seeds, cluster: true, password: "wrong-pw", tls: tls, logger: quietLogger)
        }
        #expect(refused.code == .auth && !refused.message.contains("wrong-pw"), "\(refused)")
        // The password given apart (redis.password_file) reaches every node.
        let redis = try await RedisTarget.connect(url: seeds, cluster: true, password: "pw-acl-9", tls: tls, logger: quietLogger)
        #expect(!redis.redacted.contains("pw-acl-9"))
        let store = RedisClaimStore(redis: redis, logger: quietLogger)
        if inline { store.readInline(Self.inlineReads) }
        // 1000 keys' scripts are more than a TLS session writes inline (each node's share goes to
        // its queue); 30 keys' shares are read on this thread when `inline` is set.
        for count in [1000, 30] {
            let keys = (0..<count).map { "\(uniquePrefix())\($0)" }
            #expect(try await store.claim(keys, owner: "w1", lease: .seconds(30)).allSatisfy { $0 == .claimed })
            #expect(try await store.confirm(keys, owner: "w1", retention: .seconds(60)).allSatisfy { $0 == .confirmed })
            #expect(try await store.claim(keys, owner: "w2", lease: .seconds(30)).allSatisfy { $0 == .done })
        }
        guard case .cluster(let client) = redis else { Issue.record("not a cluster"); return }
        #expect(client.primaries.count == 3)
        if inline {
            // Every primary is connected by now: a small round trip to all three is answered over
            // TLS before `send` returns.
            let keys = (0..<30).map { "\(uniquePrefix())\($0)" }
            #expect(Set(keys.map { client.primary(for: ClusterSlot.of($0)) }).count == 3, "the keys go to every primary")
            let exists = client.send({
                RedisCommandBatch(keys.map { ["EXISTS", RedisArgument($0)] })
            }, slots: keys.map(ClusterSlot.of), parse: { RedisReply($0).int ?? -1 })
            #expect(exists.answeredAt != nil)
            #expect(try await exists.value() == Array(repeating: 0, count: keys.count))
        }
    }

    @Test func aSeedListWhereNoNodeAnswersAndAStandaloneServerAreClearErrors() async throws {
        let closed = try (0..<2).map { _ in try freePort() }
        let none = try await #require(throws: RedisError.self) {
            _ = try await RedisTarget.connect(url: "redis://127.0.0.1:\(closed[0]),127.0.0.1:\(closed[1])", cluster: true, logger: quietLogger)
        }
        #expect(none.isRetriable, "the worker waits for the cluster, failing closed")
        #expect(none.message.contains("no Redis Cluster node answered") && none.message.contains("127.0.0.1:\(closed[1])"), "\(none)")

        let standalone = try RedisServerProcess()
        let notCluster = try await #require(throws: RedisError.self) {
            _ = try await RedisTarget.connect(url: standalone.url, cluster: true, logger: quietLogger)
        }
        #expect(!notCluster.isRetriable)
        #expect(notCluster.message.contains("not in cluster mode") && notCluster.message.contains("redis.mode: standalone"), "\(notCluster)")

        let crossSlot = RedisError.fromServerReply("CROSSSLOT Keys in request don't hash to the same slot", context: "EVALSHA claim")
        #expect(crossSlot.message.contains("hash tag"), "\(crossSlot)")
    }

    @Test(arguments: [false, true])
    func failsClosedWhileAPrimaryIsDownAndResumesOnItsReplica(inline: Bool) async throws {
        let cluster = try RedisClusterProcess()
        let store = try await Self.store(cluster, inline: inline)
        let p = uniquePrefix()
        let before = (0..<1000).map { "\(p)before:\($0)" }
        _ = try await store.claim(before, owner: "w1", lease: .seconds(30))
        #expect(try await store.confirm(before, owner: "w1", retention: .seconds(300)).allSatisfy { $0 == .confirmed })
        // WAIT makes sure the replicas have the done records before the crash (AOF always is
        // the primary's own disk; a promoted replica only has what was replicated).
        _ = try await store.redis.waitForReplicas(1, timeout: .seconds(2), slots: before.map(ClusterSlot.of))

        let victim = try cluster.primaryPorts()[0]
        cluster.node(port: victim)!.kill()
        let killed = ContinuousClock.now
        var failures = 0
        var recovered: Duration?
        let after = (0..<500).map { "\(p)after:\($0)" }
        while ContinuousClock.now - killed < .seconds(30) {
            do {
                let outcomes = try await store.claim(after, owner: "w1", lease: .seconds(30))
                #expect(outcomes.allSatisfy { $0 == .claimed || $0 == .alreadyOwned })
                recovered = ContinuousClock.now - killed
                break
            } catch let error as RedisError {
                #expect(error.isRetriable, "a node down is retriable: \(error)")
                failures += 1
                try await Task.sleep(for: .milliseconds(200))
            }
        }
        let took = try #require(recovered, "the replica took over within 30 s")
        #expect(failures > 0, "claims failed (closed) while the slots had no primary")
        // The done records written before the crash were replicated: still done on the new primary.
        #expect(try await store.claim(before, owner: "w2", lease: .seconds(30)).allSatisfy { $0 == .done })
        print("cluster failover (inline reads: \(inline)): claims failed closed \(failures) times, served again \(took) after SIGKILL of primary \(victim)")
    }
}

private final class Finished: Sendable {
    private let flag = Mutex(false)
    func set() { flag.withLock { $0 = true } }
    var isSet: Bool { flag.withLock { $0 } }
}
