import DedupCore
import RedisIO

extension RedisTLSOptions {
    /// The `redis.tls.*` settings as RedisIO's connection options.
    public init(_ settings: RedisTLSSettings) {
        self.init(caFile: settings.caFile, certificateFile: settings.certFile, keyFile: settings.keyFile, serverName: settings.serverName)
    }
}
