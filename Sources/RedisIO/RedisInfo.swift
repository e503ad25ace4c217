/// The `INFO` figures the seen-set measurements read (`dedupd bench`, the memory tests): Redis
/// memory and CPU time, as deltas between two reads.
public struct RedisInfo: Sendable {
    /// `used_memory`: bytes Redis has allocated for data and overhead.
    public var usedMemory: Int64
    /// `used_cpu_user + used_cpu_sys`: seconds of CPU the server used since it started.
    public var cpuSeconds: Double
    /// `used_cpu_sys` alone: the kernel's share of `cpuSeconds` (reading requests, writing
    /// replies and the AOF).
    public var systemSeconds: Double

    public static func read(_ connection: RedisConnection) async throws -> RedisInfo {
        let text = try await connection.command("INFO", "all").text ?? ""
        var fields: [Substring: Substring] = [:]
        for line in text.split(whereSeparator: \.isNewline) {
            let parts = line.split(separator: ":", maxSplits: 1)
            if parts.count == 2 { fields[parts[0]] = parts[1] }
        }
        guard let memory = fields["used_memory"].flatMap({ Int64($0) }),
              let user = fields["used_cpu_user"].flatMap({ Double($0) }), let sys = fields["used_cpu_sys"].flatMap({ Double($0) })
        else { throw RedisError(.protocolError, "INFO lacks used_memory or used_cpu_user/used_cpu_sys") }
        return RedisInfo(usedMemory: memory, cpuSeconds: user + sys, systemSeconds: sys)
    }
}
