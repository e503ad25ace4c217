/// The Sentinels that watch a primary (`redis.mode: sentinel`). A connection asks them where the
/// primary is each time it connects, so after a failover, once the old primary's socket breaks
/// or answers `READONLY`, the next connect reaches the new one: no address has to move with it.
public struct RedisSentinels: Sendable, Hashable {
    /// The Sentinels' addresses (host and port of each), reached the way the primary is (TLS for
    /// `rediss://`), with the user and password they are offered: their own
    /// (`redis.sentinel_password`), or else the primary's, which a Sentinel with the same
    /// `requirepass` takes and one without a password ignores.
    public var nodes: [RedisURL]
    /// The name the Sentinels monitor the primary under (`redis.sentinel_master`).
    public var master: String
    /// Whether `nodes` carry the Sentinels' own credentials rather than the primary's: says which
    /// setting to fix when a Sentinel refuses them.
    public var ownCredentials = false

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
    /// first answer wins. Throws a retriable error when none answers, and a non-retriable one when
    /// one answers that it monitors no primary of that name (a wrong `redis.sentinel_master`) or
    /// refuses the credentials it was offered.
    func locate(connectTimeout: Duration, commandTimeout: Duration, tls: RedisTLSContext?) throws -> (host: String, port: Int) {
        var failures: [String] = []
        var refused = false
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
                // AUTH's own answer matters only when the question is refused: a Sentinel without
                // a password refuses the primary's AUTH and answers the question.
                let replies = try RedisConnection.roundTrip(socket, ask) { RedisReply($0) }.all()
                reply = replies.last!
                if node.password != nil, case .error(let authText) = replies[0], case .error = reply {
                    refused = true
                    let who = node.user.map { "user '\($0)'" } ?? "the default user"
                    failures.append("\(peer): AUTH as \(who) was refused: \(authText)\(credentialsHint)")
                    continue
                }
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
                refused = true
                failures.append("\(peer): \(text)\(credentialsHint)")
            case .error(let text) where text.hasPrefix("NOPERM"):
                refused = true
                failures.append("\(peer): \(text) (the Sentinel's ACL user needs +sentinel|get-master-addr-by-name)")
            case .error(let text):
                failures.append("\(peer): \(text)")
            default:
                failures.append("\(peer): unexpected answer \(reply)")
            }
        }
        let message = "no Sentinel told where primary \(master) is: " + failures.joined(separator: "; ")
        throw refused ? RedisError(.auth, message) : RedisError(.connection, message)
    }

    /// What to set when a Sentinel refuses what it was offered.
    private var credentialsHint: String {
        ownCredentials
            ? " (redis.sentinel_username and redis.sentinel_password must be this Sentinel's)"
            : " (this Sentinel has a password of its own: set redis.sentinel_password or redis.sentinel_password_file)"
    }
}
