import DedupCore
import Logging
import RedisIO

extension WorkerConfiguration {
    /// What the worker makes of each Redis primary's settings: `refusals` stop the start, each
    /// naming the setting to change; `warnings` are logged and the worker runs. `dedupd run` and
    /// `dedupd check-config --connect` judge alike.
    public func judge(
        _ primaries: [(node: String, found: RedisRequirements)], cluster: Bool
    ) -> (refusals: [ConfigError], warnings: [(message: String, metadata: Logger.Metadata)]) {
        var refusals: [ConfigError] = []
        var warnings: [(message: String, metadata: Logger.Metadata)] = []
        let compact = ([dedup] + routes.map(\.dedup)).contains { $0.layout == .compact }
        for (node, found) in primaries {
            if let refusal = found.configRefusal {
                warnings.append((
                    "redis refused CONFIG GET, so its eviction policy is unknown: dedupd needs maxmemory-policy noeviction (an evicted done record lets a duplicate through)",
                    ["redis.reply": "\(refusal)", "redis.node": "\(node)"]))
            }
            if let problem = found.evictionProblem {
                if redisAllowEviction {
                    warnings.append((
                        "redis evicts keys with a TTL; running anyway (redis.allow_eviction: true)",
                        ["redis.maxmemory_policy": "\(found.maxmemoryPolicy ?? "")", "redis.node": "\(node)"]))
                } else {
                    refusals.append(ConfigError(key: "redis.allow_eviction", value: "false", problem: cluster ? "\(node): \(problem)" : problem))
                }
            }
            if found.persistenceOff == true {
                warnings.append((
                    "redis persists nothing (appendonly no, no save points): a restart of Redis forgets every done record",
                    ["redis.node": "\(node)"]))
            }
            if compact, cluster, found.lacksGetdel {
                refusals.append(ConfigError(
                    key: "dedup.layout", value: "compact",
                    problem: "\(node) does not know GETDEL (Redis older than 6.2): the compact layout on a Redis Cluster needs Redis 6.2 or later. Upgrade Redis, or set dedup.layout: keys (any Redis)"))
            }
            if compact, let problem = found.listpackProblem {
                warnings.append((problem, ["redis.node": "\(node)"]))
            }
        }
        return (refusals, warnings)
    }
}
