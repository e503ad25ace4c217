import DedupCore
import Testing

/// Cooperative rebalancing seen by the engine (issue 19): a revocation, assignment or loss of
/// some partitions is an event like any other. What stays keeps its window, claims and commit
/// position; what goes is dropped and its claims given back; the counts say how much moved and
/// how much its next owner reads again. No I/O: the engine's actions are answered by hand on a
/// test clock.
@Suite struct IncrementalRebalanceTests {
    let template = try! KeyTemplate("header:message-id")
    func tp(_ p: Int32) -> TopicPartition { TopicPartition(topic: "t", partition: p) }

    /// An engine holding `a` (p0, offset 0), `b` (p1, offsets 0 and 1: a repeat) and `c` (p2),
    /// claimed and waiting in a 1 s window.
    func engineHoldingThreePartitions(now: ContinuousClock.Instant, drain: Duration = .zero) throws -> DedupEngine {
        var engine = DedupEngine(
            settings: DedupSettings(template: template, window: .seconds(1)), options: .init(shutdownDrain: drain), now: now)
        engine.handle(.polled([.assigned([tp(0), tp(1), tp(2)]),
                               .message(msg("a", partition: 0, offset: 0)), .message(msg("b", partition: 1, offset: 0)),
                               .message(msg("b", partition: 1, offset: 1)), .message(msg("c", partition: 2, offset: 0))]), now: now)
        guard case .claim(let id, let groups, _) = engine.nextAction(now: now) else { throw Unexpected("expected a claim") }
        engine.handle(.answered([.claims(id, .success(Array(repeating: .claimed, count: groups.flatMap(\.keys).count)))]), now: now)
        #expect(engine.ledger.buffer.count == 3)
        return engine
    }

    struct Unexpected: Error, CustomStringConvertible {
        let description: String
        init(_ d: String) { description = d }
    }

    /// Answers a release, a round or a confirm as Redis and a handler would (every key given
    /// back, dispatched, confirmed) and notes what it released and dispatched; false for any
    /// other action.
    func answer(
        _ action: DedupEngine.Action, _ engine: inout DedupEngine, now: ContinuousClock.Instant,
        released: inout [String], dispatched: inout [String]
    ) -> Bool {
        switch action {
            case .release(let id, let keys, _):
                released += keys
                engine.handle(.answered([.releases(id, .success(keys.map { _ in true }))]), now: now)
            case .dispatch(let id, let due):
                dispatched += due.map(\.key.raw)
                engine.handle(.answered([.round(id, due.map { _ in .success })]), now: now)
            case .confirm(let id, let groups, _):
                engine.handle(.answered([.confirms(id, .success(groups.flatMap(\.keys).map { _ in .confirmed }))]), now: now)
        default:
            return false
        }
        return true
    }

    /// Runs the engine until it polls or waits, answering releases and rounds as Redis and a
    /// handler would; returns what it released and dispatched.
    func settle(_ engine: inout DedupEngine, now: ContinuousClock.Instant) -> (released: [String], dispatched: [String]) {
        var released: [String] = [], dispatched: [String] = []
        for _ in 0..<50 {
            let action = engine.nextAction(now: now)
            if answer(action, &engine, now: now, released: &released, dispatched: &dispatched) { continue }
            switch action {
            case .poll, .wait:
                return (released, dispatched)
            default:
                continue
            }
        }
        return (released, dispatched)
    }

    @Test func revokingSomePartitionsKeepsTheWindowOfTheRest() throws {
        let start = ContinuousClock.now
        var engine = try engineHoldingThreePartitions(now: start)
        engine.handle(.polled([.revoked([tp(1)])]), now: start + .milliseconds(500))
        let afterRevoke = settle(&engine, now: start + .milliseconds(500))
        #expect(afterRevoke.released == ["dedupd:default:b"], "only the revoked partition's claim is given back")
        #expect(afterRevoke.dispatched.isEmpty, "the window of what stays is not cut short")
        #expect(engine.assignment == [tp(0), tp(2)])
        #expect(engine.ledger.buffer.count == 2)

        // A partition that moves here is added; nothing already held is touched.
        engine.handle(.polled([.assigned([tp(3)]), .message(msg("d", partition: 3, offset: 7))]), now: start + .milliseconds(600))
        #expect(engine.assignment == [tp(0), tp(2), tp(3)])
        let afterWindow = settle(&engine, now: start + .seconds(1))
        #expect(afterWindow.dispatched.sorted() == ["a", "c"], "kept partitions dispatch when their window ends")

        let c = engine.counters
        #expect(c.rebalances == 2)
        #expect(c.partitionsAssigned == 4)
        #expect(c.partitionsRevoked == 1)
        #expect(c.partitionsLost == 0)
        #expect(c.rereadAfterRebalance == 2, "p1 read offsets 0 and 1 and stored neither: its next owner reads both again")
    }

    @Test func lostPartitionsAreDroppedLikeRevokedOnesAndCountedApart() throws {
        let start = ContinuousClock.now
        var engine = try engineHoldingThreePartitions(now: start)
        // p0 resolves and its position is stored before the loss: nothing of it is read again.
        _ = settle(&engine, now: start + .seconds(1))
        engine.handle(.polled([.message(msg("e", partition: 0, offset: 1)), .lost([tp(0), tp(2)])]), now: start + .seconds(1))
        let after = settle(&engine, now: start + .seconds(1))
        #expect(engine.assignment == [tp(1)])
        #expect(after.released.isEmpty || after.released == ["dedupd:default:e"])
        let c = engine.counters
        #expect(c.partitionsLost == 2)
        #expect(c.partitionsRevoked == 0)
        #expect(c.rereadAfterRebalance == 1, "p0: offset 1 read past the stored position 1; p2 was stored to 1")
    }

    /// Runs a stopping engine to `.finished`, letting the test clock jump to each wait's end.
    func runToFinish(_ engine: inout DedupEngine, from start: ContinuousClock.Instant) -> (released: [String], dispatched: [String], finishedAt: ContinuousClock.Instant) {
        var now = start
        var released: [String] = [], dispatched: [String] = []
        for _ in 0..<200 {
            let action = engine.nextAction(now: now)
            if answer(action, &engine, now: now, released: &released, dispatched: &dispatched) { continue }
            switch action {
            case .wait(let until):
                now = max(now, until)
                engine.handle(.answered([]), now: now)
            case .poll:
                Issue.record("a stopping engine polled")
                return (released, dispatched, now)
            case .finished:
                return (released, dispatched, now)
            default:
                continue
            }
        }
        Issue.record("did not finish")
        return (released, dispatched, now)
    }

    /// SIGTERM in a rolling restart: what the window holds and is due within the drain is
    /// dispatched before the worker leaves, so its next owner reads nothing again; nothing is
    /// polled meanwhile.
    @Test func stoppingFinishesTheWindowWithinTheDrain() throws {
        let start = ContinuousClock.now
        var engine = try engineHoldingThreePartitions(now: start, drain: .seconds(5))
        engine.handle(.stop, now: start + .milliseconds(200))
        let end = runToFinish(&engine, from: start + .milliseconds(200))
        #expect(end.dispatched.sorted() == ["a", "b", "c"])
        #expect(end.released.isEmpty)
        #expect(end.finishedAt == start + .seconds(1), "done when the window ended, not at the end of the drain")
        #expect(engine.counters.rereadAfterRebalance == 0)
        #expect(engine.storedPositions == [tp(0): 1, tp(1): 2, tp(2): 1])
    }

    /// SIGTERM while Redis is briefly down: the dispatched messages' confirms fail, and are tried
    /// again with the store's backoff until they go through, so the next owner does not dispatch
    /// them again; their offsets are stored and nothing is released.
    @Test func confirmsThatFailWhileStoppingAreTriedAgain() throws {
        let start = ContinuousClock.now
        var engine = try engineHoldingThreePartitions(now: start, drain: .seconds(5))
        engine.handle(.stop, now: start + .milliseconds(200))
        var now = start + .milliseconds(200)
        var failures = 0, confirmed: [String] = [], released: [String] = []
        loop: for _ in 0..<300 {
            switch engine.nextAction(now: now) {
            case .release(let id, let keys, _):
                released += keys
                engine.handle(.answered([.releases(id, .success(keys.map { _ in true }))]), now: now)
            case .dispatch(let id, let due):
                engine.handle(.answered([.round(id, due.map { _ in .success })]), now: now)
            case .confirm(let id, let groups, _):
                if failures < 2 {
                    failures += 1
                    engine.handle(.answered([.confirms(id, .failure(Unexpected("redis down")))]), now: now)
                } else {
                    confirmed += groups.flatMap(\.keys)
                    engine.handle(.answered([.confirms(id, .success(groups.flatMap(\.keys).map { _ in .confirmed }))]), now: now)
                }
            case .wait(let until):
                now = max(now, until)
                engine.handle(.answered([]), now: now)
            case .finished:
                break loop
            default:
                continue
            }
        }
        #expect(engine.isFinished)
        #expect(failures == 2)
        #expect(confirmed.count == 3, "the round's three keys confirmed on the third try")
        #expect(released.isEmpty)
        #expect(engine.storedPositions == [tp(0): 1, tp(1): 2, tp(2): 1])
        #expect(now < start + .seconds(8), "within three quarters of the shutdown deadline")
    }

    /// A window longer than the drain: released at once, as without a drain.
    @Test func aWindowLongerThanTheDrainIsReleased() throws {
        let start = ContinuousClock.now
        var engine = try engineHoldingThreePartitions(now: start, drain: .milliseconds(500))
        engine.handle(.stop, now: start + .milliseconds(200))
        let end = runToFinish(&engine, from: start + .milliseconds(200))
        #expect(end.dispatched.isEmpty)
        #expect(end.released.count == 3)
        #expect(end.finishedAt == start + .milliseconds(200))
        #expect(engine.counters.rereadAfterRebalance == 4)
    }
}
