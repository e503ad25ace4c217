import DedupCore
import Foundation
import Synchronization
import Testing
@testable import RedisIO
import TestSupport

@Suite("RedisClaimStore against redis-server")
struct RedisClaimStoreTests {
    @Test func claimsTenThousandKeysInOnePipeline() async throws {
        let fx = try await RedisFixture()
        let prefix = uniquePrefix()
        let keys = (0..<10_000).map { "\(prefix)\($0)" }

        let clock = ContinuousClock()
        var outcomes: [ClaimOutcome] = []
        let elapsed = try await clock.measure {
            outcomes = try await fx.store.claim(keys, owner: "w1", lease: .seconds(30))
        }
        print("10,000-key pipelined claim took \(elapsed)")
        #expect(outcomes.count == keys.count)
        #expect(outcomes.allSatisfy { $0 == .claimed })

        let again = try await fx.store.claim(keys, owner: "w1", lease: .seconds(30))
        #expect(again.allSatisfy { $0 == .alreadyOwned })

        let other = try await fx.store.claim(keys, owner: "w2", lease: .seconds(30))
        #expect(other.allSatisfy { $0 == .pendingElsewhere(owner: "w1") })

        let count = try await fx.connection.command("DBSIZE")
        #expect(count == .integer(10_000))
    }

    @Test func resultsKeepKeyOrderAcrossChunks() async throws {
        let fx = try await RedisFixture(maxKeysPerScript: 3)
        let p = uniquePrefix()
        let keys = (0..<10).map { "\(p)\($0)" }
        // Prepare mixed states: 1 and 7 done, 4 pending elsewhere, 8 already ours.
        _ = try await fx.store.claim([keys[1], keys[7]], owner: "w1", lease: .seconds(30))
        _ = try await fx.store.confirm([keys[1], keys[7]], owner: "w1", retention: .seconds(60))
        _ = try await fx.store.claim([keys[4]], owner: "other", lease: .seconds(30))
        _ = try await fx.store.claim([keys[8]], owner: "w1", lease: .seconds(30))

        let outcomes = try await fx.store.claim(keys, owner: "w1", lease: .seconds(30))
        #expect(outcomes == [
            .claimed, .done, .claimed, .claimed, .pendingElsewhere(owner: "other"),
            .claimed, .claimed, .done, .alreadyOwned, .claimed,
        ])
    }

    @Test func confirmByNonOwnerIsRefusedAndKeyStaysPending() async throws {
        let fx = try await RedisFixture()
        let key = uniquePrefix() + "k"
        #expect(try await fx.store.claim([key], owner: "w1", lease: .seconds(30)) == [.claimed])
        #expect(try await fx.store.confirm([key], owner: "w2", retention: .seconds(60)) == [.notOwner(owner: "w1")])
        let state = try #require(try await fx.store.inspect([key]).first)
        guard case .pending(let owner, let ttl) = state else {
            Issue.record("expected pending, got \(state)")
            return
        }
        #expect(owner == "w1")
        #expect(ttl > 0 && ttl <= 30_000)
    }

    @Test func confirmByOwnerMakesKeyDoneForEveryone() async throws {
        let fx = try await RedisFixture()
        let key = uniquePrefix() + "k"
        _ = try await fx.store.claim([key], owner: "w1", lease: .seconds(30))
        #expect(try await fx.store.confirm([key], owner: "w1", retention: .seconds(60)) == [.confirmed])
        // Idempotent.
        #expect(try await fx.store.confirm([key], owner: "w1", retention: .seconds(60)) == [.confirmed])
        #expect(try await fx.store.claim([key], owner: "w1", lease: .seconds(30)) == [.done])
        #expect(try await fx.store.claim([key], owner: "w2", lease: .seconds(30)) == [.done])
        let state = try #require(try await fx.store.inspect([key]).first)
        guard case .done(let ttl) = state else {
            Issue.record("expected done, got \(state)")
            return
        }
        #expect(ttl > 30_000 && ttl <= 60_000)
        #expect(try await fx.connection.command("GET", RedisArgument(key)).text == "d:w1")
    }

    @Test func releaseOnlyByOwner() async throws {
        let fx = try await RedisFixture()
        let key = uniquePrefix() + "k"
        _ = try await fx.store.claim([key], owner: "w1", lease: .seconds(30))
        #expect(try await fx.store.release([key], owner: "w2") == [false])
        #expect(try await fx.store.inspect([key]).first.map { if case .pending = $0 { true } else { false } } == true)
        #expect(try await fx.store.release([key], owner: "w1") == [true])
        #expect(try await fx.store.inspect([key]) == [.absent])
        #expect(try await fx.store.release([key], owner: "w1") == [false])
        // A done key is never released.
        _ = try await fx.store.claim([key], owner: "w1", lease: .seconds(30))
        _ = try await fx.store.confirm([key], owner: "w1", retention: .seconds(60))
        #expect(try await fx.store.release([key], owner: "w1") == [false])
        #expect(try await fx.store.claim([key], owner: "w2", lease: .seconds(30)) == [.done])
    }

    @Test func renewOnlyByOwner() async throws {
        let fx = try await RedisFixture()
        let p = uniquePrefix()
        let key = p + "k", absent = p + "absent"
        // A lease long enough that a loaded machine cannot let it run out before the renewal;
        // the renewal must still lengthen it well past the original 10 s.
        _ = try await fx.store.claim([key], owner: "w1", lease: .seconds(10))
        #expect(try await fx.store.renew([key, absent], owner: "w2", lease: .seconds(60)) == [false, false])
        #expect(try await fx.store.renew([key, absent], owner: "w1", lease: .seconds(60)) == [true, false])
        guard case .pending(_, let ttl)? = try await fx.store.inspect([key]).first else {
            Issue.record("expected pending")
            return
        }
        #expect(ttl > 50_000)
        #expect(try await fx.store.inspect([absent]) == [.absent])
    }

    @Test func inspectShowsAbsentPendingAndDone() async throws {
        let fx = try await RedisFixture()
        let p = uniquePrefix()
        let (absent, pending, done) = (p + "a", p + "p", p + "d")
        _ = try await fx.store.claim([pending, done], owner: "worker-7", lease: .seconds(30))
        _ = try await fx.store.confirm([done], owner: "worker-7", retention: .seconds(120))
        let states = try await fx.store.inspect([absent, pending, done])
        #expect(states.count == 3)
        #expect(states[0] == .absent)
        guard case .pending(let owner, let pendingTTL) = states[1], case .done(let doneTTL) = states[2] else {
            Issue.record("unexpected states \(states)")
            return
        }
        #expect(owner == "worker-7")
        #expect(pendingTTL > 20_000 && pendingTTL <= 30_000)
        #expect(doneTTL > 100_000 && doneTTL <= 120_000)
        #expect(try await fx.store.inspect([]) == [])
    }

    @Test func confirmAfterLeaseExpiredIsConfirmedAfterLeaseLost() async throws {
        let fx = try await RedisFixture()
        let key = uniquePrefix() + "k"
        #expect(try await fx.store.claim([key], owner: "w1", lease: .milliseconds(50)) == [.claimed])
        let expired = try await waitUntil { try await fx.store.inspect([key]) == [.absent] }
        #expect(expired)
        #expect(try await fx.store.confirm([key], owner: "w1", retention: .seconds(60)) == [.confirmedAfterLeaseLost])
        #expect(try await fx.store.claim([key], owner: "w2", lease: .seconds(30)) == [.done])
    }

    @Test func reloadsScriptsAfterScriptFlush() async throws {
        let fx = try await RedisFixture(maxKeysPerScript: 2)
        let p = uniquePrefix()
        _ = try await fx.store.claim([p + "0"], owner: "w1", lease: .seconds(30))
        #expect(try await fx.connection.command("SCRIPT", "FLUSH") == .status("OK"))
        let outcomes = try await fx.store.claim((0..<5).map { "\(p)\($0)" }, owner: "w1", lease: .seconds(30))
        #expect(outcomes == [.alreadyOwned, .claimed, .claimed, .claimed, .claimed])
    }

    @Test func sentRequestsRunInOrderAndAnswerWhenAwaited() async throws {
        let fx = try await RedisFixture(maxKeysPerScript: 2)
        let p = uniquePrefix()
        let keys = (0..<5).map { "\(p)\($0)" }
        _ = try await fx.store.claim([p + "warm"], owner: "w1", lease: .seconds(30))

        let claims = fx.store.sendClaims([KeyGroup(keys, ttl: .seconds(30))], owner: "w1")
        // The connection's queue is serial: a command issued after the send sees its effect.
        let seen = try await fx.store.inspect(keys)
        #expect(seen.allSatisfy { if case .pending(owner: "w1", _) = $0 { true } else { false } })
        #expect(try await claims.outcomes() == Array(repeating: .claimed, count: 5))

        let confirms = fx.store.sendConfirms([KeyGroup(Array(keys.prefix(3)), ttl: .seconds(60))], owner: "w1")
        #expect(try await confirms.outcomes() == Array(repeating: .confirmed, count: 3))
        #expect(try await fx.store.claim(keys, owner: "w2", lease: .seconds(30))
                == [.done, .done, .done, .pendingElsewhere(owner: "w1"), .pendingElsewhere(owner: "w1")])
    }

    @Test func sentRequestsLoadScriptsOnFirstUseAndAfterAFlush() async throws {
        let fx = try await RedisFixture(maxKeysPerScript: 2)
        let p = uniquePrefix()
        // First use: nothing is loaded yet, so the request loads the scripts when awaited.
        #expect(try await fx.store.sendClaims([KeyGroup([p + "a"], ttl: .seconds(30))], owner: "w1").outcomes() == [.claimed])
        #expect(try await fx.connection.command("SCRIPT", "FLUSH") == .status("OK"))
        let outcomes = try await fx.store.sendClaims([KeyGroup((0..<3).map { "\(p)\($0)" } + [p + "a"], ttl: .seconds(30))], owner: "w1").outcomes()
        #expect(outcomes == [.claimed, .claimed, .claimed, .alreadyOwned])
    }

    @Test func sentRequestFailsRetriablyWhenTheServerIsGone() async throws {
        let fx = try await RedisFixture()
        let p = uniquePrefix()
        _ = try await fx.store.claim([p + "warm"], owner: "w1", lease: .seconds(30))
        fx.server.stop()
        let request = fx.store.sendClaims([KeyGroup([p + "k"], ttl: .seconds(30))], owner: "w1")
        let error = try await #require(throws: RedisError.self) { try await request.outcomes() }
        #expect(error.isRetriable)
    }

    @Test func aSentRequestReportsItsRoundTripNotTheCallersWait() async throws {
        let fx = try await RedisFixture()
        let durations = Mutex<[Duration]>([])
        let store = RedisClaimStore(connection: fx.connection, logger: quietLogger, onRoundTrip: { _, d in durations.withLock { $0.append(d) } })
        let p = uniquePrefix()
        _ = try await store.claim([p + "warm"], owner: "w1", lease: .seconds(30))
        let request = store.sendClaims([KeyGroup([p + "k"], ttl: .seconds(30))], owner: "w1")
        try await Task.sleep(for: .milliseconds(300))  // the caller works meanwhile
        #expect(try await request.outcomes() == [.claimed])
        let recorded = durations.withLock { $0 }
        #expect(recorded.count == 2)
        #expect(recorded.last! < .milliseconds(300), "\(recorded)")
    }

    @Test func pendingRepliesArriveWhicheverSideComesFirst() async throws {
        let early = RedisPending<[Int]>()
        #expect(early.answeredAt == nil)
        early.complete(.success([1, 2]))
        #expect(early.answeredAt != nil)
        #expect(try await early.value() == [1, 2])

        let late = RedisPending<[Int]>()
        async let waited = late.value()
        for _ in 0..<100 { await Task.yield() }
        late.complete(.success([3]))
        #expect(try await waited == [3])

        let failed = RedisPending<[Int]>()
        failed.complete(.failure(RedisError(.closed, "gone")))
        await #expect(throws: RedisError.self) { try await failed.value() }
    }

    @Test func emptyBatchesCostNothing() async throws {
        let fx = try await RedisFixture()
        #expect(try await fx.store.claim([], owner: "w1", lease: .seconds(1)) == [])
        #expect(try await fx.store.confirm([], owner: "w1", retention: .seconds(1)) == [])
        #expect(try await fx.store.release([], owner: "w1") == [])
        #expect(try await fx.store.renew([], owner: "w1", lease: .seconds(1)) == [])
        #expect(try await fx.connection.pipeline([]) == [])
    }
}

@Suite("RedisConnection against redis-server")
struct RedisConnectionTests {
    @Test func pipelineReturnsEveryReplyKindInOrder() async throws {
        let fx = try await RedisFixture()
        let p = uniquePrefix()
        let binary: [UInt8] = [0, 1, 2, 255, 13, 10]
        let replies = try await fx.connection.pipeline([
            ["SET", RedisArgument(p + "bin"), RedisArgument(bytes: binary)],
            ["GET", RedisArgument(p + "bin")],
            ["GET", RedisArgument(p + "missing")],
            ["INCRBY", RedisArgument(p + "n"), 41],
            ["RPUSH", RedisArgument(p + "l"), "a", "b"],
            ["LRANGE", RedisArgument(p + "l"), 0, -1],
            ["NOSUCHCOMMAND"],
            ["PING"],
        ])
        #expect(replies.count == 8)
        #expect(replies[0] == .status("OK"))
        #expect(replies[1] == .string(binary))
        #expect(replies[2] == .null)
        #expect(replies[3] == .integer(41))
        #expect(replies[4] == .integer(2))
        #expect(replies[5] == .array([.string(Array("a".utf8)), .string(Array("b".utf8))]))
        guard case .error(let text) = replies[6] else {
            Issue.record("expected an error reply, got \(replies[6])")
            return
        }
        #expect(text.hasPrefix("ERR"))
        #expect(throws: RedisError.self) { try replies[6].throwingOnError() }
        #expect(replies[7] == .status("PONG"))
        try await fx.connection.ping()
    }

    /// Arguments travel back to back in one buffer (RedisCommandBatch): an empty one between two
    /// others, and commands of different lengths in one pipeline, must keep their boundaries.
    @Test func emptyArgumentsKeepTheirPlace() async throws {
        let fx = try await RedisFixture()
        let p = uniquePrefix()
        let replies = try await fx.connection.pipeline([
            ["MSET", RedisArgument(p + "a"), "", RedisArgument(p + "b"), "xyz"],
            ["MGET", RedisArgument(p + "a"), RedisArgument(p + "b")],
            ["PING"],
        ])
        #expect(replies == [.status("OK"), .array([.string([]), .string(Array("xyz".utf8))]), .status("PONG")])
    }

    @Test func selectsTheDatabaseFromTheURL() async throws {
        let server = try RedisServerProcess()
        let url = try RedisURL("redis://127.0.0.1:\(server.port)/5")
        let connection = try await RedisConnection.connect(url, connectTimeout: .seconds(2), commandTimeout: .seconds(2), logger: quietLogger)
        _ = try await connection.command("SET", "in-db-5", "x")
        let info = try #require(try await connection.command("CLIENT", "INFO").text)
        #expect(info.contains("db=5"))
    }

    @Test func commandTimeoutIsRetriableAndConnectionRecovers() async throws {
        let fx = try await RedisFixture(commandTimeout: .milliseconds(100))
        let pauser = try await RedisConnection.connect(
            try RedisURL(fx.server.url), connectTimeout: .seconds(2), commandTimeout: .seconds(2), logger: quietLogger)
        // Long against the ping's 100 ms, so a test machine under load still sends the ping
        // inside the pause.
        #expect(try await pauser.command("CLIENT", "PAUSE", 1500, "ALL") == .status("OK"))
        let error = try await #require(throws: RedisError.self) { try await fx.connection.ping() }
        #expect(error.code == .timeout)
        #expect(error.isRetriable)
        let recovered = try await waitUntil(timeout: .seconds(6)) {
            (try? await fx.connection.ping()) != nil
        }
        #expect(recovered)
        #expect(await fx.connection.connectCount >= 2)
    }

    @Test func connectionRefusedIsARetriableConnectionError() async throws {
        let port = try freePort()
        let error = try await #require(throws: RedisError.self) {
            _ = try await RedisConnection.connect(
                try RedisURL("redis://127.0.0.1:\(port)"), connectTimeout: .seconds(1), commandTimeout: .seconds(1), logger: quietLogger)
        }
        #expect(error.code == .connection)
        #expect(error.isRetriable)
        #expect(error.message.contains("\(port)"))
    }
}
