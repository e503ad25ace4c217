import Foundation
import KafkaIO
import Testing
import TestSupport

/// A rolling restart under steady traffic, in both rebalance modes (issue 19): three `dedupd run`
/// workers on six partitions, each stopped with SIGTERM and started again in turn, while a
/// producer sends at a steady rate. Measured from the handler side (the `log` handler's lines,
/// sampled every 100 ms) and from the workers' own shutdown summaries:
/// - the largest gap between dispatches on a partition that stayed with its worker through a
///   restart (cooperative: such partitions keep flowing; eager: every rebalance stops them all),
/// - messages read more than once (Σ consumed over every worker run − messages in the topic),
/// - lost and duplicated ids (none allowed in either mode).
/// The traffic is a chain of producers, each with ids of its own, started one after another until
/// the last restart has settled: how long restarts take depends on the machine, not on the test.
@Suite(.serialized) struct RollingRestartTests {
    @Test(.timeLimit(.minutes(8)))
    func cooperativeRollingRestartKeepsUnmovedPartitionsFlowingAndRereadsLittle() async throws {
        let eager = try await RollingRestart(mode: "eager").run()
        let cooperative = try await RollingRestart(mode: "cooperative").run()
        for r in [eager, cooperative] {
            print("rolling: \(r)")
            #expect(r.lost == 0, "\(r.mode): lost")
            #expect(r.duplicates == 0, "\(r.mode): duplicates")
            #expect(r.extra == 0, "\(r.mode): ids never produced")
            #expect(r.trafficCoveredRestarts, "\(r.mode): no producer was sending when the last restart settled")
        }
        // Eager: every partition is revoked at every rebalance, so none is unmoved (the range
        // assignor often hands it back to another worker, too): the stop they all see is the
        // smallest, over partitions, of each one's largest gap. Cooperative: a partition that
        // stays with its worker keeps being dispatched.
        let eagerStop = eager.smallestPartitionGap
        let coopGap = try #require(cooperative.unmovedGap, "cooperative: no partition stayed with its worker through a restart")
        #expect(coopGap * 3 < eagerStop, "largest gap on an unmoved partition: cooperative \(coopGap), eager stop \(eagerStop)")
        #expect(cooperative.reread * 10 <= eager.reread, "re-read per rolling restart: cooperative \(cooperative.reread), eager \(eager.reread)")
    }
}

struct RollingOutcome: CustomStringConvertible {
    var mode = ""
    var produced = 0, unique = 0, dispatched = 0, lost = 0, extra = 0, duplicates = 0
    /// Σ consumed over every worker run, minus the messages in the topic.
    var reread = 0
    /// What the workers counted themselves (`reread` of their summaries).
    var rereadCounted = 0
    var rebalances = 0, revoked = 0, assigned = 0
    /// Largest dispatch gap, during the restarts, between two dispatches of a partition by the same worker run.
    var unmovedGap: Duration?
    /// Largest dispatch gap of any partition during the restarts.
    var largestGap: Duration = .zero
    /// The smallest, over partitions, of each one's largest gap during the restarts.
    var smallestPartitionGap: Duration = .zero
    var restartsTook: Duration = .zero
    var trafficCoveredRestarts = false

    var description: String {
        "mode=\(mode) produced=\(produced) unique=\(unique) dispatched=\(dispatched) lost=\(lost) duplicates=\(duplicates) reread=\(reread) reread_counted=\(rereadCounted) rebalances=\(rebalances) revoked=\(revoked) assigned=\(assigned) unmoved_gap_max=\(unmovedGap.map { "\($0)" } ?? "none") gap_max=\(largestGap) smallest_partition_gap=\(smallestPartitionGap) restarts_took=\(restartsTook)"
    }
}

final class RollingRestart {
    static let rate = 250
    /// Messages per producer in the chain: 20 s of traffic each.
    static let messagesPerProducer = 5_000

    let mode: String
    let dir: TemporaryDirectory
    var workers: [DedupdProcess?] = [nil, nil, nil]
    var runs = 0
    var finished: [DedupdProcess] = []
    /// Dispatches seen so far: (sample time, partition, output file).
    var seen: [(at: ContinuousClock.Instant, partition: Int, file: String)] = []
    var ids: [String] = []
    var readOffsets: [String: Int] = [:]
    /// The chain of producers so far (see `keepTrafficFlowing`).
    var producers: [DedupdProcess] = []
    var trafficWanted = true
    var lastProducerStarted = ContinuousClock.now
    var bootstrap = ""

    init(mode: String) throws {
        self.mode = mode
        dir = try TemporaryDirectory(prefix: "dedupd-rolling-\(mode)")
    }

    func note(_ s: String) { print("rolling[\(mode)]: \(s)") }

    func run() async throws -> RollingOutcome {
        let redis = try RedisServerProcess()
        let mock = try DedupdProcess(["mock-kafka", "--brokers", "1", "--topic", "orders:6"], name: "mock-kafka", in: dir, stdin: true)
        bootstrap = try mock.firstLine(timeout: .seconds(20))
        let group = "rolling-\(mode)"
        let config = dir.file("worker.yaml")
        try writeGroupWorkerConfig(
            to: config, bootstrap: bootstrap, redisURL: redis.url, group: group, rebalance: mode,
            concurrency: 4, maxBatch: 50)

        func start(_ slot: Int) throws {
            runs += 1
            let name = "slot\(slot)-run\(runs)"
            workers[slot] = try DedupdProcess(
                ["run", "--config", config.path, "--output", dir.file("\(name).jsonl").path], name: name, in: dir)
        }
        for slot in 0..<3 { try start(slot) }
        try keepTrafficFlowing()
        // Steady state: every worker dispatches and every partition flows.
        try await waitUntil(timeout: .seconds(60)) {
            Set(self.seen.map(\.file)).count == 3 && Set(self.seen.suffix(600).map(\.partition)).count == 6
        }
        try await pause(.seconds(3))

        var outcome = RollingOutcome(mode: mode)
        let restartsBegan = ContinuousClock.now
        for slot in 0..<3 {
            let w = workers[slot]!
            w.terminate()
            try await waitUntil(timeout: .seconds(30)) { !w.process.isRunning }
            #expect(w.process.terminationStatus == 0, "\(w.name) exit after SIGTERM: \(w.stderr.suffix(2000))")
            finished.append(w)
            note("\(w.name) stopped")
            try start(slot)
            let name = workers[slot]!.name
            // Settled: the new worker dispatches, and so does every partition since it did.
            try await waitUntil(timeout: .seconds(60)) { self.seen.contains { $0.file == name } }
            let since = ContinuousClock.now
            try await waitUntil(timeout: .seconds(60)) { Set(self.seen.filter { $0.at >= since }.map(\.partition)).count == 6 }
            try await pause(.seconds(3))
            note("\(name) settled")
        }
        let restartsEnded = ContinuousClock.now
        outcome.restartsTook = restartsEnded - restartsBegan
        outcome.trafficCoveredRestarts = producers.last!.process.isRunning
        trafficWanted = false

        var expected = Set<String>()
        for (k, produce) in producers.enumerated() {
            #expect(try produce.wait(timeout: .seconds(120)) == 0, "\(produce.name): \(produce.stderr)")
            let match = try #require(produce.stdout.firstMatch(of: /sent=(\d+) unique=(\d+)/), "\(produce.name) printed: \(produce.stdout)")
            outcome.produced += Int(match.1)!
            outcome.unique += Int(match.2)!
            expected.formUnion((0..<Int(match.2)!).map { "p\(k)-\($0)" })
        }
        try await waitUntil(timeout: .seconds(60)) { Set(self.ids).isSuperset(of: expected) }
        try await pause(.seconds(2))
        for w in workers.compactMap({ $0 }) {
            w.terminate()
            try await waitUntil(timeout: .seconds(30)) { !w.process.isRunning }
            #expect(w.process.terminationStatus == 0, "\(w.name) final SIGTERM: \(w.stderr.suffix(2000))")
            finished.append(w)
        }
        sample()

        let distinct = Set(ids)
        outcome.dispatched = ids.count
        outcome.lost = expected.subtracting(distinct).count
        outcome.extra = distinct.subtracting(expected).count
        outcome.duplicates = ids.count - distinct.count

        var consumed = 0
        for w in finished {
            let summary = try #require(w.stderr.split(separator: "\n").last { $0.contains("shutdown complete") }, "\(w.name): no summary")
            func field(_ name: String) -> Int {
                guard let m = summary.firstMatch(of: try! Regex("\(name)=\"?(\\d+)")) else { return 0 }
                return Int(m.output[1].substring ?? "") ?? 0
            }
            consumed += field(" consumed")
            outcome.rereadCounted += field("reread")
            outcome.rebalances += field("kafka.rebalances")
            outcome.revoked += field("kafka.partitions.revoked")
            outcome.assigned += field("kafka.partitions.assigned")
        }
        outcome.reread = consumed - outcome.produced

        // Gaps during the restarts, per partition, from the sampled dispatches.
        let during = seen.filter { $0.at >= restartsBegan && $0.at <= restartsEnded }
        var smallest: Duration?
        for p in 0..<6 {
            let events = during.filter { $0.partition == p }
            var largest: Duration = .zero
            for (a, b) in zip(events, events.dropFirst()) {
                let gap = b.at - a.at
                largest = max(largest, gap)
                if a.file == b.file { outcome.unmovedGap = max(outcome.unmovedGap ?? .zero, gap) }
            }
            outcome.largestGap = max(outcome.largestGap, largest)
            smallest = min(smallest ?? largest, largest)
        }
        outcome.smallestPartitionGap = smallest ?? .zero

        mock.terminate()
        _ = try? mock.wait(timeout: .seconds(20))
        if let keep = ProcessInfo.processInfo.environment["CHAOS_KEEP_DIR"] {
            let target = "\(keep)/rolling-\(mode)"
            try? FileManager.default.removeItem(atPath: target)
            try FileManager.default.copyItem(atPath: dir.path, toPath: target)
        }
        withExtendedLifetime(redis) {}
        return outcome
    }

    /// Starts the next producer of the chain while traffic is wanted: two seconds before the
    /// last one is due to finish (they overlap, so the chain leaves no gap of its own in the
    /// dispatches), or at once if none is sending.
    func keepTrafficFlowing() throws {
        guard trafficWanted else { return }
        if let last = producers.last, last.process.isRunning,
            ContinuousClock.now < lastProducerStarted + .seconds(Self.messagesPerProducer / Self.rate - 2) {
            return
        }
        lastProducerStarted = ContinuousClock.now
        let k = producers.count
        producers.append(try DedupdProcess(
            ["produce", "--bootstrap-servers", bootstrap, "--topic", "orders", "--count", "\(Self.messagesPerProducer)",
             "--duplicate-ratio", "0.3", "--rate", "\(Self.rate)", "--id-prefix", "p\(k)", "--seed", "\(42 + k)"],
            name: "produce\(k)", in: dir))
    }

    /// Reads what the `log` handler appended since the last call, and notes each dispatch's
    /// partition with the time it was seen.
    func sample() {
        let now = ContinuousClock.now
        let files = ((try? FileManager.default.contentsOfDirectory(atPath: dir.path)) ?? []).filter { $0.hasSuffix(".jsonl") }
        for name in files.sorted() {
            guard let data = FileManager.default.contents(atPath: dir.file(name).path) else { continue }
            let from = readOffsets[name] ?? 0
            // Only whole lines: a line being written is taken at the next sample.
            guard let end = data.lastIndex(of: UInt8(ascii: "\n")), end + 1 > from else { continue }
            readOffsets[name] = end + 1
            for line in data[from...end].split(separator: UInt8(ascii: "\n")) {
                guard let object = try? JSONSerialization.jsonObject(with: Data(line)) as? [String: Any],
                    let partition = object["partition"] as? Int,
                    let id = (object["headers"] as? [String: Any])?["message-id"] as? String
                else { continue }
                seen.append((now, partition, String(name.dropLast(".jsonl".count))))
                ids.append(id)
            }
        }
    }

    func pause(_ d: Duration) async throws {
        let end = ContinuousClock.now + d
        while ContinuousClock.now < end {
            try keepTrafficFlowing()
            sample()
            try await Task.sleep(for: .milliseconds(100))
        }
    }

    func waitUntil(timeout: Duration, _ condition: () throws -> Bool) async throws {
        let deadline = ContinuousClock.now + timeout
        while true {
            try keepTrafficFlowing()
            sample()
            if try condition() { return }
            guard ContinuousClock.now < deadline else { throw TestSupportError("rolling[\(mode)]: condition not met within \(timeout)") }
            try await Task.sleep(for: .milliseconds(100))
        }
    }
}
