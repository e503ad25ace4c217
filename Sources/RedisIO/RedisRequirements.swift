/// What dedupd needs of the Redis it keeps its seen-set in, checked at start-up.
///
/// A Redis whose `maxmemory-policy` evicts keys (`allkeys-*`, or `volatile-*`: every dedupd key
/// has a TTL) forgets done records silently under memory pressure, and a forgotten done record
/// is a duplicate dispatch; many managed offerings default to `volatile-lru`. A Redis without
/// persistence forgets them all on a restart.
public struct RedisRequirements: Sendable, Equatable {
    /// `maxmemory-policy`, or nil when the server refused `CONFIG GET`.
    public var maxmemoryPolicy: String?
    /// The server's answer when it refused `CONFIG GET` (managed services rename or forbid it;
    /// an ACL user may lack the permission).
    public var configRefusal: String?
    /// Neither AOF nor RDB snapshots: done records do not survive a restart. Nil when unknown.
    public var persistenceOff: Bool?
    /// `hash-max-listpack-entries` (read by its older alias, `hash-max-ziplist-entries`): a compact
    /// bucket with more fields becomes a hashtable, several times larger. Nil when unknown.
    public var hashListpackEntries: Int? = nil
    /// The server answered `GETDEL` with "unknown command": it is older than Redis 6.2 (or the
    /// command was renamed away). A cluster's compact confirm script calls it.
    public var lacksGetdel = false

    /// Whether the policy can evict dedupd's keys.
    public var evicts: Bool {
        guard let policy = maxmemoryPolicy?.lowercased() else { return false }
        return policy.hasPrefix("allkeys-") || policy.hasPrefix("volatile-")
    }

    /// Reads the settings, and whether `GETDEL` exists, in one round trip.
    public static func read(from connection: RedisConnection) async throws -> RedisRequirements {
        try await read(from: .server(connection))[0].found
    }

    /// Reads them from the server, or from every primary of a cluster (each keeps its own).
    public static func read(from target: RedisTarget) async throws -> [(node: String, found: RedisRequirements)] {
        try await target.onEveryPrimary(commands).map { ($0.node, parse($0.replies)) }
    }

    private static let commands = [
        ["CONFIG", "GET", "maxmemory-policy"], ["CONFIG", "GET", "appendonly"], ["CONFIG", "GET", "save"],
        ["CONFIG", "GET", "hash-max-ziplist-entries"],
        // A key no dedupd record has (those have three parts). On a primary that does not own
        // its slot the reply is MOVED, which still says the command exists: Redis checks the
        // command before the slot.
        ["GETDEL", "dedupd:version-probe"],
    ].map { $0.map { RedisArgument($0) } }

    private static func parse(_ replies: [RedisReply]) -> RedisRequirements {
        func value(_ reply: RedisReply) -> String? {
            guard case .array(let items) = reply, items.count == 2 else { return nil }
            return items[1].text
        }
        func lacksGetdel(_ reply: RedisReply) -> Bool {
            if case .error(let text) = reply { text.hasPrefix("ERR unknown command") } else { false }
        }
        if case .error(let text) = replies[0] {
            return RedisRequirements(maxmemoryPolicy: nil, configRefusal: text, persistenceOff: nil, lacksGetdel: lacksGetdel(replies[4]))
        }
        let appendOnly = value(replies[1])
        let save = value(replies[2])
        let off: Bool? = appendOnly.flatMap { aof in save.map { aof == "no" && $0.allSatisfy { $0 == " " } } }
        return RedisRequirements(
            maxmemoryPolicy: value(replies[0]), configRefusal: nil, persistenceOff: off,
            hashListpackEntries: value(replies[3]).flatMap { Int($0) }, lacksGetdel: lacksGetdel(replies[4]))
    }

    /// Fields a compact bucket holds on average with `dedup.compact.buckets` sized by the guidance;
    /// a server that converts smaller hashes makes buckets hashtables.
    public static let bucketFieldsGuidance = 100

    /// The warning for a server that keeps fewer hash fields as a listpack than the compact
    /// layout's buckets are sized for, or nil.
    public var listpackProblem: String? {
        guard let entries = hashListpackEntries, entries < Self.bucketFieldsGuidance + 28 else { return nil }
        return "redis hash-max-listpack-entries is \(entries): compact buckets sized for ~\(Self.bucketFieldsGuidance) fields become hashtables "
            + "(several times the memory per id). Raise it to 128 (the default) or set dedup.compact.buckets so that one slot's unique ids / buckets stays under \(entries * 3 / 4)"
    }

    /// The refusal for an evicting policy, naming the fix; nil when the policy keeps every key.
    public var evictionProblem: String? {
        guard evicts, let policy = maxmemoryPolicy else { return nil }
        return "redis maxmemory-policy is \(policy): under memory pressure Redis would silently evict dedupd's keys "
            + "(every one has a TTL), and an evicted done record lets a duplicate through. Set maxmemory-policy "
            + "to noeviction (redis-cli CONFIG SET maxmemory-policy noeviction, or in redis.conf / your provider's "
            + "parameter group), or set redis.allow_eviction: true to run anyway"
    }
}
