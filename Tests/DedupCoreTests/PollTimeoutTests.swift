import DedupCore
import Testing

/// How long the loop blocks in poll: until the next window ends, never longer than 100 ms, and
/// in whole milliseconds rounded up (librdkafka's unit), so a window ending within the next
/// millisecond is waited for rather than polled for in a spin.
@Suite struct PollTimeoutTests {
    let template = try! KeyTemplate("header:message-id")

    /// An engine holding one message whose window (100 ms) started at `start`.
    func engineWithOneBufferedMessage(start: ContinuousClock.Instant) -> DedupEngine {
        var engine = DedupEngine(settings: DedupSettings(template: template, window: .milliseconds(100)), now: start)
        engine.handle(.polled([.assigned([TopicPartition(topic: "t", partition: 0)]), .message(InboundMessage(
            topic: "t", partition: 0, offset: 0, value: Array("{}".utf8),
            headers: [MessageHeader(name: "message-id", value: Array("a".utf8))]))]), now: start)
        guard case .claim(let id, _, _) = engine.nextAction(now: start) else {
            Issue.record("expected a claim")
            return engine
        }
        engine.handle(.answered([.claims(id, .success([.claimed]))]), now: start)
        return engine
    }

    @Test func waitsUntilTheWindowEndsInWholeMillisecondsRoundedUp() {
        let start = ContinuousClock.now
        let engine = engineWithOneBufferedMessage(start: start)
        #expect(engine.ledger.nextWakeup == start + .milliseconds(100))
        #expect(engine.pollTimeout(now: start) == .milliseconds(100))
        #expect(engine.pollTimeout(now: start + .microseconds(60_300)) == .milliseconds(40))
        // 0.4 ms left: one millisecond, not zero (zero would spin through empty passes).
        #expect(engine.pollTimeout(now: start + .microseconds(99_600)) == .milliseconds(1))
        #expect(engine.pollTimeout(now: start + .milliseconds(100)) == .zero)
        #expect(engine.pollTimeout(now: start + .milliseconds(150)) == .zero)
    }

    @Test func anEmptyLoopWaitsAtMostOneHundredMilliseconds() {
        let now = ContinuousClock.now
        var engine = DedupEngine(settings: DedupSettings(template: template), now: now)
        #expect(engine.pollTimeout(now: now) == .milliseconds(100))
        guard case .poll(let timeout) = engine.nextAction(now: now) else {
            Issue.record("expected a poll")
            return
        }
        #expect(timeout == .milliseconds(100))
    }
}

/// Claims of polled keys wait `claimGather` for the keys of the next fetches, so one round trip
/// carries several fetches' keys; the loop blocks in poll no longer than until they go out.
@Suite struct ClaimGatherTests {
    let template = try! KeyTemplate("header:message-id")
    let partition = TopicPartition(topic: "t", partition: 0)

    func message(_ id: String, offset: Int64) -> SourceEvent {
        .message(InboundMessage(
            topic: "t", partition: 0, offset: offset, value: Array("{}".utf8),
            headers: [MessageHeader(name: "message-id", value: Array(id.utf8))]))
    }

    func engine(batchSize: Int = 1000, start: ContinuousClock.Instant) -> DedupEngine {
        var engine = DedupEngine(
            settings: DedupSettings(template: template, window: .milliseconds(100)),
            options: .init(batchSize: batchSize, claimGather: .milliseconds(10)), now: start)
        engine.handle(.polled([.assigned([partition])]), now: start)
        return engine
    }

    @Test func claimsOfSeveralPollsGoOutTogetherWhenTheGatherEnds() {
        let start = ContinuousClock.now
        var engine = engine(start: start)
        engine.handle(.polled([message("a", offset: 0)]), now: start)
        guard case .poll(let timeout) = engine.nextAction(now: start) else {
            Issue.record("the claim went out at once")
            return
        }
        #expect(timeout == .milliseconds(10))
        let later = start + .milliseconds(4)
        engine.handle(.polled([message("b", offset: 1)]), now: later)
        guard case .poll(let rest) = engine.nextAction(now: later) else {
            Issue.record("the claim went out before the gather ended")
            return
        }
        #expect(rest == .milliseconds(6), "the gather counts from the first key's poll")
        guard case .claim(_, let groups, _) = engine.nextAction(now: start + .milliseconds(10)) else {
            Issue.record("no claim when the gather ended")
            return
        }
        #expect(groups.flatMap(\.keys).count == 2)
    }

    /// The gather is the window's: a message is due a window after its poll, not after its
    /// claim went out.
    @Test func theWindowCountsFromThePoll() {
        let start = ContinuousClock.now
        var engine = engine(start: start)
        engine.handle(.polled([message("a", offset: 0)]), now: start)
        let sent = start + .milliseconds(10)
        guard case .claim(let id, _, _) = engine.nextAction(now: sent) else {
            Issue.record("no claim when the gather ended")
            return
        }
        engine.handle(.answered([.claims(id, .success([.claimed]))]), now: sent + .milliseconds(1))
        #expect(engine.ledger.nextWakeup == start + .milliseconds(100))
        guard case .dispatch(_, let due) = engine.nextAction(now: start + .milliseconds(100)) else {
            Issue.record("not dispatched a window after its poll")
            return
        }
        #expect(due.map(\.key.raw) == ["a"])
    }

    @Test func aBatchsWorthGoesOutAtOnce() {
        let start = ContinuousClock.now
        var engine = engine(batchSize: 2, start: start)
        engine.handle(.polled([message("a", offset: 0), message("b", offset: 1)]), now: start)
        guard case .claim(_, let groups, _) = engine.nextAction(now: start) else {
            Issue.record("a full batch waited")
            return
        }
        #expect(groups.flatMap(\.keys).count == 2)
    }

    @Test func withoutAGatherClaimsGoOutAtOnce() {
        let start = ContinuousClock.now
        var engine = DedupEngine(settings: DedupSettings(template: template, window: .milliseconds(100)), now: start)
        engine.handle(.polled([.assigned([partition]), message("a", offset: 0)]), now: start)
        guard case .claim = engine.nextAction(now: start) else {
            Issue.record("expected a claim")
            return
        }
    }
}
