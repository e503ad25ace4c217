import DedupCore
import Testing

/// Drives the engine the way the worker does, against the fake store, on a test clock.
struct Harness {
    var engine: DedupLedger
    var clock = TestClock()
    let store = FakeClaimStore()
    let owner: String
    var dispatched: [Dispatch] = []

    init(
        owner: String = "w1", keep: KeepPolicy = .first, window: Duration = .seconds(5), lease: Duration? = nil,
        maxMessages: Int = 1000
    ) throws {
        self.owner = owner
        engine = DedupLedger(settings: DedupSettings(
            template: try KeyTemplate("header:message-id"), namespace: "test", window: window, lease: lease, keep: keep,
            bufferMaxMessages: maxMessages))
        store.setNow(clock.now)
    }

    mutating func advance(_ d: Duration) {
        clock.advance(d)
        store.setNow(clock.now)
    }

    @discardableResult
    mutating func consume(_ messages: [InboundMessage]) async throws -> [DedupLedger.Ingested] {
        let results = messages.map { engine.ingest($0) }
        let keys = engine.keysToClaim(now: clock.now)
        if !keys.isEmpty {
            engine.applyClaims(keys, try await store.claim(keys.map(\.storeKey), owner: owner, lease: engine.settings.lease), now: clock.now)
        }
        return results
    }

    /// Dispatch what is due (the handler always succeeds) and confirm it.
    mutating func dispatchDue() async throws {
        let due = engine.takeDue(now: clock.now)
        for d in due { engine.dispatchSucceeded(d.key) }
        dispatched += due
        let keys = engine.keysToConfirm()
        if !keys.isEmpty {
            engine.applyConfirms(keys, try await store.confirm(keys.map(\.storeKey), owner: owner, retention: .seconds(3600)))
        }
    }
}

@Suite struct DedupLedgerTests {
    let tp0 = TopicPartition(topic: "t", partition: 0)

    @Test func firstCopyIsDispatchedAfterTheWindowAndRepeatsAreLocal() async throws {
        var h = try Harness()
        let r = try await h.consume([msg("a", offset: 0), msg("b", offset: 1), msg("a", offset: 2)])
        #expect(r[2] == .localDuplicate(DedupKey(raw: "a", namespace: "test")))
        #expect(h.store.roundTrips == 1, "one claim round trip for the whole batch")
        #expect(h.engine.takeCommitPositions().isEmpty, "nothing is committed while the window runs")

        h.advance(.seconds(4))
        try await h.dispatchDue()
        #expect(h.dispatched.isEmpty)
        try await h.consume([msg("a", offset: 3)])  // repeat within the window: no round trip
        #expect(h.store.roundTrips == 1)

        h.advance(.seconds(1))
        try await h.dispatchDue()
        #expect(h.dispatched.map(\.message.offset) == [0, 1])
        #expect(h.engine.takeCommitPositions() == [tp0: 4])
        #expect(h.engine.counters.duplicatesLocal == 2)
        #expect(h.store.value("dedupd:test:a") == "d:w1")
        #expect(h.engine.isIdle)
    }

    @Test func repeatAfterTheWindowIsADuplicateFromTheStore() async throws {
        var h = try Harness()
        try await h.consume([msg("a", offset: 0)])
        h.advance(.seconds(5))
        try await h.dispatchDue()
        h.advance(.seconds(60))
        try await h.consume([msg("a", offset: 1)])
        #expect(h.engine.counters.duplicatesStore == 1)
        #expect(h.engine.takeCommitPositions() == [tp0: 2])
        #expect(h.engine.isIdle)
    }

    @Test func keepLastDispatchesTheNewestCopy() async throws {
        var h = try Harness(keep: .last)
        try await h.consume([msg("a", offset: 0, value: #"{"v":1}"#)])
        h.advance(.seconds(2))
        try await h.consume([msg("a", offset: 1, value: #"{"v":2}"#)])
        h.advance(.seconds(3))
        try await h.dispatchDue()
        #expect(h.dispatched.map(\.message.offset) == [1])
        #expect(h.engine.takeCommitPositions() == [tp0: 2])
    }

    @Test func badInputIsResolvedAndCounted() async throws {
        var h = try Harness()
        let r = try await h.consume([msg(nil, offset: 0), msg("", offset: 1), msg("ok", offset: 2)])
        guard case .bad(let b0) = r[0], case .bad(let b1) = r[1] else {
            Issue.record("expected bad input, got \(r)")
            return
        }
        #expect(b0.reason == .missingHeader)
        #expect(b1.reason == .emptyKey)
        #expect(h.engine.counters.invalid == 2)
        #expect(h.engine.takeCommitPositions() == [tp0: 2], "bad input never blocks the partition")
    }

    @Test func oversizedMessageIsBadInput() async throws {
        var h = try Harness()
        h.engine = DedupLedger(settings: DedupSettings(
            template: try KeyTemplate("header:message-id"), namespace: "test", maxMessageBytes: 10))
        let r = try await h.consume([msg("a", offset: 0, value: String(repeating: "x", count: 11))])
        guard case .bad(let bad) = r[0] else { Issue.record("expected bad input"); return }
        #expect(bad.reason == .tooLarge)
    }

    @Test func keyPendingElsewhereIsParkedThenDuplicateOnceConfirmed() async throws {
        var a = try Harness(owner: "A")
        var b = try Harness(owner: "B")
        let shared = a.store
        b = try Harness(owner: "B")
        // Both workers on one store: B uses A's store.
        var bEngine = b.engine
        _ = a.engine.ingest(msg("k", offset: 0))
        var keys = a.engine.keysToClaim(now: a.clock.now)
        a.engine.applyClaims(keys, try await shared.claim(keys.map(\.storeKey), owner: "A", lease: .seconds(35)), now: a.clock.now)

        _ = bEngine.ingest(msg("k", partition: 1, offset: 0))
        keys = bEngine.keysToClaim(now: a.clock.now)
        bEngine.applyClaims(keys, try await shared.claim(keys.map(\.storeKey), owner: "B", lease: .seconds(35)), now: a.clock.now)
        #expect(bEngine.parkedCount == 1)
        #expect(bEngine.counters.parked == 1)
        #expect(bEngine.takeCommitPositions().isEmpty, "a parked message is not committed")
        #expect(bEngine.keysToClaim(now: a.clock.now).isEmpty, "not retried before parkRetry")

        a.advance(.seconds(5))
        try await a.dispatchDue()
        #expect(a.dispatched.count == 1)

        keys = bEngine.keysToClaim(now: a.clock.now)
        #expect(keys.count == 1)
        bEngine.applyClaims(keys, try await shared.claim(keys.map(\.storeKey), owner: "B", lease: .seconds(35)), now: a.clock.now)
        #expect(bEngine.counters.duplicatesStore == 1)
        #expect(bEngine.takeCommitPositions() == [TopicPartition(topic: "t", partition: 1): 1])
        #expect(bEngine.isIdle)
    }

    @Test func parkedKeyIsClaimedOnceTheOtherLeaseExpires() async throws {
        var h = try Harness(owner: "B")
        h.store.put("dedupd:test:k", "p:dead-worker", ttl: .seconds(10))
        try await h.consume([msg("k", offset: 0)])
        #expect(h.engine.parkedCount == 1)
        h.advance(.seconds(11))
        try await h.consume([])
        #expect(h.engine.parkedCount == 0)
        #expect(h.store.value("dedupd:test:k") == "p:B")
        h.advance(.seconds(5))
        try await h.dispatchDue()
        #expect(h.dispatched.count == 1)
    }

    @Test func failedClaimRoundTripLeavesEverythingToRetry() async throws {
        var h = try Harness()
        _ = h.engine.ingest(msg("a", offset: 0))
        h.store.failNextCall()
        let keys = h.engine.keysToClaim(now: h.clock.now)
        await #expect(throws: FakeClaimStore.Down.self) {
            _ = try await h.store.claim(keys.map(\.storeKey), owner: "w1", lease: .seconds(1))
        }
        h.engine.requestFailed(keys)
        let again = h.engine.keysToClaim(now: h.clock.now)
        #expect(again.keys == keys.keys && again.ticket != keys.ticket, "still waiting for a claim, in a new request")
        #expect(h.engine.applyClaims(keys, [.claimed], now: h.clock.now).isEmpty && h.engine.buffer.count == 0,
                "an answer to the failed request is stale")
        h.engine.requestFailed(again)
        try await h.consume([])
        #expect(h.engine.buffer.count == 1)
        h.advance(.seconds(5))
        #expect(h.engine.takeDue(now: h.clock.now).count == 1)
    }

    @Test func revocationDropsWaitingMessagesWithoutCommittingThem() async throws {
        var h = try Harness()
        try await h.consume([msg("a", offset: 0), msg("b", partition: 1, offset: 0)])
        let released = h.engine.revoke([tp0])
        #expect(released.map(\.raw) == ["a"])
        #expect(h.engine.counters.released == 1)
        #expect(h.engine.takeCommitPositions().isEmpty)
        h.advance(.seconds(5))
        try await h.dispatchDue()
        #expect(h.dispatched.map(\.key.raw) == ["b"])
    }

    @Test func failedDispatchResolvesTheOffsetAndAbandonedDoesNot() async throws {
        var h = try Harness()
        try await h.consume([msg("a", offset: 0), msg("b", offset: 1)])
        h.advance(.seconds(5))
        let due = h.engine.takeDue(now: h.clock.now)
        h.engine.dispatchFailed(due[0].key)
        h.engine.dispatchAbandoned(due[1].key)
        #expect(h.engine.counters.failed == 1)
        #expect(h.engine.takeCommitPositions() == [tp0: 1], "the abandoned message at offset 1 stays uncommitted")
        #expect(h.engine.isIdle)
    }

    @Test func backpressureWhenTheBufferIsFull() async throws {
        var h = try Harness(maxMessages: 4)
        try await h.consume((0..<4).map { msg("k\($0)", offset: Int64($0)) })
        #expect(h.engine.shouldPause)
        h.advance(.seconds(5))
        try await h.dispatchDue()
        #expect(!h.engine.shouldPause && h.engine.canResume)
    }

    /// The bounds count every message held, not only those in the window: a worker whose handler
    /// or Redis is slow holds messages after their window, and its memory must stay bounded.
    @Test func backpressureCountsMessagesOutsideTheWindow() async throws {
        var h = try Harness(maxMessages: 4)
        try await h.consume((0..<4).map { msg("k\($0)", offset: Int64($0)) })
        h.advance(.seconds(5))
        // All four are with the handler: none is in the window, all are held.
        let due = h.engine.takeDue(now: h.clock.now)
        #expect(due.count == 4 && h.engine.buffer.count == 0)
        #expect(h.engine.heldMessages == 4 && h.engine.shouldPause && !h.engine.canResume)
        for d in due { h.engine.dispatchSucceeded(d.key) }
        // Dispatched, not yet confirmed: still held.
        #expect(h.engine.heldMessages == 4 && h.engine.shouldPause)
        let keys = h.engine.keysToConfirm()
        h.engine.applyConfirms(keys, try await h.store.confirm(keys.map(\.storeKey), owner: h.owner, retention: .seconds(3600)))
        #expect(h.engine.heldMessages == 0 && h.engine.heldBytes == 0)
        #expect(!h.engine.shouldPause && h.engine.canResume)
    }

    @Test func heldBytesFollowEveryMessageHeldAndTheByteBoundPauses() async throws {
        let one = msg("k0", offset: 0).approximateSize
        var h = try Harness()
        h.engine = DedupLedger(settings: DedupSettings(
            template: try KeyTemplate("header:message-id"), namespace: "test", window: .seconds(5),
            bufferMaxBytes: 3 * one))
        // Waiting for their claims (not yet sent): held, not in the window.
        for i in 0..<2 { _ = h.engine.ingest(msg("k\(i)", offset: Int64(i))) }
        #expect(h.engine.buffer.count == 0 && h.engine.heldBytes == 2 * one && !h.engine.shouldPause)
        _ = h.engine.ingest(msg("k2", offset: 2))
        #expect(h.engine.heldBytes == 3 * one && h.engine.shouldPause)
        // A repeat is resolved at once and adds nothing.
        _ = h.engine.ingest(msg("k2", offset: 3))
        #expect(h.engine.heldBytes == 3 * one)
        let keys = h.engine.keysToClaim(now: h.clock.now)
        h.engine.applyClaims(keys, try await h.store.claim(keys.map(\.storeKey), owner: h.owner, lease: h.engine.settings.lease), now: h.clock.now)
        h.advance(.seconds(5))
        try await h.dispatchDue()
        #expect(h.dispatched.count == 3 && h.engine.heldBytes == 0 && h.engine.canResume)
    }

    @Test func keepLastCountsTheCopyItHolds() async throws {
        var h = try Harness(keep: .last)
        let first = msg("a", offset: 0), newer = msg("a", offset: 1, value: #"{"amount": 1200, "note": "a longer copy"}"#)
        try await h.consume([first])
        #expect(h.engine.heldBytes == first.approximateSize && h.engine.buffer.bytes == first.approximateSize)
        try await h.consume([newer])
        #expect(h.engine.heldMessages == 1 && h.engine.heldBytes == newer.approximateSize && h.engine.buffer.bytes == newer.approximateSize)
        h.advance(.seconds(5))
        try await h.dispatchDue()
        #expect(h.engine.heldBytes == 0 && h.engine.buffer.bytes == 0)
    }

    @Test func shutdownReleasesEverythingWaiting() async throws {
        var h = try Harness()
        try await h.consume([msg("a", offset: 0), msg("b", offset: 1)])
        let released = h.engine.drainForShutdown()
        #expect(Set(released.map(\.raw)) == ["a", "b"])
        #expect(h.engine.isIdle)
    }

    @Test func leasesAreRenewedInTheClaimRoundTripOnceHalfUsed() async throws {
        var h = try Harness(window: .seconds(30), lease: .seconds(10))
        try await h.consume([msg("a", offset: 0)])
        h.advance(.seconds(4))
        #expect(h.engine.keysToClaim(now: h.clock.now).isEmpty, "not yet half used")
        h.advance(.seconds(1))
        let renewal = h.engine.keysToClaim(now: h.clock.now)
        #expect(renewal.map(\.raw) == ["a"] && renewal.renewals == 1)
        h.engine.applyClaims(renewal, try await h.store.claim(renewal.map(\.storeKey), owner: "w1", lease: .seconds(10)), now: h.clock.now)
        #expect(h.engine.counters.renewed == 1)
        // Renewed at t=5s: the lease now runs to t=15s, past the original t=10s.
        h.advance(.seconds(6))
        #expect(h.store.value("dedupd:test:a") == "p:w1")
        for _ in 0..<5 {
            h.advance(.seconds(5))
            try await h.consume([])
        }
        #expect(h.store.value("dedupd:test:a") == "p:w1", "held for 36 s on a 10 s lease")
        try await h.dispatchDue()
        #expect(h.dispatched.count == 1)
    }

    @Test func aLostLeaseTakesTheMessageOutOfTheBuffer() async throws {
        var h = try Harness(window: .seconds(30), lease: .seconds(10))
        try await h.consume([msg("a", offset: 0), msg("b", offset: 1)])
        // Redis was unreachable past the lease; meanwhile other workers took both keys.
        h.advance(.seconds(11))
        h.store.put("dedupd:test:a", "d:other", ttl: .seconds(3600))
        h.store.put("dedupd:test:b", "p:other", ttl: .seconds(10))
        try await h.consume([])
        #expect(h.engine.counters.leasesLost == 2)
        #expect(h.engine.buffer.isEmpty)
        #expect(h.engine.counters.duplicatesStore == 1, "a: the other worker dispatched it")
        #expect(h.engine.parkedCount == 1, "b: still in flight elsewhere, parked")
        h.advance(.seconds(30))
        try await h.dispatchDue()
        #expect(h.dispatched.isEmpty, "neither is dispatched here")
    }

    @Test func failOpenLetsMessagesThroughUnclaimed() async throws {
        var h = try Harness()
        _ = h.engine.ingest(msg("a", offset: 0))
        let keys = h.engine.keysToClaim(now: h.clock.now)
        h.engine.applyClaimsWithoutStore(keys, now: h.clock.now)
        #expect(h.engine.counters.unclaimed == 1)
        #expect(h.store.value("dedupd:test:a") == nil)
        h.advance(.seconds(5))
        #expect(h.engine.takeDue(now: h.clock.now).count == 1)
    }

    @Test func tokenModeClaimsOnlyAfterTheTokenWasAccepted() async throws {
        var engine = DedupLedger(settings: DedupSettings(
            template: try KeyTemplate("header:message-id"), namespace: "test",
            token: try KeyTemplate("header:message-id")))
        let clock = TestClock()
        for (i, id) in ["ok", "old", "used", "nope"].enumerated() { _ = engine.ingest(msg(id, offset: Int64(i))) }
        #expect(engine.keysToClaim(now: clock.now).isEmpty, "nothing is claimed before its token is used")
        let pending = engine.tokensToUse()
        #expect(Set(pending.storeKeys) == Set(["ok", "old", "used", "nope"].map { TokenKey.storeKey($0, namespace: "test") }))
        #expect(pending.marks.allSatisfy { $0.hasPrefix("t/0/") })
        let outcomes: [TokenOutcome] = pending.keys.map {
            switch $0.raw {
            case "ok": .accepted
            case "old": .expired
            case "used": .reused
            default: .unknown
            }
        }
        let refused = engine.applyTokens(pending.keys, outcomes)
        #expect(Set(refused.map(\.0.reason)) == [.tokenExpired, .tokenReused, .tokenUnknown])
        #expect(engine.keysToClaim(now: clock.now).map(\.raw) == ["ok"])
        #expect(engine.counters.invalid == 3)
    }

    /// A claim answer applied after the next batch was polled and keyed: keys ingested meanwhile
    /// wait for the next claim, and a key whose partition was revoked meanwhile comes back as an
    /// orphan to release.
    @Test func claimAnswersArriveAfterTheNextBatch() throws {
        var h = try Harness()
        _ = h.engine.ingest(msg("a", offset: 0))
        _ = h.engine.ingest(msg("b", partition: 1, offset: 0))
        let asked = h.engine.keysToClaim(now: h.clock.now)
        #expect(asked.map(\.raw) == ["a", "b"])
        #expect(h.engine.ingest(msg("a", offset: 1)) == .localDuplicate(DedupKey(raw: "a", namespace: "test")))
        _ = h.engine.ingest(msg("c", offset: 2))
        _ = h.engine.revoke([TopicPartition(topic: "t", partition: 1)])
        let orphans = h.engine.applyClaims(asked, [.claimed, .claimed], now: h.clock.now)
        #expect(orphans.map(\.raw) == ["b"], "claimed after its partition was revoked: to be released")
        let waiting = h.engine.keysToClaim(now: h.clock.now)
        #expect(waiting.map(\.raw) == ["c"], "c waits for the next claim")
        h.engine.requestFailed(waiting)
        #expect(h.engine.buffer.count == 1)

        // Without a revocation the asked keys leave the front of the queue, later ones stay.
        _ = h.engine.ingest(msg("d", offset: 3))
        let next = h.engine.keysToClaim(now: h.clock.now)
        _ = h.engine.ingest(msg("e", offset: 4))
        #expect(h.engine.applyClaims(next, [.claimed, .claimed], now: h.clock.now).isEmpty)
        #expect(h.engine.keysToClaim(now: h.clock.now).map(\.raw) == ["e"])
        #expect(h.engine.buffer.count == 3)
    }

    /// Claims are sent after a batch is keyed and answered while other keys are dispatched. That
    /// is safe for new and parked keys (nothing dispatches them); a renewal is different, because
    /// its answer decides whether the buffered copy may go at all, so the request says how many
    /// renewals it carries and the engine starts no round before they are answered.
    @Test func claimAnswersArriveWhileAnotherRoundIsDispatched() throws {
        var h = try Harness(window: .seconds(10), lease: .seconds(16))
        _ = h.engine.ingest(msg("a", offset: 0))
        let first = h.engine.keysToClaim(now: h.clock.now)
        #expect(first.renewals == 0)
        h.engine.applyClaims(first, [.claimed], now: h.clock.now)

        // b arrives; its claim goes out, and a (its window over) is dispatched meanwhile.
        h.advance(.seconds(7))
        _ = h.engine.ingest(msg("b", offset: 1))
        let asked = h.engine.keysToClaim(now: h.clock.now)
        #expect(asked.map(\.raw) == ["b"])
        #expect(asked.renewals == 0, "a's lease (16 s) is not half used after 7 s")
        h.advance(.seconds(3))
        #expect(h.engine.takeDue(now: h.clock.now).map(\.key.raw) == ["a"])
        h.engine.dispatchSucceeded(DedupKey(raw: "a", namespace: "test"))
        h.engine.applyClaims(asked, [.claimed], now: h.clock.now)
        #expect(h.engine.keysToConfirm().map(\.raw) == ["a"])
        #expect(h.engine.buffer.count == 1, "b is in the window")

        // After 8 s of b's 16 s lease, b's claim is a renewal: the caller must have its answer
        // before dispatching b. An answer that finds b done elsewhere resolves the copy.
        h.advance(.seconds(8))
        _ = h.engine.ingest(msg("c", offset: 2))
        let renewal = h.engine.keysToClaim(now: h.clock.now)
        #expect(renewal.map(\.raw) == ["c", "b"])
        #expect(renewal.renewals == 1)
        h.engine.applyClaims(renewal, [.claimed, .done], now: h.clock.now)
        #expect(h.engine.takeDue(now: h.clock.now + .seconds(60)).map(\.key.raw) == ["c"], "b was done elsewhere")
        #expect(h.engine.counters.leasesLost == 1)
    }

    /// A renewal answered after its partition was revoked and the key read again must not be
    /// taken as the claim of the new copy: the release sent at revocation may have reached the
    /// store before it, so the new copy holds nothing until its own claim is answered.
    @Test func aLateRenewalAnswerIsStaleForTheKeyReadAgain() throws {
        var h = try Harness(window: .seconds(10), lease: .seconds(10))
        _ = h.engine.ingest(msg("a", offset: 0))
        h.engine.applyClaims(h.engine.keysToClaim(now: h.clock.now), [.claimed], now: h.clock.now)
        h.advance(.seconds(6))
        let renewal = h.engine.keysToClaim(now: h.clock.now)
        #expect(renewal.renewals == 1)
        #expect(h.engine.revoke([tp0]).map(\.raw) == ["a"])
        _ = h.engine.ingest(msg("a", offset: 0))
        #expect(h.engine.applyClaims(renewal, [.alreadyOwned], now: h.clock.now).isEmpty, "held again: not an orphan")
        #expect(h.engine.buffer.count == 0, "the new copy waits for its own claim")
        #expect(h.engine.keysToClaim(now: h.clock.now).map(\.raw) == ["a"])
    }

    @Test func tokenModeNeedsTheToken() throws {
        var engine = DedupLedger(settings: DedupSettings(
            template: try KeyTemplate("key"), namespace: "test", token: try KeyTemplate("header:form-token")))
        guard case .bad(let bad) = engine.ingest(msg(nil, offset: 0, key: "u1")) else {
            Issue.record("a message without its token is bad input")
            return
        }
        #expect(bad.reason == .missingHeader)
    }
}
