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
