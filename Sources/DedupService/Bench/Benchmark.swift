import DedupCore
import Foundation
import KafkaIO
import Logging
import RedisIO
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// `dedupd bench`: dedupd's own pipeline against the physical limits of this machine, measured
/// in one run against one mock cluster (hosted here) and one local `redis-server`:
///
/// - **K**: a bare group consumer (librdkafka's C API in a tight loop, counting only) on a copy
///   of the stream;
/// - **R**: `SET NX PX` in 1000-deep pipelines through `RedisConnection`;
/// - **dedupd**: a `dedupd run` child process (claim, window, `log` handler to /dev/null,
///   confirm, commit) over the same stream, with its peak RSS;
/// - **latency**: a second child fed at about half of dedupd's measured rate, its `log` output
///   read here, added latency = arrival of the line − (send time + window).
///
/// Each leg gets its own topic with the same partition count and the same messages, produced
/// while it is consumed (the mock keeps only ~5 MB per partition; see `BenchProducer`).
public enum Benchmark {
    public struct Options: Sendable {
        public var count = 1_000_000
        public var partitions: Int32 = 6
        public var duplicateRatio = 0.3
        public var window: Duration = .milliseconds(100)
        public var valueBytes = 200
        /// Length of the paced latency leg.
        public var latencySeconds = 10
        public var brokers = 1
        /// The local redis-server's `appendfsync` (AOF is on either way).
        public var redisFsync = "everysec"
        /// The `dedupd` binary for the child legs.
        public var executable: String
        public init(executable: String) { self.executable = executable }
    }

    public struct Figures: Sendable {
        public var options: Options
        public var kRate: Double
        public var rRate: Double
        public var dRate: Double
        public var dCorrect: Bool
        public var dDetail: String
        public var peakRSSKiB: Int
        public var bufferLimit: String
        public var latencyRate: Int
        public var latencyCount: Int
        public var p50: Double
        public var p99: Double
        public var pMax: Double
        public var benchRSSKiB: Int
        public var ratio: Double { dRate / kRate }
    }

    public static func run(_ o: Options, logger: Logger) async throws -> Figures {
        let quiet = Logger(label: "bench", factory: { _ in SwiftLogNoOpLogHandler() })
        let scratch = try TemporaryDirectory(prefix: "dedupd-bench")
        let redis = try RedisServerProcess(appendFsync: o.redisFsync)
        defer { redis.stop() }
        let cluster = try MockKafkaCluster.make(brokers: o.brokers, logger: quiet)
        let nonce = String(UInt32.random(in: 0...UInt32.max), radix: 16)
        // Enough unread data to keep a consumer busy, well under the ~5 MB the mock keeps per
        // partition (a message is about 300 bytes there): 8,000 per partition.
        let maxLead = Int(o.partitions) * 8_000

        // R: pipelined SET NX PX through the project's adapter.
        logger.notice("bench: baseline R (redis SET NX PX, 1000-deep pipelines)")
        let rRate = try await redisBaseline(url: redis.url, count: o.count, nonce: nonce, logger: quiet)

        // K: the bare consumer, on a thread of its own, while the stream is produced.
        logger.notice("bench: baseline K (bare group consumer)")
        let kTopic = "bench-k-\(nonce)"
        try cluster.createTopic(kTopic, partitions: o.partitions)
        let kCount = SharedCount()
        let bootstrap = cluster.bootstrapServers
        let target = o.count
        async let kResult = onThread("bench.bare-consumer") { () -> Result<BareConsumer.Result, KafkaError> in
            Result { () throws(KafkaError) in
                try BareConsumer.count(
                    bootstrapServers: bootstrap, groupID: "bench-k-\(nonce)", topics: [kTopic], target: target,
                    timeout: .seconds(600), logger: quiet, progress: { kCount.set($0) })
            }
        }
        var traffic = BenchTraffic(duplicateRatio: o.duplicateRatio, valueBytes: o.valueBytes, prefix: "k-\(nonce)")
        let kProducer = try KafkaProducer.make(bootstrapServers: bootstrap, logger: quiet)
        _ = try await BenchProducer.run(
            producer: kProducer, topic: kTopic, count: o.count, traffic: &traffic, maxLead: maxLead,
            consumed: { kCount.current })
        let k = try (await kResult).get()
        guard k.messages == o.count, let kFirst = k.first, let kLast = k.last else {
            throw LocalServerError("bare consumer read \(k.messages) of \(o.count) messages")
        }
        let kRate = Double(k.messages) / seconds(kLast - kFirst)

        // dedupd: a child `dedupd run`, the same stream on its own topic.
        logger.notice("bench: dedupd (child process, log handler to /dev/null)")
        let d = try await workerLeg(
            o, name: "d", nonce: nonce, cluster: cluster, redisURL: redis.url, scratch: scratch, rate: nil,
            count: o.count, maxLead: maxLead, logger: logger)

        // Latency: another child, fed at half of the rate just measured.
        let latencyRate = max(1000, Int(d.rate / 2))
        let latencyCount = min(o.count, latencyRate * o.latencySeconds)
        logger.notice("bench: latency at half load", metadata: ["rate": "\(latencyRate)", "count": "\(latencyCount)"])
        let l = try await workerLeg(
            o, name: "l", nonce: nonce, cluster: cluster, redisURL: redis.url, scratch: scratch, rate: latencyRate,
            count: latencyCount, maxLead: maxLead, logger: logger)
        let sorted = l.latencies.sorted()
        func pct(_ p: Double) -> Double {
            guard !sorted.isEmpty else { return .nan }
            return Double(sorted[min(sorted.count - 1, Int(Double(sorted.count) * p))]) / 1000
        }
        var usage = rusage()
        getrusage(__rusage_who_t(RUSAGE_SELF.rawValue), &usage)
        return Figures(
            options: o, kRate: kRate, rRate: rRate, dRate: d.rate, dCorrect: d.correct && l.correct,
            dDetail: d.detail, peakRSSKiB: d.peakRSSKiB, bufferLimit: "100000 messages / 64 MiB (defaults)",
            latencyRate: latencyRate, latencyCount: sorted.count, p50: pct(0.50), p99: pct(0.99),
            pMax: sorted.last.map { Double($0) / 1000 } ?? .nan, benchRSSKiB: Int(usage.ru_maxrss))
    }

    // MARK: - Legs

    static func redisBaseline(url: String, count: Int, nonce: String, logger: Logger) async throws -> Double {
        let connection = try await RedisConnection.connect(try RedisURL(url), logger: logger)
        let clock = ContinuousClock()
        let started = clock.now
        var done = 0
        var stored = 0
        while done < count {
            let n = min(1000, count - done)
            var commands: [[RedisArgument]] = []
            commands.reserveCapacity(n)
            for i in done..<(done + n) {
                commands.append(["SET", RedisArgument("bench:r:\(nonce):\(i)"), "1", "NX", "PX", 600_000])
            }
            for reply in try await connection.pipeline(commands) where reply.text == "OK" { stored += 1 }
            done += n
        }
        let elapsed = clock.now - started
        // The next legs start from an empty store: a million fresh keys growing Redis' main
        // dictionary (incremental rehashing) would be charged to whichever leg comes next.
        _ = try await connection.command("FLUSHALL", "SYNC")
        await connection.close()
        guard stored == count else { throw LocalServerError("SET NX stored \(stored) of \(count) keys") }
        return Double(count) / seconds(elapsed)
    }

    struct WorkerLeg {
        var rate: Double
        var peakRSSKiB: Int
        var latencies: [Int64]
        var correct: Bool
        var detail: String
    }

    static func workerLeg(
        _ o: Options, name: String, nonce: String, cluster: MockKafkaCluster, redisURL: String,
        scratch: TemporaryDirectory, rate: Int?, count: Int, maxLead: Int, logger: Logger
    ) async throws -> WorkerLeg {
        let topic = "bench-\(name)-\(nonce)"
        try cluster.createTopic(topic, partitions: o.partitions)
        let config = scratch.file("\(name).yaml").path
        let yaml = """
            kafka:
              bootstrap_servers: "\(cluster.bootstrapServers)"
              topics: ["\(topic)"]
              group: "bench-\(name)-\(nonce)"
            \(rate == nil ? "" : "  properties:\n    fetch.wait.max.ms: 10\n")
            redis:
              url: "\(redisURL)"
            dedup:
              key: "header:message-id"
              namespace: "bench-\(name)-\(nonce)"
              window: "\(WorkerConfiguration.format(o.window))"
              retention: "1h"
            handler:
              type: log
              output: "\(rate == nil ? "/dev/null" : "-")"
            log:
              level: info
              stats_interval: 50ms

            """
        try yaml.write(toFile: config, atomically: true, encoding: .utf8)
        let windowMicros = o.window.milliseconds * 1000
        let child = try BenchChild(executable: o.executable, config: config, captureOutput: rate != nil, windowMicros: windowMicros)

        let consumed = SharedCount()
        let clock = ContinuousClock()
        // Keeps `consumed` current for the producer's lead bound; ends with the leg.
        let stop = Mutex(false)
        async let tracker: Void = {
            while !stop.withLock({ $0 }) && !Task.isCancelled {
                if let s = child.latest { consumed.set(s.consumed) }
                try? await Task.sleep(for: .milliseconds(5))
            }
        }()

        if rate != nil {
            // Latency is measured from the send: start sending once the worker has its partitions
            // (joining the group takes seconds), not before.
            let deadline = clock.now + .seconds(60)
            while !child.state.withLock({ $0.assigned }) && clock.now < deadline && child.process.isRunning {
                try await Task.sleep(for: .milliseconds(20))
            }
            try await Task.sleep(for: .seconds(1))
        }
        var traffic = BenchTraffic(duplicateRatio: o.duplicateRatio, valueBytes: o.valueBytes, prefix: "\(name)-\(nonce)")
        var props: [String: String] = [:]
        // Latency leg: the send time is taken at `produce()`, so the producer lingers at most 1 ms
        // (0 would make every message its own batch, and the mock broker's fetch path scans its
        // batches one by one: it slows down as they pile up).
        if rate != nil { props["linger.ms"] = "1" }
        let producer = try KafkaProducer.make(bootstrapServers: cluster.bootstrapServers, properties: props, logger: logger)
        let report: BenchProducer.Report
        do {
            report = try await BenchProducer.run(
                producer: producer, topic: topic, count: count, traffic: &traffic, maxLead: maxLead, rate: rate,
                consumed: { consumed.current }, alive: { child.process.isRunning })
        } catch {
            stop.withLock { $0 = true }
            let status = child.stop()
            throw LocalServerError("dedupd leg \(name): \(error) (worker exit \(status)); its log:\n\(child.logTail)")
        }

        // Wait until every message is resolved (dispatched, or recognised as a repeat).
        let deadline = clock.now + .seconds(300)
        while (child.latest?.resolved ?? 0) < count && clock.now < deadline && child.process.isRunning {
            try await Task.sleep(for: .milliseconds(10))
        }
        let peak = child.peakRSSKiB
        stop.withLock { $0 = true }
        await tracker
        let samples = child.state.withLock { $0.samples }
        let status = child.stop()
        guard let end = samples.firstIndex(where: { $0.resolved >= count }),
            let first = samples.firstIndex(where: { $0.consumed > 0 }), first > 0
        else {
            throw LocalServerError("dedupd leg \(name) did not finish (exit \(status)); log tail:\n\(child.logTail)")
        }
        // Each event lies between two stats lines 50 ms apart: take the middle of each.
        let startAt = samples[first - 1].at + (samples[first].at - samples[first - 1].at) / 2
        let endAt = end > 0 ? samples[end - 1].at + (samples[end].at - samples[end - 1].at) / 2 : samples[end].at
        let last = samples[end]
        let correct = last.dispatched == report.unique && report.sent == count && status == 0
        return WorkerLeg(
            rate: Double(count) / seconds(endAt - startAt), peakRSSKiB: peak,
            latencies: child.latencies.withLock { $0 }, correct: correct,
            detail: "dispatched=\(last.dispatched) unique=\(report.unique) sent=\(report.sent) exit=\(status)")
    }

    // MARK: - Output

    public static func render(_ f: Figures) -> String {
        func rate(_ r: Double) -> String { "\(group(Int(r.rounded()))) msg/s" }
        func ms(_ v: Double) -> String { String(format: "%.2f ms", v) }
        let o = f.options
        let mib = Double(f.peakRSSKiB) / 1024
        let bound = 64.0 + 64.0
        let rows: [(String, String)] = [
            ("baseline K: bare group consumer (C API loop, count only)", rate(f.kRate)),
            ("baseline R: SET NX PX via RedisConnection, 1000-deep pipelines", "\(group(Int(f.rRate.rounded()))) cmd/s"),
            ("dedupd: claim, window \(WorkerConfiguration.format(o.window)), log → /dev/null, confirm, commit", rate(f.dRate)),
            ("ratio dedupd / K (target ≥ 0.60)", String(format: "%.2f", f.ratio)),
            ("peak RSS of the dedupd process (VmHWM)", String(format: "%.1f MiB", mib)),
            ("added latency beyond the window, p50 (at \(group(f.latencyRate)) msg/s)", ms(f.p50)),
            ("added latency beyond the window, p99 (target < 5 ms)", ms(f.p99)),
            ("added latency beyond the window, max", ms(f.pMax)),
        ]
        let width = rows.map(\.0.count).max()!
        var out = "dedupd bench: \(group(o.count)) messages (value ~\(o.valueBytes) B), \(o.partitions) partitions, "
        out += "\(Int(o.duplicateRatio * 100))% repeats, mock cluster (\(o.brokers) broker), local redis-server (AOF, appendfsync \(o.redisFsync))\n"
        out += "| " + "figure".padding(toLength: width, withPad: " ", startingAt: 0) + " | value |\n"
        out += "| " + String(repeating: "-", count: width) + " | --- |\n"
        for (name, value) in rows {
            out += "| " + name.padding(toLength: width, withPad: " ", startingAt: 0) + " | \(value) |\n"
        }
        let verdicts = [
            "dedupd/K \(String(format: "%.2f", f.ratio)) \(f.ratio >= 0.6 ? "≥" : "<") 0.60",
            "p99 \(ms(f.p99)) \(f.p99 < 5 ? "<" : "≥") 5 ms",
            String(format: "peak RSS %.1f MiB %@ %.0f MiB (64 MiB + buffer.max_bytes)", mib, mib <= bound ? "≤" : ">", bound),
            "every unique id dispatched once: \(f.dCorrect ? "yes" : "NO (\(f.dDetail))")",
            String(format: "bench process itself (mock cluster, producer): %.1f MiB", Double(f.benchRSSKiB) / 1024),
        ]
        out += "bench: " + verdicts.joined(separator: "; ")
        return out
    }

    static func group(_ n: Int) -> String {
        let s = String(n)
        var out = ""
        for (i, c) in s.reversed().enumerated() {
            if i > 0 && i % 3 == 0 { out.append(",") }
            out.append(c)
        }
        return String(out.reversed())
    }

    static func seconds(_ d: Duration) -> Double {
        let (s, atto) = d.components
        return max(1e-9, Double(s) + Double(atto) / 1e18)
    }

    static func onThread<T: Sendable>(_ name: String, _ body: @escaping @Sendable () -> T) async -> T {
        await withCheckedContinuation { c in
            BenchChild.thread(name) { c.resume(returning: body()) }
        }
    }
}
