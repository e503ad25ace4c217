import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A real `redis-server` for the demo and tests: on a free loopback port, with its own
/// temporary directory, AOF on (`appendfsync always`, so a restart keeps every
/// acknowledged write), RDB snapshots off. Stopped in `deinit`.
///
/// `@unchecked Sendable`: mutable state (`process`) is guarded by `lock`.
public final class RedisServerProcess: @unchecked Sendable {
    public let port: Int
    public let password: String?
    public let directory: TemporaryDirectory
    public let executable: String
    /// `appendfsync`: `always` (the default here: a restart keeps every acknowledged write) or
    /// `everysec`.
    public let appendFsync: String
    /// Arguments added after dedupd's own.
    public let extraArguments: [String]
    private let lock = NSLock()
    private var process: Process?

    /// `redis://127.0.0.1:PORT/0` (with `:password@` when `requirepass` is set).
    public var url: String {
        if let password {
            let encoded = password.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? password
            return "redis://:\(encoded)@127.0.0.1:\(port)/0"
        }
        return "redis://127.0.0.1:\(port)/0"
    }

    /// The URL without credentials.
    public var urlWithoutPassword: String { "redis://127.0.0.1:\(port)/0" }

    /// Starts a server and waits (at most `startTimeout`) until it answers PING.
    /// `extraArguments` go to redis-server after dedupd's own (e.g. `--maxmemory-policy volatile-lru`).
    /// `port`: the port to listen on (default: a free one).
    public init(
        password: String? = nil, appendFsync: String = "always", extraArguments: [String] = [], port: Int? = nil,
        startTimeout: Duration = .seconds(10)
    ) throws {
        guard let executable = Self.findExecutable() else {
            throw LocalServerError("redis-server not found on PATH or in /usr/bin")
        }
        self.executable = executable
        self.password = password
        self.appendFsync = appendFsync
        self.extraArguments = extraArguments
        self.directory = try TemporaryDirectory(prefix: "dedupd-redis")
        self.port = try port ?? freePort()
        try start(timeout: startTimeout)
    }

    deinit {
        stop()
    }

    /// The process id of the running server (0 if stopped).
    public var pid: Int32 { lock.withLock { process?.processIdentifier ?? 0 } }

    /// The server's log file (useful when a test fails).
    public var logFile: URL { directory.file("redis.log") }

    /// Whether the process is running.
    public var isRunning: Bool {
        lock.withLock { process.map { !Self.hasExited($0) } ?? false }
    }

    /// Whether the child has exited: `Process.isRunning`, or on Linux `/proc/PID/stat`
    /// missing or in state `Z` (exited, not yet reaped by Foundation's monitor thread).
    private static func hasExited(_ process: Process) -> Bool {
        if !process.isRunning { return true }
        guard let stat = try? String(contentsOfFile: "/proc/\(process.processIdentifier)/stat", encoding: .utf8) else {
            return true
        }
        // Format: "pid (comm) S ..."; comm may contain spaces, so look after the last ')'.
        guard let close = stat.lastIndex(of: ")") else { return false }
        let state = stat[stat.index(after: close)...].drop { $0 == " " }.first
        return state == "Z" || state == "X"
    }

    /// SIGTERM, then wait for exit (SIGKILL after `timeout`). Idempotent.
    public func stop(timeout: Duration = .seconds(10)) {
        lock.withLock {
            guard let process else { return }
            self.process = nil
            guard !Self.hasExited(process) else { return }
            process.terminate()
            let deadline = ContinuousClock.now + timeout
            while !Self.hasExited(process) && ContinuousClock.now < deadline {
                usleep(5_000)
            }
            if !Self.hasExited(process) {
                _ = Glibc.kill(process.processIdentifier, SIGKILL)
                while !Self.hasExited(process) { usleep(5_000) }
            }
        }
    }

    /// SIGKILL, as a crash: no shutdown, no final AOF write. Waits until the process is gone.
    public func kill() {
        lock.withLock {
            guard let process else { return }
            self.process = nil
            _ = Glibc.kill(process.processIdentifier, SIGKILL)
            while !Self.hasExited(process) { usleep(5_000) }
        }
    }

    /// Stops the server and starts it again on the same port and directory
    /// (so its AOF is loaded again). Waits until it answers PING.
    public func restart(timeout: Duration = .seconds(10)) throws {
        stop()
        try start(timeout: timeout)
    }

    private func start(timeout: Duration) throws {
        // What the log holds from an earlier start (a restart): readiness is read after it.
        let logStart = (try? Data(contentsOf: logFile).count) ?? 0
        try lock.withLock {
            let process = Process()
            process.executableURL = URL(fileURLWithPath: executable)
            var arguments = [
                "--port", "\(port)",
                "--bind", "127.0.0.1",
                "--dir", directory.path,
                "--save", "",
                "--appendonly", "yes",
                "--appendfsync", appendFsync,
                "--daemonize", "no",
                "--logfile", logFile.path,
            ]
            if let password {
                arguments += ["--requirepass", password]
            }
            arguments += extraArguments
            process.arguments = arguments
            process.standardInput = FileHandle.nullDevice
            process.standardOutput = FileHandle.nullDevice
            process.standardError = FileHandle.nullDevice
            try withDefaultSignalMask { try process.run() }
            self.process = process
        }
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if !isRunning {
                throw LocalServerError("redis-server exited at start; log: \(tail(of: logFile))")
            }
            // Our own log must say the server listens: a "free" port can be taken by another
            // test's server between `freePort` and the bind; then this one exits, and until it
            // has, a PING would be answered by the other server (which that test may flush).
            if Self.saysReady(logFile, after: logStart), isRunning, let answer = tcpRequest(port: port, "PING\r\n"),
               answer.hasPrefix("+PONG") || answer.hasPrefix("-NOAUTH") {
                return
            }
            usleep(20_000)
        }
        stop()
        throw LocalServerError("redis-server on port \(port) did not answer PING within \(timeout); log: \(tail(of: logFile))")
    }

    private static func saysReady(_ log: URL, after offset: Int) -> Bool {
        guard let data = try? Data(contentsOf: log), data.count > offset else { return false }
        return String(decoding: data[offset...], as: UTF8.self).contains("Ready to accept connections")
    }

    private func tail(of file: URL) -> String {
        guard let text = try? String(contentsOf: file, encoding: .utf8) else { return "(no log)" }
        return text.split(separator: "\n").suffix(10).joined(separator: "\n")
    }

    private static func findExecutable() -> String? {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? ""
        let candidates = path.split(separator: ":").map { "\($0)/redis-server" } + ["/usr/bin/redis-server"]
        return candidates.first { FileManager.default.isExecutableFile(atPath: $0) }
    }
}
