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

    /// `redis-cli` against a data node, with `password` when set.
    func cli(_ port: Int, _ password: String?, _ arguments: [String]) -> String {
        let auth = password.map { ["-a", $0, "--no-auth-warning"] } ?? []
        return (try? RedisClusterProcess.cli(["-p", "\(port)"] + auth + arguments).output) ?? ""
    }

    /// The connection asks the Sentinel where the primary is; after a failover the old primary
    /// answers `READONLY` (or Sentinel has closed its connections), the connection connects again,
    /// and the Sentinel names the new primary. With a password, the primary's is offered to the
    /// Sentinel too (a Sentinel with the same `requirepass`).
    @Test(.timeLimit(.minutes(2)), arguments: [nil, "pw-sentinel-1"])
    func aFailoverIsFollowedThroughTheSentinel(password: String?) async throws {
        let auth = password.map { ["--masterauth", $0] } ?? []
        let primary = try RedisServerProcess(password: password, extraArguments: auth)
        let replica = try RedisServerProcess(password: password, extraArguments: ["--replicaof", "127.0.0.1", "\(primary.port)"] + auth)
        #expect(eventually(.seconds(20)) { cli(replica.port, password, ["INFO", "replication"]).contains("master_link_status:up") },
                "the replica is in sync")
        let sentinel = try RedisSentinelProcess(monitoring: primary.port, password: password)
        #expect(eventually(.seconds(20)) {
            (try? sentinel.cli(["SENTINEL", "REPLICAS", sentinel.master]).output.contains("\(replica.port)")) == true
        }, "the Sentinel found the replica")

        let log = RecordingLogHandler()
        let redis = try await RedisTarget.connect(
            url: "redis://127.0.0.1:\(sentinel.port)/0", cluster: false, sentinelMaster: sentinel.master, password: password,
            logger: Logger(label: "sentinel-test") { _ in log })
        #expect(try await redis.command(["SET", "k1", "before"], key: "k1") == .status("OK"))
        #expect(cli(primary.port, password, ["GET", "k1"]).hasPrefix("before"))

        #expect(try sentinel.cli(["SENTINEL", "FAILOVER", sentinel.master]).output.hasPrefix("OK"))
        func role(_ port: Int) -> String { cli(port, password, ["ROLE"]).split(separator: "\n").first.map(String.init) ?? "" }
        #expect(eventually(.seconds(30)) { sentinel.primaryPort() == replica.port && role(primary.port) == "slave" },
                "failed over: the Sentinel names \(sentinel.primaryPort() ?? 0), the old primary is \(role(primary.port))")

        // The first write after the failover may meet the demoted primary (READONLY, or its
        // connection closed by the Sentinel: retriable); the connection then connects again,
        // through the Sentinel, to the new primary.
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
        #expect(cli(replica.port, password, ["GET", "k2"]).hasPrefix("after"), "written to the new primary")
        let located = log.records.withLock { $0.filter { $0.message == "redis primary located by sentinel" }.map { "\($0.metadata["redis.primary"] ?? "")" } }
        #expect(located == ["127.0.0.1:\(primary.port)", "127.0.0.1:\(replica.port)"], "\(located)")
        await redis.close()
    }

    /// `rediss://`: the Sentinel and the primary are both reached over TLS, each certificate
    /// verified against `redis.tls.ca_file`; a CA that signed neither is refused.
    @Test func theSentinelAndThePrimaryAreReachedOverTLS() async throws {
        let certs = try TLSTestCertificates()
        let primary = try TLSRedisServer(certs)
        let sentinel = try RedisSentinelProcess(
            monitoring: primary.port,
            tls: .init(certificate: certs.path("server.pem"), key: certs.path("server.key"), ca: certs.path("ca.pem")))
        let log = RecordingLogHandler()
        let redis = try await RedisTarget.connect(
            url: "rediss://127.0.0.1:\(sentinel.port)/0", cluster: false, sentinelMaster: sentinel.master,
            tls: RedisTLSOptions(caFile: certs.path("ca.pem")), logger: Logger(label: "sentinel-tls") { _ in log })
        #expect(try await redis.command(["SET", "k", "over-tls"], key: "k") == .status("OK"))
        #expect(try await redis.command(["GET", "k"], key: "k") == .string(Array("over-tls".utf8)))
        let located = log.records.withLock { $0.filter { $0.message == "redis primary located by sentinel" }.map { "\($0.metadata["redis.primary"] ?? "")" } }
        #expect(located == ["127.0.0.1:\(primary.port)"])
        await redis.close()

        let untrusted = await #expect(throws: RedisError.self) {
            _ = try await RedisTarget.connect(
                url: "rediss://127.0.0.1:\(sentinel.port)/0", cluster: false, sentinelMaster: sentinel.master,
                tls: RedisTLSOptions(caFile: certs.path("other-ca.pem")), logger: quietLogger)
        }
        #expect(untrusted?.message.contains("127.0.0.1:\(sentinel.port)") == true, "\(untrusted.map { "\($0)" } ?? "")")
    }

    /// Sentinels with credentials of their own (a `requirepass`, or an ACL user allowed only
    /// `SENTINEL GET-MASTER-ADDR-BY-NAME`) are given them, and the primary its own password.
    /// Offered the primary's credentials, or wrong ones, a Sentinel's refusal is a mistake to fix
    /// (`auth`, not retried), naming the Sentinel and the setting.
    @Test(arguments: [nil, "watcher"])
    func aSentinelWithCredentialsOfItsOwnIsGivenThem(user: String?) async throws {
        let primary = try RedisServerProcess(password: "pw-primary")
        let sentinel = try RedisSentinelProcess(monitoring: primary.port, password: "pw-primary", own: .init(user: user, password: "pw-sentinel"))
        let url = "redis://:pw-primary@127.0.0.1:\(sentinel.port)/0"
        func connect(user: String?, password: String?) async throws -> RedisTarget {
            try await RedisTarget.connect(
                url: url, cluster: false, sentinelMaster: sentinel.master, sentinelUsername: user, sentinelPassword: password, logger: quietLogger)
        }

        let redis = try await connect(user: user, password: "pw-sentinel")
        #expect(try await redis.command(["SET", "k", "v"], key: "k") == .status("OK"))
        #expect(cli(primary.port, "pw-primary", ["GET", "k"]).hasPrefix("v"))
        await redis.close()

        let notGiven = await #expect(throws: RedisError.self) { _ = try await connect(user: nil, password: nil) }
        #expect(notGiven?.code == .auth && notGiven?.isRetriable == false)
        #expect(notGiven?.message.contains("127.0.0.1:\(sentinel.port)") == true
                && notGiven?.message.contains("set redis.sentinel_password or redis.sentinel_password_file") == true,
                "\(notGiven.map { "\($0)" } ?? "")")

        let wrong = await #expect(throws: RedisError.self) { _ = try await connect(user: user, password: "pw-wrong") }
        #expect(wrong?.code == .auth && wrong?.isRetriable == false)
        #expect(wrong?.message.contains("AUTH as \(user.map { "user '\($0)'" } ?? "the default user") was refused: WRONGPASS") == true
                && wrong?.message.contains("must be this Sentinel's") == true, "\(wrong.map { "\($0)" } ?? "")")
        for error in [notGiven, wrong] { #expect(error?.message.contains("pw-") == false, "no password in the message") }
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
