import Synchronization

/// The reply to one store request, on its way. The store completes it once, from any thread;
/// the caller either awaits `value()` or hands it a callback with `whenAnswered`, once.
///
/// Inlinable, so that the store and the worker, in other modules, get code specialized to their
/// `Value`: unspecialized, every call looks up the metadata of `Mutex<State>` and `Result` in
/// the runtime's shared cache.
public final class StoreReply<Value: Sendable>: Sendable {
    @usableFromInline
    enum State {
        case waiting
        case done(Result<Value, any Error>)
        case callback(@Sendable (Result<Value, any Error>) -> Void)
    }

    @usableFromInline
    let state: Mutex<State>

    @inlinable
    public init() { state = Mutex(.waiting) }

    /// A reply that is already known.
    @inlinable
    public convenience init(_ result: Result<Value, any Error>) {
        self.init()
        complete(result)
    }

    @inlinable
    public func complete(_ result: Result<Value, any Error>) {
        let callback = state.withLock { state -> (@Sendable (Result<Value, any Error>) -> Void)? in
            defer { state = .done(result) }
            if case .callback(let f) = state { return f }
            return nil
        }
        callback?(result)
    }

    /// Calls `callback` with the result once it is known (at once if it already is).
    @inlinable
    public func whenAnswered(_ callback: @escaping @Sendable (Result<Value, any Error>) -> Void) {
        let done = state.withLock { state -> Result<Value, any Error>? in
            if case .done(let result) = state { return result }
            state = .callback(callback)
            return nil
        }
        if let done { callback(done) }
    }

    /// Waits for the result.
    @inlinable
    public func value() async throws -> Value {
        try await withCheckedThrowingContinuation { (c: CheckedContinuation<Value, any Error>) in
            whenAnswered { c.resume(with: $0) }
        }.self
    }
}

extension StoreReply {
    /// Calls `callback` once this reply and `other` are both answered: both values, or the
    /// first error (requests sent together, e.g. claims and the guard's holds, answered as one).
    @inlinable
    public func whenAnswered<Other: Sendable>(
        with other: StoreReply<Other>, _ callback: @escaping @Sendable (Result<(Value, Other), any Error>) -> Void
    ) {
        whenAnswered { mine in
            other.whenAnswered { theirs in
                callback(Result { (try mine.get(), try theirs.get()) })
            }
        }
    }
}
