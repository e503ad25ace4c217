import DedupCore
import Foundation
import RedisIO
import Testing
import TestSupport

/// Issue 15's memory bound through the real binary: `dedupd run` with default settings (the
/// compact layout, a 5 s window) and the `log` handler takes submissions with 30% repeats from the
/// mock cluster, about 200,000 unique ids. Once every unique id is dispatched and no claim is
/// pending, the seen-set may hold at most 32 B of Redis memory per unique id (`used_memory` delta
/// from before the worker started), and each unique id was dispatched exactly once.
///
/// The traffic is a steady flow, not a burst read at once: Redis does not shrink its keyspace's
/// hash table once the pending claims are gone, so a short run whose every claim is pending at
/// the same moment would be charged a table sized for all of them (docs/performance-history.md).
///
/// The bound is for a run inside one slot of the compact layout (24 h by default, from midnight
/// UTC): a run that crosses a slot's end confirms into two slots' buckets, twice as many bucket
/// keys for the same ids, so the test starts after the boundary when its run could cross it.
@Suite(.serialized) struct SeenSetMemoryTests {
    /// Submissions; with 30% repeats, about 200,000 unique ids (~24 per bucket of the default 8,192,
    /// so each bucket's own key weighs a few bytes per id).
    static let count = 285_000
    static let rate = 5000
    static let bytesPerIDBound = 32.0

    /// The longest the run itself may take; the time limit adds room for the wait below (at
    /// most this long again).
    static let runAtMost: Duration = .seconds(240)

    @Test(.timeLimit(.minutes(9)))
    func twoHundredThousandUniqueIDsLeaveAtMost32BytesEach() async throws {
        try await Self.startInsideOneSlot()
        let dir = try TemporaryDirectory(prefix: "dedupd-seen-set")
        let redis = try RedisServerProcess()
        let mock = try DedupdProcess(["mock-kafka", "--brokers", "1", "--topic", "seen:6"], name: "mock-kafka", in: dir)
        let bootstrap = try mock.firstLine(timeout: .seconds(20))
        let connection = try await RedisConnection.connect(try RedisURL(redis.url), logger: quietLogger())
        let before = try await RedisInfo.read(connection)

        let output = dir.file("out.jsonl")
        let worker = try DedupdProcess(
            ["run", "--bootstrap-servers", bootstrap, "--topic", "seen", "--group", "seen", "--redis-url", redis.url,
             "--output", output.path, "--stats-interval", "5s"], name: "worker", in: dir)
        #expect(try await waitUntil(timeout: .seconds(40)) { worker.stderr.contains("partitions assigned") || !worker.process.isRunning })
        let produce = try DedupdProcess(
            ["produce", "--bootstrap-servers", bootstrap, "--topic", "seen", "--count", "\(Self.count)", "--duplicate-ratio", "0.3",
             "--rate", "\(Self.rate)"], name: "produce", in: dir)
        #expect(try produce.wait(timeout: .seconds(150)) == 0, "produce: \(produce.stderr.suffix(2000))")
        let match = try #require(produce.stdout.firstMatch(of: /unique=(\d+)/), "produce printed: \(produce.stdout)")
        let unique = try #require(Int(match.1))

        // Every unique id dispatched, counted from the handler side (one JSON line each).
        let allDispatched = try await waitUntil(timeout: .seconds(90)) {
            guard worker.process.isRunning else { return true }
            try await Task.sleep(for: .milliseconds(200))
            return Self.lineCount(output) >= unique
        }
        #expect(allDispatched && worker.process.isRunning, "dispatched \(Self.lineCount(output)) of \(unique); worker log: \(worker.stderr.suffix(3000))")
        // Then nothing pending: the confirms that follow the last dispatches remove the last
        // pending claims, and what is left is done records.
        var pending = -1
        let settled = try await waitUntil(timeout: .seconds(30)) {
            pending = try await Self.pendingClaims(connection)
            if pending > 0 { try await Task.sleep(for: .milliseconds(200)) }
            return pending == 0
        }
        #expect(settled, "\(pending) claims still pending")
        let after = try await RedisInfo.read(connection)
        await connection.close()

        worker.terminate()
        #expect(try worker.wait(timeout: .seconds(60)) == 0, "worker log: \(worker.stderr.suffix(3000))")
        mock.terminate()
        _ = try? mock.wait(timeout: .seconds(20))

        let ids = dispatchedIDs(inJSONLines: (try? String(contentsOf: output, encoding: .utf8)) ?? "")
        let bytesPerID = Double(after.usedMemory - before.usedMemory) / Double(unique)
        print(String(format: "seen-set e2e: %.1f B of Redis memory per unique id (bound %.0f B), %d submissions, %d unique, %d dispatched",
                     bytesPerID, Self.bytesPerIDBound, Self.count, unique, ids.count))
        #expect(bytesPerID <= Self.bytesPerIDBound, "\(bytesPerID) B per unique id")
        #expect(ids.count == unique, "every unique id once: \(ids.count) dispatched for \(unique) unique")
        #expect(Set(ids) == Set((0..<unique).map { "ord-\($0)" }), "nothing else dispatched, nothing missing")
    }

    /// Waits for the next slot when the default slot ends within `runAtMost` (at most that long,
    /// in ~0.3% of runs with a 24 h slot).
    static func startInsideOneSlot() async throws {
        let records = CompactRecords(
            retention: ConfigSchema.defaultDuration("dedup.retention"),
            slotsPerRetention: ConfigSchema.defaultCount("dedup.compact.slots"))
        let now = Int64(Date().timeIntervalSince1970 * 1000)
        let slot = records.slot(at: now)
        guard records.slot(at: now + CompactRecords.millis(runAtMost)) != slot else { return }
        let wait = (slot + 1) * records.slotMillis - now + 1000
        print("seen-set e2e: the default slot ends in \(wait / 1000) s; starting after it")
        try await Task.sleep(for: .milliseconds(wait))
    }

    /// Newline count of the handler's output, without parsing it (polled while it grows).
    static func lineCount(_ url: URL) -> Int {
        guard let data = try? Data(contentsOf: url) else { return 0 }
        return data.reduce(0) { $0 + ($1 == UInt8(ascii: "\n") ? 1 : 0) }
    }

    /// Keys that are not compact buckets (`dedupd:{<namespace>:<tag>}:d:...`): pending claims, at
    /// the keys layout's name while that layout is read (the default) or their own.
    static func pendingClaims(_ connection: RedisConnection) async throws -> Int {
        var cursor = "0"
        var count = 0
        repeat {
            let reply = try await connection.command(["SCAN", RedisArgument(cursor), "COUNT", "1000"])
            guard case .array(let parts) = reply, parts.count == 2, let next = parts[0].text, case .array(let keys) = parts[1] else {
                throw TestSupportError("unexpected SCAN reply")
            }
            count += keys.compactMap(\.text).filter { !($0.hasPrefix("dedupd:{") && $0.contains("}:d:")) }.count
            cursor = next
        } while cursor != "0"
        return count
    }
}
