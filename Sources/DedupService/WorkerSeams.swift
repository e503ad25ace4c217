import DedupCore
import Dispatch
import KafkaIO
import Synchronization

/// Where the worker's messages come from: the Kafka consumer in production, a fake in tests.
public protocol MessageSource: AnyObject, Sendable {
    /// Up to `maxMessages` messages and the rebalances between them, in order; blocks at most
    /// `timeout` when there is nothing. A fake may throw to end the loop (a simulated crash).
    func poll(upTo maxMessages: Int, timeout: Duration) async throws -> [SourceEvent]
    /// Marks these positions (the next offset to read, per partition) as safe to commit.
    func storeOffsets(_ positions: [TopicPartition: Int64]) throws
    /// Pauses these partitions, and holds partitions assigned from now on paused too.
    func pauseFetching(_ partitions: [TopicPartition]) throws
    /// Resumes these partitions and stops holding new ones.
    func resumeFetching(_ partitions: [TopicPartition]) throws
    /// Commits the stored positions and waits for the broker, at most `timeout`.
    func commit(within timeout: Duration) async throws
    /// Leaves the group, waiting at most `timeout` for it.
    func close(within timeout: Duration) async
    /// Why the source can deliver nothing more (librdkafka gave the client up), or `nil`.
    var unrecoverableError: String? { get }
}

extension MessageSource {
    public var unrecoverableError: String? { nil }
}

/// What the worker throws, once it has stopped as for SIGTERM, after its source failed for good
/// (`MessageSource.unrecoverableError`): the process exits with an error, to be restarted.
public struct SourceFailure: Error, CustomStringConvertible {
    public var reason: String
    public var description: String { "kafka client failed for good: \(reason)" }
}

extension KafkaConsumer: MessageSource {
    public func poll(upTo maxMessages: Int, timeout: Duration) async throws -> [SourceEvent] {
        var events = await poll(maxMessages: maxMessages, timeout: timeout)
        var out: [SourceEvent] = []
        out.reserveCapacity(events.count)
        // Moved from one array to the other, in order, as `DedupEngine.handle` takes them: a
        // `compactMap` would copy each message.
        events.withUnsafeMutableBufferPointer { $0.reverse() }
        while let event = events.popLast() {
            switch consume event {
            case .message(let message): out.append(.message(message))
            case .assigned(let partitions): out.append(.assigned(partitions))
            case .revoked(let partitions): out.append(.revoked(partitions))
            case .lost(let partitions): out.append(.lost(partitions))
            // KafkaIO has already logged it (a client error with librdkafka's own level, a
            // consume error as `kafka consumer error`); librdkafka recovers from transport errors
            // by itself and reports a missing topic again at each metadata refresh.
            case .error: break
            }
        }
        return out
    }

    public func close(within timeout: Duration) async { await close(timeout: timeout) }

    public func pauseFetching(_ partitions: [TopicPartition]) throws {
        holdNewAssignments(true)
        do { try pause(partitions) } catch {
            holdNewAssignments(false)
            throw error
        }
    }

    public func resumeFetching(_ partitions: [TopicPartition]) throws {
        try resume(partitions)
        holdNewAssignments(false)
    }

    public func commit(within timeout: Duration) async throws { try await commitSync(timeout: timeout) }
}

/// The loop's time: `now`, and a timer that ends a wait. Injected, so a test clock drives the loop.
public protocol LoopClock: Sendable {
    var now: ContinuousClock.Instant { get }
    /// Calls `fire` once, at `deadline` or soon after.
    func schedule(at deadline: ContinuousClock.Instant, _ fire: @escaping @Sendable () -> Void)
}

/// Runs dispatch rounds beside the loop.
public protocol DispatchRunner: Sendable {
    /// Starts a round; `done` gets one result per message, in order, once the round ended.
    func start(_ due: [Dispatch], done: @escaping @Sendable ([DispatchResult]) -> Void)
    /// The shutdown deadline passed: rounds still running are cancelled; their messages that no
    /// handler took come back `.abandoned`.
    func cancelAll()
    func close() async
}

/// The production runner: each round in a task of its own, through each message's route's
/// dispatcher; a small round of a handler that takes it without waiting (the `log` handler),
/// on the caller's thread, the loop's.
final class HandlerRounds: DispatchRunner {
    let dispatchers: [Dispatcher]
    let handlers: [any Handler]
    /// What is in flight, for the watchdog's report.
    let ledger: InFlightLedger
    /// Rounds not yet ended, to cancel at shutdown; and the ones that ended before `start`
    /// registered them (their task started at once on another thread), not to be registered.
    private let running = Mutex<(tasks: [UInt64: Task<Void, Never>], endedEarly: Set<UInt64>)>(([:], []))
    private let nextID = Atomic<UInt64>(0)

    /// Starts a round's task; tests pass one that returns only once the round has ended.
    private let spawn: @Sendable (@escaping @Sendable () async -> Void) -> Task<Void, Never>

    init(
        dispatchers: [Dispatcher], handlers: [any Handler], ledger: InFlightLedger,
        spawn: @escaping @Sendable (@escaping @Sendable () async -> Void) -> Task<Void, Never> = { Task(operation: $0) }
    ) {
        self.dispatchers = dispatchers
        self.handlers = handlers
        self.ledger = ledger
        self.spawn = spawn
    }

    /// The largest round a handler may take on the loop's thread (`InlineRoundHandler`): at a
    /// steady rate a fetch's round is smaller, and larger ones, at full speed, are worth running
    /// beside the loop.
    static let inlineRoundLimit = 64

    func start(_ due: [Dispatch], done: @escaping @Sendable ([DispatchResult]) -> Void) {
        let flushOnly: (any Handler)?
        switch inlineHandler(for: due).map({ ($0, $0.takeRoundWithoutWaiting(due)) }) {
        case (_, .written)?: return done(Array(repeating: .success, count: due.count))
        case (let handler, .needsFlush)?: flushOnly = handler
        case (_, .notTaken)?, nil: flushOnly = nil
        }
        let dispatchers = self.dispatchers
        let ledger = self.ledger
        let id = nextID.add(1, ordering: .relaxed).newValue
        // Created outside the lock: the new task may run on another thread at once, even
        // before this thread goes on (the woken thread can preempt it), and a short round
        // would then end waiting for a lock held by a thread that is not running.
        let task = spawn { [self] in
            let token = ledger.begin(.round(size: due.count))
            let outcome = if let flushOnly {
                await DispatchRound.flush(due, handler: flushOnly)
            } else {
                await DispatchRound.run(due, dispatchers: dispatchers)
            }
            ledger.end(token)
            running.withLock { running in
                if running.tasks.removeValue(forKey: id) == nil { running.endedEarly.insert(id) }
            }
            done(outcome.results.map { result in
                switch result {
                case .success: .success
                case .gaveUp(let error, let attempts): .gaveUp(error: "\(error)", attempts: attempts)
                case .abandoned: .abandoned
                }
            })
        }
        running.withLock { running in
            if running.endedEarly.remove(id) == nil { running.tasks[id] = task }
        }
    }

    /// The handler of every message of `due` when it takes rounds inline and `due` is small.
    private func inlineHandler(for due: [Dispatch]) -> (any InlineRoundHandler)? {
        guard let first = due.first, due.count <= Self.inlineRoundLimit else { return nil }
        let id = dispatchers[first.route].handlerID
        guard due.allSatisfy({ dispatchers[$0.route].handlerID == id }),
              let handler = dispatchers[first.route].handler as? any InlineRoundHandler, handler.takesRoundsInline
        else { return nil }
        return handler
    }

    func cancelAll() {
        for task in running.withLock({ Array($0.tasks.values) }) { task.cancel() }
    }

    /// Rounds registered and not yet ended (tests read it).
    var runningCount: Int { running.withLock { $0.tasks.count + $0.endedEarly.count } }

    func close() async {
        for handler in handlers { await handler.close() }
    }
}

/// Where answers arrive (store replies, round outcomes, dead-letter acknowledgements), from any
/// thread, until the loop takes them.
///
/// A wait ends at its deadline through a timer of the loop's clock, but most waits end sooner,
/// when an answer arrives, and a timer cannot be taken back. So a wait arms a timer only when no
/// timer already armed fires at or before its deadline; a timer that fires before the deadline of
/// the wait then in progress arms the next one for it. Waits that follow each other a millisecond
/// apart, each up to `maxAnswerWait`, then share one timer instead of each waking the timer
/// thread and a worker thread for nothing.
final class AnswerInbox: Sendable {
    private struct State {
        var answers: [DedupEngine.Answer] = []
        var waiter: CheckedContinuation<[DedupEngine.Answer], Never>?
        /// The deadline of the wait in progress (`waiter`).
        var deadline: ContinuousClock.Instant?
        /// The deadlines of the timers armed and not yet fired.
        var armed: [ContinuousClock.Instant] = []

        /// Whether a timer already armed fires by `deadline`; if none does, counts the one the
        /// caller arms.
        mutating func needsTimer(by deadline: ContinuousClock.Instant) -> Bool {
            if armed.contains(where: { $0 <= deadline }) { return false }
            armed.append(deadline)
            return true
        }
    }

    private let state = Mutex(State())

    /// Whether a wait is in progress (for tests).
    var isWaiting: Bool { state.withLock { $0.waiter != nil } }

    func post(_ answer: DedupEngine.Answer) {
        let resume = state.withLock { s -> (CheckedContinuation<[DedupEngine.Answer], Never>, [DedupEngine.Answer])? in
            s.answers.append(answer)
            guard let waiter = s.waiter else { return nil }
            s.waiter = nil
            s.deadline = nil
            defer { s.answers.removeAll() }
            return (waiter, s.answers)
        }
        if let (waiter, answers) = resume { waiter.resume(returning: answers) }
    }

    /// What arrived, waiting until `deadline` if nothing has yet; empty when the deadline passed.
    func next(until deadline: ContinuousClock.Instant, clock: any LoopClock) async -> [DedupEngine.Answer] {
        await withCheckedContinuation { (c: CheckedContinuation<[DedupEngine.Answer], Never>) in
            let needsTimer = state.withLock { s -> Bool? in
                guard s.answers.isEmpty else { return nil }
                s.waiter = c
                s.deadline = deadline
                return s.needsTimer(by: deadline)
            }
            guard let needsTimer else {
                let answers = state.withLock { s in defer { s.answers.removeAll() }; return s.answers }
                return c.resume(returning: answers)
            }
            if needsTimer { arm(deadline, clock) }
        }
    }

    private func arm(_ deadline: ContinuousClock.Instant, _ clock: any LoopClock) {
        clock.schedule(at: deadline) { [weak self] in self?.fired(deadline, clock) }
    }

    /// The timer armed for `deadline` fired: it ends the wait in progress if that wait's
    /// deadline has come, or else arms a timer for it unless another armed one fires by then.
    private func fired(_ deadline: ContinuousClock.Instant, _ clock: any LoopClock) {
        enum Next { case expire(CheckedContinuation<[DedupEngine.Answer], Never>), arm(ContinuousClock.Instant), nothing }
        let next = state.withLock { s -> Next in
            if let i = s.armed.firstIndex(of: deadline) { s.armed.remove(at: i) }
            guard let waiter = s.waiter, let due = s.deadline else { return .nothing }
            if due <= deadline {
                s.waiter = nil
                s.deadline = nil
                return .expire(waiter)
            }
            return s.needsTimer(by: due) ? .arm(due) : .nothing
        }
        switch next {
        case .expire(let waiter): waiter.resume(returning: [])
        case .arm(let due): arm(due, clock)
        case .nothing: break
        }
    }

    /// Ends the wait in progress with nothing (the task was cancelled).
    func expire() {
        let waiter = state.withLock { s -> CheckedContinuation<[DedupEngine.Answer], Never>? in
            defer { s.waiter = nil; s.deadline = nil }
            return s.waiter
        }
        waiter?.resume(returning: [])
    }
}
