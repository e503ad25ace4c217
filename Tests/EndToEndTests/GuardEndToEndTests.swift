import DedupCore
import Foundation
import KafkaIO
import Logging
import Testing
import TestSupport

/// The guard as a user runs it (docs/architecture.md "The guard"): order events keyed by order
/// number on 6 partitions, the real `dedupd` binary, the mock Kafka process and a real
/// redis-server. Counted from the handler's side and the dead-letter topic.
@Suite(.serialized) struct GuardEndToEndTests {
    static let table = EntityGuard(
        entity: try! KeyTemplate("json:/orderNo"), state: try! KeyTemplate("json:/status"), initial: ["created"],
        transitions: ["created": ["paid", "cancelled"], "paid": ["shipped", "refunded"], "shipped": ["delivered"]],
        retention: .seconds(3600))

    static let guardYAML = """
        guard:
          entity: json:/orderNo
          state: json:/status
          initial: [created]
          transitions:
            created: [paid, cancelled]
            paid: [shipped, refunded]
            shipped: [delivered]
        """

    /// One order event: its message id (exact repeats share it), order and status.
    struct Event { var id: String; var order: String; var status: String }

    /// Per order, one of four scripts: double clicks (a second "paid" with a new id), a stale
    /// "created", moves that skip or go back, exact repeats.
    static func events(orders: Int) -> [Event] {
        var out: [Event] = []
        for o in 0..<orders {
            let order = "ord-\(o)"
            func e(_ n: Int, _ status: String) -> Event { Event(id: "\(order)-m\(n)", order: order, status: status) }
            switch o % 4 {
            case 0: out += [e(0, "created"), e(1, "paid"), e(2, "paid"), e(3, "shipped"), e(4, "created"), e(5, "delivered"), e(1, "paid")]
            case 1: out += [e(0, "created"), e(1, "refunded"), e(2, "paid"), e(3, "refunded"), e(4, "shipped")]
            case 2: out += [e(0, "paid"), e(1, "created"), e(2, "cancelled"), e(3, "paid"), e(1, "created")]
            default: out += [e(0, "created"), e(1, "created"), e(0, "created"), e(2, "paid"), e(3, "shipped"), e(4, "delivered")]
            }
        }
        return out
    }

    /// What the guard must do with `events`, judged in order per order (their partition order):
    /// the ids to dispatch, the ids to reject, and the exact repeats.
    static func expected(_ events: [Event]) -> (dispatched: Set<String>, rejected: Set<String>, repeats: Int, finalState: [String: String]) {
        var state: [String: String] = [:]
        var seen: Set<String> = []
        var dispatched: Set<String> = [], rejected: Set<String> = [], repeats = 0
        for e in events {
            guard seen.insert(e.id).inserted else { repeats += 1; continue }
            if table.allows(from: state[e.order], to: e.status) {
                dispatched.insert(e.id)
                state[e.order] = e.status
            } else {
                rejected.insert(e.id)
            }
        }
        return (dispatched, rejected, repeats, state)
    }

    func produce(_ events: [Event], bootstrap: String, pace: Duration? = nil) async throws {
        let producer = try KafkaProducer.make(bootstrapServers: bootstrap, logger: Logger(label: "test"))
        for (i, e) in events.enumerated() {
            try producer.send(
                topic: "orders", key: Array(e.order.utf8), value: Array(#"{"orderNo":"\#(e.order)","status":"\#(e.status)"}"#.utf8),
                headers: [MessageHeader(name: "message-id", value: Array(e.id.utf8))])
            if let pace, i % 100 == 99 { try await Task.sleep(for: pace) }
        }
        try await producer.flush(timeout: .seconds(10))
    }

    /// (message id, status) of every line the `log` handler wrote to the files, in order.
    func dispatched(_ files: [URL]) -> [(id: String, order: String, status: String)] {
        files.flatMap { file in
            ((try? String(contentsOf: file, encoding: .utf8)) ?? "").split(separator: "\n").compactMap { line in
                guard let o = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any],
                    let id = (o["headers"] as? [String: Any])?["message-id"] as? String,
                    let value = o["value"] as? String,
                    let body = try? JSONSerialization.jsonObject(with: Data(value.utf8)) as? [String: Any],
                    let order = body["orderNo"] as? String, let status = body["status"] as? String
                else { return nil }
                return (id, order, status)
            }
        }
    }

    @Test(.timeLimit(.minutes(3)))
    func exactlyTheLegalFirstMovesAreDispatchedAndEveryOtherMessageIsCountedWithItsReason() async throws {
        let dir = try TemporaryDirectory(prefix: "dedupd-guard")
        let redis = try RedisServerProcess()
        let mock = try DedupdProcess(["mock-kafka", "--brokers", "1", "--topic", "orders:6", "--topic", "dlq:1"], name: "mock-kafka", in: dir)
        let bootstrap = try mock.firstLine(timeout: .seconds(20))
        let events = Self.events(orders: 80)
        let want = Self.expected(events)
        try await produce(events, bootstrap: bootstrap)

        let config = dir.file("dedupd.yaml").path
        let output = dir.file("orders.jsonl")
        try """
            kafka: {bootstrap_servers: "\(bootstrap)", topics: [orders], group: guard}
            redis: {url: "\(redis.url)"}
            dedup: {key: "header:message-id", window: 200ms, namespace: orders}
            \(Self.guardYAML)
              on_reject: dead_letter
            handler: {type: log, output: "\(output.path)"}
            dead_letter: {topic: dlq}
            run: {stop_when_idle: 3s}
            log: {stats_interval: 0}
            """.write(toFile: config, atomically: true, encoding: .utf8)
        let check = try DedupdProcess(["check-config", "--config", config], name: "check", in: dir)
        #expect(try check.wait(timeout: .seconds(20)) == 0, "check-config: \(check.stderr)")

        let run = try DedupdProcess(["run", "--config", config], name: "run", in: dir)
        #expect(try run.wait(timeout: .seconds(120)) == 0, "stderr: \(run.stderr.suffix(3000))")

        let got = dispatched([output])
        let ids = got.map(\.id)
        #expect(Set(ids) == want.dispatched, "missing \(want.dispatched.subtracting(ids).sorted().prefix(5)), extra \(Set(ids).subtracting(want.dispatched).sorted().prefix(5))")
        #expect(ids.count == Set(ids).count, "a message dispatched twice")
        let letters = try await consumeAll(bootstrap: bootstrap, topic: "dlq", count: want.rejected.count)
        func header(_ m: InboundMessage, _ name: String) -> String? {
            m.headers.first { $0.name == name }?.value.map { String(decoding: $0, as: UTF8.self) }
        }
        #expect(Set(letters.compactMap { header($0, "message-id") }) == want.rejected)
        #expect(letters.allSatisfy { header($0, DeadLetterHeader.reason) == DeadLetter.rejectedTransition })
        let summary = run.stderr
        #expect(summary.contains("rejected_transitions=\(want.rejected.count)"), "summary: \(summary.suffix(1500))")
        #expect(summary.contains("duplicates=\(want.repeats)"))
        #expect(summary.contains("guard.from=") && summary.contains("guard.to="), "rejections are logged with entity, from, to")

        // The operator's view of one order, and a reset.
        let inspect = try DedupdProcess(["inspect", "--config", config, "--entity", "ord-0"], name: "inspect", in: dir)
        #expect(try inspect.wait(timeout: .seconds(20)) == 0)
        #expect(inspect.stdout.contains("ord-0 state=\(want.finalState["ord-0"]!)"), "\(inspect.stdout)")
        let forget = try DedupdProcess(["forget", "--config", config, "--entity", "ord-0"], name: "forget", in: dir)
        #expect(try forget.wait(timeout: .seconds(20)) == 0)
        #expect(forget.stdout.contains("ord-0 removed"), "\(forget.stdout)")
        print("guard e2e: events=\(events.count) dispatched=\(ids.count) expected=\(want.dispatched.count) rejected=\(letters.count) expected_rejected=\(want.rejected.count) repeats=\(want.repeats)")
    }

    @Test(.timeLimit(.minutes(5)))
    func sigkillMidStreamDispatchesNoIllegalMoveAndLosesNoLegalOne() async throws {
        let dir = try TemporaryDirectory(prefix: "dedupd-guard-kill")
        let redis = try RedisServerProcess()
        let mock = try DedupdProcess(["mock-kafka", "--brokers", "1", "--topic", "orders:6"], name: "mock-kafka", in: dir)
        let bootstrap = try mock.firstLine(timeout: .seconds(20))
        let events = Self.events(orders: 600)
        let want = Self.expected(events)
        let config = dir.file("dedupd.yaml").path
        let round = 8
        try """
            kafka: {bootstrap_servers: "\(bootstrap)", topics: [orders], group: guard-kill}
            redis: {url: "\(redis.url)"}
            dedup: {key: "header:message-id", window: 300ms, lease: 3s, namespace: orders}
            \(Self.guardYAML)
            handler: {type: log, concurrency: \(round), max_batch: \(round)}
            log: {stats_interval: 0}
            """.write(toFile: config, atomically: true, encoding: .utf8)
        var outputs: [URL] = []
        var worker: DedupdProcess?
        func start() throws {
            let out = dir.file("run\(outputs.count).jsonl")
            outputs.append(out)
            worker = try DedupdProcess(["run", "--config", config, "--output", out.path], name: "run\(outputs.count)", in: dir)
        }
        try start()
        let producing = Task { try await produce(events, bootstrap: bootstrap, pace: .milliseconds(60)) }
        var kills = 0
        for _ in 0..<3 {
            // Kill once this run has dispatched something, mid-stream.
            let before = dispatched(outputs).count
            let deadline = ContinuousClock.now + .seconds(60)
            while dispatched(outputs).count < before + 200, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(100)) }
            kill(worker!.process.processIdentifier, SIGKILL)
            worker!.process.waitUntilExit()
            kills += 1
            try start()
        }
        try await producing.value
        let deadline = ContinuousClock.now + .seconds(120)
        while !Set(dispatched(outputs).map(\.id)).isSuperset(of: want.dispatched), ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(250))
        }
        try await Task.sleep(for: .seconds(2))
        worker!.terminate()
        #expect(try worker!.wait(timeout: .seconds(30)) == 0, "final SIGTERM: \(worker!.stderr.suffix(2000))")

        let got = dispatched(outputs)
        let distinct = Set(got.map(\.id))
        let lost = want.dispatched.subtracting(distinct)
        let illegal = distinct.subtracting(want.dispatched)
        #expect(lost.isEmpty, "legal moves lost: \(lost.sorted().prefix(5))")
        #expect(illegal.isEmpty, "illegal moves dispatched: \(illegal.sorted().prefix(5))")
        // Per order, the distinct moves in the order they were dispatched walk the table.
        var walk: [String: String] = [:]
        var seen: Set<String> = []
        var badWalks: [String] = []
        for d in got where seen.insert(d.id).inserted {
            if !Self.table.allows(from: walk[d.order], to: d.status) { badWalks.append("\(d.order): \(walk[d.order] ?? "-")>\(d.status)") }
            walk[d.order] = d.status
        }
        #expect(badWalks.isEmpty, "\(badWalks.prefix(5))")
        let repeats = got.count - distinct.count
        #expect(repeats <= kills * round, "repeats \(repeats) beyond the crash bound \(kills * round)")
        print("guard chaos: events=\(events.count) legal=\(want.dispatched.count) dispatched=\(got.count) distinct=\(distinct.count) lost=\(lost.count) illegal=\(illegal.count) repeats=\(repeats) kills=\(kills) bound=\(kills * round)")
    }
}
