import DedupService
import Foundation
import KafkaIO
import LocalServers
import Testing
import TestSupport

/// A worker whose handler blocks every cooperative thread (`dedupd-stalling-worker`) must not
/// hang for good: its watchdog, on a thread of its own, logs what is in flight and exits non-zero
/// within `http.loop_stall_timeout` plus a margin, and a second worker in the group then
/// dispatches every message the first one held.
@Suite(.serialized) struct WatchdogTests {
    @Test(.timeLimit(.minutes(5)))
    func aStalledWorkerExitsAndAnotherDispatchesWhatItHeld() async throws {
        let dir = try TemporaryDirectory(prefix: "dedupd-watchdog")
        let redis = try RedisServerProcess(appendFsync: "everysec")
        let mock = try DedupdProcess(["mock-kafka", "--brokers", "1", "--topic", "orders:3"], name: "mock-kafka", in: dir)
        let bootstrap = try mock.firstLine(timeout: .seconds(20))
        let produce = try DedupdProcess(
            ["produce", "--bootstrap-servers", bootstrap, "--topic", "orders", "--count", "300", "--duplicate-ratio", "0"],
            name: "produce", in: dir)
        #expect(try produce.wait(timeout: .seconds(60)) == 0, "produce: \(produce.stderr)")

        func config(_ name: String, handler: String, port: Int? = nil) throws -> String {
            let file = dir.file("\(name).yaml")
            try """
            kafka:
              bootstrap_servers: "\(bootstrap)"
              topics: orders
              group: watchdog
            redis:
              url: "\(redis.url)"
            dedup:
              key: header:message-id
              window: 100ms
              lease: 5s
            handler:
            \(handler)
            http:
              port: \(try port ?? freePort())
              loop_stall_timeout: 3s
            run:
              stop_when_idle: 4s
            """.write(to: file, atomically: true, encoding: .utf8)
            return file.path
        }

        // Concurrency above the cooperative pool's width (one thread per core): every pool
        // thread ends up asleep in a handler.
        let port = try freePort()
        let stalled = try DedupdProcess(
            ["--config", try config("stalled", handler: "  concurrency: 16", port: port)], name: "stalled", in: dir,
            executable: "dedupd-stalling-worker")
        // /healthz is asked every 100 ms while the worker lives: it must keep answering while
        // every cooperative thread is blocked, and answer 503 once the loop is stalled.
        let started = ContinuousClock.now
        var answers: [(at: Duration, status: String, body: String)] = []
        while stalled.process.isRunning && ContinuousClock.now - started < .seconds(60) {
            if let (status, body) = HealthProbe.get(port: port, path: "/healthz", timeout: .seconds(1)) {
                answers.append((ContinuousClock.now - started, status, body))
            }
            try await Task.sleep(for: .milliseconds(100))
        }
        let status = try stalled.wait(timeout: .seconds(10))
        let lifetime = ContinuousClock.now - started
        let failing = answers.filter { $0.status.contains(" 503") }
        #expect(!failing.isEmpty, "/healthz answered 503 during the stall: \(answers.suffix(5))")
        // The loop has a thread of its own and goes on; the pool its handlers block is what stalls.
        #expect(failing.allSatisfy { $0.body.contains("cooperative pool stalled") }, "\(failing.prefix(3))")
        // The worker goes soon after /healthz first fails: the stall timeout is 3 s, checks are 750 ms apart.
        if let first = failing.first { #expect(lifetime - first.at < .seconds(3), "exited \(lifetime - first.at) after /healthz failed") }
        #expect(status == 70, "the watchdog exits 70 (EX_SOFTWARE); got \(status): \(stalled.stderr.suffix(2000))")
        let report = stalled.stderr.split(separator: "\n").first { $0.contains("worker loop stalled") } ?? ""
        #expect(report.contains("level=error"), "one error line: \(stalled.stderr.suffix(2000))")
        #expect(report.contains("handlers="), "it names the handlers in flight: \(report)")
        #expect(!report.contains("handlers=none"), "handlers were in flight: \(report)")
        print("watchdog: stalled worker exited \(status) after \(lifetime) (join, first round, stall timeout 3 s); "
              + "/healthz answered \(answers.count) times, \(failing.count) with 503; \(report)")

        let successor = try DedupdProcess(
            ["run", "--config", try config("successor", handler: "  output: \(dir.file("out.jsonl").path)")],
            name: "successor", in: dir)
        let successorStatus = try successor.wait(timeout: .seconds(120))
        #expect(successorStatus == 0, "successor: \(successor.stderr.suffix(3000))")
        let ids = dispatchedIDs(inJSONLines: (try? String(contentsOf: dir.file("out.jsonl"), encoding: .utf8)) ?? "")
        #expect(ids.count == 300 && Set(ids) == Set((0..<300).map { "ord-\($0)" }), "every message once: \(ids.count)")
        let progress = try await KafkaConsumer.groupProgress(bootstrapServers: bootstrap, groupID: "watchdog", topic: "orders")
        #expect(progress.allSatisfy { $0.isCaughtUp }, "\(progress)")
        mock.terminate()
    }
}
