import DedupCore
import Testing

/// Backpressure seen by the engine: the buffer's bounds count every message held, wherever it
/// is in the flow, and a paused worker is not idle. No I/O: the actions are answered by hand on a
/// test clock.
@Suite struct BackpressureTests {
    let template = try! KeyTemplate("header:message-id")
    let tp0 = TopicPartition(topic: "t", partition: 0)

    /// Runs the engine until it polls or waits, answering rounds and confirms as a handler and
    /// Redis would (claims are left to the test); returns every action it took.
    func settle(_ engine: inout DedupEngine, now: ContinuousClock.Instant) -> [DedupEngine.Action] {
        var actions: [DedupEngine.Action] = []
        for _ in 0..<50 {
            let action = engine.nextAction(now: now)
            actions.append(action)
            switch action {
            case .dispatch(let id, let due):
                engine.handle(.answered([.round(id, due.map { _ in .success })]), now: now)
            case .confirm(let id, let groups, _):
                engine.handle(.answered([.confirms(id, .success(groups.flatMap(\.keys).map { _ in .confirmed }))]), now: now)
            case .poll, .wait, .finished:
                return actions
            default:
                continue
            }
        }
        return actions
    }

    func paused(_ actions: [DedupEngine.Action]) -> Bool { actions.contains { if case .pause = $0 { true } else { false } } }
    func resumed(_ actions: [DedupEngine.Action]) -> Bool { actions.contains { if case .resume = $0 { true } else { false } } }
    func idle(_ actions: [DedupEngine.Action]) -> Bool {
        actions.contains { if case .report(.idle) = $0 { true } else { false } }
    }

    /// Redis answers slowly: the messages waiting for their claim are held outside the window,
    /// and they alone fill the bound. The worker pauses, stays paused past `stop_when_idle`
    /// (nothing arrives because nothing is read), and counts idle time from its resume.
    @Test func messagesWaitingForTheirClaimFillTheBoundAndAPausedWorkerIsNotIdle() throws {
        let start = ContinuousClock.now
        var engine = DedupEngine(
            settings: DedupSettings(template: template, window: .milliseconds(100), bufferMaxMessages: 2),
            options: .init(stopWhenIdle: .seconds(1)), now: start)
        engine.handle(.polled([.assigned([tp0]), .message(msg("a", offset: 0)), .message(msg("b", offset: 1))]), now: start)
        var actions = settle(&engine, now: start)
        guard case .claim(let claim, let groups, _) = actions.first else {
            Issue.record("expected a claim first, got \(actions)")
            return
        }
        #expect(engine.ledger.buffer.count == 0 && engine.ledger.heldMessages == 2)
        #expect(paused(actions), "two messages held, none in the window: the bound is reached")

        // Five seconds without an answer and without a message: paused, not idle.
        actions = settle(&engine, now: start + .seconds(5))
        #expect(!idle(actions))

        let answered = start + .seconds(5)
        engine.handle(.answered([.claims(claim, .success(groups.flatMap(\.keys).map { _ in .claimed }))]), now: answered)
        actions = settle(&engine, now: answered + .milliseconds(200))
        #expect(engine.ledger.heldMessages == 0)
        #expect(resumed(actions) && !idle(actions), "resumed; the idle time starts now, not at the last message")
        #expect(!idle(settle(&engine, now: answered + .milliseconds(900))))
        #expect(idle(settle(&engine, now: answered + .milliseconds(1300))))
    }
}
