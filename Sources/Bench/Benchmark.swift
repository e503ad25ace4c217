import DedupCore
import Foundation
import KafkaIO
import LocalServers
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
/// - **KH**: the same consumer looking up each message's `message-id` header, the key's source
///   in the bench's configuration (librdkafka parses a message's headers on first use), for
///   reference: what any consumer keyed by a header pays before doing anything with the key;
/// - **R**: `SET NX PX` in 1000-deep pipelines through `RedisConnection`;
/// - **dedupd**: a `dedupd run` child process (claim, window, `log` handler to /dev/null,
///   confirm, commit) over the same stream, with its peak RSS;
/// - **latency**: a second child fed at about half of dedupd's measured rate, its `log` output
///   read here, added latency = arrival of the line − (send time + window); beside it a bare
///   consumer in its own group reads the same topic, so each message's transport latency is
///   known and dedupd's own share (arrival − window − bare arrival) is measured per message.
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
        /// The latency leg's rate (messages per second); nil: half of dedupd's measured rate.
        public var latencyRate: Int?
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
        /// CPU time (user + system) the dedupd child spent per message over the throughput leg:
        /// unlike the rate, it hardly moves when other work shares the machine.
        public var cpuMicrosPerMessage: Double
        /// The same figure for the bare consumer (K), measured the same way in the same run.
        public var bareCPUMicrosPerMessage: Double
        /// The same figure for the bare consumer that looks the key's header up (KH).
        public var headerBareCPUMicrosPerMessage: Double
        /// redis-server's CPU time (INFO cpu, user + system) over dedupd's throughput leg, per
        /// unique message: the cost every worker of a fleet puts on the shared Redis.
        public var redisCPUMicrosPerUnique: Double
        public var bufferLimit: String
        public var latencyRate: Int
        public var latency: LatencyFigures
        /// `cpuMicrosPerMessage` over the latency leg: fewer messages per loop pass than at full
        /// speed, so each pays more of the pass's fixed costs (thread hops, round trips).
        public var latencyCPUMicrosPerMessage: Double
        public var benchRSSKiB: Int
        public var ratio: Double { dRate / kRate }
        public var cpuRatio: Double { cpuMicrosPerMessage / bareCPUMicrosPerMessage }
        public var headerCPURatio: Double { cpuMicrosPerMessage / headerBareCPUMicrosPerMessage }
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

        // K: the bare consumer, a child process like dedupd's, while the same stream is produced.
        logger.notice("bench: baseline K (bare group consumer, child process)")
        let k = try await workerLeg(
            o, name: "k", nonce: nonce, cluster: cluster, redisURL: redis.url, scratch: scratch, rate: nil,
            count: o.count, maxLead: maxLead, bareChild: true, logger: logger)
        guard k.correct else { throw LocalServerError("bare consumer: \(k.detail)") }
        logger.notice("bench: baseline KH (bare group consumer reading the message-id header, child process)")
        let kh = try await workerLeg(
            o, name: "kh", nonce: nonce, cluster: cluster, redisURL: redis.url, scratch: scratch, rate: nil,
            count: o.count, maxLead: maxLead, bareChild: true, bareHeader: "message-id", logger: logger)
        guard kh.correct else { throw LocalServerError("bare consumer reading headers: \(kh.detail)") }

        // dedupd: a child `dedupd run`, the same stream on its own topic.
        logger.notice("bench: dedupd (child process, log handler to /dev/null)")
        let redisBefore = try await redisCPUMicros(url: redis.url, logger: quiet)
        let d = try await workerLeg(
            o, name: "d", nonce: nonce, cluster: cluster, redisURL: redis.url, scratch: scratch, rate: nil,
            count: o.count, maxLead: maxLead, logger: logger)
        let redisAfter = try await redisCPUMicros(url: redis.url, logger: quiet)

        try await flushRedis(url: redis.url, logger: quiet)
        // Latency: another child, fed at half of the rate just measured (or --latency-rate), and beside it a bare
        // consumer (its own group) reading the same topic, so each message's transport latency
        // (producer linger, the mock broker, fetching) is known and dedupd's own share with it.
        let latencyRate = o.latencyRate ?? max(1000, Int(d.rate / 2))
        let latencyCount = min(o.count, latencyRate * o.latencySeconds)
        logger.notice("bench: latency", metadata: ["rate": "\(latencyRate)", "count": "\(latencyCount)"])
        let l = try await workerLeg(
            o, name: "l", nonce: nonce, cluster: cluster, redisURL: redis.url, scratch: scratch, rate: latencyRate,
            count: latencyCount, maxLead: maxLead, logger: logger)
        let latency = LatencyFigures(l.dispatches, bare: l.bareReceived, windowMicros: o.window.milliseconds * 1000)
        var usage = rusage()
        getrusage(__rusage_who_t(RUSAGE_SELF.rawValue), &usage)
        return Figures(
            options: o, kRate: k.rate, rRate: rRate, dRate: d.rate, dCorrect: d.correct && l.correct,
            dDetail: d.detail, peakRSSKiB: d.peakRSSKiB, cpuMicrosPerMessage: d.cpuMicrosPerMessage,
            bareCPUMicrosPerMessage: k.cpuMicrosPerMessage, headerBareCPUMicrosPerMessage: kh.cpuMicrosPerMessage,
            redisCPUMicrosPerUnique: Double(redisAfter - redisBefore) / Double(max(1, d.unique)),
            bufferLimit: "100000 messages / 64 MiB (defaults)",
            latencyRate: latencyRate, latency: latency, latencyCPUMicrosPerMessage: l.cpuMicrosPerMessage, benchRSSKiB: Int(usage.ru_maxrss))
    }

    /// Every leg's consumer settings (K, the worker children, the bare consumer beside the latency
    /// worker). The mock broker answers a fetch that finds nothing new only after
    /// fetch.wait.max.ms (a produce does not wake it, as it wakes a real broker), so librdkafka's
    /// 500 ms would measure the mock's wait, not the consumer: in the latency leg directly, and in
    /// the throughput legs whenever the consumer has caught up with the producer, which pauses
    /// while it is `maxLead` ahead: the fetch then sits in the mock while the producer sends
    /// again, and the consumer's queue runs dry. 1 ms keeps that wait below what the targets can
    /// see. Against a real broker the default is right (it answers once data arrives).
    static let mockConsumerProperties = ["fetch.wait.max.ms": "1"]
    /// The send time is taken at `produce()`, so the producer's linger counts in the transport
    /// latency. The mock broker returns one record batch per partition per fetch (a FIXME in
    /// librdkafka's mock), so batches must stay larger than what arrives between two fetches:
    /// with `linger.ms=1` the batches are tiny and the consumers fall behind the producer, so the
    /// transport alone dominates the latency; 5 ms (librdkafka's default) keeps up. The bare
    /// consumer beside the worker sees the same batches, so the linger is measured apart from
    /// dedupd's own share.
    static let latencyProducerProperties = ["linger.ms": "5"]

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
        await connection.close()
        try await flushRedis(url: url, logger: logger)
        guard stored == count else { throw LocalServerError("SET NX stored \(stored) of \(count) keys") }
        return Double(count) / seconds(elapsed)
    }

    /// Each leg starts from an empty store: the keys a leg left behind would grow Redis' main
    /// dictionary in the next one (a resize, then incremental rehashing in Redis' only thread),
    /// and the next leg would be charged for it.
    static func flushRedis(url: String, logger: Logger) async throws {
        let connection = try await RedisConnection.connect(try RedisURL(url), logger: logger)
        _ = try await connection.command("FLUSHALL", "SYNC")
        await connection.close()
    }

    /// redis-server's CPU time so far (`INFO cpu`: used_cpu_user + used_cpu_sys), in µs.
    static func redisCPUMicros(url: String, logger: Logger) async throws -> Int {
        let connection = try await RedisConnection.connect(try RedisURL(url), logger: logger)
        let info = try await connection.command("INFO", "cpu").text ?? ""
        await connection.close()
        var total = 0.0
        for line in info.split(whereSeparator: \.isNewline) {
            let parts = line.split(separator: ":")
            guard parts.count == 2, parts[0] == "used_cpu_user" || parts[0] == "used_cpu_sys" else { continue }
            total += Double(parts[1].trimmingCharacters(in: .whitespaces)) ?? 0
        }
        return Int((total * 1e6).rounded())
    }

    struct WorkerLeg {
        var rate: Double
        var peakRSSKiB: Int
        var cpuMicrosPerMessage: Double
        /// Latency leg: each dispatched line's send time and arrival (wall clock, µs).
        var dispatches: [BenchChild.Arrival]
        /// Latency leg: send time → arrival at the bare consumer beside the worker (µs).
        var bareReceived: [Int64: Int64]
        var correct: Bool
        var detail: String
        /// Unique ids in the leg's stream.
        var unique: Int
    }

    static func workerLeg(
        _ o: Options, name: String, nonce: String, cluster: MockKafkaCluster, redisURL: String,
        scratch: TemporaryDirectory, rate: Int?, count: Int, maxLead: Int, bareChild: Bool = false,
        bareHeader: String? = nil, logger: Logger
    ) async throws -> WorkerLeg {
        let topic = "bench-\(name)-\(nonce)"
        try cluster.createTopic(topic, partitions: o.partitions)
        let config = scratch.file("\(name).yaml").path
        let yaml = """
            kafka:
              bootstrap_servers: "\(cluster.bootstrapServers)"
              topics: ["\(topic)"]
              group: "bench-\(name)-\(nonce)"
              properties:
            \(mockConsumerProperties.map { "    \($0.key): \"\($0.value)\"\n" }.joined())
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
        // The bare consumer (K) is a child of its own too, so both CPU figures are read the same
        // way: /proc/PID/stat at each stats line of the child.
        let arguments = bareChild
            ? ["bench-bare", "--bootstrap-servers", cluster.bootstrapServers, "--group", "bench-\(name)-\(nonce)",
               "--topic", topic, "--count", String(count)]
                + mockConsumerProperties.map { "--property=\($0.key)=\($0.value)" }
                + (bareHeader.map { ["--read-header", $0] } ?? [])
            : ["run", "--config", config]
        let child = try BenchChild(name: name, executable: o.executable, arguments: arguments, captureOutput: rate != nil)

        // The latency leg starts with one warm-up message (no bench-ts): the paced stream starts
        // once the worker and the bare consumer both received it, i.e. once both joined their
        // groups and fetch (joining takes seconds; "partitions assigned" alone is too early: the
        // first fetch still waits for the committed offsets and an offset reset).
        let warmUp = rate == nil ? 0 : 1
        let consumed = SharedCount()
        let clock = ContinuousClock()
        // Keeps `consumed` current for the producer's lead bound; ends with the leg.
        let stop = Mutex(false)
        async let tracker: Void = {
            while !stop.withLock({ $0 }) && !Task.isCancelled {
                if let s = child.latest { consumed.set(max(0, s.consumed - warmUp)) }
                try? await Task.sleep(for: .milliseconds(5))
            }
        }()

        let bareCount = SharedCount()
        let bootstrap = cluster.bootstrapServers
        let bareGroup = "bench-\(name)-bare-\(nonce)"
        async let bare: Result<[Int64: Int64], KafkaError> = rate == nil ? .success([:]) : onThread("bench.bare-latency") {
            Result { () throws(KafkaError) in
                var received: [Int64: Int64] = [:]
                received.reserveCapacity(count)
                _ = try BareConsumer.count(
                    bootstrapServers: bootstrap, groupID: bareGroup, topics: [topic], target: count + warmUp,
                    properties: mockConsumerProperties, timeout: .seconds(600),
                    logger: Logger(label: "bench", factory: { _ in SwiftLogNoOpLogHandler() }),
                    progress: { bareCount.set($0) }, header: BenchTraffic.timestampHeader,
                    onHeader: { bytes in
                        let now = wallMicros()
                        // Two sends in the same microsecond share a key: the first arrival stands.
                        if let sent = BenchChild.number(bytes), received[sent] == nil { received[sent] = now }
                    })
                return received
            }
        }

        var traffic = BenchTraffic(duplicateRatio: o.duplicateRatio, valueBytes: o.valueBytes, prefix: "\(name)-\(nonce)")
        let props = rate == nil ? [:] : latencyProducerProperties
        let producer = try KafkaProducer.make(bootstrapServers: cluster.bootstrapServers, properties: props, logger: logger)
        if rate != nil {
            try producer.send(
                topic: topic, key: Array("warm-up".utf8), value: Array("{}".utf8),
                headers: [MessageHeader(name: "message-id", value: Array("warm-up-\(nonce)".utf8))])
            let deadline = clock.now + .seconds(60)
            while (child.latest?.consumed ?? 0) < 1 || bareCount.current < 1, clock.now < deadline, child.process.isRunning {
                try await Task.sleep(for: .milliseconds(20))
            }
        }
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
        let total = count + warmUp
        let deadline = clock.now + .seconds(300)
        while (child.latest?.resolved ?? 0) < total && clock.now < deadline && child.process.isRunning {
            try await Task.sleep(for: .milliseconds(10))
        }
        let peak = child.peakRSSKiB
        // The bare child exits by itself once it has counted everything, after leaving the group;
        // a SIGTERM while it leaves (slow when its broker connection has just dropped) would end
        // it with status 15 and fail the leg.
        if bareChild {
            let exitBy = clock.now + .seconds(30)
            while child.process.isRunning && clock.now < exitBy { try await Task.sleep(for: .milliseconds(10)) }
        }
        stop.withLock { $0 = true }
        await tracker
        let samples = child.state.withLock { $0.samples }
        let status = child.stop()
        let bareReceived = try (await bare).get()
        guard let end = samples.firstIndex(where: { $0.resolved >= total }),
            let first = samples.firstIndex(where: { $0.consumed > warmUp }), first > 0 || bareChild
        else {
            throw LocalServerError("dedupd leg \(name) did not finish (exit \(status)); log tail:\n\(child.logTail)")
        }
        let last = samples[end]
        // The CPU span runs from the last stats line before the first message (the bare child
        // writes its first line at its first message) to the first line after the last one.
        let from = bareChild ? first : first - 1
        let rate: Double
        if bareChild {
            rate = Double(count - 1) / seconds(samples[end].at - samples[first].at)
        } else {
            // Each event lies between two stats lines 50 ms apart: take the middle of each.
            let startAt = samples[first - 1].at + (samples[first].at - samples[first - 1].at) / 2
            let endAt = end > 0 ? samples[end - 1].at + (samples[end].at - samples[end - 1].at) / 2 : samples[end].at
            rate = Double(count) / seconds(endAt - startAt)
        }
        // The warm-up message is one more sent and one more unique id.
        let sent = report.sent - warmUp
        let correct = (bareChild ? last.consumed == count : last.dispatched == report.unique + warmUp) && sent == count && status == 0
        return WorkerLeg(
            rate: rate, peakRSSKiB: peak,
            cpuMicrosPerMessage: Double(last.cpuTicks - samples[from].cpuTicks) * 1e6 / Double(Int(sysconf(Int32(_SC_CLK_TCK)))) / Double(count),
            dispatches: child.arrivals.withLock { $0 }, bareReceived: bareReceived, correct: correct,
            detail: "dispatched=\(last.dispatched) consumed=\(last.consumed) unique=\(report.unique + warmUp) sent=\(sent) exit=\(status)",
            unique: report.unique)
    }

    /// Latency percentiles in milliseconds.
    public struct Percentiles: Sendable {
        public var count: Int
        public var p50: Double
        public var p99: Double
        public var max: Double

        init(_ micros: [Int64]) {
            let sorted = micros.sorted()
            count = sorted.count
            func at(_ p: Double) -> Double {
                guard !sorted.isEmpty else { return .nan }
                return Double(sorted[min(sorted.count - 1, Int(Double(sorted.count) * p))]) / 1000
            }
            p50 = at(0.5)
            p99 = at(0.99)
            max = sorted.last.map { Double($0) / 1000 } ?? .nan
        }
    }

    /// The latency leg, per dispatched message:
    /// - `endToEnd`: arrival of its line − (send + window): what a user of the mock sees;
    /// - `transport`: arrival at the bare consumer − send, for the same messages: producer
    ///   linger, the mock broker and fetching, which dedupd cannot do anything about;
    /// - `own`: arrival of its line − window − arrival at the bare consumer: dedupd's own cost,
    ///   paired per message, so a hiccup of the broker or the producer counts in neither.
    public struct LatencyFigures: Sendable {
        public var endToEnd: Percentiles
        public var transport: Percentiles
        public var own: Percentiles
        /// Dispatched lines the bare consumer had not seen (it lags, or a send-time collision).
        public var unpaired: Int

        init(_ dispatches: [BenchChild.Arrival], bare: [Int64: Int64], windowMicros: Int64) {
            var endToEnd: [Int64] = [], transport: [Int64] = [], own: [Int64] = []
            endToEnd.reserveCapacity(dispatches.count)
            transport.reserveCapacity(dispatches.count)
            own.reserveCapacity(dispatches.count)
            var unpaired = 0
            for d in dispatches {
                endToEnd.append(d.arrival - d.sent - windowMicros)
                if let b = bare[d.sent] {
                    transport.append(b - d.sent)
                    own.append(d.arrival - windowMicros - b)
                } else {
                    unpaired += 1
                }
            }
            self.endToEnd = Percentiles(endToEnd)
            self.transport = Percentiles(transport)
            self.own = Percentiles(own)
            self.unpaired = unpaired
            if let path = ProcessInfo.processInfo.environment["BENCH_LATENCY_DUMP"], let t0 = dispatches.first?.arrival {
                // One line per dispatched message, in µs: since the first line, end to end,
                // transport, own (the last two empty when unpaired).
                let text = dispatches.map { d -> String in
                    let head = "\(d.arrival - t0) \(d.arrival - d.sent - windowMicros)"
                    guard let b = bare[d.sent] else { return head }
                    return head + " \(b - d.sent) \(d.arrival - windowMicros - b)"
                }.joined(separator: "\n")
                try? text.write(toFile: path, atomically: true, encoding: .utf8)
            }
        }
    }

    // MARK: - Output

    public static func render(_ f: Figures) -> String {
        func rate(_ r: Double) -> String { "\(group(Int(r.rounded()))) msg/s" }
        func ms(_ v: Double) -> String { String(format: "%.2f ms", v) }
        let o = f.options
        let mib = Double(f.peakRSSKiB) / 1024
        let bound = 64.0 + 64.0
        let rows: [(String, String)] = [
            ("baseline K: bare group consumer (child process, C API loop, count only)", rate(f.kRate)),
            ("baseline K: CPU time per message (user + system, first to last message)", String(format: "%.2f µs", f.bareCPUMicrosPerMessage)),
            ("baseline R: SET NX PX via RedisConnection, 1000-deep pipelines", "\(group(Int(f.rRate.rounded()))) cmd/s"),
            ("dedupd: claim, window \(WorkerConfiguration.format(o.window)), log → /dev/null, confirm, commit", rate(f.dRate)),
            ("ratio dedupd / K (target ≥ 0.60)", String(format: "%.2f", f.ratio)),
            ("dedupd CPU time per message (user + system, first to last message)", String(format: "%.2f µs", f.cpuMicrosPerMessage)),
            ("ratio of CPU per message, dedupd / K (target ≤ 3)", String(format: "%.2f", f.cpuRatio)),
            ("baseline KH: K looking up each message's message-id header, CPU per message", String(format: "%.2f µs", f.headerBareCPUMicrosPerMessage)),
            ("ratio of CPU per message, dedupd / KH (for reference)", String(format: "%.2f", f.headerCPURatio)),
            ("redis-server CPU per unique message (INFO cpu, dedupd leg)", String(format: "%.2f µs", f.redisCPUMicrosPerUnique)),
            ("peak RSS of the dedupd process (VmHWM)", String(format: "%.1f MiB", mib)),
            ("added latency beyond the window, p50 (at \(group(f.latencyRate)) msg/s; send → dispatch − window)", ms(f.latency.endToEnd.p50)),
            ("added latency beyond the window, p99", ms(f.latency.endToEnd.p99)),
            ("added latency beyond the window, max", ms(f.latency.endToEnd.max)),
            ("baseline: send → bare consumer beside it, same messages, p50", ms(f.latency.transport.p50)),
            ("baseline: send → bare consumer beside it, p99", ms(f.latency.transport.p99)),
            ("dedupd's own: dispatch − window − bare arrival, per message, p50", ms(f.latency.own.p50)),
            ("dedupd's own, p99 (target < 5 ms)", ms(f.latency.own.p99)),
            ("dedupd's own, max", ms(f.latency.own.max)),
            ("dedupd CPU time per message in the latency leg", String(format: "%.1f µs", f.latencyCPUMicrosPerMessage)),
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
            String(format: "dedupd CPU/message %.2f µs = %.2f × the bare consumer's %.2f µs (target ≤ 3)",
                   f.cpuMicrosPerMessage, f.cpuRatio, f.bareCPUMicrosPerMessage),
            "dedupd/K rate \(String(format: "%.2f", f.ratio))",
            "own p99 \(ms(f.latency.own.p99)) \(f.latency.own.p99 < 5 ? "<" : "≥") 5 ms (end to end \(ms(f.latency.endToEnd.p99)))",
            String(format: "peak RSS %.1f MiB %@ %.0f MiB (64 MiB + buffer.max_bytes)", mib, mib <= bound ? "≤" : ">", bound),
            "every unique id dispatched once: \(f.dCorrect ? "yes" : "NO (\(f.dDetail))")",
            String(format: "bench process itself (mock cluster, producer): %.1f MiB", Double(f.benchRSSKiB) / 1024),
        ]
        out += "verdicts: " + verdicts.joined(separator: "; ") + "\n"
        // The one line a script reads: always the last.
        out += String(
            format: "bench: dedupd_cpu_us=%.2f bare_cpu_us=%.2f cpu_ratio=%.2f dedupd_rate=%.0f bare_rate=%.0f rate_ratio=%.2f redis_cpu_us=%.2f rss_mib=%.1f",
            f.cpuMicrosPerMessage, f.bareCPUMicrosPerMessage, f.cpuRatio, f.dRate, f.kRate, f.ratio,
            f.redisCPUMicrosPerUnique, mib)
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

extension Benchmark {
    /// `dedupd bench-bare`: the bare consumer (K) as a child process, so its CPU time is read the
    /// same way as the worker's. It writes a `stats` line on stderr at its first message, every
    /// 4096 messages and at the last (the bench reads /proc/PID/stat at each line); a write per
    /// 4096 messages is noise next to the consumer's own work.
    public static func bareChild(
        bootstrapServers: String, group: String, topic: String, count: Int, properties: [String: String],
        header: String? = nil
    ) throws -> Int {
        let quiet = Logger(label: "bench", factory: { _ in SwiftLogNoOpLogHandler() })
        var reported = 0
        var found = 0
        let result = try BareConsumer.count(
            bootstrapServers: bootstrapServers, groupID: group, topics: [topic], target: count,
            properties: properties, timeout: .seconds(600), logger: quiet,
            progress: { n in
                guard n == 1 || n - reported >= 4096 || n == count else { return }
                reported = n
                let line = Array("msg=stats consumed=\(n) dispatched=\(n)\n".utf8)
                line.withUnsafeBytes { _ = write(2, $0.baseAddress, $0.count) }
            },
            header: header, onHeader: { _ in found += 1 })
        if let header, found < result.messages {
            let line = Array("bench-bare: \(result.messages - found) of \(result.messages) messages had no \(header) header\n".utf8)
            line.withUnsafeBytes { _ = write(2, $0.baseAddress, $0.count) }
        }
        return result.messages
    }
}
