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

/// The code spans (the text between backticks) of a piece of Markdown, in order.
public func codeSpans<S: StringProtocol>(_ markdown: S) -> [String] {
    markdown.split(separator: "`", omittingEmptySubsequences: false).enumerated().filter { $0.offset % 2 == 1 }.map { String($0.element) }
}

/// The code spans in the first column of each row of the Markdown table whose header is at or
/// after `marker` (its header and `| --- |` rows left out); nil when `marker` is not in `markdown`.
/// The docs' reference tables name their items this way (metrics, log events, fields).
public func firstColumnCodeSpans(ofTableAfter marker: String, in markdown: String) -> [String]? {
    guard let start = markdown.range(of: marker) else { return nil }
    let rows = markdown[start.upperBound...].split(separator: "\n", omittingEmptySubsequences: false)
        .drop { !$0.hasPrefix("| ---") }.dropFirst().prefix { $0.hasPrefix("|") }
    return rows.flatMap { codeSpans($0.split(separator: "|").first ?? "") }
}
