import Foundation
import LocalServers
import Logging
import RedisIO
import Testing
import TestSupport

/// `redis.mode: sentinel` against real processes: a primary, its replica and a Sentinel watching
/// them (quorum 1), all redis-server 7.0.
@Suite("Redis Sentinel", .serialized)
struct RedisSentinelTests {
    /// Waits until `condition` holds (every 100 ms), at most `limit`.
    func eventually(_ limit: Duration, _ condition: () -> Bool) -> Bool {
        let deadline = ContinuousClock.now + limit
        while ContinuousClock.now < deadline {
            if condition() { return true }
            usleep(100_000)
        }
        return condition()
    }

    func role(_ port: Int) -> String {
        let info = (try? RedisClusterProcess.cli(["-p", "\(port)", "ROLE"]).output) ?? ""
        return info.split(separator: "\n").first.map(String.init) ?? ""
    }

    /// The connection asks the Sentinel where the primary is; after a failover the old primary
    /// answers `READONLY`, the connection drops it, and its next connect reaches the new primary.
    @Test(.timeLimit(.minutes(2))) func aFailoverIsFollowedThroughTheSentinel() async throws {
        let primary = try RedisServerProcess()
        let replica = try RedisServerProcess(extraArguments: ["--replicaof", "127.0.0.1", "\(primary.port)"])
        #expect(eventually(.seconds(20)) {
            (try? RedisClusterProcess.cli(["-p", "\(replica.port)", "INFO", "replication"]).output.contains("master_link_status:up")) == true
        }, "the replica is in sync")
        let sentinel = try RedisSentinelProcess(monitoring: primary.port)
        #expect(eventually(.seconds(20)) {
            (try? RedisClusterProcess.cli(["-p", "\(sentinel.port)", "SENTINEL", "REPLICAS", sentinel.master]).output.contains("\(replica.port)")) == true
        }, "the Sentinel found the replica")

        let log = RecordingLogHandler()
        let redis = try await RedisTarget.connect(
            url: "redis://127.0.0.1:\(sentinel.port)/0", cluster: false, sentinelMaster: sentinel.master,
            logger: Logger(label: "sentinel-test") { _ in log })
        #expect(try await redis.command(["SET", "k1", "before"], key: "k1") == .status("OK"))
        #expect(try RedisClusterProcess.cli(["-p", "\(primary.port)", "GET", "k1"]).output.hasPrefix("before"))

        #expect(try RedisClusterProcess.cli(["-p", "\(sentinel.port)", "SENTINEL", "FAILOVER", sentinel.master]).output.hasPrefix("OK"))
        #expect(eventually(.seconds(30)) { sentinel.primaryPort() == replica.port && role(primary.port) == "slave" },
                "failed over: the Sentinel names \(sentinel.primaryPort() ?? 0), the old primary is \(role(primary.port))")

        // The first write after the failover may meet the demoted primary (READONLY, retriable);
        // the connection then connects again, through the Sentinel, to the new primary.
        var written = false
        for _ in 0..<5 where !written {
            do {
                let reply = try await redis.command(["SET", "k2", "after"], key: "k2")
                if reply == .status("OK") { written = true } else if case .error(let text) = reply { #expect(text.hasPrefix("READONLY")) }
            } catch let error as RedisError {
                #expect(error.isRetriable, "\(error)")
            }
        }
        #expect(written)
        #expect(try RedisClusterProcess.cli(["-p", "\(replica.port)", "GET", "k2"]).output.hasPrefix("after"), "written to the new primary")
        let located = log.records.withLock { $0.filter { $0.message == "redis primary located by sentinel" }.map { "\($0.metadata["redis.primary"] ?? "")" } }
        #expect(located == ["127.0.0.1:\(primary.port)", "127.0.0.1:\(replica.port)"], "\(located)")
        await redis.close()
    }

    /// A name the Sentinel does not monitor is a mistake to fix, not an outage to wait out;
    /// Sentinels that do not answer are an outage.
    @Test func aWrongNameIsNotRetriedAndUnreachableSentinelsAre() async throws {
        let primary = try RedisServerProcess()
        let sentinel = try RedisSentinelProcess(monitoring: primary.port)
        let wrong = await #expect(throws: RedisError.self) {
            _ = try await RedisTarget.connect(url: "redis://127.0.0.1:\(sentinel.port)/0", cluster: false, sentinelMaster: "orders", logger: quietLogger)
        }
        #expect(wrong?.isRetriable == false && wrong?.message.contains("monitors no primary named orders") == true, "\(wrong.map { "\($0)" } ?? "")")

        let closed = [try freePort(), try freePort()]
        let unreachable = await #expect(throws: RedisError.self) {
            _ = try await RedisTarget.connect(
                url: "redis://127.0.0.1:\(closed[0]),127.0.0.1:\(closed[1])/0", cluster: false, sentinelMaster: sentinel.master,
                connectTimeout: .milliseconds(500), logger: quietLogger)
        }
        #expect(unreachable?.isRetriable == true, "\(unreachable.map { "\($0)" } ?? "")")
        #expect(unreachable?.message.contains("127.0.0.1:\(closed[0])") == true && unreachable?.message.contains("127.0.0.1:\(closed[1])") == true)

        // One Sentinel down, the next one answers.
        let redis = try await RedisTarget.connect(
            url: "redis://127.0.0.1:\(closed[0]),127.0.0.1:\(sentinel.port)/0", cluster: false, sentinelMaster: sentinel.master, logger: quietLogger)
        #expect(try await redis.command(["PING"], key: "") == .status("PONG"))
        await redis.close()
    }
}
