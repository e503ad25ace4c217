import Foundation
import Synchronization
import Testing

@testable import DedupService

/// The loop's own thread: a task that prefers it runs there, before and after it waits; its
/// timers fire there, in deadline order; a task that outlives it still runs.
@Suite struct LoopThreadTests {
    @Test func aTaskThatPrefersItRunsOnItBeforeAndAfterItWaits() async {
        let thread = LoopThread(name: "test-loop")
        defer { thread.stop() }
        let names = await withTaskExecutorPreference(thread) {
            let before = thread.isCurrent
            // Resumed from another thread, as the loop is by a store's answer.
            await withCheckedContinuation { c in DispatchQueue.global().async { c.resume() } }
            return [before, thread.isCurrent]
        }
        #expect(names == [true, true])
    }

    @Test func timersFireOnItInDeadlineOrder() async {
        let thread = LoopThread(name: "test-timers")
        defer { thread.stop() }
        let fired = Mutex<[(Int, Bool)]>([])
        let start = ContinuousClock.now
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            for n in [30, 10, 20] {
                thread.schedule(at: start + .milliseconds(n)) {
                    let all = fired.withLock {
                        $0.append((n, thread.isCurrent))
                        return $0.count
                    }
                    if all == 3 { c.resume() }
                }
            }
        }
        #expect(fired.withLock { $0.map(\.0) } == [10, 20, 30])
        #expect(fired.withLock { $0.map(\.1) } == [true, true, true])
        #expect(ContinuousClock.now - start >= .milliseconds(30), "none fires before its deadline")
    }

    @Test func aTaskThatOutlivesItStillRuns() async {
        let thread = LoopThread(name: "test-stopped")
        thread.stop()
        let ran = await Task(executorPreference: thread) {
            await withCheckedContinuation { c in DispatchQueue.global().async { c.resume() } }
            return true
        }.value
        #expect(ran)
    }
}
