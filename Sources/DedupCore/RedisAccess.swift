/// How the worker and the admin commands reach the seen-set's Redis: `redis.url` and
/// `redis.mode` with the credentials, TLS files and timeouts that go with them, read and checked
/// the same way for both. `ConfigLoader` then parses the URL with the connection's own parser and
/// reads the password files.
public struct RedisAccess: Sendable {
    public var url: String
    /// `redis.mode: cluster`: `url` lists seed nodes of a Redis Cluster.
    public var cluster = false
    /// `redis.mode: sentinel`: the primary's name (`redis.sentinel_master`); `url` lists Sentinels.
    public var sentinelMaster: String?
    /// `redis.password`, or the contents of `redis.password_file` once `ConfigLoader` read it.
    public var password: String?
    public var passwordFile: String?
    /// Sentinel mode: what the Sentinels are offered as AUTH when it is not the primary's
    /// (`redis.sentinel_username`; `redis.sentinel_password`, or the contents of
    /// `redis.sentinel_password_file` once `ConfigLoader` read it).
    public var sentinelUsername: String?
    public var sentinelPassword: String?
    public var sentinelPasswordFile: String?
    /// `redis.tls.*`, for a `rediss://` URL.
    public var tls = RedisTLSSettings()
    public var connectTimeout: Duration
    public var commandTimeout: Duration

    init(_ r: WorkerConfiguration.Reader) throws(ConfigError) {
        // Parsed (and so validated) by RedisIO's `RedisURL`, in `ConfigLoader`.
        url = try r.string("redis.url")
        let mode = try r.choice("redis.mode")
        cluster = mode == "cluster"
        tls = try RedisTLSSettings(r, url: url)
        connectTimeout = try r.duration("redis.connect_timeout")
        commandTimeout = try r.duration("redis.command_timeout")
        (password, passwordFile) = try Self.secret("redis.password", r)
        (sentinelPassword, sentinelPasswordFile) = try Self.secret("redis.sentinel_password", r)
        sentinelUsername = r.optional("redis.sentinel_username")
        let sentinelKeys = [
            ("redis.sentinel_master", r.optional("redis.sentinel_master")), ("redis.sentinel_username", sentinelUsername),
            ("redis.sentinel_password", sentinelPassword), ("redis.sentinel_password_file", sentinelPasswordFile),
        ]
        guard mode == "sentinel" else {
            if let (key, _) = sentinelKeys.first(where: { $0.1 != nil }) {
                throw r.fail(key, "has no effect without redis.mode: sentinel")
            }
            return
        }
        guard let master = sentinelKeys[0].1, !master.isEmpty else {
            throw r.fail("redis.sentinel_master", "is required with redis.mode: sentinel (the name of the Sentinels' `sentinel monitor` line)")
        }
        sentinelMaster = master
        if sentinelUsername != nil, sentinelPassword == nil, sentinelPasswordFile == nil {
            throw r.fail("redis.sentinel_username", "needs redis.sentinel_password or redis.sentinel_password_file (AUTH takes a user with its password)")
        }
    }

    /// A secret given as `key` or as `key_file`, not both.
    static func secret(_ key: String, _ r: WorkerConfiguration.Reader) throws(ConfigError) -> (String?, String?) {
        let value = r.optional(key), file = r.optional(key + "_file")
        if value != nil, file != nil {
            throw r.fail(key + "_file", "set either \(key) or \(key)_file, not both")
        }
        return (value, file)
    }
}
