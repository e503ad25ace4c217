import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Runs `body` (typically `Process.run()`) with this thread's signal mask
/// emptied, then restores it.
///
/// A child process inherits the signal mask of the thread that spawns it, and
/// Foundation's `Process` does not reset it. Dispatch and Swift-concurrency
/// worker threads (where every async test runs) block most signals, SIGTERM and
/// SIGINT included, so a server started from a test would never see
/// `terminate()`: redis-server ignored SIGTERM until killed. Wrap every
/// `Process.run()` in tests with this.
public func withDefaultSignalMask<T>(_ body: () throws -> T) rethrows -> T {
    var empty = sigset_t()
    var saved = sigset_t()
    sigemptyset(&empty)
    pthread_sigmask(SIG_SETMASK, &empty, &saved)
    defer { pthread_sigmask(SIG_SETMASK, &saved, nil) }
    return try body()
}
