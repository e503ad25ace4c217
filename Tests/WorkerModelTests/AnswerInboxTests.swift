@testable import DedupCore
@testable import DedupService
import Synchronization
import Testing

/// The loop's waits and their timers: a wait ends at its deadline and no sooner, and waits that
/// an answer ended first leave their timer for the waits after them instead of each arming one.
@Suite struct AnswerInboxTests {
    /// A clock whose timers fire only when the test fires them.
    final class HandClock: LoopClock {
        let start = ContinuousClock.now
        private let timers = Mutex<[(deadline: ContinuousClock.Instant, fire: @Sendable () -> Void)]>([])
        var now: ContinuousClock.Instant { start }
        func schedule(at deadline: ContinuousClock.Instant, _ fire: @escaping @Sendable () -> Void) {
            timers.withLock { $0.append((deadline, fire)) }
        }
        var deadlines: [ContinuousClock.Instant] { timers.withLock { $0.map(\.deadline) } }
        /// Fires the timer armed for `deadline`, as the clock does once it passes.
        func fire(_ deadline: ContinuousClock.Instant) {
            let fire = timers.withLock { timers -> (@Sendable () -> Void)? in
                guard let i = timers.firstIndex(where: { $0.deadline == deadline }) else { return nil }
                return timers.remove(at: i).fire
            }
            fire?()
        }
    }

    let clock = HandClock()
    let inbox = AnswerInbox()
    func at(_ ms: Int) -> ContinuousClock.Instant { clock.start + .milliseconds(ms) }
    let answer = DedupEngine.Answer.deadLetters(RequestID(rawValue: 1), [nil])

    /// Starts a wait until `deadline` and returns once it is waiting with `timers` armed (a wait
    /// arms its timer just after it starts waiting).
    func waiting(until deadline: ContinuousClock.Instant, timers: Int) async -> Task<[DedupEngine.Answer], Never> {
        let task = Task { [inbox, clock] in await inbox.next(until: deadline, clock: clock) }
        while !inbox.isWaiting || clock.deadlines.count < timers { await Task.yield() }
        return task
    }

    @Test func waitsEndedByAnswersShareOneTimer() async {
        let first = await waiting(until: at(50), timers: 1)
        inbox.post(answer)
        #expect(await first.value.count == 1)
        // Later deadlines: the timer armed for 50 ms serves them.
        let second = await waiting(until: at(51), timers: 1)
        #expect(clock.deadlines == [at(50)])
        inbox.post(answer)
        #expect(await second.value.count == 1)
        let third = await waiting(until: at(60), timers: 1)
        #expect(clock.deadlines == [at(50)])
        // At 50 ms the wait until 60 ms goes on, on a timer of its own.
        clock.fire(at(50))
        #expect(clock.deadlines == [at(60)])
        clock.fire(at(60))
        #expect(await third.value.isEmpty, "the wait ended at its deadline with nothing")
    }

    @Test func anEarlierDeadlineArmsItsOwnTimer() async {
        let first = await waiting(until: at(50), timers: 1)
        inbox.post(answer)
        _ = await first.value
        let second = await waiting(until: at(20), timers: 2)
        #expect(clock.deadlines == [at(50), at(20)])
        clock.fire(at(20))
        #expect(await second.value.isEmpty)
        // The stale timer firing later ends nothing: the next wait (until 70 ms) is re-armed.
        let third = await waiting(until: at(70), timers: 1)
        clock.fire(at(50))
        #expect(clock.deadlines == [at(70)])
        inbox.post(answer)
        #expect(await third.value.count == 1)
    }
}
