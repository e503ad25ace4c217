import DedupCore
import Foundation
import KafkaIO
import Logging
import Testing
import TestSupport

/// Routes as a user runs them: the real `dedupd` binary with a YAML file of routes, the mock
/// Kafka process and a real redis-server. Payments (by topic) go to a command, refunds (by
/// header) to a JSON-lines file, each with its own key and window; everything else is
/// dead-lettered as `no_route`. Counts are checked from the handlers' side.
@Suite(.serialized) struct RoutesEndToEndTests {
    @Test(.timeLimit(.minutes(3)))
    func eachRouteDispatchesItsUniqueMessagesOnceAndUnmatchedAreDeadLettered() async throws {
        let dir = try TemporaryDirectory(prefix: "dedupd-routes")
        let redis = try RedisServerProcess()
        let mock = try DedupdProcess(
            ["mock-kafka", "--brokers", "1", "--topic", "orders:3", "--topic", "payments:2", "--topic", "dlq:1"],
            name: "mock-kafka", in: dir)
        let bootstrap = try mock.firstLine(timeout: .seconds(20))
        let paid = dir.file("paid")
        try FileManager.default.createDirectory(at: paid, withIntermediateDirectories: true)

        // Traffic first: 100 payments with 30 repeats (same paymentId, other message-id),
        // 50 refunds with 20 repeats (same message-id), 25 orders that no route takes.
        let producer = try KafkaProducer.make(bootstrapServers: bootstrap, logger: Logger(label: "test"))
        func h(_ name: String, _ value: String) -> MessageHeader { MessageHeader(name: name, value: Array(value.utf8)) }
        for i in 0..<130 {
            let id = i < 100 ? i : (i * 7) % 100
            try producer.send(topic: "payments", key: Array("cust-\(id % 10)".utf8),
                              value: Array(#"{"paymentId":"pay-\#(id)","amount":\#(id)}"#.utf8), headers: [h("message-id", "m-\(i)")])
        }
        for i in 0..<70 {
            let id = i < 50 ? i : i - 50
            try producer.send(topic: "orders", key: nil, value: Array(#"{"refundId":"r-\#(id)"}"#.utf8),
                              headers: [h("message-id", "ref-\(id)"), h("type", "refund")])
        }
        for i in 0..<25 {
            try producer.send(topic: "orders", key: nil, value: Array(#"{"orderNo":"o-\#(i)"}"#.utf8),
                              headers: [h("message-id", "ord-\(i)"), h("type", "order")])
        }
        try await producer.flush(timeout: .seconds(10))

        let config = dir.file("dedupd.yaml").path
        try """
            kafka: {bootstrap_servers: "\(bootstrap)", topics: [orders, payments], group: routes}
            redis: {url: "\(redis.url)"}
            dedup: {key: "header:message-id", window: 300ms}
            handler: {type: log, output: "\(dir.file("default.jsonl").path)"}
            dead_letter: {topic: dlq}
            routing: {unmatched: dead_letter}
            routes:
              - name: payments
                match: {topic: payments}
                dedup: {key: "json:/paymentId", window: 1s, retention: 7d}
                handler:
                  type: exec
                  command: 'echo "$DEDUPD_OFFSET" >> "\(paid.path)/$DEDUPD_KEY"'
                  concurrency: 2
              - name: refunds
                match: {header: "type=refund"}
                handler: {type: log, output: "\(dir.file("refunds.jsonl").path)", concurrency: 1}
            run: {stop_when_idle: 3s}
            log: {stats_interval: 0}
            """.write(toFile: config, atomically: true, encoding: .utf8)

        let check = try DedupdProcess(["check-config", "--config", config], name: "check", in: dir)
        #expect(try check.wait(timeout: .seconds(20)) == 0, "check-config: \(check.stderr)")

        let run = try DedupdProcess(["run", "--config", config], name: "run", in: dir)
        #expect(try run.wait(timeout: .seconds(120)) == 0, "stderr: \(run.stderr.suffix(3000))")

        // Payments: one file per key, each written once.
        let files = try FileManager.default.contentsOfDirectory(atPath: paid.path)
        #expect(Set(files) == Set((0..<100).map { "pay-\($0)" }), "\(files.count) payment keys dispatched")
        let writes = try files.map { try String(contentsOf: paid.appendingPathComponent($0), encoding: .utf8) }
        #expect(writes.allSatisfy { $0.split(separator: "\n").count == 1 }, "a payment dispatched twice")

        // Refunds: each message id once, in the refunds file only.
        let refunds = dispatchedIDs(inJSONLines: (try? String(contentsOf: dir.file("refunds.jsonl"), encoding: .utf8)) ?? "")
        #expect(refunds.count == 50 && Set(refunds) == Set((0..<50).map { "ref-\($0)" }))
        let toDefault = dispatchedIDs(inJSONLines: (try? String(contentsOf: dir.file("default.jsonl"), encoding: .utf8)) ?? "")
        #expect(toDefault.isEmpty, "unmatched messages never reach the default handler")

        // Unmatched orders: dead-lettered with their reason.
        let letters = try await consumeAll(bootstrap: bootstrap, topic: "dlq", count: 25)
        for letter in letters {
            let reason = letter.header("dedupd-reason").flatMap { $0.value }.map { String(decoding: $0, as: UTF8.self) }
            #expect(reason == "no_route")
        }
        #expect(run.stderr.contains("route.name=payments") && run.stderr.contains("route.name=refunds"))
        #expect(run.stderr.contains("dispatched=150"), "100 payments + 50 refunds")
        #expect(run.stderr.contains("duplicates=50"), "30 payment and 20 refund repeats")

        for topic in ["orders", "payments"] {
            let progress = try await KafkaConsumer.groupProgress(bootstrapServers: bootstrap, groupID: "routes", topic: topic)
            #expect(progress.allSatisfy { $0.isCaughtUp }, "\(topic): every route's messages resolved and committed: \(progress)")
        }
        // The admin commands find a route's keys by its name.
        let inspect = try DedupdProcess(["inspect", "--config", config, "--route", "payments", "pay-7", "pay-100"], name: "inspect", in: dir)
        #expect(try inspect.wait(timeout: .seconds(20)) == 0, "inspect: \(inspect.stderr)")
        #expect(inspect.stdout.contains("pay-7 done") && inspect.stdout.contains("redis.key=dedupd:payments:pay-7"), "\(inspect.stdout)")
        #expect(inspect.stdout.contains("pay-100 absent"), "\(inspect.stdout)")
        mock.terminate()
    }
}
