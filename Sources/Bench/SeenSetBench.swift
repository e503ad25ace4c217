import DedupCore
import Foundation
import LocalServers
import Logging
import RedisIO

/// The seen-set leg of `dedupd bench` (issue 15): what each way of remembering ids costs Redis,
/// in one run against one local redis-server: the compact layout (default settings), the keys
/// layout, and a plain pipelined `SET NX PX` for reference.
///
/// The stream is the bench's: `count` messages, `duplicateRatio` of them repeats of earlier ids.
/// Batches of 1,000 go through `RedisClaimStore` as the worker sends them (a claim round trip,
/// then a confirm round trip for what it claimed; repeats inside one batch are resolved locally,
/// as the engine does). Memory is `used_memory` after minus before, once nothing is pending,
/// divided by the unique ids; CPU is `used_cpu_user + used_cpu_sys` after minus before, divided
/// by the unique ids, and the kernel's part of it (`used_cpu_sys`) is shown apart.
///
/// Every variant starts from the same state: an empty keyspace (`FLUSHALL`) on a server that has
/// already held the largest variant's data once (an unmeasured pass of the keys layout first),
/// and with the AOF on, a freshly rewritten AOF. Without that, whichever variant ran first paid
/// for the server's growth (its heap's first page faults, the AOF file's first blocks) and the
/// AOF rewrites fell on whichever variant crossed the size that triggers them
/// (docs/performance.md has the figures).
public enum SeenSetBench {
    public struct Row: Sendable {
        public var name: String
        public var bytesPerID: Double
        public var cpuMicrosPerUnique: Double
        /// The kernel's part of `cpuMicrosPerUnique`: reading requests, writing replies and the AOF.
        public var kernelMicrosPerUnique: Double
    }

    public struct Figures: Sendable {
        public var count: Int
        public var unique: Int
        public var persistence: String
        public var rows: [Row]
    }

    /// `appendOnly` false: `--appendonly no`; else AOF with `appendfsync fsync`.
    public static func run(count: Int, duplicateRatio: Double, appendOnly: Bool, fsync: String = "everysec", logger: Logger) async throws -> Figures {
        let server = try RedisServerProcess(appendFsync: fsync, extraArguments: appendOnly ? [] : ["--appendonly", "no"])
        defer { server.stop() }
        let connection = try await RedisConnection.connect(try RedisURL(server.url), logger: logger)
        defer { Task { await connection.close() } }
        let ids = stream(count: count, duplicateRatio: duplicateRatio)
        let unique = Set(ids).count
        let retention: Duration = .seconds(86400)
        // BENCH_SEEN_SET_BUCKETS: fewer buckets fill each as full as a worker's are in steady state
        // with the few ids a run under callgrind can afford (scripts/seen-set-instructions).
        let buckets = ProcessInfo.processInfo.environment["BENCH_SEEN_SET_BUCKETS"].flatMap { Int($0) }
            ?? ConfigSchema.defaultCount("dedup.compact.buckets")
        let compact = DoneLayout.compact(CompactRecords(
            retention: retention, slotsPerRetention: ConfigSchema.defaultCount("dedup.compact.slots"),
            buckets: buckets, readsKeysLayout: false))
        let upgrading = DoneLayout.compact(CompactRecords(
            retention: retention, slotsPerRetention: ConfigSchema.defaultCount("dedup.compact.slots"),
            buckets: buckets, readsKeysLayout: true))
        let variants = [
            ("compact", compact, false), ("compact + reading the keys layout", upgrading, false),
            ("compact through scripts (a cluster's way)", compact, true), ("keys", DoneLayout.keys, false),
        ]
        // Every variant confirms into one slot, even when the leg runs across a slot's end (at
        // midnight UTC by default): ids split over two slots' buckets make twice the bucket keys.
        let startMillis = Int64(Date().timeIntervalSince1970 * 1000)
        // The stream as the worker sends it, through one layout.
        func pass(_ name: String, _ layout: DoneLayout, scripts: Bool) async throws {
            let store = RedisClaimStore(
                connection: connection, logger: logger, unixMillis: { startMillis }, compactScripts: scripts)
            var seen = Set<String>()
            for start in stride(from: 0, to: ids.count, by: 1000) {
                var batch: [String] = []
                var inBatch = Set<String>()
                for id in ids[start..<min(start + 1000, ids.count)] where inBatch.insert(id).inserted { batch.append(id) }
                let outcomes = try await store.claim([KeyGroup(batch, ttl: .seconds(60), layout: layout)], owner: "bench")
                let claimed = zip(batch, outcomes).filter { $0.1 == .claimed }.map(\.0)
                _ = try await store.confirm([KeyGroup(claimed, ttl: retention, layout: layout)], owner: "bench")
                seen.formUnion(claimed)
            }
            guard seen.count == unique else { throw LocalServerError("\(name): claimed \(seen.count) of \(unique) unique ids") }
        }
        // Unmeasured: the server grows to the largest variant's size once (see above).
        try await pass("warm-up", .keys, scripts: false)
        var rows: [Row] = []
        for (name, layout, scripts) in variants {
            rows.append(try await measure(name, server: server, connection: connection, appendOnly: appendOnly) {
                try await pass(name, layout, scripts: scripts)
            })
        }
        rows.append(try await measure("SET NX PX (reference)", server: server, connection: connection, appendOnly: appendOnly) {
            for start in stride(from: 0, to: ids.count, by: 1000) {
                let commands: [[RedisArgument]] = ids[start..<min(start + 1000, ids.count)].map {
                    ["SET", RedisArgument($0), "1", "NX", "PX", 86_400_000]
                }
                _ = try await connection.pipeline(commands)
            }
        })
        for i in rows.indices {
            rows[i].bytesPerID /= Double(unique)
            rows[i].cpuMicrosPerUnique /= Double(unique)
            rows[i].kernelMicrosPerUnique /= Double(unique)
        }
        return Figures(
            count: count, unique: unique, persistence: appendOnly ? "AOF, appendfsync \(fsync)" : "no AOF", rows: rows)
    }

    /// Totals (bytes, µs) of one variant; the caller divides by the unique ids.
    static func measure(
        _ name: String, server: RedisServerProcess, connection: RedisConnection, appendOnly: Bool, _ body: () async throws -> Void
    ) async throws -> Row {
        _ = try await connection.command("FLUSHALL", "SYNC")
        if appendOnly { try await rewriteAOF(connection) }
        _ = try await connection.command("CONFIG", "RESETSTAT")
        // BENCH_REDIS_CALLGRIND=1, with redis-server run under callgrind (scripts/seen-set-instructions):
        // the server's instructions over this variant alone, in a dump named after it.
        let callgrind = ProcessInfo.processInfo.environment["BENCH_REDIS_CALLGRIND"] != nil
        if callgrind { try callgrindControl(["--zero", "\(server.pid)"]) }
        let before = try await RedisInfo.read(connection)
        try await body()
        let after = try await RedisInfo.read(connection)
        if callgrind {
            try callgrindControl(["--dump=" + name.map { $0.isLetter || $0.isNumber ? $0 : "_" }, "\(server.pid)"])
        }
        // BENCH_COMMANDSTATS=1: where Redis spent the time, per command (calls inside scripts included).
        if ProcessInfo.processInfo.environment["BENCH_COMMANDSTATS"] != nil {
            print("\(name): " + (try await connection.command("INFO", "commandstats").text ?? "")
                .split(whereSeparator: \.isNewline).filter { $0.hasPrefix("cmdstat_") }.joined(separator: "; "))
        }
        return Row(
            name: name, bytesPerID: Double(after.usedMemory - before.usedMemory),
            cpuMicrosPerUnique: (after.cpuSeconds - before.cpuSeconds) * 1e6,
            kernelMicrosPerUnique: (after.systemSeconds - before.systemSeconds) * 1e6)
    }

    /// `BGREWRITEAOF`, and waits until it is over: the next variant starts with an AOF as small
    /// as the empty keyspace, so the rewrites its own writes trigger are its own.
    private static func rewriteAOF(_ connection: RedisConnection) async throws {
        _ = try await connection.command("BGREWRITEAOF")
        for _ in 0..<600 {
            let text = try await connection.command("INFO", "persistence").text ?? ""
            if text.contains("aof_rewrite_in_progress:0"), text.contains("aof_rewrite_scheduled:0") { return }
            try await Task.sleep(for: .milliseconds(50))
        }
        throw LocalServerError("the AOF rewrite before a seen-set variant did not finish in 30 s")
    }

    private static func callgrindControl(_ arguments: [String]) throws {
        let control = Process()
        control.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        control.arguments = ["callgrind_control"] + arguments
        control.standardOutput = FileHandle.nullDevice
        try control.run()
        control.waitUntilExit()
        guard control.terminationStatus == 0 else { throw LocalServerError("callgrind_control \(arguments.joined(separator: " ")) failed") }
    }

    /// Ids as a worker's store keys; a repeat is an earlier id, chosen at random (seeded).
    static func stream(count: Int, duplicateRatio: Double) -> [String] {
        var rng = SplitMix64(seed: 15)
        var ids: [String] = []
        ids.reserveCapacity(count)
        var next = 0
        for _ in 0..<count {
            if next > 0, Double(rng.next() % 1_000_000) / 1_000_000 < duplicateRatio {
                ids.append(ids[Int(rng.next() % UInt64(ids.count))])
            } else {
                ids.append("dedupd:bench:order-\(next)")
                next += 1
            }
        }
        return ids
    }

    public static func render(_ figures: [Figures]) -> String {
        var out = "seen-set: Redis memory per remembered id and Redis CPU per unique message (INFO deltas; batches of 1,000, claim then confirm)\n"
        out += "| persistence | ids (unique) | layout | bytes per id | Redis CPU per unique message | of it kernel |\n| --- | --- | --- | --- | --- | --- |\n"
        for f in figures {
            for r in f.rows {
                out += String(
                    format: "| %@ | %d (%d) | %@ | %.1f B | %.2f µs | %.2f µs |\n", f.persistence, f.count, f.unique, r.name,
                    r.bytesPerID, r.cpuMicrosPerUnique, r.kernelMicrosPerUnique)
            }
        }
        return out
    }
}
