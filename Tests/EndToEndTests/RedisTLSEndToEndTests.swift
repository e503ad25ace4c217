import Foundation
import KafkaIO
import Testing
import TestSupport

/// `dedupd run` with its seen-set on a TLS-only redis-server that requires a client
/// certificate: every unique submission is dispatched once; with a CA that did not sign the
/// server's certificate the worker fails closed (dispatches nothing, says why) until stopped.
@Suite(.serialized) struct RedisTLSEndToEndTests {
    @Test(.timeLimit(.minutes(4)))
    func aWorkerOnATLSRedisDispatchesEveryUniqueSubmissionOnce() async throws {
        let dir = try TemporaryDirectory(prefix: "dedupd-tls-e2e")
        let certs = try TLSTestCertificates()
        let redis = try TLSRedisServer(certs, clientCertificates: "yes")
        let mock = try DedupdProcess(["mock-kafka", "--brokers", "1", "--topic", "orders:3"], name: "mock-kafka", in: dir)
        let bootstrap = try mock.firstLine(timeout: .seconds(20))
        let produce = try DedupdProcess(
            ["produce", "--bootstrap-servers", bootstrap, "--topic", "orders", "--count", "2000", "--duplicate-ratio", "0.3"],
            name: "produce", in: dir)
        #expect(try produce.wait(timeout: .seconds(60)) == 0)
        let unique = try #require(produce.stdout.firstMatch(of: /unique=(\d+)/).flatMap { Int($0.1) })

        func config(_ name: String, ca: String) throws -> String {
            let file = dir.file("\(name).yaml")
            try """
            kafka: {bootstrap_servers: "\(bootstrap)", topics: orders, group: \(name)}
            redis:
              url: "rediss://127.0.0.1:\(redis.port)/0"
              tls: {ca_file: "\(certs.path(ca))", cert_file: "\(certs.path("client.pem"))", key_file: "\(certs.path("client.key"))"}
            dedup: {window: 200ms}
            run: {stop_when_idle: 3s}
            """.write(to: file, atomically: true, encoding: .utf8)
            return file.path
        }

        let run = try DedupdProcess(["run", "--config", try config("tls", ca: "ca.pem"), "--output", dir.file("out.jsonl").path], name: "tls", in: dir)
        #expect(try run.wait(timeout: .seconds(120)) == 0, "\(run.stderr.suffix(3000))")
        let ids = dispatchedIDs(inJSONLines: (try? String(contentsOf: dir.file("out.jsonl"), encoding: .utf8)) ?? "")
        #expect(ids.count == unique && Set(ids) == Set((0..<unique).map { "ord-\($0)" }), "\(ids.count) dispatched of \(unique)")
        #expect(run.stderr.contains("redis.tls=true"))

        let wrong = try DedupdProcess(
            ["run", "--config", try config("wrong-ca", ca: "other-ca.pem"), "--output", dir.file("wrong.jsonl").path], name: "wrong", in: dir)
        let deadline = ContinuousClock.now + .seconds(30)
        while !wrong.stderr.contains("redis unreachable") && ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(100)) }
        wrong.terminate()
        _ = try wrong.wait(timeout: .seconds(20))
        #expect(wrong.stderr.contains("certificate was not accepted") && wrong.stderr.contains("redis.tls.ca_file"), "\(wrong.stderr.suffix(2000))")
        #expect(((try? String(contentsOf: dir.file("wrong.jsonl"), encoding: .utf8)) ?? "").isEmpty, "fail-closed: nothing dispatched")
        mock.terminate()
    }
}
