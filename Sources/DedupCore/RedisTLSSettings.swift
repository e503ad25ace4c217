#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The `redis.tls.*` keys, checked with `redis.url`: TLS files only with a `rediss://` URL, a
/// client certificate with its key, and files that exist.
public struct RedisTLSSettings: Sendable, Equatable {
    public var caFile: String?
    public var certFile: String?
    public var keyFile: String?
    public var serverName: String?

    public init(caFile: String? = nil, certFile: String? = nil, keyFile: String? = nil, serverName: String? = nil) {
        self.caFile = caFile
        self.certFile = certFile
        self.keyFile = keyFile
        self.serverName = serverName
    }

    init(_ r: WorkerConfiguration.Reader, url: String) throws(ConfigError) {
        // The URL itself is checked by RedisIO's parser (ConfigLoader); here only what TLS adds.
        let lower = url.lowercased()
        caFile = r.optional("redis.tls.ca_file")
        certFile = r.optional("redis.tls.cert_file")
        keyFile = r.optional("redis.tls.key_file")
        serverName = r.optional("redis.tls.server_name")
        let given: [(String, String?)] = [
            ("redis.tls.ca_file", caFile), ("redis.tls.cert_file", certFile), ("redis.tls.key_file", keyFile),
            ("redis.tls.server_name", serverName),
        ]
        if !lower.hasPrefix("rediss://"), let (key, _) = given.first(where: { $0.1 != nil }) {
            throw r.fail(key, "is set but redis.url is not a rediss:// (TLS) URL")
        }
        if (certFile == nil) != (keyFile == nil) {
            let missing = certFile == nil ? "redis.tls.cert_file" : "redis.tls.key_file"
            throw ConfigError(key: missing, value: nil, problem: "is required when \(certFile == nil ? "redis.tls.key_file" : "redis.tls.cert_file") is set")
        }
        for (key, path) in given.prefix(3) {
            if let path, access(path, R_OK) != 0 {
                throw r.fail(key, "cannot read the file")
            }
        }
    }
}
