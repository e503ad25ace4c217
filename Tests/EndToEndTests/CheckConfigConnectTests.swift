import Foundation
import LocalServers
import Testing
import TestSupport

/// `dedupd check-config --connect` as an operator runs it before a deploy: the real binary against
/// a password-protected redis-server and the mock cluster in its own process. What it finds is
/// what the worker would meet at start: each problem names the server and the setting, and no
/// password is printed.
@Suite(.serialized) struct CheckConfigConnectTests {
    let password = "check-pw-71"

    func checkConnect(_ environment: [String: String], extra: [String] = []) async throws -> (status: Int32, stdout: String, stderr: String) {
        try await DeployTests.dedupd(["check-config", "--connect"] + extra, environment: environment)
    }

    @Test func findsWhatTheWorkerWouldMeet() async throws {
        let dir = try TemporaryDirectory(prefix: "dedupd-check-connect")
        let mock = try DedupdProcess(["mock-kafka", "--brokers", "1", "--topic", "orders:3", "--topic", "orders.dlq:1"], name: "mock-kafka", in: dir, stdin: true)
        let bootstrap = try mock.firstLine(timeout: .seconds(10))
        let redis = try RedisServerProcess(password: password)
        let passwordFile = dir.file("redis-password").path
        try "\(password)\n".write(toFile: passwordFile, atomically: true, encoding: .utf8)
        let env = [
            "DEDUPD_KAFKA_BOOTSTRAP_SERVERS": bootstrap, "DEDUPD_KAFKA_TOPICS": "orders",
            "DEDUPD_DEAD_LETTER_TOPIC": "orders.dlq",
            "DEDUPD_REDIS_URL": redis.urlWithoutPassword, "DEDUPD_REDIS_PASSWORD_FILE": passwordFile,
        ]

        let good = try await checkConnect(env)
        #expect(good.status == 0, "stdout: \(good.stdout) stderr: \(good.stderr)")
        let lines = good.stdout.split(separator: "\n").map(String.init)
        #expect(lines.contains("ok: redis 127.0.0.1:\(redis.port): answered; maxmemory-policy noeviction, persistence on"), "\(lines.suffix(6))")
        #expect(lines.contains("ok: kafka (kafka.bootstrap_servers = \(bootstrap)): topic orders (kafka.topics): 3 partitions"), "\(lines.suffix(6))")
        #expect(lines.contains("ok: kafka (kafka.bootstrap_servers = \(bootstrap)): topic orders.dlq (dead_letter.topic): 1 partition"), "\(lines.suffix(6))")
        #expect(lines.last == "usable")

        // A topic the cluster does not have, a dead-letter topic the user may not describe, a
        // Redis that evicts keys, and a wrong password: each one a problem naming its setting.
        try mock.send("topic-error orders UNKNOWN_TOPIC_OR_PART")
        try mock.send("topic-error orders.dlq TOPIC_AUTHORIZATION_FAILED")
        let evicting = try RedisClusterProcess.cli(["-p", "\(redis.port)", "-a", password, "--no-auth-warning", "CONFIG", "SET", "maxmemory-policy", "allkeys-lru"])
        #expect(evicting.output.hasPrefix("OK"))
        let bad = try await checkConnect(env)
        #expect(bad.status == 1, "stdout: \(bad.stdout) stderr: \(bad.stderr)")
        #expect(bad.stdout.contains("problem: kafka (kafka.bootstrap_servers = \(bootstrap)): topic orders (kafka.topics): UNKNOWN_TOPIC_OR_PART"), "\(bad.stdout)")
        #expect(bad.stdout.contains("problem: kafka (kafka.bootstrap_servers = \(bootstrap)): topic orders.dlq (dead_letter.topic): TOPIC_AUTHORIZATION_FAILED"), "\(bad.stdout)")
        #expect(bad.stdout.contains("problem: config key redis.allow_eviction = \"false\""), "\(bad.stdout)")
        #expect(bad.stdout.hasSuffix("not usable: 3 problems\n"), "\(bad.stdout)")

        try "wrong-\(password)\n".write(toFile: passwordFile, atomically: true, encoding: .utf8)
        let unreachable = try await checkConnect(env.merging(["DEDUPD_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"]) { $1 }, extra: ["--timeout", "2s"])
        #expect(unreachable.status == 1)
        #expect(unreachable.stdout.contains("problem: redis (redis.url = \(redis.urlWithoutPassword)): AUTH as the default user at 127.0.0.1:\(redis.port) was refused: WRONGPASS"),
                "\(unreachable.stdout)")
        #expect(unreachable.stdout.contains("problem: kafka (kafka.bootstrap_servers = 127.0.0.1:1): no broker answered within 2s: 127.0.0.1:1/bootstrap: Connect to ipv4#127.0.0.1:1 failed: Connection refused"),
                "\(unreachable.stdout)")
        for run in [good, bad, unreachable] { #expect(!(run.stdout + run.stderr).contains(password)) }
        mock.terminate()
    }
}
