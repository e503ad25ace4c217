import DedupCore
import Logging
import RedisIO

extension RedisTLSOptions {
    /// The `redis.tls.*` settings as RedisIO's connection options.
    public init(_ settings: RedisTLSSettings) {
        self.init(caFile: settings.caFile, certificateFile: settings.certFile, keyFile: settings.keyFile, serverName: settings.serverName)
    }
}

extension RedisTarget {
    /// Connects as the `redis.*` settings say: the worker and the admin commands alike.
    public static func connect(_ access: RedisAccess, logger: Logger) async throws -> RedisTarget {
        try await connect(
            url: access.url, cluster: access.cluster, sentinelMaster: access.sentinelMaster, password: access.password,
            sentinelUsername: access.sentinelUsername, sentinelPassword: access.sentinelPassword,
            connectTimeout: access.connectTimeout, commandTimeout: access.commandTimeout,
            tls: RedisTLSOptions(access.tls), logger: logger)
    }
}
