import Foundation
import KafkaIO
import Testing
import TestSupport

/// Two `dedupd run` workers with their seen-set on a six-node Redis Cluster; one primary is
/// SIGKILLed mid-run, after 300 slots were migrated under the workers. From the handler side: every unique submission dispatched, duplicates
/// within the failover bound (docs/operations.md "Redis Cluster"), offsets committed to the end.
@Suite(.serialized) struct RedisClusterEndToEndTests {
    @Test(.timeLimit(.minutes(5)))
    func twoWorkersSurviveThePrimaryFailover() async throws {
        let dir = try TemporaryDirectory(prefix: "dedupd-cluster-e2e")
        let cluster = try RedisClusterProcess()
        let mock = try DedupdProcess(["mock-kafka", "--brokers", "1", "--topic", "orders:6"], name: "mock-kafka", in: dir)
        let bootstrap = try mock.firstLine(timeout: .seconds(20))
        let group = "cluster"
        let batch = 200
        let config = dir.file("worker.yaml")
        try """
            kafka: {bootstrap_servers: "\(bootstrap)", topics: orders, group: \(group)}
            redis: {mode: cluster, url: "\(cluster.url)", command_timeout: 1s, connect_timeout: 500ms}
            dedup: {namespace: \(group), window: 300ms, lease: 6s}
            consumer: {batch_size: \(batch)}
            log: {stats_interval: 2s}
            """.write(to: config, atomically: true, encoding: .utf8)
        let workers = try (0..<2).map { i in
            try DedupdProcess(["run", "--config", config.path, "--output", dir.file("w\(i).jsonl").path], name: "w\(i)", in: dir)
        }
        func dispatched() -> [String] {
            (0..<2).flatMap { dispatchedIDs(inJSONLines: (try? String(contentsOf: dir.file("w\($0).jsonl"), encoding: .utf8)) ?? "") }
        }
        #expect(try await waitUntil(timeout: .seconds(40)) { workers.allSatisfy { $0.stderr.contains("partitions assigned") } })

        let produce = try DedupdProcess(
            ["produce", "--bootstrap-servers", bootstrap, "--topic", "orders", "--count", "12000", "--duplicate-ratio", "0.3",
             "--rate", "1500"], name: "produce", in: dir)
        #expect(try await waitUntil(timeout: .seconds(60)) { dispatched().count >= 1000 })

        // A slot migration while the workers claim: they are answered ASK, then MOVED.
        let primaries = try cluster.primaryPorts()
        let reshardStart = ContinuousClock.now
        try await Task.detached { try cluster.reshard(from: primaries[1], to: primaries[2], slots: 300) }.value
        let reshardTook = ContinuousClock.now - reshardStart
        #expect(try await waitUntil(timeout: .seconds(60)) { dispatched().count >= 2000 })

        // The crash: a primary dies; its replica is promoted after cluster-node-timeout.
        let victim = primaries[0]
        let victimID = try #require(try cluster.topology().first { $0.port == victim }?.id)
        let atKill = dispatched().count
        cluster.node(port: victim)!.kill()
        let killed = ContinuousClock.now
        var promoted: Duration?
        var largestGap: Duration = .zero
        var last = (count: atKill, at: killed)
        while ContinuousClock.now - killed < .seconds(40) {
            let now = ContinuousClock.now
            let count = dispatched().count
            if count > last.count { last = (count, now) } else { largestGap = max(largestGap, now - last.at) }
            if promoted == nil, let nodes = try? cluster.topology(),
               nodes.contains(where: { $0.isPrimary && !$0.failed && $0.port != victim && nodes.contains { $0.id == victimID && $0.failed } }),
               nodes.filter({ $0.isPrimary && !$0.failed }).count == 3 {
                promoted = now - killed
            }
            if promoted != nil, count > atKill + 500 { break }
            try await Task.sleep(for: .milliseconds(50))
        }
        let failover = try #require(promoted, "a replica took over")

        #expect(try produce.wait(timeout: .seconds(60)) == 0, "produce: \(produce.stderr)")
        let match = try #require(produce.stdout.firstMatch(of: /sent=(\d+) unique=(\d+)/))
        let unique = Int(match.2)!
        let expected = Set((0..<unique).map { "ord-\($0)" })
        #expect(try await waitUntil(timeout: .seconds(90)) { Set(dispatched()).isSuperset(of: expected) })
        try await Task.sleep(for: .seconds(2))
        for w in workers {
            w.terminate()
            #expect(try w.wait(timeout: .seconds(30)) == 0, "\(w.name): \(w.stderr.suffix(2000))")
        }

        let ids = dispatched()
        let distinct = Set(ids)
        let lost = expected.subtracting(distinct).count
        let duplicates = ids.count - distinct.count
        // The bound: a failover can lose what the dead primary acknowledged but had not yet
        // replicated, at most the claims and confirms of one round trip per worker.
        let bound = 2 * batch * workers.count
        #expect(lost == 0)
        #expect(distinct.subtracting(expected).isEmpty)
        #expect(duplicates <= bound)
        // Fail-closed while the slots had no primary: one line when it starts, one when it ends.
        let outages = workers.map { $0.stderr.components(separatedBy: "redis unavailable, pausing").count - 1 }
        let recoveries = workers.map { $0.stderr.components(separatedBy: "redis reachable again").count - 1 }
        #expect(outages.reduce(0, +) >= 1 && outages == recoveries, "outages \(outages), recoveries \(recoveries)")
        let progress = try await KafkaConsumer.groupProgress(bootstrapServers: bootstrap, groupID: group, topic: "orders")
        for p in progress {
            #expect(p.committed == p.high, "partition \(p.partition): committed \(p.committed), end \(p.high)")
        }
        print("cluster e2e: unique=\(unique) dispatched=\(ids.count) lost=\(lost) duplicates=\(duplicates) bound=\(bound) failover=\(failover) largest_dispatch_gap=\(largestGap) killed_at=\(atKill) outages=\(outages) reshard_300_slots=\(reshardTook)")
        mock.terminate()
    }
}
