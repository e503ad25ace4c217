import DedupCore
import Foundation
import Testing
@testable import RedisIO
import TestSupport

/// What only the operator can fix, against redis-server: an ACL user without a command dedupd
/// sends, and a Redis at `maxmemory`. A missing command is a refusal (`RedisError.Code.auth`,
/// `StoreFailure.refused`) naming the list in docs/operations.md, whether Redis refused the
/// command itself (`NOPERM`) or a script that calls it (`ERR`, worded by version); a compact
/// bucket sweep it refused is sent again once the user may run it. A full Redis is
/// `StoreFailure.full`, with what to do.
@Suite("Refusals and a full Redis against redis-server")
struct OperatorFixTests {
    static let records = CompactLayoutTests.records
    static let layout = CompactLayoutTests.layout

    /// A connection as a fresh ACL user allowed every command but `without`, and its name.
    static func limited(_ fx: RedisFixture, without: [String]) async throws -> (RedisConnection, String) {
        let user = "limited-\(UUID().uuidString.prefix(8))"
        let reply = try await fx.connection.command(
            ["ACL", "SETUSER", RedisArgument(user), "reset", "on", ">pw", "~*", "&*", "+@all"] + without.map { RedisArgument("-" + $0) })
        #expect(reply.text == "OK")
        var url = try RedisURL(fx.server.url)
        url.user = user
        url.password = "pw"
        return (try await RedisConnection.connect(url, logger: quietLogger), user)
    }

    /// `#expect(throws:)` already failed the test when nothing was thrown.
    static func expectRefusal(_ error: RedisError?, naming command: String, sourceLocation: SourceLocation = #_sourceLocation) {
        guard let error else { return }
        #expect(error.code == .auth && error.storeFailure == .refused, "\(error)", sourceLocation: sourceLocation)
        #expect(error.message.contains("\"ACL users\", lists them"), "\(error)", sourceLocation: sourceLocation)
        #expect(error.message.lowercased().contains(command), "\(error)", sourceLocation: sourceLocation)
    }

    /// Without `HEXISTS`, a compact claim's pipeline gets `NOPERM`; without `PEXPIRE`, the
    /// `renew` script that extends the worker's own claim gets Redis 7.0's "The user executing
    /// the script can't run this command" (7.2: "ACL failure in script"), an `ERR` reply.
    @Test func aCommandRefusedDirectlyOrInAScriptIsARefusal() async throws {
        let fx = try await RedisFixture()
        let (noHexists, _) = try await Self.limited(fx, without: ["hexists"])
        let claims = RedisClaimStore(connection: noHexists, logger: quietLogger)
        let refused = await #expect(throws: RedisError.self) { try await CompactLayoutTests.claim(claims, ["dedupd:orders:a"], "w") }
        Self.expectRefusal(refused, naming: "'hexists'")

        let (noPexpire, _) = try await Self.limited(fx, without: ["pexpire"])
        let renewals = RedisClaimStore(connection: noPexpire, logger: quietLogger)
        #expect(try await CompactLayoutTests.claim(renewals, ["dedupd:orders:b"], "w") == [.claimed])
        let inScript = await #expect(throws: RedisError.self) { try await CompactLayoutTests.claim(renewals, ["dedupd:orders:b"], "w") }
        Self.expectRefusal(inScript, naming: "script")
        #expect(RedisError.fromServerReply("ERR ACL failure in script: User w has no permissions to run the 'pexpire' command script: 1f2e").storeFailure == .refused)
        #expect(RedisError.fromServerReply("ERR Error running script (call to f_1f2e): @user_script:3: wrong number of arguments").storeFailure == .unavailable)
    }

    /// At connect: a user without `SELECT` (a database other than 0) is refused that command,
    /// and says so with the list; only a server that wants a password none was given for says
    /// "requires AUTH".
    @Test func aRefusedSelectAtConnectIsNotAMissingPassword() async throws {
        let fx = try await RedisFixture()
        let (_, user) = try await Self.limited(fx, without: ["select"])
        var url = try RedisURL(fx.server.url)
        url.user = user
        url.password = "pw"
        url.database = 1
        let refused = await #expect(throws: RedisError.self) { _ = try await RedisConnection.connect(url, logger: quietLogger) }
        Self.expectRefusal(refused, naming: "'select'")
        #expect(refused?.message.contains("SELECT 1 at 127.0.0.1:\(fx.server.port)") == true && refused?.message.contains("requires AUTH") == false)

        let guarded = try RedisServerProcess(password: "secret")
        var bare = try RedisURL(guarded.url)
        bare.password = nil
        let missing = await #expect(throws: RedisError.self) { _ = try await RedisConnection.connect(bare, logger: quietLogger) }
        #expect(missing?.code == .auth && missing?.message.contains("requires AUTH (no password in URL)") == true, "\(missing.map { "\($0)" } ?? "")")
    }

    /// A Redis at `maxmemory` (with `noeviction`) answers writes `OOM`: a full store, with what
    /// to do, not an outage; given room again, the same claim goes through.
    @Test func aFullRedisIsAFullStore() async throws {
        let fx = try await RedisFixture()
        _ = try await fx.connection.command(["CONFIG", "SET", "maxmemory", "1"])
        let full = await #expect(throws: RedisError.self) { try await CompactLayoutTests.claim(fx.store, ["dedupd:orders:e"], "w") }
        #expect(full?.code == .outOfMemory && full?.storeFailure == .full && full?.isRetriable == true, "\(full.map { "\($0)" } ?? "")")
        #expect(full?.message.contains("OOM") == true && full?.message.contains("\"Redis is full\"") == true)
        _ = try await fx.connection.command(["CONFIG", "SET", "maxmemory", "0"])
        #expect(try await CompactLayoutTests.claim(fx.store, ["dedupd:orders:e"], "w") == [.claimed])
    }

    /// A confirm whose bucket sweep (`PEXPIRE`) was refused fails, and leaves its slots to be
    /// swept again: once the user may run `PEXPIRE`, the next confirm gives the buckets their
    /// TTL. Marked swept after the failure, they would never expire.
    @Test func aRefusedBucketSweepIsSentAgain() async throws {
        let fx = try await RedisFixture()
        let (connection, user) = try await Self.limited(fx, without: ["pexpire"])
        let store = RedisClaimStore(connection: connection, logger: quietLogger)
        let keys = ["dedupd:orders:c", "dedupd:orders:d"]
        #expect(try await CompactLayoutTests.claim(store, keys, "w") == [.claimed, .claimed])
        let refused = await #expect(throws: RedisError.self) { try await CompactLayoutTests.confirm(store, [keys[0]], "w") }
        Self.expectRefusal(refused, naming: "'pexpire'")
        let bucket = Self.records.placement(of: keys[0]).bucketKey(slot: Self.records.slot(at: store.unixMillis()))
        #expect(try await fx.connection.command(["PTTL", RedisArgument(bucket)]).int == -1, "the field is written, the TTL is not")

        _ = try await fx.connection.command(["ACL", "SETUSER", RedisArgument(user), "+pexpire"])
        #expect(try await CompactLayoutTests.confirm(store, [keys[1]], "w") == [.confirmed])
        let ttl = try #require(try await fx.connection.command(["PTTL", RedisArgument(bucket)]).int)
        #expect(ttl > CompactRecords.millis(Self.records.retention) - 60_000, "the bucket expires: PTTL \(ttl)")
    }
}
