import CHiredis
import Logging

/// Where a store's commands go: one Redis server, or a Redis Cluster whose primaries each serve
/// their slots. Every command is given with the hash slot of its keys; one server ignores it.
public enum RedisTarget: Sendable {
    case server(RedisConnection)
    case cluster(RedisCluster)

    /// Whether every script call must keep its keys in one slot.
    public var isCluster: Bool {
        if case .cluster = self { return true }
        return false
    }

    /// Sends `batch` now (one round trip, per node side by side in a cluster); `slots[i]` is
    /// command `i`'s slot, needed in a cluster only.
    func send<T: Sendable>(
        _ build: @escaping @Sendable () -> RedisCommandBatch, slots: [UInt16],
        parse: @escaping @Sendable (UnsafePointer<redisReply>) throws -> T
    ) -> RedisPending<[T]> {
        switch self {
        case .server(let connection): connection.send(build, parse: parse)
        case .cluster(let cluster): cluster.send(build, slots: slots, parse: parse)
        }
    }

    func pipeline<T: Sendable>(
        _ batch: RedisCommandBatch, slots: [UInt16], parse: @escaping @Sendable (UnsafePointer<redisReply>) throws -> T
    ) async throws -> [T] {
        switch self {
        case .server(let connection): try await connection.pipeline(batch, parse: parse)
        case .cluster(let cluster): try await cluster.pipeline(batch, slots: slots, parse: parse)
        }
    }

    /// Commands without keys (SCRIPT LOAD, CONFIG GET) run on the server, or on every primary.
    public func onEveryPrimary(_ commands: [[RedisArgument]]) async throws -> [(node: String, replies: [RedisReply])] {
        switch self {
        case .server(let connection): [(connection.node, try await connection.pipeline(commands))]
        case .cluster(let cluster): try await cluster.onEveryPrimary(commands)
        }
    }

    /// One command routed by the slot of `key` (admin commands).
    public func command(_ args: [RedisArgument], key: String) async throws -> RedisReply {
        try await pipeline(RedisCommandBatch([args]), slots: [ClusterSlot.of(key)]) { RedisReply($0) }[0]
    }

    /// `WAIT count timeout` on the server, or on each primary serving one of `slots` (the same
    /// connection that carried the writes, as WAIT requires); the fewest replicas any acknowledged.
    func waitForReplicas(_ count: Int, timeout: Duration, slots: [UInt16]) async throws -> Int {
        let wait: [RedisArgument] = ["WAIT", RedisArgument(count), RedisArgument(RedisClaimStore.millis(timeout))]
        var replies: [RedisReply]
        switch self {
        case .server(let connection):
            replies = try await connection.pipeline([wait])
        case .cluster(let cluster):
            // One slot per primary is enough: WAIT covers every write made on the connection.
            var seen = Set<RedisCluster.Node>()
            var oneSlotPerNode: [UInt16] = []
            for slot in slots {
                if let node = cluster.primary(for: slot), seen.insert(node).inserted { oneSlotPerNode.append(slot) }
            }
            let batch = RedisCommandBatch(Array(repeating: wait, count: oneSlotPerNode.count))
            replies = try await cluster.pipeline(batch, slots: oneSlotPerNode) { RedisReply($0) }
        }
        var fewest = count
        for reply in replies {
            guard let acked = try reply.throwingOnError("WAIT").int else {
                throw RedisError(.protocolError, "unexpected reply to WAIT: \(reply)")
            }
            fewest = min(fewest, Int(acked))
        }
        return fewest
    }

    public func close() async {
        switch self {
        case .server(let connection): await connection.close()
        case .cluster(let cluster): await cluster.close()
        }
    }
}

extension RedisTarget {
    /// Connects to the Redis that `url` names: one server, a Redis Cluster whose seed nodes it
    /// lists (`cluster`), or the primary that the Sentinels it lists monitor as `sentinelMaster`.
    /// `password`, when given, replaces the URL's. The Sentinels are offered `sentinelPassword`
    /// (as `sentinelUsername` when given), else the primary's user and password. Throws when no
    /// server answers, so a wrong address, password or certificate is reported at start.
    public static func connect(
        url text: String, cluster: Bool, sentinelMaster: String? = nil, password: String? = nil,
        sentinelUsername: String? = nil, sentinelPassword: String? = nil,
        connectTimeout: Duration = .seconds(2), commandTimeout: Duration = .seconds(5),
        tls: RedisTLSOptions = RedisTLSOptions(), logger: Logger
    ) async throws -> RedisTarget {
        if let sentinelMaster {
            var (sentinels, url) = try RedisSentinels.parse(text, master: sentinelMaster)
            if let password { url.password = password }
            for i in sentinels.nodes.indices {
                if let sentinelPassword {
                    sentinels.nodes[i].user = sentinelUsername
                    sentinels.nodes[i].password = sentinelPassword
                } else {
                    sentinels.nodes[i].user = url.user
                    sentinels.nodes[i].password = url.password
                }
            }
            sentinels.ownCredentials = sentinelPassword != nil
            return .server(try await RedisConnection.connect(
                url, sentinels: sentinels, connectTimeout: connectTimeout, commandTimeout: commandTimeout, tls: tls, logger: logger))
        }
        if cluster {
            var seeds = try RedisURL.clusterSeeds(text)
            if let password { for i in seeds.indices { seeds[i].password = password } }
            return .cluster(try await RedisCluster.connect(
                seeds: seeds, connectTimeout: connectTimeout, commandTimeout: commandTimeout, tls: tls, logger: logger))
        }
        var url = try RedisURL(text)
        if let password { url.password = password }
        return .server(try await RedisConnection.connect(
            url, connectTimeout: connectTimeout, commandTimeout: commandTimeout, tls: tls, logger: logger))
    }

    /// For logs: the server's URL, or the cluster's seeds, without the password.
    public var redacted: String {
        switch self {
        case .server(let connection): connection.redactedTarget
        case .cluster(let cluster): "cluster " + cluster.seeds.map { "\($0.host):\($0.port)" }.joined(separator: ",")
        }
    }
}
