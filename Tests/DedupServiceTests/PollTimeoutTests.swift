import DedupCore
import Testing
@testable import DedupService

/// How long the loop blocks in poll: until the next window ends, never longer than 100 ms, and
/// in whole milliseconds rounded up (librdkafka's unit), so a window ending within the next
/// millisecond is waited for rather than polled for in a spin.
@Suite struct PollTimeoutTests {
    /// A loop state holding one message whose window (100 ms) started at `start`.
    func stateWithOneBufferedMessage(start: ContinuousClock.Instant) throws -> Worker.LoopState {
        var engine = DedupEngine(settings: DedupSettings(template: try KeyTemplate("header:message-id"), window: .milliseconds(100)))
        _ = engine.ingest(InboundMessage(
            topic: "t", partition: 0, offset: 0, value: Array("{}".utf8),
            headers: [MessageHeader(name: "message-id", value: Array("a".utf8))]))
        let keys = engine.keysToClaim(now: start)
        engine.applyClaims(keys, [.claimed], now: start)
        return Worker.LoopState(engine: engine, lastActivity: start)
    }

    @Test func waitsUntilTheWindowEndsInWholeMillisecondsRoundedUp() throws {
        let start = ContinuousClock.now
        let state = try stateWithOneBufferedMessage(start: start)
        #expect(state.engine.nextWakeup == start + .milliseconds(100))
        #expect(state.pollTimeout(now: start, failOpen: false) == .milliseconds(100))
        #expect(state.pollTimeout(now: start + .microseconds(60_300), failOpen: false) == .milliseconds(40))
        // 0.4 ms left: one millisecond, not zero (zero would spin through empty passes).
        #expect(state.pollTimeout(now: start + .microseconds(99_600), failOpen: false) == .milliseconds(1))
        #expect(state.pollTimeout(now: start + .milliseconds(100), failOpen: false) == .zero)
        #expect(state.pollTimeout(now: start + .milliseconds(150), failOpen: false) == .zero)
    }

    @Test func anEmptyLoopWaitsAtMostOneHundredMilliseconds() throws {
        let now = ContinuousClock.now
        let state = Worker.LoopState(engine: DedupEngine(settings: DedupSettings(template: try KeyTemplate("header:message-id"))), lastActivity: now)
        #expect(state.pollTimeout(now: now, failOpen: false) == .milliseconds(100))
    }
}
