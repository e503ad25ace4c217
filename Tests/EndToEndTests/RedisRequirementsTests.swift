import Foundation
import Testing
import TestSupport

/// A Redis that evicts keys with a TTL would silently forget done records: `dedupd run` refuses
/// it at start-up, naming the setting and the fix, unless `redis.allow_eviction: true`.
@Suite(.serialized) struct RedisRequirementsTests {
    @Test(.timeLimit(.minutes(3)))
    func anEvictingRedisStopsStartUpUnlessAllowed() async throws {
        let dir = try TemporaryDirectory(prefix: "dedupd-eviction")
        let redis = try RedisServerProcess(extraArguments: ["--maxmemory-policy", "volatile-lru", "--appendonly", "no"])
        let mock = try DedupdProcess(["mock-kafka", "--brokers", "1", "--topic", "in:1"], name: "mock-kafka", in: dir)
        let bootstrap = try mock.firstLine(timeout: .seconds(20))

        func run(_ name: String, allow: Bool) throws -> DedupdProcess {
            let file = dir.file("\(name).yaml")
            try """
            kafka: {bootstrap_servers: "\(bootstrap)", topics: in, group: \(name)}
            redis: {url: "\(redis.url)", allow_eviction: \(allow)}
            run: {stop_when_idle: 2s}
            """.write(to: file, atomically: true, encoding: .utf8)
            return try DedupdProcess(["run", "--config", file.path, "--output", dir.file("\(name).jsonl").path], name: name, in: dir)
        }

        let refused = try run("refused", allow: false)
        let status = try refused.wait(timeout: .seconds(60))
        #expect(status != 0, "an evicting Redis must stop start-up: \(refused.stderr.suffix(2000))")
        #expect(refused.stderr.contains("maxmemory-policy is volatile-lru"), "\(refused.stderr.suffix(2000))")
        #expect(refused.stderr.contains("redis.allow_eviction") && refused.stderr.contains("noeviction"))

        let allowed = try run("allowed", allow: true)
        #expect(try allowed.wait(timeout: .seconds(90)) == 0, "\(allowed.stderr.suffix(2000))")
        #expect(allowed.stderr.contains("redis evicts keys with a TTL; running anyway"))
        #expect(allowed.stderr.contains("redis persists nothing"), "AOF and snapshots are both off here")
        mock.terminate()
    }

    /// mock-kafka with topic `in` (3 partitions) holding `count` submissions, 30% of them
    /// repeats: the mock (for the caller to terminate), its bootstrap servers, and how many
    /// unique ids were sent.
    static func mockKafka(holding count: Int, in dir: TemporaryDirectory) throws -> (mock: DedupdProcess, bootstrap: String, unique: Int) {
        let mock = try DedupdProcess(["mock-kafka", "--brokers", "1", "--topic", "in:3"], name: "mock-kafka", in: dir)
        let bootstrap = try mock.firstLine(timeout: .seconds(20))
        let produce = try DedupdProcess(
            ["produce", "--bootstrap-servers", bootstrap, "--topic", "in", "--count", "\(count)", "--duplicate-ratio", "0.3"], name: "produce", in: dir)
        #expect(try produce.wait(timeout: .seconds(60)) == 0, "\(produce.stderr.suffix(2000))")
        let unique = try #require(produce.stdout.split(separator: " ").first { $0.hasPrefix("unique=") }.flatMap { Int($0.dropFirst(7)) })
        return (mock, bootstrap, unique)
    }

    /// The commands docs/operations.md lists for an ACL user ("ACL users"), every one of them,
    /// whatever it says they are for.
    static func documentedACLCommands() throws -> [String] {
        let doc = try DocsTests.read("docs/operations.md")
        // The bullet is the section's last: it ends at the blank line.
        let bullet = try #require(doc.components(separatedBy: "- **ACL users.**").dropFirst().first?.components(separatedBy: "\n\n").first)
        let commands = codeSpans(bullet).filter { !$0.isEmpty && $0.allSatisfy { $0.isUppercase || $0 == " " } }
        #expect(commands.contains("EVALSHA") && commands.contains("CONFIG GET") && commands.count >= 15, "\(commands)")
        return commands
    }

    /// User `dedupd` (password `pw-acl-7`) on the server at `port`, allowed exactly the
    /// documented commands, on every key and channel.
    static func createDocumentedACLUser(port: Int) throws {
        let acl = ["-p", "\(port)", "ACL", "SETUSER", "dedupd", "reset", "on", ">pw-acl-7", "~*", "&*"]
            + (try documentedACLCommands()).map { "+" + $0.lowercased().replacingOccurrences(of: " ", with: "|") }
        let set = try RedisClusterProcess.cli(acl)
        #expect(set.status == 0 && set.output.hasPrefix("OK"), "\(set.output)")
    }

    /// docs/operations.md lists the commands an ACL user needs. A user allowed exactly those (read
    /// from the doc) runs the whole flow: claims, lease renewals (a 3 s lease is renewed once half
    /// used, inside the 2 s window), confirms, then `inspect` and `forget` of a dispatched key,
    /// in database 1 (`SELECT`). Without one of them the worker waits, fail-closed, and names the list; given it back, it
    /// resumes.
    @Test(.timeLimit(.minutes(3)))
    func anACLUserWithTheDocumentedCommandsRunsTheWholeFlow() async throws {
        let redis = try RedisServerProcess()
        try Self.createDocumentedACLUser(port: redis.port)

        let dir = try TemporaryDirectory(prefix: "dedupd-acl")
        let (mock, bootstrap, unique) = try Self.mockKafka(holding: 3000, in: dir)
        defer { mock.terminate() }

        try "pw-acl-7\n".write(to: dir.file("password"), atomically: true, encoding: .utf8)
        let config = dir.file("acl.yaml")
        try """
            kafka: {bootstrap_servers: "\(bootstrap)", topics: in, group: acl}
            redis: {url: "redis://dedupd@127.0.0.1:\(redis.port)/1", password_file: "\(dir.file("password").path)"}
            dedup: {key: "header:message-id", window: 2s, lease: 3s}
            run: {stop_when_idle: 3s}
            """.write(to: config, atomically: true, encoding: .utf8)
        let run = try DedupdProcess(["run", "--config", config.path, "--output", dir.file("out.jsonl").path], name: "acl", in: dir)
        #expect(try run.wait(timeout: .seconds(90)) == 0, "\(run.stderr.suffix(3000))")
        let ids = dispatchedIDs(inJSONLines: try String(contentsOf: dir.file("out.jsonl"), encoding: .utf8))
        #expect(ids.count == unique && Set(ids).count == unique, "dispatched \(ids.count) (\(Set(ids).count) distinct) of \(unique)")
        #expect(!run.stderr.contains("NOPERM"), "\(run.stderr.suffix(3000))")
        #expect(!run.stderr.contains("could not check"), "CONFIG GET is allowed: \(run.stderr.suffix(2000))")
        let summary = try #require(run.stderr.split(separator: "\n").last { $0.contains("shutdown complete") })
        #expect(fields(summary)["renewed"].flatMap { Int($0) } ?? 0 > 0, "leases were renewed: \(summary)")

        let key = try #require(ids.first)
        let (inspected, shown, inspectErr) = try await DeployTests.dedupd(["inspect", "--config", config.path, key])
        #expect(inspected == 0 && shown.hasPrefix("\(key) done"), "\(shown)\(inspectErr)")
        let (forgot, removed, forgetErr) = try await DeployTests.dedupd(["forget", "--config", config.path, key])
        #expect(forgot == 0 && removed.hasPrefix("\(key) removed"), "\(removed)\(forgetErr)")

        // A user without one of them: the worker names the command and the list, and dispatches
        // nothing it could not claim (fail-closed). The forgotten key is new to a new group.
        #expect(try RedisClusterProcess.cli(["-p", "\(redis.port)", "ACL", "SETUSER", "dedupd", "-hexists"]).status == 0)
        let short = try DedupdProcess(
            ["run", "--config", config.path, "--group", "acl-short", "--output", dir.file("short.jsonl").path], name: "acl-short", in: dir)
        let deadline = ContinuousClock.now + .seconds(30)
        while !short.stderr.contains("NOPERM"), ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(100)) }
        short.terminate()
        let refused = try #require(short.stderr.split(separator: "\n").first { $0.contains("NOPERM") }, "\(short.stderr.suffix(3000))")
        #expect(refused.contains("redis refused dedupd's commands (authentication or permissions), pausing consumption"), "\(refused)")
        #expect(refused.contains("'hexists'") && refused.contains("\\\"ACL users\\\", lists them"), "\(refused)")
        #expect(try String(contentsOf: dir.file("short.jsonl"), encoding: .utf8).isEmpty)

        // A user without HSET: claims are granted, every confirm is refused. One outage, logged
        // once (not again at each granted claim or renewal), one round dispatched; given HSET
        // back, the worker resumes by itself and dispatches every id once. A namespace of its
        // own, so the ids are new.
        #expect(try RedisClusterProcess.cli(["-p", "\(redis.port)", "ACL", "SETUSER", "dedupd", "+hexists", "-hset"]).status == 0)
        let noHset = dir.file("no-hset.yaml")
        try String(contentsOf: config, encoding: .utf8).replacingOccurrences(of: "lease: 3s}", with: "lease: 3s, namespace: acl-hset}")
            .write(to: noHset, atomically: true, encoding: .utf8)
        let hset = try DedupdProcess(
            ["run", "--config", noHset.path, "--group", "acl-hset", "--output", dir.file("hset.jsonl").path], name: "acl-hset", in: dir)
        let refusedAt = ContinuousClock.now + .seconds(30)
        while !hset.stderr.contains("NOPERM"), ContinuousClock.now < refusedAt { try await Task.sleep(for: .milliseconds(100)) }
        #expect(hset.stderr.contains("'hset'"), "\(hset.stderr.suffix(3000))")
        // Long enough for several renewals (3 s lease) and for the confirm's backoff to reach 5 s.
        try await Task.sleep(for: .seconds(8))
        let lines = { (text: String) in hset.stderr.split(separator: "\n").count { $0.contains(text) } }
        #expect(lines("redis refused dedupd's commands") == 1 && lines("redis reachable again") == 0, "\(hset.stderr.suffix(3000))")
        let whileRefused = dispatchedIDs(inJSONLines: try String(contentsOf: dir.file("hset.jsonl"), encoding: .utf8)).count
        #expect(whileRefused > 0 && whileRefused <= 500, "one round (handler.max_batch 500): \(whileRefused)")
        #expect(try RedisClusterProcess.cli(["-p", "\(redis.port)", "ACL", "SETUSER", "dedupd", "+hset"]).status == 0)
        #expect(try hset.wait(timeout: .seconds(60)) == 0, "\(hset.stderr.suffix(3000))")
        #expect(lines("redis refused dedupd's commands") == 1 && lines("redis reachable again") == 1, "\(hset.stderr.suffix(3000))")
        let after = dispatchedIDs(inJSONLines: try String(contentsOf: dir.file("hset.jsonl"), encoding: .utf8))
        #expect(after.count == unique && Set(after).count == unique, "dispatched \(after.count) (\(Set(after).count) distinct) of \(unique)")
    }

    /// The same list on a six-node Redis Cluster, with a guard and `redis.wait_replicas: 1`: a
    /// user allowed exactly the documented commands on every node (ACLs are per node) runs the
    /// guarded flow while 300 slots move under it. What the cluster (`CLUSTER SLOTS`, and
    /// `ASKING` when a key's slot is being migrated), the guard (`HMGET`) and `WAIT` add is in
    /// the list.
    @Test(.timeLimit(.minutes(4)))
    func aClusterACLUserWithTheDocumentedCommandsRunsAGuardedFlow() async throws {
        let dir = try TemporaryDirectory(prefix: "dedupd-acl-cluster")
        let cluster = try RedisClusterProcess()
        for node in cluster.nodes { try Self.createDocumentedACLUser(port: node.port) }
        let mock = try DedupdProcess(["mock-kafka", "--brokers", "1", "--topic", "orders:6"], name: "mock-kafka", in: dir)
        defer { mock.terminate() }
        let bootstrap = try mock.firstLine(timeout: .seconds(20))

        try "pw-acl-7\n".write(to: dir.file("password"), atomically: true, encoding: .utf8)
        let output = dir.file("orders.jsonl")
        let config = dir.file("acl-cluster.yaml")
        try """
            kafka: {bootstrap_servers: "\(bootstrap)", topics: [orders], group: acl-cluster}
            redis: {mode: cluster, url: "\(cluster.url.replacingOccurrences(of: "redis://", with: "redis://dedupd@"))", password_file: "\(dir.file("password").path)", wait_replicas: 1}
            dedup: {key: "header:message-id", window: 200ms, namespace: orders}
            \(GuardEndToEndTests.guardYAML)
            handler: {type: log, output: "\(output.path)"}
            run: {stop_when_idle: 3s}
            """.write(to: config, atomically: true, encoding: .utf8)
        let run = try DedupdProcess(["run", "--config", config.path], name: "acl-cluster", in: dir)
        #expect(try await waitUntil(timeout: .seconds(40)) { run.stderr.contains("partitions assigned") }, "\(run.stderr.suffix(3000))")

        let events = GuardEndToEndTests.events(orders: 400)
        let want = GuardEndToEndTests.expected(events)
        let primaries = try cluster.primaryPorts()
        async let moved: Void = Task.detached { try cluster.reshard(from: primaries[1], to: primaries[2], slots: 300) }.value
        try await GuardEndToEndTests().produce(events, bootstrap: bootstrap, pace: .milliseconds(100))
        try await moved
        #expect(try run.wait(timeout: .seconds(90)) == 0, "\(run.stderr.suffix(3000))")

        let ids = GuardEndToEndTests().dispatched([output]).map(\.id)
        #expect(Set(ids) == want.dispatched && ids.count == Set(ids).count, "dispatched \(ids.count) (\(Set(ids).count) distinct), want \(want.dispatched.count)")
        #expect(!run.stderr.contains("NOPERM") && !run.stderr.contains("refused"), "\(run.stderr.suffix(3000))")
        #expect(!run.stderr.contains("could not check"), "CONFIG GET is allowed: \(run.stderr.suffix(2000))")
        let summary = try #require(run.stderr.split(separator: "\n").last { $0.contains("shutdown complete") })
        #expect(summary.contains("rejected_transitions=\(want.rejected.count)"), "\(summary)")
        // Whether a claim met a slot in migration depends on timing: said, not required.
        let asked = try cluster.nodes.map { node in
            try RedisClusterProcess.cli(["-p", "\(node.port)", "INFO", "commandstats"]).output
                .split(separator: "\n").first { $0.hasPrefix("cmdstat_asking:") }.map(String.init) ?? ""
        }.filter { !$0.isEmpty }
        print("acl cluster: \(ids.count) dispatched, \(want.rejected.count) rejected; ASKING: \(asked.isEmpty ? "not sent" : asked.joined(separator: " "))")
    }

    /// A Redis at `maxmemory` answers every claim `OOM`: the worker logs that Redis is full
    /// (once), dispatches nothing, and once Redis has room resumes by itself and dispatches every
    /// id once.
    @Test(.timeLimit(.minutes(3)))
    func aFullRedisPausesTheWorkerUntilItHasRoom() async throws {
        let dir = try TemporaryDirectory(prefix: "dedupd-full")
        let redis = try RedisServerProcess()
        let (mock, bootstrap, unique) = try Self.mockKafka(holding: 3000, in: dir)
        defer { mock.terminate() }

        #expect(try RedisClusterProcess.cli(["-p", "\(redis.port)", "CONFIG", "SET", "maxmemory", "1"]).status == 0)
        let output = dir.file("out.jsonl")
        let run = try DedupdProcess(
            ["run", "--bootstrap-servers", bootstrap, "--topic", "in", "--group", "full", "--redis-url", redis.url,
             "--window", "1s", "--stop-when-idle", "3s", "--output", output.path], name: "full", in: dir)
        #expect(try await waitUntil(timeout: .seconds(30)) { run.stderr.contains("OOM") }, "\(run.stderr.suffix(3000))")
        try await Task.sleep(for: .seconds(3))
        let lines = { (text: String) in run.stderr.split(separator: "\n").count { $0.contains(text) } }
        #expect(lines("redis is full (maxmemory with noeviction refuses writes), pausing consumption") == 1, "\(run.stderr.suffix(3000))")
        #expect(lines("\\\"Redis is full\\\"") == 1 && lines("redis unavailable") == 0)
        #expect(((try? String(contentsOf: output, encoding: .utf8)) ?? "").isEmpty, "nothing dispatched while full")

        #expect(try RedisClusterProcess.cli(["-p", "\(redis.port)", "CONFIG", "SET", "maxmemory", "0"]).status == 0)
        #expect(try run.wait(timeout: .seconds(60)) == 0, "\(run.stderr.suffix(3000))")
        #expect(lines("redis reachable again") == 1, "\(run.stderr.suffix(3000))")
        let ids = dispatchedIDs(inJSONLines: try String(contentsOf: output, encoding: .utf8))
        #expect(ids.count == unique && Set(ids).count == unique, "dispatched \(ids.count) (\(Set(ids).count) distinct) of \(unique)")
    }

    /// A Redis Cluster older than 6.2 cannot run the compact layout's confirm script (`GETDEL`):
    /// `dedupd run` refuses it at start, naming `dedup.layout` and the fix, rather than waiting
    /// on a script error for good; the keys layout runs on it. Older here means `GETDEL` renamed
    /// away, which Redis answers as an old server does ("unknown command").
    @Test(.timeLimit(.minutes(3)))
    func aClusterWithoutGetdelRefusesTheCompactLayoutAtStart() async throws {
        let dir = try TemporaryDirectory(prefix: "dedupd-old-cluster")
        let cluster = try RedisClusterProcess(extraArguments: ["--rename-command", "GETDEL", "\"\""])
        let (mock, bootstrap, unique) = try Self.mockKafka(holding: 1000, in: dir)
        defer { mock.terminate() }

        func run(_ layout: String) throws -> DedupdProcess {
            let file = dir.file("\(layout).yaml")
            try """
                kafka: {bootstrap_servers: "\(bootstrap)", topics: in, group: \(layout)}
                redis: {mode: cluster, url: "\(cluster.url)"}
                dedup: {layout: \(layout), window: 200ms}
                run: {stop_when_idle: 3s}
                """.write(to: file, atomically: true, encoding: .utf8)
            return try DedupdProcess(["run", "--config", file.path, "--output", dir.file("\(layout).jsonl").path], name: layout, in: dir)
        }
        let compact = try run("compact")
        #expect(try compact.wait(timeout: .seconds(60)) != 0, "\(compact.stderr.suffix(2000))")
        #expect(compact.stderr.contains("dedup.layout") && compact.stderr.contains("GETDEL (Redis older than 6.2)")
                && compact.stderr.contains("dedup.layout: keys"), "\(compact.stderr.suffix(2000))")

        let keys = try run("keys")
        #expect(try keys.wait(timeout: .seconds(90)) == 0, "\(keys.stderr.suffix(2000))")
        let ids = dispatchedIDs(inJSONLines: try String(contentsOf: dir.file("keys.jsonl"), encoding: .utf8))
        #expect(ids.count == unique && Set(ids).count == unique, "dispatched \(ids.count) of \(unique)")
    }

    /// Managed services rename or forbid CONFIG: the worker starts, with a warning that names the requirement.
    @Test(.timeLimit(.minutes(3)))
    func aRedisThatRefusesConfigGetsAWarning() async throws {
        let dir = try TemporaryDirectory(prefix: "dedupd-eviction")
        let redis = try RedisServerProcess(extraArguments: ["--rename-command", "CONFIG", ""])
        let mock = try DedupdProcess(["mock-kafka", "--brokers", "1", "--topic", "in:1"], name: "mock-kafka", in: dir)
        let bootstrap = try mock.firstLine(timeout: .seconds(20))
        let run = try DedupdProcess(
            ["run", "--bootstrap-servers", bootstrap, "--topic", "in", "--group", "managed", "--redis-url", redis.url,
             "--stop-when-idle", "2s", "--output", dir.file("out.jsonl").path], name: "managed", in: dir)
        #expect(try run.wait(timeout: .seconds(90)) == 0, "\(run.stderr.suffix(2000))")
        #expect(run.stderr.contains("redis refused CONFIG GET") && run.stderr.contains("maxmemory-policy noeviction"), "\(run.stderr.suffix(2000))")
        mock.terminate()
    }
}
