import DedupCore
import Foundation
import KafkaIO
import Logging
import RedisIO
import Testing
import TestSupport

let adminQuiet = Logger(label: "admin-tests") { _ in SwiftLogNoOpLogHandler() }

/// `dedupd inspect`, `forget` and `dlq replay` as an operator runs them, against a real
/// redis-server (with a password, given through a password file) and the mock Kafka process.
@Suite(.serialized) struct AdminCommandTests {
    let password = "adm-pw-7731-secret"

    /// A redis-server with a password, a config file pointing at it through `redis.password_file`,
    /// and a store seeded with one pending and one done key in namespace `ns`.
    func fixture() async throws -> (RedisServerProcess, TemporaryDirectory, String, RedisClaimStore) {
        let redis = try RedisServerProcess(password: password)
        let dir = try TemporaryDirectory(prefix: "dedupd-admin")
        let pwFile = dir.file("redis-password").path
        try (password + "\n").write(toFile: pwFile, atomically: true, encoding: .utf8)
        let config = dir.file("dedupd.yaml").path
        try """
            redis:
              url: \(redis.urlWithoutPassword)
              password_file: \(pwFile)
            dedup:
              namespace: ns
            """.write(toFile: config, atomically: true, encoding: .utf8)
        let connection = try await RedisConnection.connect(
            try RedisURL(redis.url), connectTimeout: .seconds(2), commandTimeout: .seconds(5), logger: adminQuiet)
        let store = RedisClaimStore(connection: connection, logger: adminQuiet)
        let pending = DedupKey(raw: "k-pending", namespace: "ns").storeKey
        let done = DedupKey(raw: "k-done", namespace: "ns").storeKey
        #expect(try await store.claim([pending, done], owner: "worker-1", lease: .seconds(60)) == [.claimed, .claimed])
        #expect(try await store.confirm([done], owner: "worker-1", retention: .seconds(3600)) == [.confirmed])
        return (redis, dir, config, store)
    }

    @Test func inspectShowsAbsentPendingWithOwnerAndLeaseAndDoneWithTTL() async throws {
        let (redis, dir, config, _) = try await fixture()
        defer { _ = redis }
        let run = try DedupdProcess(["inspect", "--config", config, "k-absent", "k-pending", "k-done"], name: "inspect", in: dir)
        #expect(try await offPool { try run.wait(timeout: .seconds(30)) } == 0, "stderr: \(run.stderr)")
        let lines = run.stdout.split(separator: "\n").map(String.init)
        #expect(lines.count == 3, "\(run.stdout)")
        #expect(lines.first == "k-absent absent redis.key=dedupd:ns:k-absent")
        let pending = try #require(lines.dropFirst().first?.firstMatch(of: /^k-pending pending owner=worker-1 lease_left=(\d+)s(\d+ms)? redis.key=dedupd:ns:k-pending$/), "\(lines)")
        #expect((50...60).contains(Int(pending.1)!))
        let done = try #require(lines.last?.firstMatch(of: /^k-done done ttl_left=59m(\d+)s(\d+ms)? redis.key=dedupd:ns:k-done$/), "\(lines)")
        #expect(Int(done.1)! >= 30)
        #expect(!(run.stdout + run.stderr).contains(password))
    }

    /// The admin commands take `redis.mode: sentinel` as the worker does: the same config with the
    /// Sentinel's address, its password the primary's (given through `redis.password_file`).
    @Test func inspectReachesTheStoreThroughASentinel() async throws {
        let (redis, dir, config, _) = try await fixture()
        let sentinel = try RedisSentinelProcess(monitoring: redis.port, password: password)
        let text = try String(contentsOfFile: config, encoding: .utf8)
            .replacingOccurrences(of: "url: \(redis.urlWithoutPassword)", with: "url: redis://127.0.0.1:\(sentinel.port)/0\n  mode: sentinel\n  sentinel_master: \(sentinel.master)")
        let sentinelConfig = dir.file("sentinel.yaml").path
        try text.write(toFile: sentinelConfig, atomically: true, encoding: .utf8)
        let run = try DedupdProcess(["inspect", "--config", sentinelConfig, "k-done"], name: "inspect-sentinel", in: dir)
        #expect(try await offPool { try run.wait(timeout: .seconds(30)) } == 0, "stderr: \(run.stderr)")
        #expect(run.stdout.hasPrefix("k-done done ttl_left="), "\(run.stdout)")
        #expect(!(run.stdout + run.stderr).contains(password))
    }

    /// A Sentinel with an ACL user of its own: `redis.sentinel_username` and
    /// `redis.sentinel_password_file` reach it, the primary keeps its password. Without them the
    /// command fails at once, naming the Sentinel and the settings; no password is printed.
    @Test func inspectGivesASentinelItsOwnCredentials() async throws {
        let (redis, dir, config, _) = try await fixture()
        let sentinelPassword = "sentinel-secret-93"
        let sentinel = try RedisSentinelProcess(monitoring: redis.port, password: password, own: .init(user: "watcher", password: sentinelPassword))
        let passwordFile = dir.file("sentinel-password").path
        try "\(sentinelPassword)\n".write(toFile: passwordFile, atomically: true, encoding: .utf8)
        let base = try String(contentsOfFile: config, encoding: .utf8)
            .replacingOccurrences(of: "url: \(redis.urlWithoutPassword)", with: "url: redis://127.0.0.1:\(sentinel.port)/0\n  mode: sentinel\n  sentinel_master: \(sentinel.master)")
        let withOwn = dir.file("sentinel-own.yaml").path
        try base.replacingOccurrences(of: "  mode: sentinel\n", with: "  mode: sentinel\n  sentinel_username: watcher\n  sentinel_password_file: \(passwordFile)\n")
            .write(toFile: withOwn, atomically: true, encoding: .utf8)
        let run = try DedupdProcess(["inspect", "--config", withOwn, "k-done"], name: "inspect-sentinel-own", in: dir)
        #expect(try await offPool { try run.wait(timeout: .seconds(30)) } == 0, "stderr: \(run.stderr)")
        #expect(run.stdout.hasPrefix("k-done done ttl_left="), "\(run.stdout)")

        let withoutOwn = dir.file("sentinel-without.yaml").path
        try base.write(toFile: withoutOwn, atomically: true, encoding: .utf8)
        let refused = try DedupdProcess(["inspect", "--config", withoutOwn, "k-done"], name: "inspect-sentinel-refused", in: dir)
        #expect(try await offPool { try refused.wait(timeout: .seconds(30)) } != 0)
        #expect(refused.stderr.contains("127.0.0.1:\(sentinel.port)") && refused.stderr.contains("set redis.sentinel_password or redis.sentinel_password_file"),
                "stderr: \(refused.stderr)")
        let printed = run.stdout + run.stderr + refused.stdout + refused.stderr
        #expect(!printed.contains(password) && !printed.contains(sentinelPassword))
    }

    @Test func forgetRemovesDoneKeysKeepsPendingUnlessForcedAndAResendIsAcceptedAgain() async throws {
        let (redis, dir, config, store) = try await fixture()
        defer { _ = redis }
        let forget = try DedupdProcess(["forget", "--config", config, "k-done", "k-pending", "k-absent"], name: "forget", in: dir)
        #expect(try await offPool { try forget.wait(timeout: .seconds(30)) } == 1, "exit 1: a pending key was kept; stderr: \(forget.stderr)")
        let lines = forget.stdout.split(separator: "\n").map(String.init)
        #expect(lines.count == 3, "\(forget.stdout)")
        #expect(lines[0].hasPrefix("k-done removed (was done ttl_left=59m"))
        #expect(lines[1].hasPrefix("k-pending kept: pending owner=worker-1 lease_left="))
        #expect(lines[1].contains("--force removes it"))
        #expect(lines[2] == "k-absent absent, nothing removed redis.key=dedupd:ns:k-absent")

        let pending = DedupKey(raw: "k-pending", namespace: "ns").storeKey
        let done = DedupKey(raw: "k-done", namespace: "ns").storeKey
        let states = try await store.inspect([done, pending])
        #expect(states[0] == .absent)
        guard case .pending(owner: "worker-1", _) = states[1] else {
            Issue.record("k-pending must still be pending: \(states[1])")
            return
        }
        // A resend of the forgotten key is claimed as new.
        #expect(try await store.claim([done], owner: "worker-2", lease: .seconds(10)) == [.claimed])

        let forced = try DedupdProcess(["forget", "--config", config, "--force", "k-pending"], name: "forget-force", in: dir)
        #expect(try await offPool { try forced.wait(timeout: .seconds(30)) } == 0, "stderr: \(forced.stderr)")
        #expect(forced.stdout.hasPrefix("k-pending removed (was pending owner=worker-1 lease_left="))
        #expect(try await store.inspect([pending]) == [.absent])
        #expect(!(forget.stdout + forget.stderr + forced.stdout + forced.stderr).contains(password))
    }

    @Test(.timeLimit(.minutes(3)))
    func dlqReplayResendsSelectedRecordsWithoutDeadLetterHeadersOnce() async throws {
        let dir = try TemporaryDirectory(prefix: "dedupd-admin")
        let mock = try DedupdProcess(
            ["mock-kafka", "--brokers", "1", "--topic", "in:2", "--topic", "in.dlq:1", "--topic", "other:1"], name: "mock-kafka", in: dir)
        defer { mock.terminate() }
        let bootstrap = try await offPool { try mock.firstLine(timeout: .seconds(20)) }
        let producer = try KafkaProducer.make(bootstrapServers: bootstrap, logger: adminQuiet)
        func deadLetter(_ id: String, reason: String) throws {
            let headers: [MessageHeader] = [
                .init(name: "message-id", value: Array(id.utf8)),
                .init(name: "content-type", value: Array("application/json".utf8)),
                .init(name: DeadLetterHeader.reason, value: Array(reason.utf8)),
                .init(name: DeadLetterHeader.error, value: Array("boom".utf8)),
                .init(name: DeadLetterHeader.originalTopic, value: Array("in".utf8)),
                .init(name: DeadLetterHeader.originalPartition, value: Array("1".utf8)),
                .init(name: DeadLetterHeader.originalOffset, value: Array("42".utf8)),
                .init(name: DeadLetterHeader.dedupKey, value: Array(id.utf8)),
                .init(name: DeadLetterHeader.attempts, value: Array("5".utf8)),
            ]
            try producer.send(topic: "in.dlq", key: Array("key-\(id)".utf8), value: Array(#"{"orderNo":"\#(id)"}"#.utf8), headers: headers)
        }
        for id in ["a", "b", "c"] { try deadLetter(id, reason: "handler_failed") }
        for id in ["x", "y"] { try deadLetter(id, reason: "missing_header") }
        try await producer.flush(timeout: .seconds(10))

        func replay(_ extra: [String], name: String) async throws -> String {
            let p = try DedupdProcess(["dlq", "replay", "--bootstrap-servers", bootstrap, "--from", "in.dlq"] + extra, name: name, in: dir)
            #expect(try await offPool { try p.wait(timeout: .seconds(90)) } == 0, "\(name) stderr: \(p.stderr.suffix(2000))")
            return p.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        }
        #expect(try await replay(["--reason", "handler_failed"], name: "replay-1")
            == "read=5 replayed=3 skipped.reason=2 skipped.no_target=0 failed=0 to=in:3")
        #expect(try await replay(["--reason", "handler_failed"], name: "replay-2")
            == "read=0 replayed=0 skipped.reason=0 skipped.no_target=0 failed=0 to=-", "a second run resends nothing")
        #expect(try await replay(["--to", "other", "--limit", "1"], name: "replay-3")
            == "read=1 replayed=1 skipped.reason=0 skipped.no_target=0 failed=0 to=other:1")

        let resent = try await consumeAll(bootstrap: bootstrap, topic: "in", count: 3)
        #expect(Set(resent.map { String(decoding: $0.key ?? [], as: UTF8.self) }) == ["key-a", "key-b", "key-c"])
        for m in resent {
            #expect(m.headers.map(\.name) == ["message-id", "content-type"], "dead-letter headers stripped, the rest kept in order")
            let id = String(decoding: m.header("message-id")!.value!, as: UTF8.self)
            #expect(m.value == Array(#"{"orderNo":"\#(id)"}"#.utf8))
        }
        let other = try await consumeAll(bootstrap: bootstrap, topic: "other", count: 1)
        #expect(other.count == 1 && other[0].headers.count == 2)
    }

    /// A configured password appears in no output of check-config (valid or not) and no log line of
    /// a worker that cannot reach its Redis.
    @Test(.timeLimit(.minutes(2)))
    func checkConfigAndTheWorkerLogNeverShowAPassword() async throws {
        let dir = try TemporaryDirectory(prefix: "dedupd-redaction")
        let file = dir.file("dedupd.yaml").path
        try """
            kafka:
              properties:
                sasl.password: sasl-pw-992
                ssl.key.password: key-pw-993
            """.write(toFile: file, atomically: true, encoding: .utf8)
        let secrets = ["url-pw-991", "sasl-pw-992", "key-pw-993", "env-pw-994"]
        let base = ["--config", file, "--bootstrap-servers", "127.0.0.1:1", "--topic", "t"]
        let valid = try await DeployTests.dedupd(["check-config"] + base + ["--redis-url", "redis://app:url-pw-991@127.0.0.1:1/0"])
        #expect(valid.0 == 0, "\(valid.2)")
        #expect(valid.1.contains("redis.url = redis://app:***@127.0.0.1:1/0  # flag"))
        let invalid = try await DeployTests.dedupd(["check-config"] + base + ["--window", "forever"], environment: ["DEDUPD_REDIS_PASSWORD": "env-pw-994"])
        #expect(invalid.0 == 2 && invalid.2.contains("dedup.window"))
        let both = try await DeployTests.dedupd(
            ["check-config"] + base + ["--redis-url", "redis://:url-pw-991@127.0.0.1:1/0"], environment: ["DEDUPD_REDIS_PASSWORD": "env-pw-994"])
        #expect(both.0 == 2 && both.2.contains("give the password once"), "\(both.2)")

        let port = try freePort()  // nothing listens: the worker logs that Redis is unreachable, and waits
        let httpPort = try freePort()
        let run = try DedupdProcess(
            ["run"] + base + ["--redis-url", "redis://app:url-pw-991@127.0.0.1:\(port)/0", "--log-level", "debug", "--http-port", "\(httpPort)"],
            name: "run", in: dir)
        let deadline = ContinuousClock.now + .seconds(30)
        while !(run.stderr.contains("redis unreachable") && run.stderr.contains("http endpoint listening")) && ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(50))
        }
        // The image's HEALTHCHECK: alive while it waits for Redis, but not ready.
        let live = try await DeployTests.dedupd(["healthcheck", "--port", "\(httpPort)"])
        #expect(live.0 == 0 && live.1.hasPrefix("HTTP/1.1 200"), "\(live)")
        let ready = try await DeployTests.dedupd(["healthcheck"], environment: ["DEDUPD_HTTP_PORT": "\(httpPort)"])
        #expect(ready.0 == 0, "DEDUPD_HTTP_PORT is the default port: \(ready)")
        let withConfig = dir.file("http.yaml").path
        try "http:\n  port: \(httpPort)\n".write(toFile: withConfig, atomically: true, encoding: .utf8)
        let fromConfig = try await DeployTests.dedupd(["healthcheck", "--config", withConfig])
        #expect(fromConfig.0 == 0, "http.port of the config file the worker reads (the image's HEALTHCHECK): \(fromConfig)")
        let notReady = try await DeployTests.dedupd(["healthcheck", "--port", "\(httpPort)", "--path", "/readyz"])
        #expect(notReady.0 == 1 && notReady.1.contains("503") && notReady.1.contains("redis unreachable"), "\(notReady)")
        let nobody = try await DeployTests.dedupd(["healthcheck", "--port", "\(try freePort())"])
        #expect(nobody.0 == 1)
        run.terminate()
        _ = try await offPool { try run.wait(timeout: .seconds(30)) }
        #expect(run.stderr.contains("redis unreachable") && run.stderr.contains("redis://app:***@127.0.0.1:\(port)/0"), "\(run.stderr)")
        for output in [valid.1, valid.2, invalid.1, invalid.2, both.1, both.2, run.stdout, run.stderr] {
            for secret in secrets { #expect(!output.contains(secret), "\(secret) shown in: \(output)") }
        }
    }
}
