import DedupCore
import Logging
import RedisIO

/// Token mode's issuing side, as a Swift API: what a web server calls before it renders a form
/// (or what `dedupd token issue` runs). Tokens go into Redis with a time to live; the worker
/// accepts each one once.
public struct TokenIssuer: Sendable {
    public let store: any TokenStore
    public let namespace: String

    public init(store: any TokenStore, namespace: String) {
        self.store = store
        self.namespace = namespace
    }

    /// Connects to Redis at `url` and issues through a claim store there.
    public static func connect(url: String, namespace: String, logger: Logger) async throws -> TokenIssuer {
        let connection = try await RedisConnection.connect(try RedisURL(url), logger: logger)
        return TokenIssuer(store: RedisClaimStore(connection: connection, logger: logger), namespace: namespace)
    }

    /// Issues `count` new random tokens usable for `ttl`; after that they are refused as
    /// expired (for `memory` more), then as unknown. One round trip whatever the count.
    public func issue(count: Int = 1, ttl: Duration, memory: Duration = .seconds(86_400)) async throws -> [String] {
        let tokens = (0..<count).map { _ in TokenKey.random() }
        try await store.issue(tokens.map { TokenKey.storeKey($0, namespace: namespace) }, ttl: ttl, memory: memory)
        return tokens
    }
}
