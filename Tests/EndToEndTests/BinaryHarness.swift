import DedupCore
import Foundation
import KafkaIO
import Logging
import Testing
import TestSupport

/// The built `dedupd` executable, next to the test bundle in the build products directory.
func dedupdBinary(_ name: String = "dedupd") throws -> URL {
    var dir = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
    // swift-testing runs the bundle from `.build/<config>/dedupdPackageTests.xctest`.
    for _ in 0..<3 {
        let candidate = dir.appendingPathComponent(name)
        if FileManager.default.isExecutableFile(atPath: candidate.path) { return candidate }
        dir = dir.deletingLastPathComponent()
    }
    if name == "dedupd", let env = ProcessInfo.processInfo.environment["TEST_DEDUPD_BINARY"] { return URL(fileURLWithPath: env) }
    throw TestSupportError("\(name) binary not found next to \(CommandLine.arguments[0]); run `swift build` first")
}

/// A `dedupd` child process whose stdout and stderr go to files in a scratch directory, so
/// nothing blocks on a full pipe and a failing test can show the logs.
final class DedupdProcess: @unchecked Sendable {
    let process = Process()
    let stdoutURL: URL
    let stderrURL: URL
    let name: String
    let input: Pipe?

    init(_ arguments: [String], name: String, in dir: TemporaryDirectory, stdin: Bool = false, executable: String = "dedupd") throws {
        self.name = name
        stdoutURL = dir.file("\(name).out")
        stderrURL = dir.file("\(name).err")
        try Data().write(to: stdoutURL)
        try Data().write(to: stderrURL)
        process.executableURL = try dedupdBinary(executable)
        process.arguments = arguments
        input = stdin ? Pipe() : nil
        process.standardInput = input ?? FileHandle.nullDevice
        process.standardOutput = try FileHandle(forWritingTo: stdoutURL)
        process.standardError = try FileHandle(forWritingTo: stderrURL)
        // Children inherit the test thread's blocked signals; unblock them so SIGTERM reaches dedupd.
        try withDefaultSignalMask { try process.run() }
    }

    var stdout: String { (try? String(contentsOf: stdoutURL, encoding: .utf8)) ?? "" }
    var stderr: String { (try? String(contentsOf: stderrURL, encoding: .utf8)) ?? "" }

    /// Waits for the first stdout line (bounded), e.g. the mock cluster's bootstrap servers.
    func firstLine(timeout: Duration) throws -> String {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if let line = stdout.split(separator: "\n").first { return String(line) }
            guard process.isRunning else { break }
            usleep(20_000)
        }
        throw TestSupportError("\(name) printed no line within \(timeout); stderr: \(stderr.suffix(2000))")
    }

    /// Waits for exit (bounded); kills and throws on timeout.
    @discardableResult
    func wait(timeout: Duration) throws -> Int32 {
        let deadline = ContinuousClock.now + timeout
        while process.isRunning && ContinuousClock.now < deadline { usleep(50_000) }
        if process.isRunning {
            process.interrupt()
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
            throw TestSupportError("\(name) did not exit within \(timeout); stderr tail: \(stderr.suffix(3000))")
        }
        return process.terminationStatus
    }

    /// Writes one line to the child's stdin (e.g. a `mock-kafka` fault command).
    func send(_ line: String) throws {
        guard let input else { throw TestSupportError("\(name) was started without a stdin pipe") }
        try input.fileHandleForWriting.write(contentsOf: Data((line + "\n").utf8))
    }

    func terminate() {
        if process.isRunning { process.terminate() }
    }

    deinit {
        if process.isRunning {
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }
    }
}

/// `message-id` headers of the JSON lines the `log` handler wrote.
func dispatchedIDs(inJSONLines text: String) -> [String] {
    text.split(separator: "\n").compactMap { line in
        guard let object = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any],
            let headers = object["headers"] as? [String: Any]
        else { return nil }
        return headers["message-id"] as? String
    }
}

/// Every record of `topic` (a fresh group from the start), expecting `count` of them: waits up
/// to 30 s for them, then half a second more to see that nothing else arrives.
func consumeAll(bootstrap: String, topic: String, count: Int) async throws -> [InboundMessage] {
    let consumer = try KafkaConsumer.make(
        bootstrapServers: bootstrap, groupID: "check-\(topic)-\(UUID().uuidString.prefix(6))", topics: [topic],
        logger: Logger(label: "check") { _ in SwiftLogNoOpLogHandler() })
    var out: [InboundMessage] = []
    let deadline = ContinuousClock.now + .seconds(30)
    while out.count < count && ContinuousClock.now < deadline {
        for case .message(let m) in await consumer.poll(maxMessages: 100, timeout: .milliseconds(200)) { out.append(m) }
    }
    for case .message(let m) in await consumer.poll(maxMessages: 100, timeout: .milliseconds(500)) { out.append(m) }
    await consumer.close()
    #expect(out.count == count, "\(topic): \(out.count) records")
    return out
}

/// The worker config the group tests (chaos, rolling restart) run their workers with: the
/// `orders` topic in group `group`, a 1 s window and a 6 s lease, stats every 5 s.
func writeGroupWorkerConfig(
    to file: URL, bootstrap: String, redisURL: String, group: String, rebalance mode: String,
    concurrency: Int, maxBatch: Int
) throws {
    try """
        kafka:
          bootstrap_servers: \(bootstrap)
          topics: [orders]
          group: \(group)
          rebalance: \(mode)
        redis:
          url: \(redisURL)
        dedup:
          namespace: \(group)
          window: 1s
          lease: 6s
        handler:
          concurrency: \(concurrency)
          max_batch: \(maxBatch)
        log:
          stats_interval: 5s
        """.write(to: file, atomically: true, encoding: .utf8)
}
