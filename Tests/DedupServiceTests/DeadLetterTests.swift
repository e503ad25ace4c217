import DedupCore
import Foundation
import KafkaIO
import RedisIO
import Testing
import TestSupport

@testable import DedupService

@Suite("dead-letter topic: bad input and handler give-ups", .serialized)
struct DeadLetterTests {
    /// The issue's test: 10,000 messages, half malformed in each way a message can be, mixed
    /// with valid ones (with repeats). The worker keeps running; every malformed one is in the
    /// dead-letter topic with the right reason and its original coordinates; every valid unique
    /// one is dispatched once; the group's offsets reach the end.
    @Test func tenThousandMessagesHalfMalformed() async throws {
        let cluster = try MockKafkaCluster.make(brokers: 1, logger: quietLogger())
        let redis = try RedisServerProcess()
        let (topic, dlq) = (unique("in"), unique("dlq"))
        try cluster.createTopic(topic, partitions: 4)
        try cluster.createTopic(dlq, partitions: 1)

        // {header}|{key}|{json}: each malformation below fails exactly one part.
        let reasons = ["invalid_json", "missing_json_field", "missing_header", "invalid_utf8", "empty_key",
                       "missing_record_key", "message_too_large"]
        var messages: [(key: [UInt8]?, value: [UInt8], headers: [MessageHeader])] = []
        var expectedReason: [String: String] = [:]  // by the `n` header
        var validIDs = Set<String>()
        var rng = SystemRandomNumberGenerator()
        for n in 0..<10_000 {
            let tag = header("n", String(n))
            if n % 2 == 1 {
                let reason = reasons[(n / 2) % reasons.count]
                expectedReason[String(n)] = reason
                let id = "bad-\(n)"
                let good = bytes(#"{"orderNo":"o-\#(n)"}"#)
                switch reason {
                case "invalid_json": messages.append((bytes("k"), bytes("{not json"), [header("message-id", id), tag]))
                case "missing_json_field": messages.append((bytes("k"), bytes(#"{"other":1}"#), [header("message-id", id), tag]))
                case "missing_header": messages.append((bytes("k"), good, [tag]))
                case "invalid_utf8": messages.append((bytes("k"), good, [MessageHeader(name: "message-id", value: [0xff, 0xfe]), tag]))
                case "empty_key": messages.append((bytes("k"), good, [MessageHeader(name: "message-id", value: []), tag]))
                case "missing_record_key": messages.append((nil, good, [header("message-id", id), tag]))
                default:
                    let big = bytes(#"{"orderNo":"o-\#(n)","pad":""# + String(repeating: "x", count: 5000) + #""}"#)
                    messages.append((bytes("k"), big, [header("message-id", id), tag]))
                }
            } else {
                // 20% of the valid ones repeat an earlier id (same key parts, same order number).
                let id: String
                if !validIDs.isEmpty && Int.random(in: 0..<5, using: &rng) == 0 {
                    id = validIDs.randomElement(using: &rng)!
                } else {
                    id = "ok-\(n)"
                    validIDs.insert(id)
                }
                messages.append((bytes("k-\(id)"), bytes(#"{"orderNo":"\#(id)"}"#), [header("message-id", id), tag]))
            }
        }
        try await produce(cluster.bootstrapServers, topic, messages)

        let config = try workerConfig(bootstrap: cluster.bootstrapServers, topic: topic, redis: redis, [
            "dedup.key": "{header:message-id}|{key}|{json:/orderNo}",
            "dedup.max_message_bytes": "4KiB",
            "dead_letter.topic": dlq,
            "handler.concurrency": "16",
        ])
        let handler = RecordingHandler()
        let worker = try Worker(config: config, handler: handler, logger: quietLogger(), exitsOnStall: false)
        let started = ContinuousClock.now
        try await runUntilIdle(worker)
        let elapsed = ContinuousClock.now - started

        let counters = worker.counters.withLock { $0 }
        #expect(counters.consumed == 10_000)
        #expect(counters.invalid == 5_000)
        #expect(counters.deadLettered == 5_000)

        let dispatchedIDs = handler.dispatched.withLock { $0.map { $0.message.headerText("message-id")! } }
        #expect(dispatchedIDs.count == validIDs.count)
        #expect(Set(dispatchedIDs) == validIDs)

        let letters = try await readTopic(cluster.bootstrapServers, dlq, count: 5_000)
        #expect(letters.count == 5_000)
        var wrong = 0
        for letter in letters {
            guard let n = letter.headerText("n"), let want = expectedReason[n] else { wrong += 1; continue }
            if letter.headerText(DeadLetterHeader.reason) != want { wrong += 1 }
            if letter.headerText(DeadLetterHeader.originalTopic) != topic { wrong += 1 }
            if letter.headerText(DeadLetterHeader.attempts) != "0" { wrong += 1 }
            if (letter.headerText(DeadLetterHeader.error) ?? "").isEmpty { wrong += 1 }
        }
        #expect(wrong == 0)
        #expect(Set(letters.compactMap { $0.headerText("n") }).count == 5_000)
        // The original record travels unchanged: spot-check the values against what was sent.
        let sentByN = Dictionary(uniqueKeysWithValues: messages.map { m in
            (String(decoding: m.headers.first { $0.name == "n" }!.value!, as: UTF8.self), m)
        })
        for letter in letters.prefix(200) {
            let sent = sentByN[letter.headerText("n")!]!
            #expect(letter.value == sent.value && letter.key == sent.key)
            #expect(letter.headerText(DeadLetterHeader.originalOffset).flatMap(Int64.init) != nil)
        }

        let progress = try await KafkaConsumer.groupProgress(
            bootstrapServers: cluster.bootstrapServers, groupID: config.group, topic: topic, logger: quietLogger())
        #expect(progress.allSatisfy { $0.isCaughtUp })
        print("10k half malformed: \(WorkerConfiguration.format(elapsed)) worker run, dispatched \(dispatchedIDs.count), dead-lettered \(letters.count)")
    }

    /// A handler that gives up (permanently at once, or after its last retry) sends the message
    /// to the dead-letter topic with `handler_failed`, the attempts and the dedup key; the claim
    /// is released, so a corrected resend with the same key is dispatched.
    @Test func handlerGiveUpsAreDeadLetteredAndTheirClaimsReleased() async throws {
        let cluster = try MockKafkaCluster.make(brokers: 1, logger: quietLogger())
        let redis = try RedisServerProcess()
        let (topic, dlq) = (unique("in"), unique("dlq"))
        try cluster.createTopic(topic, partitions: 2)
        try cluster.createTopic(dlq, partitions: 1)
        try await produce(cluster.bootstrapServers, topic, [
            (nil, bytes("a"), [header("message-id", "perm-1"), header("fail", "permanent")]),
            (nil, bytes("b"), [header("message-id", "retry-1"), header("fail", "always")]),
            (nil, bytes("c"), [header("message-id", "fine-1")]),
        ])
        let config = try workerConfig(bootstrap: cluster.bootstrapServers, topic: topic, redis: redis, [
            "dead_letter.topic": dlq, "handler.max_attempts": "3",
        ])
        let handler = RecordingHandler()
        let worker = try Worker(config: config, handler: handler, logger: quietLogger(), exitsOnStall: false)
        try await runUntilIdle(worker)

        #expect(handler.keys == ["fine-1"])
        #expect(handler.attempts.withLock { $0 } == ["perm-1": 1, "retry-1": 3, "fine-1": 1])
        let letters = try await readTopic(cluster.bootstrapServers, dlq, count: 2)
        #expect(letters.count == 2)
        let byKey = Dictionary(uniqueKeysWithValues: letters.map { ($0.headerText(DeadLetterHeader.dedupKey) ?? "", $0) })
        #expect(byKey["perm-1"]?.headerText(DeadLetterHeader.reason) == "handler_failed")
        #expect(byKey["perm-1"]?.headerText(DeadLetterHeader.attempts) == "1")
        #expect(byKey["perm-1"]?.headerText(DeadLetterHeader.error)?.contains("rejected by test") == true)
        #expect(byKey["retry-1"]?.headerText(DeadLetterHeader.reason) == "handler_failed")
        #expect(byKey["retry-1"]?.headerText(DeadLetterHeader.attempts) == "3")
        #expect(byKey["retry-1"]?.value == bytes("b"))
        #expect(worker.counters.withLock { $0.failed } == 2)

        // Claims released: nothing left in Redis for the two; the good one is `done`.
        let connection = try await RedisConnection.connect(try RedisURL(redis.url), logger: quietLogger())
        let store = RedisClaimStore(connection: connection, logger: quietLogger())
        let ns = config.dedup.namespace
        let states = try await store.inspect(
            ["perm-1", "retry-1", "fine-1"].map { DedupKey(raw: $0, namespace: ns).storeKey }, layout: config.dedup.doneLayout)
        #expect(states[0] == .absent && states[1] == .absent)
        if case .done = states[2] {} else { Issue.record("fine-1 should be done, is \(states[2])") }

        // A corrected resend of the same key now passes.
        try await produce(cluster.bootstrapServers, topic, [(nil, bytes("a2"), [header("message-id", "perm-1")])])
        let again = try Worker(config: config, handler: handler, logger: quietLogger(), exitsOnStall: false)
        try await runUntilIdle(again)
        #expect(handler.keys == ["fine-1", "perm-1"])
    }

    /// While the dead-letter topic does not acknowledge, the bad message stays unresolved: its
    /// offset is not committed and the worker does not call itself idle. Once the topic is back,
    /// it is dead-lettered and committed.
    @Test func deadLetterOutageHoldsTheOffset() async throws {
        let cluster = try MockKafkaCluster.make(brokers: 1, logger: quietLogger())
        let dlqCluster = try MockKafkaCluster.make(brokers: 1, logger: quietLogger())
        let redis = try RedisServerProcess()
        let (topic, dlq) = (unique("in"), unique("dlq"))
        try cluster.createTopic(topic, partitions: 1)
        try dlqCluster.createTopic(dlq, partitions: 1)
        dlqCluster.setBrokerDown(1)
        try await produce(cluster.bootstrapServers, topic, [
            (nil, bytes("{}"), [header("message-id", "ok-1")]),
            (nil, bytes("{}"), []),  // missing_header
            (nil, bytes("{}"), [header("message-id", "ok-2")]),
        ])
        let config = try workerConfig(bootstrap: cluster.bootstrapServers, topic: topic, redis: redis, [
            "dead_letter.topic": dlq, "dead_letter.bootstrap_servers": dlqCluster.bootstrapServers,
            "dead_letter.timeout": "500ms",
        ])
        let handler = RecordingHandler()
        let worker = try Worker(config: config, handler: handler, logger: quietLogger(), exitsOnStall: false)
        let run = Task { try await runUntilIdle(worker, limit: .seconds(30)) }

        // Both good ones dispatched, the bad one held: the commit stops at its offset (1).
        let deadline = ContinuousClock.now + .seconds(15)
        while handler.keys.count < 2 && ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(100)) }
        try await Task.sleep(for: .seconds(2))  // past the idle time: the worker must still be running
        #expect(handler.keys.sorted() == ["ok-1", "ok-2"])
        let held = try await KafkaConsumer.committedOffsets(
            bootstrapServers: cluster.bootstrapServers, groupID: config.group, topic: topic)
        #expect((held[0] ?? -1) <= 1)
        #expect(worker.counters.withLock { $0.deadLettered } == 0)

        dlqCluster.setBrokerUp(1)
        try await run.value
        #expect(worker.counters.withLock { $0.deadLettered } == 1)
        let letters = try await readTopic(dlqCluster.bootstrapServers, dlq, count: 1)
        #expect(letters.map { $0.headerText(DeadLetterHeader.reason) } == ["missing_header"])
        let committed = try await KafkaConsumer.committedOffsets(
            bootstrapServers: cluster.bootstrapServers, groupID: config.group, topic: topic)
        #expect(committed[0] == 3)
    }
}
