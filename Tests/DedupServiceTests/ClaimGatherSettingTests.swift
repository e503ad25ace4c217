import DedupCore
import TestSupport
import Testing

@testable import DedupService

/// The worker's claims gather for a tenth of its shortest window, at most 10 ms.
@Suite struct ClaimGatherSettingTests {
    func options(_ values: [String: String]) throws -> DedupEngine.Options {
        var all = [
            "kafka.bootstrap_servers": "127.0.0.1:9", "kafka.topics": "t", "kafka.group": "g",
            "redis.url": "redis://127.0.0.1:9",
        ]
        all.merge(values) { _, new in new }
        let config = try WorkerConfiguration(layers: [all.mapValues { ConfigValue($0, origin: "test") }])
        return try Worker(config: config, handler: RecordingHandler(), logger: quietLogger(), exitsOnStall: false).engineOptions
    }

    @Test func aTenthOfTheWindowAtMostTenMilliseconds() throws {
        #expect(try options([:]).claimGather == .milliseconds(10), "the default window, 5 s")
        #expect(try options(["dedup.window": "50ms"]).claimGather == .milliseconds(5))
        #expect(Worker.claimGather(windows: [.seconds(1), .milliseconds(20)]) == .milliseconds(2), "a route's shorter window")
        #expect(Worker.claimGather(windows: [.zero]) == .zero)
    }
}
