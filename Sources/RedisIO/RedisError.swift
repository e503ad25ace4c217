/// The one error type of `RedisIO`.
///
/// `code` says what kind of failure it was; `isRetriable` says whether the same
/// call may succeed later without anyone changing configuration (the connection
/// dropped, a timeout, a server still loading its data set).
public struct RedisError: Error, Sendable, CustomStringConvertible {
    /// What kind of failure. A struct over a private enum so new codes can be added
    /// without breaking `switch`es in other modules.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        private enum Base: String, Hashable, Sendable {
            case connection
            case protocolError = "protocol"
            case serverReply = "server reply"
            case noScript = "noscript"
            case timeout
            case invalidURL = "invalid URL"
            case auth
            case closed
            case tls
            case outOfMemory = "out of memory"
        }

        private let base: Base
        private init(_ base: Base) { self.base = base }

        /// Could not connect, or the connection broke (I/O error, server closed it).
        public static let connection = Code(.connection)
        /// The server sent something that is not valid RESP, or a reply of an unexpected shape.
        public static let protocolError = Code(.protocolError)
        /// The server answered with an error reply (`ERR ...`, `WRONGTYPE ...`).
        public static let serverReply = Code(.serverReply)
        /// `EVALSHA` named a script the server does not know (its script cache was flushed).
        public static let noScript = Code(.noScript)
        /// Connecting or a command took longer than the configured timeout.
        public static let timeout = Code(.timeout)
        /// A `redis://` URL could not be parsed.
        public static let invalidURL = Code(.invalidURL)
        /// AUTH was refused (wrong password or user), the server requires AUTH and none was
        /// given, or the ACL user may not run a command dedupd sends (directly or in a script).
        public static let auth = Code(.auth)
        /// The connection was closed by its owner.
        public static let closed = Code(.closed)
        /// A TLS file could not be loaded (not retriable), or the handshake failed: the server's
        /// certificate was not accepted, or the port does not speak TLS (retriable: fail closed
        /// and try again, as for an unreachable server).
        public static let tls = Code(.tls)
        /// The server reached `maxmemory` and, with `noeviction`, refuses writes (`OOM`) until
        /// keys expire or it gets more memory (retriable: it may have room later).
        public static let outOfMemory = Code(.outOfMemory)

        public var description: String { base.rawValue }
    }

    public let code: Code
    /// A human-readable message. Never contains a password.
    public let message: String
    private let retriable: Bool

    public init(_ code: Code, _ message: String, retriable: Bool? = nil) {
        self.code = code
        self.message = message
        self.retriable = retriable ?? (code == .connection || code == .timeout || code == .tls)
    }

    /// Whether the same call may succeed later: connection and timeout errors are
    /// (the connection reconnects on the next call), and server replies that mean
    /// "not now" (`LOADING`, `BUSY`, `TRYAGAIN`, `MASTERDOWN`, `CLUSTERDOWN` while a failover runs;
    /// `READONLY` from a demoted primary, after which the connection connects again; `OOM`).
    public var isRetriable: Bool { retriable }

    public var description: String { "RedisError(\(code)): \(message)" }

    static let aclHint = " (the Redis ACL user needs every command dedupd sends; docs/operations.md, \"ACL users\", lists them)"

    /// A command a script called that the ACL user may not run: Redis 7.0 says "The user
    /// executing the script can't run this command" (or "can't access" a key), 7.2 and later
    /// "ACL failure in script"; both with the `ERR` prefix, not `NOPERM`.
    static func isScriptACLFailure(_ text: String) -> Bool {
        text.contains("The user executing the script can't") || text.hasPrefix("ERR ACL failure in script")
    }

    /// Classifies a server error reply.
    static func fromServerReply(_ text: String, context: String? = nil) -> RedisError {
        let prefix = text.prefix { $0 != " " }
        let message = context.map { "\($0): \(text)" } ?? text
        switch prefix {
        case "NOSCRIPT":
            return RedisError(.noScript, message)
        case "NOAUTH", "WRONGPASS":
            return RedisError(.auth, message)
        case "NOPERM":
            return RedisError(.auth, "\(message)\(aclHint)")
        case "ERR" where isScriptACLFailure(text):
            return RedisError(.auth, "\(message)\(aclHint)")
        case "CROSSSLOT":
            return RedisError(.serverReply, "\(message) (a Redis Cluster runs a script only on keys of one slot; dedupd groups its keys by slot and hash tag, so a key in another slot was passed: report this as a bug)")
        case "OOM":
            return RedisError(
                .outOfMemory,
                "\(message) (Redis is full: with noeviction it takes no new claims or done records until old ones expire; give it more memory (maxmemory); docs/operations.md, \"Redis is full\")",
                retriable: true)
        case "READONLY":
            return RedisError(
                .serverReply,
                "\(message) (the node is a replica now, as after a failover: dedupd connects again, and redis.url must name the primary or an endpoint that follows it)",
                retriable: true)
        case "LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN", "CLUSTERDOWN":
            return RedisError(.serverReply, message, retriable: true)
        default:
            return RedisError(.serverReply, message)
        }
    }
}
