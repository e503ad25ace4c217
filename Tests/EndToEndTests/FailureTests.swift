import Foundation
import DedupCore
import KafkaIO
import RedisIO
import Testing
import TestSupport

/// Shutdown and store outages, seen from outside the binary as an operator sees them.
@Suite(.serialized) struct FailureTests {
    final class Setup {
        let dir: TemporaryDirectory
        let redis: RedisServerProcess
        let mock: DedupdProcess
        let bootstrap: String

        init(topic: String, brokers: Int = 1) throws {
            dir = try TemporaryDirectory(prefix: "dedupd-failure")
            redis = try RedisServerProcess()
            mock = try DedupdProcess(
                ["mock-kafka", "--brokers", "\(brokers)", "--topic", "\(topic):3"], name: "mock-kafka", in: dir, stdin: true)
            bootstrap = try mock.firstLine(timeout: .seconds(20))
        }

        func produce(_ count: Int, prefix: String, seed: Int) throws -> Int {
            let p = try DedupdProcess(
                ["produce", "--bootstrap-servers", bootstrap, "--topic", "t", "--count", "\(count)", "--duplicate-ratio", "0.3",
                 "--id-prefix", prefix, "--seed", "\(seed)"], name: "produce-\(prefix)", in: dir)
            guard try p.wait(timeout: .seconds(60)) == 0, let m = p.stdout.firstMatch(of: /unique=(\d+)/) else {
                throw TestSupportError("produce failed: \(p.stderr)")
            }
            return Int(m.1)!
        }

        func worker(_ extra: [String], redisURL: String? = nil) throws -> DedupdProcess {
            try DedupdProcess(
                ["run", "--bootstrap-servers", bootstrap, "--topic", "t", "--group", "g", "--redis-url", redisURL ?? redis.url,
                 "--output", dir.file("out.jsonl").path] + extra, name: "worker", in: dir)
        }

        var dispatched: [String] {
            dispatchedIDs(inJSONLines: (try? String(contentsOf: dir.file("out.jsonl"), encoding: .utf8)) ?? "")
        }

        func pendingClaims() async throws -> Int {
            let c = try await RedisConnection.connect(try RedisURL(redis.url), logger: .init(label: "test"))
            defer { Task { await c.close() } }
            let reply = try await c.command(
                "EVAL",
                "local n = 0 for _, k in ipairs(redis.call('KEYS', 'dedupd:*')) do if string.sub(redis.call('GET', k) or '', 1, 2) == 'p:' then n = n + 1 end end return n",
                "0")
            return Int(reply.int ?? -1)
        }
    }

    func waitUntil(timeout: Duration, _ what: String, _ condition: () async throws -> Bool) async throws {
        let deadline = ContinuousClock.now + timeout
        while try await !condition() {
            guard ContinuousClock.now < deadline else { throw TestSupportError("timed out waiting for \(what)") }
            try await Task.sleep(for: .milliseconds(100))
        }
    }

    /// A subscribed topic the cluster does not have is an error in the log naming it and
    /// `kafka.topics` (it used to pass in silence); the worker consumes the other topic meanwhile.
    @Test(.timeLimit(.minutes(2)))
    func aMissingTopicIsNamedAndTheOthersAreConsumed() async throws {
        let s = try Setup(topic: "t")
        try s.mock.send("topic-error gone UNKNOWN_TOPIC_OR_PART")
        let unique = try s.produce(300, prefix: "mt", seed: 5)
        let w = try s.worker(["--topic", "gone", "--window", "200ms", "--stop-when-idle", "3s"])
        #expect(try w.wait(timeout: .seconds(60)) == 0, "stderr: \(w.stderr.suffix(2000))")
        let line = w.stderr.split(separator: "\n").first { $0.contains(#"msg="kafka consumer error""#) }.map(String.init) ?? ""
        #expect(line.contains("level=error") && line.contains("kafka.error=UNKNOWN_TOPIC_OR_PART")
                && line.contains("Subscribed topic not available: gone") && line.contains("check kafka.topics"), "stderr: \(w.stderr.suffix(2000))")
        #expect(Set(s.dispatched) == Set((0..<unique).map { "mt-\($0)" }) && s.dispatched.count == unique)
        s.mock.terminate()
    }

    @Test(.timeLimit(.minutes(2)))
    func sigtermReleasesWhatWaitsInTheWindowCommitsAndExitsZero() async throws {
        let s = try Setup(topic: "t")
        let unique = try s.produce(300, prefix: "a", seed: 1)
        // A long window: at SIGTERM every message is still waiting, claimed.
        let w = try s.worker(["--window", "60s"])
        try await waitUntil(timeout: .seconds(40), "claims") { try await s.pendingClaims() == unique }

        w.terminate()
        #expect(try w.wait(timeout: .seconds(15)) == 0, "stderr: \(w.stderr.suffix(2000))")
        #expect(w.stderr.contains("shutdown complete, offsets committed"))
        #expect(w.stderr.contains("released=\(unique)"), "summary: \(w.stderr.suffix(1500))")
        #expect(try await s.pendingClaims() == 0, "every claim was given back")
        #expect(s.dispatched.isEmpty, "nothing was dispatched early")

        // The next worker dispatches all of them: nothing was committed past them.
        let next = try s.worker(["--window", "200ms", "--stop-when-idle", "2s"])
        #expect(try next.wait(timeout: .seconds(60)) == 0)
        #expect(Set(s.dispatched) == Set((0..<unique).map { "a-\($0)" }))
        #expect(s.dispatched.count == unique)
        s.mock.terminate()
    }

    @Test(.timeLimit(.minutes(2)))
    func redisOutageIsFailClosedLoggedOnceAndRecovers() async throws {
        let s = try Setup(topic: "t")
        let w = try s.worker(["--window", "200ms", "--stats-interval", "0"])
        let first = try s.produce(500, prefix: "a", seed: 1)
        try await waitUntil(timeout: .seconds(40), "first wave") { s.dispatched.count == first }

        s.redis.stop()
        let second = try s.produce(500, prefix: "b", seed: 2)
        try await Task.sleep(for: .seconds(3))
        #expect(s.dispatched.count == first, "nothing unclaimed is dispatched while Redis is down")
        #expect(w.process.isRunning)

        try s.redis.restart()
        try await waitUntil(timeout: .seconds(40), "second wave") { s.dispatched.count == first + second }
        w.terminate()
        #expect(try w.wait(timeout: .seconds(15)) == 0)

        let err = w.stderr
        #expect(err.components(separatedBy: "redis unavailable, pausing consumption").count - 1 == 1, "logged once:\n\(err.suffix(3000))")
        #expect(err.components(separatedBy: "redis reachable again").count - 1 == 1)
        #expect(Set(s.dispatched).count == first + second, "each unique id once")
        s.mock.terminate()
    }

    /// A managed Redis's failover behind one endpoint: the replica is promoted, the old primary
    /// becomes its replica and keeps the worker's connection, and the endpoint now leads to the
    /// new primary. The old connection answers every write `READONLY`; the worker connects again
    /// through the endpoint and goes on with the new primary, which has the done records (a
    /// repeat of the whole first wave is found done). Had it kept the old connection, it would
    /// have dispatched nothing more, for good.
    @Test(.timeLimit(.minutes(2)))
    func aFailoverBehindAnEndpointIsFollowed() async throws {
        let s = try Setup(topic: "t")
        let replica = try RedisServerProcess(extraArguments: ["--replicaof", "127.0.0.1", "\(s.redis.port)"])
        let endpoint = try TCPForwarder(to: s.redis.port)
        let w = try s.worker(
            ["--window", "200ms", "--stats-interval", "0", "--stop-when-idle", "8s"], redisURL: "redis://127.0.0.1:\(endpoint.port)/0")
        let first = try s.produce(500, prefix: "a", seed: 1)
        try await waitUntil(timeout: .seconds(40), "first wave") { s.dispatched.count == first }
        let synced = try RedisClusterProcess.cli(["-p", "\(s.redis.port)", "WAIT", "1", "5000"])
        #expect(synced.output.hasPrefix("1"), "the replica has the done records: \(synced.output)")

        #expect(try RedisClusterProcess.cli(["-p", "\(replica.port)", "REPLICAOF", "NO", "ONE"]).status == 0)
        #expect(try RedisClusterProcess.cli(["-p", "\(s.redis.port)", "REPLICAOF", "127.0.0.1", "\(replica.port)"]).status == 0)
        endpoint.retarget(replica.port)
        let second = try s.produce(500, prefix: "b", seed: 2)
        _ = try s.produce(500, prefix: "a", seed: 1)
        #expect(try w.wait(timeout: .seconds(60)) == 0, "\(w.stderr.suffix(3000))")
        #expect(w.stderr.contains("redis answered READONLY (the node is now a replica), connecting again"), "\(w.stderr.suffix(3000))")
        #expect(w.stderr.contains("redis reachable again"))
        #expect(s.dispatched.count == first + second && Set(s.dispatched).count == first + second, "\(s.dispatched.count) dispatched")
        s.mock.terminate()
    }

    /// `redis.mode: sentinel`: the worker asks the Sentinel where the primary is, and after a
    /// failover (the done records replicated first) it follows to the new primary: the second
    /// wave is dispatched once, and the first wave sent again is recognised there.
    @Test(.timeLimit(.minutes(3)))
    func aSentinelFailoverIsFollowed() async throws {
        let s = try Setup(topic: "t")
        let replica = try RedisServerProcess(extraArguments: ["--replicaof", "127.0.0.1", "\(s.redis.port)"])
        try await waitUntil(timeout: .seconds(20), "the replica is in sync") {
            (try? RedisClusterProcess.cli(["-p", "\(replica.port)", "INFO", "replication"]).output.contains("master_link_status:up")) == true
        }
        let sentinel = try RedisSentinelProcess(monitoring: s.redis.port)
        try await waitUntil(timeout: .seconds(20), "the Sentinel found the replica") {
            (try? RedisClusterProcess.cli(["-p", "\(sentinel.port)", "SENTINEL", "REPLICAS", sentinel.master]).output.contains("\(replica.port)")) == true
        }
        let config = s.dir.file("sentinel.yaml")
        try "redis:\n  mode: sentinel\n  sentinel_master: \(sentinel.master)\n".write(to: config, atomically: true, encoding: .utf8)
        let w = try s.worker(
            ["--window", "200ms", "--stats-interval", "0", "--stop-when-idle", "20s", "--config", config.path],
            redisURL: "redis://127.0.0.1:\(sentinel.port)/0")
        let first = try s.produce(500, prefix: "a", seed: 1)
        try await waitUntil(timeout: .seconds(40), "first wave") { s.dispatched.count == first }
        let synced = try RedisClusterProcess.cli(["-p", "\(s.redis.port)", "WAIT", "1", "5000"])
        #expect(synced.output.hasPrefix("1"), "the replica has the done records: \(synced.output)")

        #expect(try RedisClusterProcess.cli(["-p", "\(sentinel.port)", "SENTINEL", "FAILOVER", sentinel.master]).output.hasPrefix("OK"))
        // Traffic resumes once the old primary is demoted: writes it took between the promotion
        // and its demotion would be lost with it, as in any failover (docs/operations.md).
        try await waitUntil(timeout: .seconds(30), "the Sentinel names the new primary and the old one is demoted") {
            sentinel.primaryPort() == replica.port
                && (try? RedisClusterProcess.cli(["-p", "\(s.redis.port)", "ROLE"]).output.hasPrefix("slave")) == true
        }
        let second = try s.produce(500, prefix: "b", seed: 2)
        _ = try s.produce(500, prefix: "a", seed: 1)
        #expect(try w.wait(timeout: .seconds(90)) == 0, "\(w.stderr.suffix(3000))")
        #expect(w.stderr.split(separator: "\n").contains { $0.contains("redis primary located by sentinel") && $0.contains("redis.primary=127.0.0.1:\(replica.port)") },
                "\(w.stderr.suffix(3000))")
        #expect(s.dispatched.count == first + second && Set(s.dispatched).count == first + second, "\(s.dispatched.count) dispatched")
        s.mock.terminate()
    }

    /// A worker paused by backpressure when a rebalance takes its partitions and gives some back must fetch
    /// them again: librdkafka keeps a revoked partition's pause, so a worker that resumed in between (its
    /// buffer emptied by the revocation) would otherwise never read them again. Cooperative: the
    /// partitions it keeps stay paused until its buffer drains, and those that move are fetched by
    /// the second worker. A second wave is produced once the second worker holds partitions, so both
    /// workers have new messages on what they hold after the rebalance, however fast the first one is.
    @Test(.timeLimit(.minutes(2)), arguments: ["eager", "cooperative"])
    func aRebalanceWhileBackpressuredLeavesNoPartitionPaused(mode: String) async throws {
        let s = try Setup(topic: "t")
        let config = s.dir.file("small-buffer.yaml")
        try "buffer:\n  max_messages: 200\nkafka:\n  rebalance: \(mode)\n".write(to: config, atomically: true, encoding: .utf8)
        let firstWave = try s.produce(1500, prefix: "a", seed: 1)
        // A 2 s window behind a 200-message buffer: the first worker is paused nearly all the time.
        let first = try s.worker(["--window", "2s", "--config", config.path, "--stats-interval", "0"])
        try await waitUntil(timeout: .seconds(40), "backpressure") { first.stderr.contains("buffer full, pausing consumption") }
        let second = try DedupdProcess(
            ["run", "--bootstrap-servers", s.bootstrap, "--topic", "t", "--group", "g", "--redis-url", s.redis.url,
             "--output", s.dir.file("out-second.jsonl").path, "--window", "2s", "--config", config.path,
             "--stats-interval", "0"], name: "second", in: s.dir)
        let theirs: () -> [String] = {
            dispatchedIDs(inJSONLines: (try? String(contentsOf: s.dir.file("out-second.jsonl"), encoding: .utf8)) ?? "")
        }
        // Cooperative rebalancing takes two rounds; the first may hand the newcomer nothing.
        try await waitUntil(timeout: .seconds(40), "the second worker holds partitions") {
            second.stderr.split(separator: "\n").contains { $0.contains("partitions assigned") && $0.contains(/kafka\.partitions=\S/) }
        }
        let secondWave = try s.produce(1500, prefix: "b", seed: 2)
        let unique = firstWave + secondWave
        try await waitUntil(timeout: .seconds(60), "every id dispatched (\(unique))") { s.dispatched.count + theirs().count >= unique }
        first.terminate()
        second.terminate()
        #expect(try first.wait(timeout: .seconds(15)) == 0)
        #expect(try second.wait(timeout: .seconds(15)) == 0)
        #expect(first.stderr.components(separatedBy: "partitions revoked").count - 1 >= 1, "a rebalance happened")
        #expect(!theirs().isEmpty, "the second worker took partitions")
        let all = s.dispatched + theirs()
        #expect(Set(all) == Set((0..<firstWave).map { "a-\($0)" } + (0..<secondWave).map { "b-\($0)" }))
        #expect(all.count == unique, "each id once")
        s.mock.terminate()
    }

    /// A handler slower than max.poll.interval.ms must not push the worker out of its group:
    /// the dispatch round runs beside the loop, which keeps polling.
    @Test(.timeLimit(.minutes(2)))
    func slowHandlersDoNotPushTheWorkerOutOfItsGroup() async throws {
        let s = try Setup(topic: "t")
        let unique = try s.produce(3, prefix: "slow", seed: 3)
        let config = s.dir.file("slow.yaml")
        try """
            kafka:
              properties:
                max.poll.interval.ms: "6000"
            handler:
              type: exec
              command: "sleep 8; echo $DEDUPD_KEY >> \(s.dir.file("exec.out").path)"
              timeout: 20s
              concurrency: 4
            """.write(to: config, atomically: true, encoding: .utf8)
        let w = try s.worker(["--config", config.path, "--window", "200ms", "--stop-when-idle", "2s"])
        #expect(try w.wait(timeout: .seconds(60)) == 0, "stderr: \(w.stderr.suffix(3000))")
        let keys = ((try? String(contentsOf: s.dir.file("exec.out"), encoding: .utf8)) ?? "").split(separator: "\n")
        #expect(keys.count == unique, "each message handled once: \(keys)")
        #expect(!w.stderr.contains("MAX_POLL_EXCEEDED") && !w.stderr.contains("maximum poll interval"),
                "left the group: \(w.stderr.suffix(3000))")
        #expect(w.stderr.components(separatedBy: "partitions assigned").count - 1 == 1, "no second join")
        s.mock.terminate()
    }

    /// The final commit and leaving the group wait for the group coordinator, which librdkafka does
    /// not bound. A worker whose coordinator stops answering still exits by its shutdown deadline,
    /// having confirmed everything it dispatched: the next reader finds it all done.
    @Test(.timeLimit(.minutes(2)))
    func aCoordinatorThatStopsAnsweringDoesNotHoldTheShutdown() async throws {
        let s = try Setup(topic: "t", brokers: 2)
        try s.mock.send("coordinator g 2")
        let unique = try s.produce(200, prefix: "co", seed: 5)
        let config = s.dir.file("co.yaml")
        try """
            run:
              shutdown_deadline: 4s
            """.write(to: config, atomically: true, encoding: .utf8)
        let w = try s.worker(["--config", config.path, "--window", "100ms"])
        try await waitUntil(timeout: .seconds(40), "every message dispatched") { Set(s.dispatched).count == unique }
        try s.mock.send("rtt 2 120000")
        try await Task.sleep(for: .milliseconds(200))
        let sent = ContinuousClock.now
        w.terminate()
        #expect(try w.wait(timeout: .seconds(30)) == 0, "stderr: \(w.stderr.suffix(2000))")
        let took = ContinuousClock.now - sent
        #expect(took < .seconds(8), "exit took \(took)")
        #expect(w.stderr.contains("leaving the group did not finish in time"), "stderr: \(w.stderr.suffix(2000))")

        // Whatever the commit left uncommitted is read again and found done.
        try s.mock.send("rtt 2 0")
        let next = try s.worker(["--window", "100ms", "--stop-when-idle", "2s"])
        #expect(try next.wait(timeout: .seconds(60)) == 0, "stderr: \(next.stderr.suffix(2000))")
        #expect(s.dispatched.count == unique, "no message dispatched twice")
        #expect(Set(s.dispatched) == Set((0..<unique).map { "co-\($0)" }))
        s.mock.terminate()
    }

    @Test(.timeLimit(.minutes(1)))
    func aSecondSignalExitsAtOnce() async throws {
        let s = try Setup(topic: "t")
        _ = try s.produce(1, prefix: "sig", seed: 4)
        let config = s.dir.file("sig.yaml")
        try """
            handler:
              type: exec
              command: "sleep 60"
              timeout: 90s
            run:
              shutdown_deadline: 60s
            """.write(to: config, atomically: true, encoding: .utf8)
        let w = try s.worker(["--config", config.path, "--window", "100ms"])
        try await waitUntil(timeout: .seconds(40), "a round in flight") { try await s.pendingClaims() == 1 }
        try await Task.sleep(for: .milliseconds(500))
        w.terminate()
        try await Task.sleep(for: .milliseconds(500))
        #expect(w.process.isRunning, "the first signal waits for the handler")
        let sent = ContinuousClock.now
        w.terminate()
        let status = try w.wait(timeout: .seconds(5))
        #expect(ContinuousClock.now - sent < .seconds(3))
        #expect(status == 128 + SIGTERM)
        #expect(w.stderr.contains("second signal, exiting now"))
        s.mock.terminate()
    }
}

/// Token mode as a user runs it: `dedupd token issue`, then submissions carrying the tokens.
@Suite(.serialized) struct TokenModeTests {
    @Test(.timeLimit(.minutes(2)))
    func onlyIssuedUnusedTokensAreDispatchedAndEachRefusalHasItsReason() async throws {
        let dir = try TemporaryDirectory(prefix: "dedupd-token")
        let redis = try RedisServerProcess()
        let mock = try DedupdProcess(["mock-kafka", "--brokers", "1", "--topic", "forms:2"], name: "mock-kafka", in: dir)
        let bootstrap = try mock.firstLine(timeout: .seconds(20))

        func issue(ttl: String) throws -> String {
            let p = try DedupdProcess(
                ["token", "issue", "--redis-url", redis.url, "--namespace", "forms", "--ttl", ttl], name: "issue-\(ttl)", in: dir)
            #expect(try p.wait(timeout: .seconds(20)) == 0, "token issue: \(p.stderr)")
            return p.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        }
        let good = try issue(ttl: "10m")
        let stale = try issue(ttl: "100ms")
        #expect(good.count == 32 && stale.count == 32)
        try await Task.sleep(for: .milliseconds(300))

        let producer = try KafkaProducer.make(bootstrapServers: bootstrap, logger: .init(label: "test"))
        func submit(_ id: String, token: String?) throws {
            var headers = [MessageHeader(name: "message-id", value: Array(id.utf8))]
            if let token { headers.append(MessageHeader(name: "form-token", value: Array(token.utf8))) }
            try producer.send(topic: "forms", key: Array("u1".utf8), value: Array("{\"form\":\"\(id)\"}".utf8), headers: headers)
        }
        try submit("first", token: good)
        try submit("no-token", token: nil)
        try submit("stale", token: stale)
        try submit("made-up", token: "0123456789abcdef0123456789abcdef")
        try await producer.flush(timeout: .seconds(10))

        let config = dir.file("forms.yaml")
        try """
            kafka: {bootstrap_servers: "\(bootstrap)", topics: [forms], group: forms}
            redis: {url: "\(redis.url)"}
            dedup: {key: "header:form-token", token: "header:form-token", namespace: forms, window: 200ms}
            """.write(to: config, atomically: true, encoding: .utf8)
        let out = dir.file("out.jsonl").path
        let first = try DedupdProcess(["run", "--config", config.path, "--output", out, "--stop-when-idle", "2s"], name: "run-1", in: dir)
        #expect(try first.wait(timeout: .seconds(60)) == 0, "stderr: \(first.stderr.suffix(2000))")

        // The same token again, long after the window: a reuse, refused by the token, not a window repeat.
        try submit("again", token: good)
        try await producer.flush(timeout: .seconds(10))
        let second = try DedupdProcess(["run", "--config", config.path, "--output", out, "--stop-when-idle", "2s"], name: "run-2", in: dir)
        #expect(try second.wait(timeout: .seconds(60)) == 0, "stderr: \(second.stderr.suffix(2000))")

        let dispatched = dispatchedIDs(inJSONLines: (try? String(contentsOf: URL(fileURLWithPath: out), encoding: .utf8)) ?? "")
        #expect(dispatched == ["first"])
        let log = first.stderr + second.stderr
        for reason in ["missing_header", "token_expired", "token_unknown", "token_reused"] {
            #expect(log.contains("dedup.reason=\(reason)"), "no \(reason) in:\n\(log.suffix(3000))")
        }
        mock.terminate()
    }
}
