import DedupCore
@testable import DedupService
import Testing

/// The metrics an operator's alerts and dashboard use that no end-to-end run exercises: fail-open
/// dispatches (`unclaimed`) and the build's identity.
@Suite struct BuildInfoAndUnclaimedTests {
    @Test func unclaimedDispatchesAreCounted() {
        let (registry, factory) = PrometheusSetup.make()
        let start = ContinuousClock.now
        let t = WorkerTelemetry(factory: factory, now: start)
        var counters = DedupCounters()
        counters.unclaimed = 3
        t.loopPass(.init(now: start, counters: counters, bufferMessages: 0, bufferBytes: 0, parked: 0, assignment: [], paused: false, redisUp: false), consumer: nil)
        counters.unclaimed = 5
        t.loopPass(.init(now: start + .seconds(2), counters: counters, bufferMessages: 0, bufferBytes: 0, parked: 0, assignment: [], paused: false, redisUp: false), consumer: nil)
        let text = String(decoding: registry.emitToBuffer(), as: UTF8.self)
        #expect(text.contains("\ndedupd_messages_unclaimed_total 5\n"), "\(text)")
    }

    @Test func buildInfoCarriesVersionCommitAndLibraries() {
        let (registry, factory) = PrometheusSetup.make()
        BuildInfo.record(factory: factory)
        let text = String(decoding: registry.emitToBuffer(), as: UTF8.self)
        let line = text.split(separator: "\n").first { $0.hasPrefix("dedupd_build_info{") }
        #expect(line != nil, "\(text)")
        for label in [#"version="\#(BuildInfo.version)""#, #"commit="\#(BuildInfo.commit)""#, #"librdkafka="\#(BuildInfo.librdkafka)""#, #"hiredis="\#(BuildInfo.hiredis)""#] {
            #expect(line?.contains(label) == true, "\(label) in \(line ?? "")")
        }
        #expect(line?.hasSuffix(" 1") == true || line?.hasSuffix(" 1.0") == true)
        #expect(BuildInfo.librdkafka.hasPrefix("2.") && BuildInfo.hiredis.hasPrefix("0.14"))
    }
}
