import DedupCore
import Foundation
import KafkaIO
import Logging
import RedisIO
import Synchronization
import Testing
import TestSupport

@testable import DedupService

func bytes(_ s: String) -> [UInt8] { Array(s.utf8) }

func header(_ name: String, _ value: String) -> MessageHeader { MessageHeader(name: name, value: bytes(value)) }

extension InboundMessage {
    func headerText(_ name: String) -> String? {
        header(name).flatMap { $0.value }.map { String(decoding: $0, as: UTF8.self) }
    }
}

/// A worker configuration against `cluster` and `redis` with a short window, stopping when idle.
func workerConfig(
    bootstrap: String, topic: String, redis: RedisServerProcess, _ extra: [String: String] = [:]
) throws -> WorkerConfiguration {
    var values: [String: String] = [
        "kafka.bootstrap_servers": bootstrap,
        "kafka.topics": topic,
        "kafka.group": unique("group"),
        "redis.url": redis.url,
        "dedup.namespace": unique("ns"),
        "dedup.window": "200ms",
        "run.stop_when_idle": "2s",
        "log.stats_interval": "0",
        "handler.backoff": "10ms",
    ]
    values.merge(extra) { _, new in new }
    return try WorkerConfiguration(layers: [values.mapValues { ConfigValue($0, origin: "test") }])
}

/// Runs a worker until it stops by itself (idle), bounded by `limit`.
func runUntilIdle(_ worker: Worker, limit: Duration = .seconds(60)) async throws {
    try await withThrowingTaskGroup(of: Bool.self) { group in
        group.addTask {
            try await worker.run()
            return true
        }
        group.addTask {
            try await Task.sleep(for: limit)
            return false
        }
        let finished = try await group.next()!
        if !finished {
            worker.requestStop()
            _ = try await group.next()
        }
        group.cancelAll()
        #expect(finished, "worker did not become idle within \(limit)")
    }
}

/// Every record of `topic`, read by a fresh consumer group until `count` arrived (or `limit`).
func readTopic(_ bootstrap: String, _ topic: String, count: Int, limit: Duration = .seconds(30)) async throws -> [InboundMessage] {
    let consumer = try KafkaConsumer.make(
        bootstrapServers: bootstrap, groupID: unique("reader"), topics: [topic], logger: quietLogger())
    defer { Task { await consumer.close() } }
    var out: [InboundMessage] = []
    let deadline = ContinuousClock.now + limit
    while out.count < count && ContinuousClock.now < deadline {
        for event in await consumer.poll(maxMessages: 2000, timeout: .milliseconds(100)) {
            if case .message(let m) = event { out.append(m) }
        }
    }
    // Anything beyond `count` would be a bug (a duplicate): give it a moment to show up.
    let settle = ContinuousClock.now + .milliseconds(500)
    while ContinuousClock.now < settle {
        for event in await consumer.poll(maxMessages: 2000, timeout: .milliseconds(100)) {
            if case .message(let m) = event { out.append(m) }
        }
    }
    return out
}

/// Sends `messages` and waits for every ack.
func produce(_ bootstrap: String, _ topic: String, _ messages: [(key: [UInt8]?, value: [UInt8], headers: [MessageHeader])]) async throws {
    let producer = try KafkaProducer.make(bootstrapServers: bootstrap, logger: quietLogger())
    for m in messages { try producer.send(topic: topic, key: m.key, value: m.value, headers: m.headers) }
    try await producer.flush(timeout: .seconds(30))
    #expect(producer.deliveryCounts.failed == 0)
}

/// A handler that records what it was given, and fails on request: messages whose
/// `fail` header says `permanent` throw `PermanentFailure`, `always` throw a retriable error.
final class RecordingHandler: Handler {
    struct Retriable: Error {}
    let dispatched = Mutex<[Dispatch]>([])
    let attempts = Mutex<[String: Int]>([:])

    func handle(_ dispatch: Dispatch) async throws {
        attempts.withLock { $0[dispatch.key.raw, default: 0] += 1 }
        switch dispatch.message.headerText("fail") {
        case "permanent": throw PermanentFailure("rejected by test")
        case "always": throw Retriable()
        default: dispatched.withLock { $0.append(dispatch) }
        }
    }

    var keys: [String] { dispatched.withLock { $0.map(\.key.raw) } }
}
