import DedupCore
import Logging
import Testing
@testable import RedisIO
import TestSupport

@Suite("Reconnect after a redis-server restart")
struct RedisReconnectTests {
    @Test func sameConnectionWorksAfterServerRestart() async throws {
        let fx = try await RedisFixture()
        let p = uniquePrefix()
        let (doneKey, pendingKey, newKey) = (p + "done", p + "pending", p + "new")
        _ = try await fx.store.claim([doneKey, pendingKey], owner: "w1", lease: .seconds(60))
        #expect(try await fx.store.confirm([doneKey], owner: "w1", retention: .seconds(300)) == [.confirmed])

        try fx.server.restart()

        // The first call may fail (retriable); the one after must succeed on the same object.
        do {
            try await fx.connection.ping()
        } catch let error as RedisError {
            #expect(error.isRetriable, "\(error)")
        }
        try await fx.connection.ping()
        #expect(await fx.connection.connectCount == 2)

        // AOF kept both keys; EVALSHA runs after the restart emptied the script cache.
        let states = try await fx.store.inspect([doneKey, pendingKey, newKey])
        guard case .done = states[0], case .pending(let owner, _) = states[1] else {
            Issue.record("unexpected states after restart: \(states)")
            return
        }
        #expect(owner == "w1")
        #expect(states[2] == .absent)
        #expect(try await fx.store.claim([doneKey, pendingKey, newKey], owner: "w1", lease: .seconds(60))
                == [.done, .alreadyOwned, .claimed])
    }

    @Test func callsFailRetriablyWhileServerIsDownAndRecoverAfter() async throws {
        let fx = try await RedisFixture()
        let key = uniquePrefix() + "k"
        _ = try await fx.store.claim([key], owner: "w1", lease: .seconds(60))
        _ = try await fx.store.confirm([key], owner: "w1", retention: .seconds(300))

        fx.server.stop()
        for _ in 0..<2 {
            let error = try await #require(throws: RedisError.self) {
                _ = try await fx.store.claim([key], owner: "w2", lease: .seconds(60))
            }
            #expect(error.code == .connection)
            #expect(error.isRetriable)
        }

        try fx.server.restart()
        var outcome: [ClaimOutcome] = []
        let recovered = try await waitUntil {
            guard let o = try? await fx.store.claim([key], owner: "w2", lease: .seconds(60)) else { return false }
            outcome = o
            return true
        }
        #expect(recovered)
        #expect(outcome == [.done])
    }
}

@Suite("AUTH against redis-server with requirepass")
struct RedisAuthTests {
    static let password = "s3cret:p@ss/word"

    @Test func wrongPasswordIsAClearAuthError() async throws {
        let server = try RedisServerProcess(password: Self.password)
        let url = try RedisURL("redis://:wrong-one@127.0.0.1:\(server.port)/0")
        let error = try await #require(throws: RedisError.self) {
            _ = try await RedisConnection.connect(url, connectTimeout: .seconds(2), commandTimeout: .seconds(2), logger: quietLogger)
        }
        #expect(error.code == .auth)
        #expect(!error.isRetriable)
        #expect(error.message.contains("AUTH"))
        #expect(!error.message.contains("wrong-one"))
    }

    @Test func missingPasswordIsAnAuthError() async throws {
        let server = try RedisServerProcess(password: Self.password)
        // The PING at connect finds out, so it is reported at start rather than at the first claim.
        let error = try await #require(throws: RedisError.self) {
            _ = try await RedisConnection.connect(
                try RedisURL(server.urlWithoutPassword), connectTimeout: .seconds(2), commandTimeout: .seconds(2), logger: quietLogger)
        }
        #expect(error.code == .auth)
        let withDB = try await #require(throws: RedisError.self) {
            _ = try await RedisConnection.connect(
                try RedisURL("redis://127.0.0.1:\(server.port)/2"), connectTimeout: .seconds(2), commandTimeout: .seconds(2), logger: quietLogger)
        }
        #expect(withDB.code == .auth)
    }

    @Test func rightPasswordWorksWithAndWithoutUser() async throws {
        let server = try RedisServerProcess(password: Self.password)
        let url = try RedisURL(server.url)
        #expect(url.password == Self.password)
        let connection = try await RedisConnection.connect(url, connectTimeout: .seconds(2), commandTimeout: .seconds(2), logger: quietLogger)
        try await connection.ping()
        let store = RedisClaimStore(connection: connection, logger: quietLogger)
        #expect(try await store.claim([uniquePrefix() + "k"], owner: "w1", lease: .seconds(5)) == [.claimed])

        var withUser = url
        withUser.user = "default"
        withUser.database = 1
        let second = try await RedisConnection.connect(withUser, connectTimeout: .seconds(2), commandTimeout: .seconds(2), logger: quietLogger)
        try await second.ping()

        // Restart: the reconnect must AUTH again.
        try server.restart()
        _ = try? await connection.ping()
        try await connection.ping()
    }
}

/// A primary demoted to a replica (a failover) keeps its clients' connections and answers
/// every write `READONLY`.
@Suite("A connection to a demoted primary")
struct RedisReadOnlyTests {
    /// The connection drops its socket after a round trip that met `READONLY` and connects again
    /// on the next call (to what its URL names then: behind a managed endpoint, the new primary),
    /// logging that once while it keeps meeting a replica.
    @Test func aReadOnlyReplyDropsTheConnectionAndIsLoggedOnce() async throws {
        let primary = try RedisServerProcess()
        let node = try RedisServerProcess()
        let log = RecordingLogHandler()
        let connection = try await RedisConnection.connect(try RedisURL(node.url), logger: Logger(label: "test") { _ in log })
        #expect(try await connection.command("SET", "k", "v") == .status("OK"))
        #expect(try RedisClusterProcess.cli(["-p", "\(node.port)", "REPLICAOF", "127.0.0.1", "\(primary.port)"]).status == 0)
        for _ in 0..<3 {
            let reply = try await connection.command("SET", "k", "w")
            guard case .error(let text) = reply else { Issue.record("not an error: \(reply)"); return }
            #expect(text.hasPrefix("READONLY"))
        }
        #expect(await connection.connectCount == 3, "connected again before the second and the third SET")
        let notices = log.records.withLock { $0.filter { $0.message.contains("READONLY") } }
        #expect(notices.count == 1 && notices.first?.level == .notice, "\(notices.map(\.message))")

        #expect(try RedisClusterProcess.cli(["-p", "\(node.port)", "REPLICAOF", "NO", "ONE"]).status == 0)
        #expect(try await connection.command("SET", "k", "x") == .status("OK"))
        #expect(await connection.connectCount == 4)
        await connection.close()
    }
}
