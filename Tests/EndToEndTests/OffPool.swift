import Dispatch

/// Runs blocking work (waiting for a child process, polling its output with `usleep`) on a
/// Dispatch thread instead of Swift's cooperative pool, which has one thread per core: blocking
/// it stalls every other test's async work on a 2-core machine.
func offPool<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { continuation in
        DispatchQueue.global().async { continuation.resume(with: Result { try body() }) }
    }
}
