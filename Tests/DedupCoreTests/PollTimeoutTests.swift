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
