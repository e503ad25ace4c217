/// The Sentinels that watch a primary (`redis.mode: sentinel`). A connection asks them where the
/// primary is each time it connects, so after a failover, once the old primary's socket breaks
/// or answers `READONLY`, the next connect reaches the new one: no address has to move with it.
public struct RedisSentinels: Sendable, Hashable {
    /// The Sentinels' addresses (host and port of each), with the primary's user and password:
    /// they are reached the way the primary is (TLS for `rediss://`), and offered its AUTH, which
    /// a Sentinel with the same `requirepass` takes and one without a password ignores.
    public var nodes: [RedisURL]
    /// The name the Sentinels monitor the primary under (`redis.sentinel_master`).
    public var master: String

    public init(nodes: [RedisURL], master: String) {
        self.nodes = nodes
        self.master = master
    }

    /// The Sentinels and the primary's URL (user, password, database, scheme) from
    /// `redis://[user:password@]sentinel:port[,sentinel:port...][/db]`.
    public static func parse(_ text: String, master: String) throws -> (sentinels: RedisSentinels, primary: RedisURL) {
        let nodes = try RedisURL.nodeList(text, kind: "Redis Sentinel URL")
        let sentinels = RedisSentinels(nodes: nodes, master: master)
        return (sentinels, nodes[0])
    }

    /// For logs: `sentinel <master> via host:port,...`.
    public var description: String {
        "sentinel \(master) via " + nodes.map(\.peer).joined(separator: ",")
    }

    /// Asks the Sentinels in turn where the primary is (`SENTINEL GET-MASTER-ADDR-BY-NAME`); the
    /// first answer wins. Throws a retriable error when none answers, and a non-retriable one
    /// when one answers that it monitors no primary of that name (a wrong `redis.sentinel_master`).
    func locate(connectTimeout: Duration, commandTimeout: Duration, tls: RedisTLSContext?) throws -> (host: String, port: Int) {
        var failures: [String] = []
        for node in nodes {
            let peer = node.peer
            let reply: RedisReply
            do {
                let socket = try RedisSocket.connect(
                    host: node.host, port: node.port, connectTimeout: connectTimeout, commandTimeout: commandTimeout, tls: tls)
                var ask = RedisCommandBatch()
                ask.appendAuth(node)
                ask.begin()
                ask.append("SENTINEL")
                ask.append("GET-MASTER-ADDR-BY-NAME")
                ask.append(master)
                // AUTH's own answer does not matter: the question's says whether it was needed.
                reply = try RedisConnection.roundTrip(socket, ask) { RedisReply($0) }.all().last!
            } catch let error as RedisError {
                failures.append("\(peer): \(error.message)")
                continue
            }
            switch reply {
            case .array(let parts) where parts.count == 2:
                if case .string(let host) = parts[0], case .string(let portText) = parts[1],
                    let port = Int(String(decoding: portText, as: UTF8.self))
                {
                    return (String(decoding: host, as: UTF8.self), port)
                }
                failures.append("\(peer): unexpected answer \(reply)")
            case .null, .array([]):
                throw RedisError(
                    .serverReply,
                    "Sentinel \(peer) monitors no primary named \(master) (redis.sentinel_master must be the name of its `sentinel monitor` line)",
                    retriable: false)
            case .error(let text) where text.hasPrefix("NOAUTH"):
                failures.append("\(peer): \(text) (this Sentinel wants a password other than the primary's, which dedupd does not support)")
            case .error(let text):
                failures.append("\(peer): \(text)")
            default:
                failures.append("\(peer): unexpected answer \(reply)")
            }
        }
        throw RedisError(.connection, "no Sentinel told where primary \(master) is: " + failures.joined(separator: "; "))
    }
}
