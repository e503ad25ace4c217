// Helpers the test targets share. The servers tests start (redis-server on a free port,
// temporary directories, spawning with a default signal mask) are the LocalServers target's,
// re-exported here as the test harness; the library itself (DedupService) is imported by the
// tests that use it.
@_exported import LocalServers
import Logging

/// A logger that drops everything.
public func quietLogger() -> Logger {
    Logger(label: "dedupd.test", factory: { _ in SwiftLogNoOpLogHandler() })
}

/// A fresh name per test so groups, topics and namespaces never collide.
public func unique(_ prefix: String) -> String { "\(prefix)-\(UInt32.random(in: 0...UInt32.max))" }

/// Polls `condition` every 10 ms until it holds or `timeout` passes; returns whether it held.
@discardableResult
public func waitUntil(timeout: Duration = .seconds(3), _ condition: () async throws -> Bool) async throws -> Bool {
    let deadline = ContinuousClock.now + timeout
    while ContinuousClock.now < deadline {
        if try await condition() { return true }
        try await Task.sleep(for: .milliseconds(10))
    }
    return try await condition()
}

/// What the harnesses throw when a server does not start or answer.
public typealias TestSupportError = LocalServerError
