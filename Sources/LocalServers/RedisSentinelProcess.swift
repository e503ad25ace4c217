import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A real Redis Sentinel (`redis-server <conf> --sentinel`) for the tests of `redis.mode:
/// sentinel`: on a free loopback port, with its own directory (a Sentinel rewrites its config
/// file), monitoring one primary under `master` with a quorum of 1, so that it alone decides a
/// failover. Stopped in `deinit`.
public final class RedisSentinelProcess: @unchecked Sendable {
    public let port: Int
    public let master: String
    public let directory: TemporaryDirectory
    private let process = Process()

    /// `downAfter`: how long the primary must be unreachable before the Sentinel fails it over.
    public init(monitoring primaryPort: Int, master: String = "dedupd-primary", downAfter: Duration = .seconds(1),
                startTimeout: Duration = .seconds(10)) throws {
        self.master = master
        directory = try TemporaryDirectory(prefix: "dedupd-sentinel")
        port = try freePort()
        let config = directory.file("sentinel.conf")
        let downAfterMs = downAfter.components.seconds * 1000 + downAfter.components.attoseconds / 1_000_000_000_000_000
        try """
            port \(port)
            bind 127.0.0.1
            dir \(directory.path)
            logfile \(directory.file("sentinel.log").path)
            sentinel monitor \(master) 127.0.0.1 \(primaryPort) 1
            sentinel down-after-milliseconds \(master) \(downAfterMs)
            sentinel failover-timeout \(master) 10000
            sentinel parallel-syncs \(master) 1

            """.write(to: config, atomically: true, encoding: .utf8)
        process.executableURL = URL(fileURLWithPath: "/usr/bin/redis-server")
        process.arguments = [config.path, "--sentinel"]
        process.standardInput = FileHandle.nullDevice
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try withDefaultSignalMask { try process.run() }
        let deadline = ContinuousClock.now + startTimeout
        while ContinuousClock.now < deadline {
            if !process.isRunning { throw LocalServerError("redis sentinel exited at start; log: \(log.suffix(2000))") }
            if let answer = tcpRequest(port: port, "PING\r\n"), answer.hasPrefix("+PONG") { return }
            usleep(20_000)
        }
        stop()
        throw LocalServerError("redis sentinel on port \(port) did not answer PING within \(startTimeout); log: \(log.suffix(2000))")
    }

    deinit { stop() }

    /// `redis://127.0.0.1:PORT` of this Sentinel.
    public var address: String { "127.0.0.1:\(port)" }

    public var log: String { (try? String(contentsOf: directory.file("sentinel.log"), encoding: .utf8)) ?? "" }

    /// The primary's port as this Sentinel reports it now.
    public func primaryPort() -> Int? {
        let ask = "*3\r\n$8\r\nSENTINEL\r\n$23\r\nGET-MASTER-ADDR-BY-NAME\r\n$\(master.utf8.count)\r\n\(master)\r\n"
        guard let answer = tcpRequest(port: port, ask) else { return nil }
        // *2\r\n$9\r\n127.0.0.1\r\n$5\r\n12345\r\n
        let lines = answer.split(separator: "\r\n")
        guard lines.count >= 5, let port = Int(lines[4]) else { return nil }
        return port
    }

    public func stop() {
        guard process.isRunning else { return }
        process.terminate()
        process.waitUntilExit()
    }
}
