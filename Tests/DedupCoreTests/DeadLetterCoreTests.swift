import DedupCore
import Testing

@Suite struct DeadLetterCoreTests {
    func layer(_ pairs: [String: String]) -> [String: ConfigValue] { pairs.mapValues { ConfigValue($0, origin: "file") } }
    let required = ["kafka.bootstrap_servers": "k:9092", "kafka.topics": "a"]

    /// With a dead-letter topic, bad input and given-up messages hold the commit position until
    /// `deadLettered` says the topic acknowledged them; without one they are resolved at once.
    @Test func heldDeadLettersHoldTheCommitPosition() throws {
        var engine = DedupLedger(settings: DedupSettings(
            template: try KeyTemplate("header:message-id"), namespace: "t", window: .seconds(1), holdsDeadLetters: true))
        let now = ContinuousClock.now
        let bad = msg(nil, offset: 0)
        guard case .bad(let reason) = engine.ingest(bad) else { Issue.record("expected bad input"); return }
        #expect(reason.reason == .missingHeader)
        _ = engine.ingest(msg("a", offset: 1))
        engine.applyClaims(engine.keysToClaim(now: now), [.claimed], now: now)
        let due = engine.takeDue(now: now + .seconds(2))
        #expect(due.count == 1)
        engine.dispatchFailed(due[0].key)
        #expect(engine.takeCommitPositions().isEmpty)
        engine.deadLettered(bad)
        #expect(engine.takeCommitPositions() == [TopicPartition(topic: "t", partition: 0): 1])
        engine.deadLettered(due[0].message)
        #expect(engine.takeCommitPositions() == [TopicPartition(topic: "t", partition: 0): 2])
        #expect(engine.counters.deadLettered == 2 && engine.counters.failed == 1 && engine.counters.invalid == 1)

        var plain = DedupLedger(settings: DedupSettings(template: try KeyTemplate("header:message-id")))
        _ = plain.ingest(msg(nil, offset: 0))
        #expect(plain.takeCommitPositions() == [TopicPartition(topic: "t", partition: 0): 1])
    }

    @Test func deadLetterHeadersReplaceEarlierOnesAndKeepTheOriginals() {
        var m = msg("id-1", partition: 3, offset: 99, topic: "orders")
        m.headers.append(MessageHeader(name: "dedupd-reason", value: Array("old".utf8)))
        let letter = DeadLetter(message: m, reason: DeadLetter.handlerFailed, error: "HTTP 422", dedupKey: "id-1", attempts: 2)
        let h = Dictionary(letter.headers.map { ($0.name, String(decoding: $0.value ?? [], as: UTF8.self)) }) { a, b in a + "|" + b }
        #expect(h["message-id"] == "id-1")
        #expect(h["dedupd-reason"] == "handler_failed")
        #expect(h["dedupd-error"] == "HTTP 422")
        #expect(h["dedupd-original-topic"] == "orders")
        #expect(h["dedupd-original-partition"] == "3")
        #expect(h["dedupd-original-offset"] == "99")
        #expect(h["dedupd-dedup-key"] == "id-1")
        #expect(h["dedupd-attempts"] == "2")
        let bad = DeadLetter(badInput: BadInput(.invalidJSON, "value is not valid JSON"), message: m)
        #expect(bad.headers.contains { $0.name == "dedupd-dedup-key" } == false)
        #expect(bad.reason == "invalid_json" && bad.attempts == 0)
    }

    @Test func handlerKindsNameWhatTheyNeed() throws {
        #expect(throws: ConfigError.self) { try WorkerConfiguration(layers: [layer(required.merging(["handler.type": "kafka"]) { $1 })]) }
        #expect(throws: ConfigError.self) { try WorkerConfiguration(layers: [layer(required.merging(["handler.type": "exec"]) { $1 })]) }
        let noURL = #expect(throws: ConfigError.self) {
            try WorkerConfiguration(layers: [layer(required.merging(["handler.type": "http"]) { $1 })])
        }
        #expect(noURL?.key == "handler.url")
        let ftp = #expect(throws: ConfigError.self) {
            try WorkerConfiguration(layers: [layer(required.merging(["handler.type": "http", "handler.url": "ftp://x/y"]) { $1 })])
        }
        #expect(ftp?.description.contains("must be an http:// or https:// URL") == true)
        let http = try WorkerConfiguration(layers: [layer(required.merging([
            "handler.type": "http", "handler.url": "https://h/x", "handler.timeout": "3s", "dead_letter.topic": "dlq",
        ]) { $1 })])
        #expect(http.handler.timeout == .seconds(3))
        #expect(http.deadLetterTopic == "dlq" && http.deadLetterBootstrapServers == "k:9092")
        #expect(http.dedup.holdsDeadLetters)
        #expect(try WorkerConfiguration(layers: [layer(required)]).dedup.holdsDeadLetters == false)
    }
}
