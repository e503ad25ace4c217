import DedupCore
import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
import KafkaIO
import Logging
import RedisIO
import Testing
import TestSupport

/// An HTTP GET with a real client (URLSession): status and body.
func httpGet(_ port: Int, _ path: String) async throws -> (Int, String) {
    var request = URLRequest(url: URL(string: "http://127.0.0.1:\(port)\(path)")!)
    // Generous: while the whole suite runs, other tests block the cooperative pool for seconds.
    request.timeoutInterval = 60
    let (data, response) = try await URLSession.shared.data(for: request)
    return ((response as? HTTPURLResponse)?.statusCode ?? -1, String(decoding: data, as: UTF8.self))
}

/// `name{labels} value` lines of a Prometheus scrape.
func metricValue(_ text: String, _ series: String) -> Double? {
    for line in text.split(separator: "\n") where line.hasPrefix(series + " ") {
        return Double(line.dropFirst(series.count + 1))
    }
    return nil
}

/// logfmt `key=value` fields of one line (values without spaces, as the stats line has).
func fields(_ line: Substring) -> [String: String] {
    var out: [String: String] = [:]
    for part in line.split(separator: " ") {
        guard let eq = part.firstIndex(of: "=") else { continue }
        out[String(part[..<eq])] = String(part[part.index(after: eq)...])
    }
    return out
}

/// Seconds of a `ts=2026-11-27T05:34:45.399Z` field, within the day (runs do not cross midnight).
func timestamp(_ ts: String) -> Double? {
    let time = ts.split(separator: "T").last?.dropLast() ?? ""
    let hms = time.split(separator: ":").compactMap { Double($0) }
    guard hms.count == 3 else { return nil }
    return hms[0] * 3600 + hms[1] * 60 + hms[2]
}

/// The stats line, `/metrics`, `/healthz` and `/readyz` of a `dedupd run` process against a known
/// run. The worker runs as its own process: inside the test process, tests that block Swift's
/// cooperative pool (waiting for children) can stall an in-process worker for minutes on 2 cores.
@Suite(.serialized) struct TelemetryEndToEndTests {
    /// A known run: 140 unique ids of which 10 are already `done` in Redis, 60 repeats inside the
    /// window, 5 messages without the key. The stats lines, /metrics, /healthz and /readyz must
    /// show exactly that, and the Redis password must appear in none of them.
    @Test(.timeLimit(.minutes(5)))
    func statsLineMetricsAndHealthMatchAKnownRun() async throws {
        let password = "pw-Zq81-never-shown"
        let redis = try RedisServerProcess(password: password)
        let dir = try TemporaryDirectory(prefix: "dedupd-telemetry")
        let quiet = Logger(label: "test") { _ in SwiftLogNoOpLogHandler() }
        // The mock cluster in its own process, like the other end-to-end tests.
        let mock = try DedupdProcess(["mock-kafka", "--brokers", "1", "--topic", "in:2"], name: "mock-kafka", in: dir)
        defer { mock.terminate() }
        let bootstrap = try await offPool { try mock.firstLine(timeout: .seconds(20)) }

        // 10 keys already done in Redis, as if another worker dispatched them earlier.
        let connection = try await RedisConnection.connect(
            try RedisURL(redis.url), connectTimeout: .seconds(2), commandTimeout: .seconds(5), logger: quiet)
        let seed = RedisClaimStore(connection: connection, logger: quiet)
        let done = (0..<10).map { DedupKey(raw: "ord-\($0)", namespace: "telemetry").storeKey }
        _ = try await seed.claim(done, owner: "earlier", lease: .seconds(60))
        _ = try await seed.confirm(done, owner: "earlier", retention: .seconds(3600))

        let producer = try KafkaProducer.make(bootstrapServers: bootstrap, logger: quiet)
        func send(_ id: String?) throws {
            let headers = id.map { [MessageHeader(name: "message-id", value: Array($0.utf8))] } ?? []
            try producer.send(topic: "in", key: Array((id ?? "none").utf8), value: Array(#"{"x":1}"#.utf8), headers: headers)
        }
        for i in 0..<140 { try send("ord-\(i)") }
        for i in 20..<80 { try send("ord-\(i)") }
        for _ in 0..<5 { try send(nil) }
        try await producer.flush(timeout: .seconds(10))

        let port = try freePort()
        let pwFile = dir.file("redis-password").path
        try password.write(toFile: pwFile, atomically: true, encoding: .utf8)
        let config = dir.file("dedupd.yaml").path
        try """
            kafka: {bootstrap_servers: "\(bootstrap)", topics: [in], group: telemetry}
            redis: {url: "\(redis.urlWithoutPassword)", password_file: "\(pwFile)"}
            dedup: {namespace: telemetry, window: 1s}
            run: {stop_when_idle: 4s}
            log: {stats_interval: 1s, level: debug}
            handler: {output: "\(dir.file("out.jsonl").path)"}
            http: {port: \(port)}
            """.write(toFile: config, atomically: true, encoding: .utf8)
        let worker = try DedupdProcess(["run", "--config", config], name: "worker", in: dir)
        // Ready once partitions are assigned and Redis answered.
        var ready = (0, "")
        let readyBy = ContinuousClock.now + .seconds(120)
        while ContinuousClock.now < readyBy {
            // Refused until the process listens.
            if let r = try? await httpGet(port, "/readyz") { ready = r }
            if ready.0 == 200 { break }
            try await Task.sleep(for: .milliseconds(100))
        }
        #expect(ready.0 == 200, "readyz: \(ready.1)")
        #expect(ready.1.hasPrefix("ready: 2 partitions assigned, redis up"))
        // Wait for the run to settle and reach the metrics (published at most once a second).
        var (status, metrics) = (0, "")
        let settledBy = ContinuousClock.now + .seconds(120)
        while ContinuousClock.now < settledBy {
            (status, metrics) = try await httpGet(port, "/metrics")
            if metricValue(metrics, "dedupd_messages_dispatched_total") == 130 && metricValue(metrics, "dedupd_buffer_messages") == 0 { break }
            try await Task.sleep(for: .milliseconds(200))
        }
        #expect(status == 200)
        let (healthy, healthBody) = try await httpGet(port, "/healthz")
        #expect(healthy == 200, "healthz: \(healthBody)")
        let expected: [(String, Double)] = [
            ("dedupd_messages_consumed_total", 205), ("dedupd_messages_dispatched_total", 130),
            (#"dedupd_messages_duplicate_total{dedup_caught_by="window"}"#, 60),
            (#"dedupd_messages_duplicate_total{dedup_caught_by="redis"}"#, 10),
            ("dedupd_messages_invalid_total", 5), ("dedupd_messages_failed_total", 0),
            ("dedupd_buffer_messages", 0), ("dedupd_buffer_bytes", 0), ("dedupd_partitions_assigned", 2),
            ("dedupd_redis_up", 1), ("dedupd_consumer_lag_messages", 0), ("dedupd_handlers_in_flight", 0),
        ]
        for (series, value) in expected {
            #expect(metricValue(metrics, series) == value, "\(series) in:\n\(metrics)")
        }
        #expect((metricValue(metrics, #"dedupd_redis_round_trip_seconds_count{redis_op="claim"}"#) ?? 0) >= 1)
        #expect((metricValue(metrics, #"dedupd_redis_round_trip_seconds_count{redis_op="confirm"}"#) ?? 0) >= 1)
        #expect(metricValue(metrics, "dedupd_handler_duration_seconds_count") == 130)
        // The handler's duration is a histogram of seconds (not a timer, whose buckets compare
        // `Duration`s per observation): its bounds must read exactly as the timers' do.
        func bounds(_ prefix: String) -> [String] {
            metrics.split(separator: "\n").filter { $0.hasPrefix(prefix) }.compactMap { line in
                line.firstMatch(of: /le="([^"]+)"/).map { String($0.1) }
            }
        }
        let claimBounds = bounds(#"dedupd_redis_round_trip_seconds_bucket{redis_op="claim","#)
        #expect(claimBounds.count == 17 && claimBounds.first == "0.0001" && claimBounds.last == "+Inf", "\(claimBounds)")
        #expect(bounds("dedupd_handler_duration_seconds_bucket{") == claimBounds)
        let (stillReady, _) = try await httpGet(port, "/readyz")
        #expect(stillReady == 200)
        #expect(!metrics.contains(password))
        // deploy/'s alert rules and dashboard use only series this scrape has.
        let served = Set(metrics.split(separator: "\n").filter { !$0.hasPrefix("#") }
            .map { String($0.prefix { $0 != "{" && $0 != " " }) })
        let used = try DeployTests.monitoringMetricNames()
        #expect(used.count >= 15, "\(used)")
        for name in used.sorted() {
            #expect(served.contains(name), "\(name), used in deploy/prometheus or deploy/grafana, is not served at /metrics")
        }
        #expect(metrics.contains(#"dedupd_build_info{"#) && metrics.contains(#"version=""#), "the build info metric")
        // docs/metrics.md's table names every metric family served, and no other.
        let families = Set(metrics.split(separator: "\n").filter { $0.hasPrefix("# TYPE ") }.map { String($0.split(separator: " ")[2]) })
        let documented = Set(try #require(firstColumnCodeSpans(ofTableAfter: "| Prometheus name |", in: DocsTests.read("docs/metrics.md"))))
        #expect(families.count >= 25, "\(families)")
        #expect(families == documented, "served, not documented: \(families.subtracting(documented).sorted()); documented, not served: \(documented.subtracting(families).sorted())")

        #expect(try await offPool { try worker.wait(timeout: .seconds(120)) } == 0, "worker: \(worker.stderr.suffix(3000))")
        let log = worker.stderr
        #expect(!log.contains(password), "the password is in no log line")
        let stats = log.split(separator: "\n").filter { $0.contains("msg=stats ") }.map(fields)
        let last = try #require(stats.last, "stats lines in:\n\(log.suffix(3000))")
        #expect(last["consumed"] == "205")
        #expect(last["dispatched"] == "130")
        #expect(last["duplicates.local"] == "60")
        #expect(last["duplicates.redis"] == "10")
        #expect(last["invalid"] == "5")
        #expect(last["buffer.messages"] == "0" && last["buffer.bytes"] == "0" && last["parked"] == "0")
        #expect(last["kafka.partitions"] == "2")
        #expect(last["kafka.lag"] == "0")
        // Each line's rate is the change of its total since the previous line over the time between them.
        for (a, b) in zip(stats, stats.dropFirst()) {
            let delta = Double(Int(b["consumed"]!)! - Int(a["consumed"]!)!)
            let seconds = try #require(timestamp(b["ts"]!)) - timestamp(a["ts"]!)!
            let rate = Double(b["rate.consumed"]!)!
            #expect(abs(rate - delta / seconds) <= max(1.5, delta / seconds * 0.1), "rate.consumed \(rate) for \(delta) in \(seconds) s")
        }
        let peaks = stats.compactMap { Int($0["handlers.in_flight.peak"] ?? "") }
        #expect(peaks.max().map { (1...4).contains($0) } == true, "some handler ran, at most handler.concurrency at once: \(peaks)")
        let withRTT = stats.filter { $0["redis.rtt.p50"] != nil }
        #expect(!withRTT.isEmpty)
        for line in withRTT {
            let p50 = Double(line["redis.rtt.p50"]!.dropLast(2))!, p99 = Double(line["redis.rtt.p99"]!.dropLast(2))!
            #expect(p50 > 0 && p50 <= p99)
        }
        let rts = stats.compactMap { Int($0["redis.round_trips"] ?? "") }.reduce(0, +)
        let scraped = [#"claim"#, #"confirm"#, #"release"#, #"renew"#].compactMap {
            metricValue(metrics, #"dedupd_redis_round_trip_seconds_count{redis_op="\#($0)"}"#)
        }.reduce(0, +)
        #expect(Double(rts) >= scraped, "the stats lines count every round trip the timer saw by then")
        for event in ["msg=\"worker started\"", "msg=\"partitions assigned\"", "msg=\"shutdown complete, offsets committed\""] {
            #expect(log.components(separatedBy: event).count - 1 == 1, "\(event) logged once")
        }
        await connection.close()
    }

}
