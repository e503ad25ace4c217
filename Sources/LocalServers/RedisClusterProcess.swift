import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A real Redis Cluster for tests: six `redis-server --cluster-enabled yes` processes on loopback
/// (three primaries, each with one replica), joined by `redis-cli --cluster create`. Ready once
/// every node reports `cluster_state:ok` and every replica has finished its first sync (a primary
/// killed before that is never replaced). Stopped in `deinit`.
public final class RedisClusterProcess: @unchecked Sendable {
    public let nodes: [RedisServerProcess]
    /// `cluster-node-timeout`: how long a primary may be silent before its replica takes over.
    public let nodeTimeout: Duration

    /// The seed list for `redis.mode: cluster`: every node.
    public var url: String { "redis://" + nodes.map { "127.0.0.1:\($0.port)" }.joined(separator: ",") }

    public init(nodeTimeout: Duration = .milliseconds(1500), extraArguments: [String] = [], readyTimeout: Duration = .seconds(60)) throws {
        self.nodeTimeout = nodeTimeout
        let ports = try Self.clusterPorts(6)
        let millis = Int(nodeTimeout.components.seconds * 1000 + nodeTimeout.components.attoseconds / 1_000_000_000_000_000)
        nodes = try ports.map { port in
            try RedisServerProcess(
                appendFsync: "always",
                extraArguments: ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                 "--cluster-node-timeout", "\(millis)"] + extraArguments,
                port: port)
        }
        let create = try Self.cli(["--cluster", "create"] + ports.map { "127.0.0.1:\($0)" } + ["--cluster-replicas", "1", "--cluster-yes"])
        guard create.status == 0 else { throw LocalServerError("redis-cli --cluster create failed: \(create.output.suffix(800))") }
        try waitUntilReady(timeout: readyTimeout)
    }

    /// Waits until every live node says `cluster_state:ok` and every live replica's link is up and synced.
    public func waitUntilReady(timeout: Duration = .seconds(60)) throws {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if try nodes.filter(\.isRunning).allSatisfy({ node in
                let info = try Self.cli(["-p", "\(node.port)", "cluster", "info"]).output
                guard info.contains("cluster_state:ok") else { return false }
                let replication = try Self.cli(["-p", "\(node.port)", "info", "replication"]).output
                if replication.contains("role:slave") {
                    return replication.contains("master_link_status:up") && replication.contains("master_sync_in_progress:0")
                }
                return true
            }) {
                return
            }
            usleep(100_000)
        }
        throw LocalServerError("redis cluster not ready within \(timeout): \((try? Self.cli(["-p", "\(nodes[0].port)", "cluster", "nodes"]).output) ?? "")")
    }

    /// One line of `CLUSTER NODES`.
    public struct NodeInfo: Sendable {
        public var id: String
        public var port: Int
        public var isPrimary: Bool
        public var failed: Bool
        /// The primary's id, for a replica.
        public var primaryID: String?
        /// The slots a primary serves (migration markers such as `[42->-id]` left out).
        public var slots: [ClosedRange<Int>] = []
    }

    /// The cluster as the node on `port` (default: the first live one) sees it.
    public func topology(askingPort port: Int? = nil) throws -> [NodeInfo] {
        let askPort = port ?? nodes.first(where: \.isRunning)!.port
        let text = try Self.cli(["-p", "\(askPort)", "cluster", "nodes"]).output
        return text.split(separator: "\n").compactMap { line in
            let f = line.split(separator: " ")
            guard f.count >= 8, let colon = f[1].firstIndex(of: ":") else { return nil }
            let portText = f[1][f[1].index(after: colon)...].prefix { $0.isNumber }
            guard let port = Int(portText) else { return nil }
            let flags = f[2]
            let slots: [ClosedRange<Int>] = f.dropFirst(8).compactMap { range in
                let ends = range.split(separator: "-").compactMap { Int($0) }
                return ends.count == 1 ? ends[0]...ends[0] : ends.count == 2 ? ends[0]...ends[1] : nil
            }
            return NodeInfo(id: String(f[0]), port: port, isPrimary: flags.contains("master"),
                            failed: flags.contains("fail"), primaryID: f[3] == "-" ? nil : String(f[3]), slots: slots)
        }
    }

    /// The live primaries, by port.
    public func primaryPorts() throws -> [Int] {
        try topology().filter { $0.isPrimary && !$0.failed }.map(\.port).filter { port in nodes.contains { $0.port == port && $0.isRunning } }
    }

    public func node(port: Int) -> RedisServerProcess? { nodes.first { $0.port == port } }

    /// Moves `slots` hash slots from one primary to another with `redis-cli --cluster reshard`
    /// (keys migrate with MIGRATE; clients meanwhile get ASK, then MOVED).
    public func reshard(from source: Int, to target: Int, slots: Int) throws {
        let all = try topology()
        guard let from = all.first(where: { $0.port == source }), let to = all.first(where: { $0.port == target }) else {
            throw LocalServerError("reshard: unknown node")
        }
        let result = try Self.cli([
            "--cluster", "reshard", "127.0.0.1:\(source)", "--cluster-from", from.id, "--cluster-to", to.id,
            "--cluster-slots", "\(slots)", "--cluster-yes",
        ])
        guard result.status == 0 else { throw LocalServerError("reshard failed: \(result.output.suffix(800))") }
    }

    /// Runs redis-cli; its exit status and output (stdout and stderr).
    @discardableResult
    public static func cli(_ arguments: [String]) throws -> (status: Int32, output: String) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/redis-cli")
        process.arguments = arguments
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        process.standardInput = FileHandle.nullDevice
        try withDefaultSignalMask { try process.run() }
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return (process.terminationStatus, String(decoding: data, as: UTF8.self))
    }

    /// `count` free ports below 55536 whose cluster bus port (port + 10000) is free too.
    public static func clusterPorts(_ count: Int) throws -> [Int] {
        var ports: [Int] = []
        var attempts = 0
        while ports.count < count {
            attempts += 1
            guard attempts < 10_000 else { throw LocalServerError("no free ports for a redis cluster") }
            let port = Int.random(in: 20_000..<45_000)
            if ports.contains(port) || ports.contains(port + 10_000) || ports.contains(port - 10_000) { continue }
            if isFree(port), isFree(port + 10_000) { ports.append(port) }
        }
        return ports
    }

    private static func isFree(_ port: Int) -> Bool {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = in_port_t(UInt16(port).bigEndian)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        return withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        } == 0
    }
}
