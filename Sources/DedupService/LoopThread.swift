import Dispatch
import Foundation
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The worker loop's own thread: a task executor the loop's task prefers, and the timers that
/// end its waits.
///
/// On the cooperative pool, every answer that resumed the loop woke a pool thread, and every
/// wait's deadline woke libdispatch's timer thread and then a pool thread to run the timer's
/// block; a poll that could block hopped to the consumer's queue and back. Here an answer wakes
/// this one thread, a deadline is the timeout of this thread's own wait, and a blocking poll
/// blocks this thread, which has nothing else to do meanwhile (`KafkaConsumer.pollsBlockCaller`).
final class LoopThread: TaskExecutor, @unchecked Sendable {
    // `mutex` guards the variables below it; `wakeup` is signalled when a job, a timer or the
    // stop arrives, after the mutex is unlocked: signalled under it, the woken thread would
    // only wake to wait for the mutex, a second sleep and wake-up per answer.
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let wakeup = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    private var jobs: [UnownedJob] = []
    private var timers: [(deadline: ContinuousClock.Instant, fire: @Sendable () -> Void)] = []
    private var stopping = false
    private var finished = false
    private var id: pthread_t?

    init(name: String) {
        pthread_mutex_init(mutex, nil)
        // Timed waits count on the monotonic clock: a change of the wall clock moves no deadline.
        var attributes = pthread_condattr_t()
        pthread_condattr_init(&attributes)
        pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
        pthread_cond_init(wakeup, &attributes)
        pthread_condattr_destroy(&attributes)
        let thread = Thread { [self] in
            // Its name in `top -H` and perf (at most 15 bytes).
            Thread.current.name = String(name.prefix(15))
            locked { id = pthread_self() }
            run()
        }
        thread.start()
    }

    deinit {
        pthread_cond_destroy(wakeup)
        pthread_mutex_destroy(mutex)
        wakeup.deallocate()
        mutex.deallocate()
    }

    /// Whether the caller runs on this thread.
    var isCurrent: Bool { locked { id.map { pthread_equal($0, pthread_self()) != 0 } ?? false } }

    func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        let ran = locked { () -> Bool in
            if finished { return false }
            jobs.append(job)
            return true
        }
        if ran {
            pthread_cond_signal(wakeup)
        } else {
            // Only a job of a task that preferred this executor and outlived the loop: it still runs.
            DispatchQueue.global().async { [self] in job.runSynchronously(on: asUnownedTaskExecutor()) }
        }
    }

    /// Calls `fire` on this thread at `deadline` or soon after.
    func schedule(at deadline: ContinuousClock.Instant, _ fire: @escaping @Sendable () -> Void) {
        locked { timers.append((deadline, fire)) }
        pthread_cond_signal(wakeup)
    }

    /// Ends the thread once the jobs queued by then have run; timers not yet due never fire.
    func stop() {
        locked { stopping = true }
        pthread_cond_signal(wakeup)
    }

    private func locked<T>(_ body: () -> T) -> T {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return body()
    }

    private func run() {
        while true {
            var ready: [UnownedJob] = []
            var due: [@Sendable () -> Void] = []
            let done = locked { () -> Bool in
                while true {
                    let now = ContinuousClock.now
                    if timers.contains(where: { $0.deadline <= now }) {
                        due = timers.filter { $0.deadline <= now }.map(\.fire)
                        timers.removeAll { $0.deadline <= now }
                    }
                    if !jobs.isEmpty || !due.isEmpty { break }
                    if stopping {
                        finished = true
                        // Their closures may hold this thread (through its clock).
                        timers.removeAll()
                        return true
                    }
                    if let next = timers.map(\.deadline).min() {
                        var until = Self.monotonic(after: next - now)
                        pthread_cond_timedwait(wakeup, mutex, &until)
                    } else {
                        pthread_cond_wait(wakeup, mutex)
                    }
                }
                swap(&ready, &jobs)
                return false
            }
            if done { return }
            for fire in due { fire() }
            for job in ready { job.runSynchronously(on: asUnownedTaskExecutor()) }
        }
    }

    /// The monotonic clock's time `delay` from now, for `pthread_cond_timedwait`.
    private static func monotonic(after delay: Duration) -> timespec {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        let (seconds, attoseconds) = delay.components
        var nanos = Int(now.tv_nsec) + Int(attoseconds / 1_000_000_000)
        var secs = Int(now.tv_sec) + Int(seconds) + nanos / 1_000_000_000
        nanos %= 1_000_000_000
        if nanos < 0 { nanos += 1_000_000_000; secs -= 1 }
        return timespec(tv_sec: secs, tv_nsec: nanos)
    }
}

/// The loop's clock when it runs on a `LoopThread`: deadlines are that thread's timers.
struct LoopThreadClock: LoopClock {
    let thread: LoopThread
    var now: ContinuousClock.Instant { .now }
    func schedule(at deadline: ContinuousClock.Instant, _ fire: @escaping @Sendable () -> Void) {
        thread.schedule(at: deadline, fire)
    }
}
