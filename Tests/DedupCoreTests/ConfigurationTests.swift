import DedupCore
import Testing

@Suite struct ConfigurationTests {
    func layer(_ pairs: [String: String], origin: String = "file") -> [String: ConfigValue] {
        pairs.mapValues { ConfigValue($0, origin: origin) }
    }
    let required = ["kafka.bootstrap_servers": "k:9092", "kafka.topics": "a,b"]

    @Test func defaults() throws {
        let c = try WorkerConfiguration(layers: [layer(required)])
        #expect(c.topics == ["a", "b"])
        #expect(c.group == "dedupd")
        #expect(c.dedup.window == .seconds(5))
        #expect(c.dedup.retention == .seconds(86_400))
        #expect(c.dedup.lease == .seconds(35))
        #expect(c.dedup.template.description == "header:message-id")
        #expect(c.dedup.bufferMaxBytes == 64 << 20)
        #expect(c.stopWhenIdle == nil)
    }

    @Test func laterLayersWin() throws {
        let c = try WorkerConfiguration(layers: [
            layer(required.merging(["dedup.window": "2s"]) { $1 }),
            layer(["dedup.window": "3s"], origin: "env"),
            layer(["dedup.window": "500ms"], origin: "flag"),
        ])
        #expect(c.dedup.window == .milliseconds(500))
    }

    @Test func badValueNamesKeyValueAndOrigin() {
        let error = #expect(throws: ConfigError.self) {
            try WorkerConfiguration(layers: [layer(required.merging(["dedup.window": "5 parsecs"]) { $1 })])
        }
        #expect(error?.description == #"config key dedup.window = "5 parsecs" (from file): must be a duration such as 500ms, 2s, 5m, 24h"#)
    }

    @Test func unknownKeySuggestsTheNearest() {
        let error = #expect(throws: ConfigError.self) {
            try WorkerConfiguration(layers: [layer(required.merging(["dedup.windwo": "5s"]) { $1 })])
        }
        #expect(error?.description.contains("unknown key; did you mean dedup.window?") == true)
    }

    @Test func missingRequiredKey() {
        let error = #expect(throws: ConfigError.self) { try WorkerConfiguration(layers: [layer(["kafka.topics": "a"])]) }
        #expect(error?.key == "kafka.bootstrap_servers")
    }

    @Test func badTemplateAndChoice() {
        let t = #expect(throws: ConfigError.self) {
            try WorkerConfiguration(layers: [layer(required.merging(["dedup.key": "cookie:x"]) { $1 })])
        }
        #expect(t?.key == "dedup.key")
        let k = #expect(throws: ConfigError.self) {
            try WorkerConfiguration(layers: [layer(required.merging(["dedup.keep": "middle"]) { $1 })])
        }
        #expect(k?.description.contains("must be one of: first, last") == true)
    }

    @Test func kafkaPropertiesPassThrough() throws {
        let c = try WorkerConfiguration(layers: [layer(required.merging(["kafka.properties.session.timeout.ms": "9000"]) { $1 })])
        #expect(c.kafkaProperties == ["session.timeout.ms": "9000"])
    }

    @Test func durationsAndSizes() {
        #expect(DurationParser.parse("250ms") == .milliseconds(250))
        #expect(DurationParser.parse("1h30m") == .seconds(5400))
        #expect(DurationParser.parse("1.5s") == .milliseconds(1500))
        #expect(DurationParser.parse("7d") == .seconds(604_800))
        #expect(DurationParser.parse("5") == nil)
        #expect(DurationParser.parse("s") == nil)
        #expect(SizeParser.parse("64MiB") == 64 << 20)
        #expect(SizeParser.parse("1_000") == 1000)
        #expect(SizeParser.parse("3 parsecs") == nil)
        #expect(WorkerConfiguration.format(.seconds(90)) == "1m30s")
        #expect(WorkerConfiguration.format(.milliseconds(500)) == "500ms")
    }

    @Test func redisPasswordIsRedacted() {
        #expect(ConfigSchema.redact("redis://app:s3cret@r:6379/0") == "redis://app:***@r:6379/0")
        #expect(ConfigSchema.redact("redis://:s3cret@r:6379/0") == "redis://:***@r:6379/0")
        #expect(ConfigSchema.redact("redis://r:6379/0") == "redis://r:6379/0")
    }

    /// `kafka.rebalance` picks the protocol; an assignor set by hand must speak the same one, or
    /// start-up stops with an error naming the property, since librdkafka would silently run
    /// the protocol of the assignor.
    @Test func rebalanceModeAndAHandSetAssignorMustAgree() throws {
        #expect(try WorkerConfiguration(layers: [layer(required)]).rebalance == .cooperative)
        #expect(try WorkerConfiguration(layers: [layer(required.merging(["kafka.rebalance": "eager"]) { $1 })]).rebalance == .eager)
        let strategy = "kafka.properties.partition.assignment.strategy"
        // Agreeing by hand is fine.
        _ = try WorkerConfiguration(layers: [layer(required.merging([strategy: "cooperative-sticky"]) { $1 })])
        _ = try WorkerConfiguration(layers: [layer(required.merging(["kafka.rebalance": "eager", strategy: "roundrobin"]) { $1 })])

        let eagerAssignor = #expect(throws: ConfigError.self) {
            try WorkerConfiguration(layers: [layer(required.merging([strategy: "range,roundrobin"]) { $1 })])
        }
        #expect(eagerAssignor?.key == strategy)
        #expect(eagerAssignor?.value == "range,roundrobin")
        #expect(eagerAssignor?.description.contains("kafka.rebalance is cooperative") == true, "\(String(describing: eagerAssignor))")
        #expect(eagerAssignor?.description.contains("(from file)") == true)

        let cooperativeAssignor = #expect(throws: ConfigError.self) {
            try WorkerConfiguration(layers: [layer(required.merging(["kafka.rebalance": "eager", strategy: "cooperative-sticky"]) { $1 })])
        }
        #expect(cooperativeAssignor?.key == strategy)
        #expect(cooperativeAssignor?.description.contains("kafka.rebalance is eager") == true)

        let mixed = #expect(throws: ConfigError.self) {
            try WorkerConfiguration(layers: [layer(required.merging([strategy: "cooperative-sticky,range"]) { $1 })])
        }
        #expect(mixed?.key == strategy)

        let badMode = #expect(throws: ConfigError.self) {
            try WorkerConfiguration(layers: [layer(required.merging(["kafka.rebalance": "incremental"]) { $1 })])
        }
        #expect(badMode?.key == "kafka.rebalance")
    }
}

@Suite struct SubmissionGeneratorTests {
    @Test func repeatsAtTheRequestedRatioAndDeterministic() {
        var g = SubmissionGenerator(duplicateRatio: 0.3, seed: 7)
        var ids: [String] = []
        for _ in 0..<10_000 { ids.append(g.next().id) }
        #expect(Set(ids).count == g.uniqueCount)
        #expect(abs(Double(g.repeatCount) / 10_000 - 0.3) < 0.02)
        #expect(Set(ids) == Set((0..<g.uniqueCount).map { "ord-\($0)" }))
        var again = SubmissionGenerator(duplicateRatio: 0.3, seed: 7)
        #expect((0..<100).map { _ in again.next().id } == Array(ids.prefix(100)))
    }

}
