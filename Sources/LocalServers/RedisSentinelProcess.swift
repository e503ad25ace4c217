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
    public let password: String?
    /// What a client must AUTH with here: `own`, else `password`.
    public let credentials: Credentials?
    public let tls: TLS?
    public let directory: TemporaryDirectory
    private let process = Process()

    /// `downAfter`: how long the primary must be unreachable before the Sentinel fails it over.
    /// PEM files for a Sentinel that listens on TLS only and reaches the primary over TLS.
    public struct TLS: Sendable {
        public var certificate: String
        public var key: String
        public var ca: String
        public init(certificate: String, key: String, ca: String) {
            self.certificate = certificate
            self.key = key
            self.ca = ca
        }
    }

    /// A Sentinel's own credentials: a `requirepass` password (no user), or an ACL user allowed
    /// nothing but `SENTINEL GET-MASTER-ADDR-BY-NAME`, with the default user off.
    public struct Credentials: Sendable {
        public var user: String?
        public var password: String
        public init(user: String? = nil, password: String) {
            self.user = user
            self.password = password
        }
    }

    /// `password`: the primary's (`sentinel auth-pass`), and this Sentinel's own (`requirepass`)
    /// unless `own` gives it credentials of its own.
    public init(monitoring primaryPort: Int, master: String = "dedupd-primary", password: String? = nil, own: Credentials? = nil,
                tls: TLS? = nil, downAfter: Duration = .seconds(1), startTimeout: Duration = .seconds(10)) throws {
        self.master = master
        self.tls = tls
        self.password = password
        let credentials = own ?? password.map { Credentials(password: $0) }
        self.credentials = credentials
        directory = try TemporaryDirectory(prefix: "dedupd-sentinel")
        let port = try freePort()
        self.port = port
        let config = directory.file("sentinel.conf")
        let downAfterMs = downAfter.components.seconds * 1000 + downAfter.components.attoseconds / 1_000_000_000_000_000
        let listen = tls.map {
            "port 0\ntls-port \(port)\ntls-cert-file \($0.certificate)\ntls-key-file \($0.key)\ntls-ca-cert-file \($0.ca)\ntls-auth-clients no\ntls-replication yes"
        } ?? "port \(port)"
        let ownAuth = credentials.map { c in
            c.user.map { "user default off\nuser \($0) on >\(c.password) +sentinel|get-master-addr-by-name" } ?? "requirepass \(c.password)"
        } ?? ""
        try """
            \(listen)
            bind 127.0.0.1
            dir \(directory.path)
            logfile \(directory.file("sentinel.log").path)
            sentinel monitor \(master) 127.0.0.1 \(primaryPort) 1
            sentinel down-after-milliseconds \(master) \(downAfterMs)
            sentinel failover-timeout \(master) 10000
            sentinel parallel-syncs \(master) 1
            \(password.map { "sentinel auth-pass \(master) \($0)" } ?? "")
            \(ownAuth)

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
            // An ACL user allowed one command is refused PING: that answer, too, means it is up.
            if let answer = try? cli(["PING"]).output, answer.hasPrefix("PONG") || answer.contains("NOAUTH") || answer.contains("NOPERM") { return }
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
        let answer = try? cli(["SENTINEL", "GET-MASTER-ADDR-BY-NAME", master]).output
        let lines = answer?.split(separator: "\n") ?? []
        return lines.count == 2 ? Int(lines[1]) : nil
    }

    /// `redis-cli` against this Sentinel (with its credentials).
    public func cli(_ arguments: [String]) throws -> (status: Int32, output: String) {
        let secure = tls.map { ["--tls", "--cacert", $0.ca] } ?? []
        let auth = credentials.map { c in (c.user.map { ["--user", $0] } ?? []) + ["--pass", c.password, "--no-auth-warning"] } ?? []
        return try RedisClusterProcess.cli(["-p", "\(port)"] + secure + auth + arguments)
    }

    public func stop() {
        guard process.isRunning else { return }
        process.terminate()
        process.waitUntilExit()
    }
}
