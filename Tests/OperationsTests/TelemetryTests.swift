import DedupCore
@testable import DedupService
import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
import KafkaIO
import Logging
import RedisIO
import Testing
import TestSupport

@Suite struct TelemetryTests {
    @Test func percentilesAreNearestRank() {
        let samples = (1...100).map { Duration.milliseconds($0) }
        let p = RoundTripPercentiles(samples, count: 100)
        #expect(p?.p50 == Duration.milliseconds(50))
        #expect(p?.p99 == Duration.milliseconds(99))
        #expect(RoundTripPercentiles([Duration.milliseconds(7)], count: 1)?.p99 == Duration.milliseconds(7))
        #expect(RoundTripPercentiles([], count: 0) == nil)
        #expect(StatsReporter.formatMillis(.microseconds(420)) == "0.42ms")
        #expect(StatsReporter.formatMillis(.milliseconds(250)) == "250ms")
    }

    /// docs/metrics.md's table of the `stats` line names every field the line prints, and no other.
    @Test func statsFieldsAreTheDocumentedOnes() throws {
        let snapshot = WorkerTelemetry.Snapshot(
            now: .now, counters: DedupCounters(), bufferMessages: 0, bufferBytes: 0, parked: 0, assignment: [], paused: false, redisUp: true)
        let printed = Set(StatsReporter.fields(
            snapshot, previous: DedupCounters(), seconds: 1, lag: nil, inFlightPeak: 0,
            roundTrip: RoundTripPercentiles([.milliseconds(1)], count: 1)).keys)
        let doc = try String(contentsOf: ExampleConfigTests.repoRoot.appendingPathComponent("docs/metrics.md"), encoding: .utf8)
        // The first column's names are in backticks; a note such as "(guard)" is not.
        let documented = Set(try #require(firstColumnCodeSpans(ofTableAfter: "The `stats` line's fields:", in: doc)))
        #expect(printed.subtracting(documented).isEmpty, "printed, not documented: \(printed.subtracting(documented).sorted())")
        #expect(documented.subtracting(printed).isEmpty, "documented, not printed: \(documented.subtracting(printed).sorted())")
    }

    @Test func livenessAndReadinessFollowTheLoop() {
        let start = ContinuousClock.now
        let t = WorkerTelemetry(stallTimeout: .seconds(30), now: start)
        #expect(t.liveness(now: start + .seconds(29)).ok)
        #expect(t.readiness(now: start + .seconds(1)).detail == "not ready: no partitions assigned, redis unreachable")
        t.heartbeat(redisUp: true, now: start + .seconds(2))
        let snapshot = WorkerTelemetry.Snapshot(
            now: start + .seconds(3), counters: DedupCounters(), bufferMessages: 0, bufferBytes: 0, parked: 0,
            assignment: [TopicPartition(topic: "t", partition: 0), TopicPartition(topic: "t", partition: 1)], paused: false, redisUp: true)
        t.loopPass(snapshot, consumer: nil)
        #expect(t.readiness(now: start + .seconds(4)) == (true, "ready: 2 partitions assigned, redis up"))
        #expect(t.liveness(now: start + .seconds(4)) == (true, "ok: last loop pass 1s ago"))
        t.stopping()
        #expect(t.readiness(now: start + .seconds(4)).detail == "not ready: shutting down")
        let stalled = t.liveness(now: start + .seconds(34))
        #expect(stalled == (false, "loop stalled: no pass for 31s (limit 30s)"))
        #expect(t.readiness(now: start + .seconds(34)).detail == "not ready: loop stalled: no pass for 31s (limit 30s), shutting down")
    }

    @Test func aPoolThatRunsNoTaskIsAStallToo() {
        let start = ContinuousClock.now
        var h = WorkerTelemetry.Health(lastPass: start + .seconds(40), poolBeat: start)
        #expect(h.stall(now: start + .seconds(41), timeout: .seconds(30)) == "cooperative pool stalled: no task ran for 41s")
        h.poolBeat = start + .seconds(39)
        #expect(h.stall(now: start + .seconds(41), timeout: .seconds(30)) == nil)
        // A stopped loop is named first: it stops everything, the pool's beats included.
        #expect(h.stall(now: start + .seconds(80), timeout: .seconds(30)) == "loop stalled: no pass for 40s")
    }
}

/// The watchdog's decision and report, on a test clock (no thread, no exit).
@Suite struct LoopWatchdogTests {
    @Test func aStalledLoopIsReportedWithWhatIsInFlightAndAStoppingOneIsNot() {
        let start = ContinuousClock.now
        let t = WorkerTelemetry(stallTimeout: .seconds(30), now: start)
        let watchdog = LoopWatchdog(telemetry: t, timeout: .seconds(30), logger: Logger(label: "test") { _ in SwiftLogNoOpLogHandler() })
        #expect(watchdog.interval == .seconds(1))
        let round = t.inFlightLedger.begin(.round(size: 500), now: start + .seconds(1))
        let call = t.inFlightLedger.begin(.handler, now: start + .seconds(2))
        _ = t.inFlightLedger.begin(.handler, now: start + .seconds(5))
        let claim = t.inFlightLedger.begin(.redis("confirm"), now: start + .seconds(3))
        #expect(watchdog.check(now: start + .seconds(29)) == nil, "not stalled yet")
        let report = watchdog.check(now: start + .seconds(31))
        #expect(report == "rounds=1 (500 messages, oldest 30s) handlers=2 (oldest 29s) redis=1 (confirm, oldest 28s)")
        t.inFlightLedger.end(round)
        t.inFlightLedger.end(call)
        t.inFlightLedger.end(claim)
        #expect(t.inFlightLedger.describe(now: start + .seconds(31)) == "rounds=none handlers=1 (oldest 26s) redis=none")
        t.heartbeat(redisUp: true, now: start + .seconds(30))
        #expect(watchdog.check(now: start + .seconds(31)) == nil, "a pass resets it")
        t.stopping()
        #expect(watchdog.check(now: start + .seconds(90)) == nil, "a draining worker is the shutdown deadline's business")
    }
}
