import Synchronization

/// The replies of a round trip that is on its way: completed once on the connection's queue,
/// awaited by the caller when it is ready for them.
///
/// This is what lets the worker's loop send a batch's claims, dispatch meanwhile, and only then
/// wait, with two thread hops per round trip (to the connection's queue, and back to the
/// awaiting task). A `Task` around an async call costs two more: one to start the task on the
/// pool, and one from the finished task to whoever awaits its value. On two busy cores every
/// hop is a wait in the run queue.
public final class RedisPending<Value: Sendable>: Sendable {
    private enum State {
        case waiting
        case done(Result<Value, any Error>, at: ContinuousClock.Instant)
        case awaited(CheckedContinuation<Value, any Error>)
    }

    private let state: Mutex<State>

    init() { state = Mutex(.waiting) }

    func complete(_ result: Result<Value, any Error>) {
        let now = ContinuousClock.now
        let waiter = state.withLock { state -> CheckedContinuation<Value, any Error>? in
            defer { state = .done(result, at: now) }
            if case .awaited(let continuation) = state { return continuation }
            return nil
        }
        waiter?.resume(with: result)
    }

    /// When the replies arrived (nil while they have not): the round trip's own duration,
    /// however late the caller awaits them.
    public var answeredAt: ContinuousClock.Instant? {
        state.withLock { state in
            if case .done(_, let at) = state { return at }
            return nil
        }
    }

    /// The replies, when they are here; nil while they are not.
    var result: Result<Value, any Error>? {
        state.withLock { state in
            if case .done(let result, _) = state { return result }
            return nil
        }
    }

    /// Waits for the replies (returns at once when they are already here). Await it once.
    public func value() async throws -> Value {
        if let done = result { return try done.get() }
        return try await withCheckedThrowingContinuation { continuation in
            let done = state.withLock { state -> Result<Value, any Error>? in
                if case .done(let result, _) = state { return result }
                state = .awaited(continuation)
                return nil
            }
            if let done { continuation.resume(with: done) }
        }
    }
}
