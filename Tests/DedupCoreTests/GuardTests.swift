import DedupCore
import Synchronization
import Testing

/// The order lifecycle of the docs' worked example.
let orderGuard = EntityGuard(
    entity: try! KeyTemplate("json:/orderNo"), state: try! KeyTemplate("json:/status"), initial: ["created"],
    transitions: ["created": ["paid", "cancelled"], "paid": ["shipped", "refunded"], "shipped": ["delivered"]],
    retention: .seconds(3600))

func order(_ id: String, _ orderNo: String, _ status: String, partition: Int32 = 0, offset: Int64) -> InboundMessage {
    msg(id, partition: partition, offset: offset, value: #"{"orderNo":"\#(orderNo)","status":"\#(status)"}"#)
}

/// One worker's engine driven against the fake store on a test clock, the way `Worker` runs it:
/// every action carried out at once, answers fed back on the next wait, handlers that succeed
/// unless their key is in `failing`.
struct GuardWorld {
    var clock: TestClock
    let store: FakeClaimStore
    let owner: String
    var engine: DedupEngine
    var inbox: [DedupEngine.Answer] = []
    var toPoll: [SourceEvent] = []
    var dispatched: [Dispatch] = []
    var rejected: [DedupLedger.Rejection] = []
    var deadLetters: [DeadLetter] = []
    var failing: Set<String> = []
    /// Claim round trips to fail after the store applied them (the answer lost on the way).
    var claimAnswersLost = 0
    var committed: [TopicPartition: Int64] = [:]

    init(owner: String = "w1", store: FakeClaimStore = FakeClaimStore(), clock: TestClock = TestClock(),
         window: Duration = .milliseconds(100), lease: Duration = .seconds(10), onReject: EntityGuard.OnReject = .drop) throws {
        self.owner = owner
        self.store = store
        self.clock = clock
        var g = orderGuard
        g.onReject = onReject
        var settings = DedupSettings(
            template: try KeyTemplate("header:message-id"), namespace: "orders", window: window, lease: lease, layout: .keys)
        settings.entityGuard = g
        settings.holdsDeadLetters = onReject == .deadLetter
        engine = DedupEngine(
            settings: settings, options: .init(handlerMaxBatch: 100, deadLetters: onReject == .deadLetter), now: clock.now, seed: 1)
        store.setNow(clock.now)
        toPoll = [.assigned((0..<6).map { TopicPartition(topic: "t", partition: $0) })]
    }

    mutating func send(_ messages: [InboundMessage]) { toPoll += messages.map { .message($0) } }

    /// Runs the loop for `duration` of test time.
    mutating func run(for duration: Duration) {
        let end = clock.now + duration
        var steps = 0
        while clock.now < end, steps < 100_000 {
            steps += 1
            let now = clock.now
            switch engine.nextAction(now: now) {
            case .poll(let timeout):
                let events = toPoll
                toPoll = []
                engine.handle(.polled(events), now: now)
                if events.isEmpty, inbox.isEmpty { advance(max(timeout, .milliseconds(1))) }
            case .wait(let until):
                let answers = inbox
                inbox = []
                engine.handle(.answered(answers), now: now)
                if answers.isEmpty { advance(max(until - now, .milliseconds(1))) }
            case .claim(let id, let groups, let holds):
                let claims = Result { try store.claim(groups, owner: owner) }
                let held = holds.isEmpty ? .success([]) : result(store.requestHolds(holds, owner: owner))
                switch (claims, held) {
                case (.success, .success) where claimAnswersLost > 0:
                    claimAnswersLost -= 1
                    inbox.append(.claims(id, .failure(FakeClaimStore.Down())))
                case (.success(let c), .success(let h)): inbox.append(.claims(id, .success(c), holds: h))
                case (.failure(let e), _), (_, .failure(let e)): inbox.append(.claims(id, .failure(e)))
                }
            case .confirm(let id, let groups, let moves):
                let confirms = Result { try store.confirm(groups, owner: owner) }
                let moved = moves.isEmpty ? .success([]) : result(store.requestMoves(moves, owner: owner))
                switch (confirms, moved) {
                case (.success(let c), .success(let m)): inbox.append(.confirms(id, .success(c), moves: m))
                case (.failure(let e), _), (_, .failure(let e)): inbox.append(.confirms(id, .failure(e)))
                }
            case .release(let id, let keys, let unholds):
                let released = Result { try store.release(keys, owner: owner) }
                if !unholds.isEmpty { _ = result(store.requestUnholds(unholds, owner: owner)) }
                inbox.append(.releases(id, released))
            case .useTokens(let id, let tokens, _):
                inbox.append(.tokens(id, .success(tokens.map { _ in .accepted })))
            case .dispatch(let id, let due):
                var results: [DispatchResult] = []
                for d in due {
                    if failing.contains(d.key.raw) {
                        results.append(.gaveUp(error: "boom", attempts: 1))
                    } else {
                        dispatched.append(d)
                        results.append(.success)
                    }
                }
                inbox.append(.round(id, results))
            case .deadLetter(let id, let letters):
                deadLetters += letters
                inbox.append(.deadLetters(id, letters.map { _ in nil }))
            case .storeOffsets(let positions):
                committed.merge(positions) { _, new in new }
            case .pause, .resume:
                break
            case .report(let report):
                if case .rejectedTransition(let r) = report { rejected.append(r) }
            case .finished:
                return
            }
        }
    }

    mutating func advance(_ d: Duration) {
        clock.advance(d)
        store.setNow(clock.now)
    }

    /// The fake store answers at once.
    func result<T: Sendable>(_ reply: StoreReply<T>) -> Result<T, any Error> {
        let out = Mutex<Result<T, any Error>?>(nil)
        reply.whenAnswered { r in out.withLock { $0 = r } }
        return out.withLock { $0! }
    }

    var dispatchedIDs: [String] { dispatched.map(\.key.raw) }
    var rejectedIDs: [String] { rejected.map(\.key.raw) }
}

@Suite struct EntityGuardTableTests {
    @Test func theTableSaysWhichTransitionsAreAllowed() {
        #expect(orderGuard.allows(from: nil, to: "created"))
        #expect(!orderGuard.allows(from: nil, to: "paid"), "an unknown entity may only enter an initial state")
        #expect(orderGuard.allows(from: "created", to: "paid"))
        #expect(!orderGuard.allows(from: "paid", to: "created"), "backwards")
        #expect(!orderGuard.allows(from: "created", to: "shipped"), "a skipped state")
        #expect(!orderGuard.allows(from: "paid", to: "paid"), "the same state again")
        #expect(!orderGuard.allows(from: "delivered", to: "refunded"), "from a final state")
        #expect(orderGuard.allowedFrom("created") == [EntityGuard.noState])
        #expect(orderGuard.allowedFrom("refunded") == ["paid"])
        #expect(orderGuard.allowedFrom("unknown").isEmpty)
    }

    @Test func tablesThatCannotWorkAreRefused() {
        var g = orderGuard
        g.transitions = [:]
        #expect(g.problem()?.key == "guard.transitions")
        g = orderGuard
        g.initial = []
        #expect(g.problem()?.key == "guard.initial")
        g = orderGuard
        g.transitions["payed"] = ["shipped"]
        #expect(g.problem()?.problem.contains("\"payed\"") == true, "a state left from but never entered")
        #expect(orderGuard.problem() == nil)
        #expect(EntityGuard.parseTransitions("created=paid|cancelled;paid=shipped") == ["created": ["paid", "cancelled"], "paid": ["shipped"]])
        #expect(EntityGuard.parseTransitions("created") == nil)
    }
}

@Suite struct GuardEngineTests {
    @Test func onlyTheLegalFirstMovesOfAnEntityAreDispatched() throws {
        var w = try GuardWorld()
        // One batch, in offset order: the second "paid" has a new id (a double click), the stale
        // "created" comes after "shipped", "refunded" can only follow "paid".
        w.send([
            order("m1", "o1", "created", offset: 0),
            order("m2", "o1", "paid", offset: 1),
            order("m3", "o1", "paid", offset: 2),
            order("m4", "o1", "shipped", offset: 3),
            order("m5", "o1", "created", offset: 4),
            order("m6", "o1", "refunded", offset: 5),
            order("m1", "o1", "created", offset: 6),  // an exact repeat
        ])
        w.run(for: .seconds(5))
        #expect(w.dispatchedIDs == ["m1", "m2", "m4"])
        #expect(w.rejectedIDs == ["m3", "m5", "m6"])
        #expect(w.rejected.map { "\($0.from ?? "-")>\($0.to)" } == ["paid>paid", "shipped>created", "shipped>refunded"])
        #expect(w.engine.counters.duplicates == 1)
        #expect(w.engine.counters.rejectedTransitions == 3)
        #expect(w.engine.counters.rejectedTransitionsByRoute == [0: 3])
        #expect(w.store.entityState("dedupd-entity:orders:o1") == "shipped")
        #expect(w.committed[TopicPartition(topic: "t", partition: 0)] == 7, "every message resolved, in order")
        #expect(w.engine.ledger.isIdle)
    }

    @Test func entitiesAreJudgedApartAndOutOfOrderMovesAreRejected() throws {
        var w = try GuardWorld()
        w.send([
            order("a1", "A", "paid", offset: 0),  // before its "created": an unknown entity may only be created
            order("b1", "B", "created", partition: 1, offset: 0),
            order("a2", "A", "created", offset: 1),
            order("b2", "B", "shipped", partition: 1, offset: 1),  // skips "paid"
            order("b3", "B", "paid", partition: 1, offset: 2),
            order("a3", "A", "cancelled", offset: 2),
            order("a4", "A", "paid", offset: 3),  // "cancelled" is final
        ])
        w.run(for: .seconds(5))
        #expect(Set(w.dispatchedIDs) == ["b1", "a2", "b3", "a3"])
        #expect(Set(w.rejectedIDs) == ["a1", "b2", "a4"])
        #expect(w.store.entityState("dedupd-entity:orders:A") == "cancelled")
        #expect(w.store.entityState("dedupd-entity:orders:B") == "paid")
    }

    @Test func aRepeatOfARejectedMessageIsADuplicateAndARepeatWithANewIDIsJudged() throws {
        var w = try GuardWorld()
        w.send([order("m1", "o1", "created", offset: 0), order("m2", "o1", "shipped", offset: 1)])
        w.run(for: .seconds(2))
        w.send([order("m3", "o1", "paid", offset: 2), order("m2", "o1", "shipped", offset: 3), order("m4", "o1", "shipped", offset: 4)])
        w.run(for: .seconds(2))
        #expect(w.dispatchedIDs == ["m1", "m3", "m4"], "m2's resend stays rejected; the same move with a new id is judged anew")
        #expect(w.rejectedIDs == ["m2"])
        #expect(w.engine.counters.duplicatesStore == 1)
    }

    @Test func aHandlerThatGivesUpLeavesTheEntityWhereItWas() throws {
        var w = try GuardWorld()
        w.failing = ["m2"]
        w.send([order("m1", "o1", "created", offset: 0), order("m2", "o1", "paid", offset: 1), order("m3", "o1", "cancelled", offset: 2)])
        w.run(for: .seconds(3))
        #expect(w.dispatchedIDs == ["m1", "m3"], "m2 never moved the order, so cancelling it is still allowed")
        #expect(w.store.entityState("dedupd-entity:orders:o1") == "cancelled")
        #expect(w.store.entities.withLock { $0["dedupd-entity:orders:o1"]?.hold == nil }, "m2's hold was given back")
    }

    @Test func aLostClaimAnswerGivesItsHoldBackBeforeTheNextAttempt() throws {
        // The store took the claim and the hold, but the worker saw the round trip fail: the
        // next attempt holds under a new id, so the old hold must not block it for a lease.
        var w = try GuardWorld(lease: .seconds(30))
        w.claimAnswersLost = 1
        w.send([order("m1", "o1", "created", offset: 0)])
        w.run(for: .seconds(3))
        #expect(w.dispatchedIDs == ["m1"], "dispatched well within the 30 s lease")
        #expect(w.engine.counters.entityBusy == 0)
        #expect(w.store.entityState("dedupd-entity:orders:o1") == "created")
    }

    @Test func twoWorkersCompetingForOneEntityDispatchOneMove() throws {
        let store = FakeClaimStore()
        var a = try GuardWorld(owner: "a", store: store)
        var b = try GuardWorld(owner: "b", store: store, clock: a.clock)
        a.send([order("m1", "o1", "created", offset: 0)])
        a.run(for: .seconds(1))
        // A double click that two producers sent to different partitions (and so workers).
        a.send([order("p1", "o1", "paid", partition: 1, offset: 0)])
        b.send([order("p2", "o1", "paid", partition: 2, offset: 0)])
        for _ in 0..<40 {
            a.run(for: .milliseconds(50))
            b.clock = a.clock
            b.run(for: .milliseconds(50))
            a.clock = b.clock
        }
        let paid = (a.dispatchedIDs + b.dispatchedIDs).filter { $0.hasPrefix("p") }
        #expect(paid.count == 1, "exactly one of the two payments: \(paid)")
        #expect((a.rejectedIDs + b.rejectedIDs).count == 1)
        #expect(a.engine.counters.entityBusy + b.engine.counters.entityBusy >= 1, "the second asked while the first held the order")
        #expect(store.entityState("dedupd-entity:orders:o1") == "paid")
    }

    @Test func aCrashedWorkersHoldRunsOutAndItsMessageIsDispatchedByTheNext() throws {
        let store = FakeClaimStore()
        var a = try GuardWorld(owner: "a", store: store, lease: .seconds(2))
        a.send([order("m1", "o1", "created", offset: 0)])
        a.run(for: .milliseconds(50))  // claimed and held, still in the window
        #expect(a.dispatched.isEmpty)
        #expect(store.entities.withLock { $0["dedupd-entity:orders:o1"]?.hold?.owner } == "a")
        // a is killed: nothing of it runs again. b reads the message again.
        var b = try GuardWorld(owner: "b", store: store, clock: a.clock, lease: .seconds(2))
        b.send([order("m1", "o1", "created", offset: 0), order("m2", "o1", "paid", offset: 1)])
        b.run(for: .seconds(5))
        #expect(b.dispatchedIDs == ["m1", "m2"], "nothing lost once a's claim and hold ran out")
        #expect(store.entityState("dedupd-entity:orders:o1") == "paid")
    }

    @Test func rejectedMessagesGoToTheDeadLetterTopicBeforeTheyAreCommitted() throws {
        var w = try GuardWorld(onReject: .deadLetter)
        w.send([order("m1", "o1", "paid", offset: 0), order("m2", "o1", "created", offset: 1)])
        w.run(for: .seconds(2))
        #expect(w.dispatchedIDs == ["m2"])
        #expect(w.deadLetters.map(\.reason) == [DeadLetter.rejectedTransition])
        #expect(w.deadLetters.first?.error.contains("paid") == true)
        #expect(w.engine.counters.deadLettered == 1)
        #expect(w.committed[TopicPartition(topic: "t", partition: 0)] == 2)
    }

    @Test func revokingAPartitionGivesBackTheHoldsOfItsWindow() throws {
        var w = try GuardWorld(window: .seconds(1))
        w.send([order("m1", "o1", "created", offset: 0)])
        w.run(for: .milliseconds(30))
        #expect(w.store.entities.withLock { $0["dedupd-entity:orders:o1"]?.hold != nil })
        w.toPoll.append(.revoked([TopicPartition(topic: "t", partition: 0)]))
        w.run(for: .milliseconds(100))
        #expect(w.dispatched.isEmpty)
        #expect(w.store.entities.withLock { $0["dedupd-entity:orders:o1"]?.hold == nil }, "the next owner can judge it at once")
        #expect(w.engine.ledger.isIdle)
    }
}
