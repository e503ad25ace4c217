import Foundation
import KafkaIO
import Testing
import TestSupport

/// Runs the real `dedupd` binary as a user would: mock Kafka in its own process, a real
/// redis-server, the producer, and two workers in one group; then checks from the handler side.
@Suite(.serialized) struct EndToEndTests {
    @Test(.timeLimit(.minutes(5)))
    func twoWorkersDispatchEveryUniqueSubmissionExactlyOnce() async throws {
        let dir = try TemporaryDirectory(prefix: "dedupd-e2e")
        let redis = try RedisServerProcess()
        let mock = try DedupdProcess(["mock-kafka", "--brokers", "3", "--topic", "submissions:6"], name: "mock-kafka", in: dir)
        let bootstrap = try mock.firstLine(timeout: .seconds(20))

        func worker(_ name: String) throws -> DedupdProcess {
            try DedupdProcess(
                [
                    "run", "--bootstrap-servers", bootstrap, "--topic", "submissions", "--group", "e2e",
                    "--redis-url", redis.url, "--window", "1s", "--stop-when-idle", "5s",
                    "--output", dir.file("\(name).jsonl").path, "--stats-interval", "2s",
                ], name: name, in: dir)
        }
        // Workers first, then traffic: repeats arrive while the workers run, some inside the
        // window (caught locally) and some after it (caught by Redis), across a rebalance.
        let a = try worker("worker-a")
        let b = try worker("worker-b")
        let produce = try DedupdProcess(
            ["produce", "--bootstrap-servers", bootstrap, "--topic", "submissions", "--count", "10000",
             "--duplicate-ratio", "0.3"], name: "produce", in: dir)
        #expect(try produce.wait(timeout: .seconds(60)) == 0, "produce: \(produce.stderr)")
        let report = produce.stdout
        let match = try #require(report.firstMatch(of: /unique=(\d+)/), "produce printed: \(report)")
        let unique = try #require(Int(match.1))

        let statusA = try a.wait(timeout: .seconds(180))
        let statusB = try b.wait(timeout: .seconds(180))
        #expect(statusA == 0, "worker-a stderr: \(a.stderr.suffix(3000))")
        #expect(statusB == 0, "worker-b stderr: \(b.stderr.suffix(3000))")

        let idsA = dispatchedIDs(inJSONLines: (try? String(contentsOf: dir.file("worker-a.jsonl"), encoding: .utf8)) ?? "")
        let idsB = dispatchedIDs(inJSONLines: (try? String(contentsOf: dir.file("worker-b.jsonl"), encoding: .utf8)) ?? "")
        let all = idsA + idsB
        let expected = Set((0..<unique).map { "ord-\($0)" })
        #expect(all.count == unique, "every unique id once: \(all.count) dispatched for \(unique) unique (a=\(idsA.count) b=\(idsB.count))")
        #expect(Set(all) == expected, "nothing else dispatched, nothing missing")

        let progress = try await KafkaConsumer.groupProgress(bootstrapServers: bootstrap, groupID: "e2e", topic: "submissions")
        #expect(progress.count == 6)
        for p in progress {
            #expect(p.committed == p.high, "partition \(p.partition): committed \(p.committed), end \(p.high)")
        }
        print("e2e: unique=\(unique) dispatched=\(all.count) worker-a=\(idsA.count) worker-b=\(idsB.count)")

        mock.terminate()
        #expect(try mock.wait(timeout: .seconds(20)) == 0)
    }

    @Test func badConfigurationStopsStartupNamingTheSetting() throws {
        let dir = try TemporaryDirectory(prefix: "dedupd-e2e")
        let run = try DedupdProcess(
            ["run", "--bootstrap-servers", "127.0.0.1:1", "--topic", "t", "--window", "5 parsecs"], name: "bad", in: dir)
        #expect(try run.wait(timeout: .seconds(20)) != 0)
        #expect(run.stderr.contains(#"dedup.window = "5 parsecs" (from flag)"#), "stderr: \(run.stderr)")
    }

    @Test func messagesWithoutTheKeyAreCountedAndLoggedNotDispatched() async throws {
        let dir = try TemporaryDirectory(prefix: "dedupd-e2e")
        let redis = try RedisServerProcess()
        let mock = try DedupdProcess(["mock-kafka", "--brokers", "1", "--topic", "in:2"], name: "mock-kafka", in: dir)
        let bootstrap = try mock.firstLine(timeout: .seconds(20))
        let producer = try KafkaProducer.make(bootstrapServers: bootstrap, logger: .init(label: "test"))
        try producer.send(topic: "in", key: nil, value: Array("{}".utf8), headers: [])
        try producer.send(topic: "in", key: nil, value: Array("{}".utf8), headers: [.init(name: "message-id", value: [])])
        try producer.send(topic: "in", key: nil, value: Array("{}".utf8), headers: [.init(name: "message-id", value: Array("ok-1".utf8))])
        try await producer.flush(timeout: .seconds(10))

        let run = try DedupdProcess(
            ["run", "--bootstrap-servers", bootstrap, "--topic", "in", "--group", "bad-input", "--redis-url", redis.url,
             "--window", "200ms", "--stop-when-idle", "2s", "--output", dir.file("out.jsonl").path], name: "run", in: dir)
        #expect(try run.wait(timeout: .seconds(90)) == 0, "stderr: \(run.stderr.suffix(3000))")
        let ids = dispatchedIDs(inJSONLines: (try? String(contentsOf: dir.file("out.jsonl"), encoding: .utf8)) ?? "")
        #expect(ids == ["ok-1"])
        #expect(run.stderr.contains("dedup.reason=missing_header"))
        #expect(run.stderr.contains("dedup.reason=empty_key"))
        #expect(run.stderr.contains("invalid=2"))
        let progress = try await KafkaConsumer.groupProgress(bootstrapServers: bootstrap, groupID: "bad-input", topic: "in")
        #expect(progress.allSatisfy { $0.isCaughtUp }, "bad input is resolved, not left uncommitted: \(progress)")
        mock.terminate()
    }
}
