import DedupCore
import Foundation
import KafkaIO
import RedisIO
import Synchronization
import Testing
import TestSupport

@testable import DedupService

/// A python3 `http.server` on 127.0.0.1 (loopback only) that answers by the Idempotency-Key's
/// prefix: `ok-*` 200, `flaky-*` 503 twice then 201, `throttle-*` 429 once then 200, `bad-*`
/// 422, `slow-*` after 3 s. Every request is appended to a JSON-lines log.
final class TestHTTPServer: @unchecked Sendable {
    let process: Process
    let port: Int
    let log: URL
    let dir: TemporaryDirectory

    init() throws {
        dir = try TemporaryDirectory(prefix: "dedupd-http")
        log = dir.file("requests.jsonl")
        let script = dir.file("server.py")
        try #"""
        import http.server, json, sys, threading, time
        LOG = sys.argv[1]
        counts = {}
        lock = threading.Lock()
        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                key = self.headers.get("Idempotency-Key", "")
                with lock:
                    counts[key] = counts.get(key, 0) + 1
                    n = counts[key]
                    with open(LOG, "a") as f:
                        f.write(json.dumps({"key": key, "n": n, "path": self.path, "body": body.decode("utf-8", "replace"),
                                            "type": self.headers.get("Content-Type"), "topic": self.headers.get("Dedupd-Topic"),
                                            "offset": self.headers.get("Dedupd-Offset")}) + "\n")
                if key.startswith("flaky-"): code = 503 if n <= 2 else 201
                elif key.startswith("throttle-"): code = 429 if n <= 1 else 200
                elif key.startswith("bad-"): code = 422
                elif key.startswith("slow-"): time.sleep(3); code = 200
                else: code = 200
                reply = b"nope" if code >= 400 else b"ok"
                self.send_response(code)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)
            def log_message(self, *args): pass
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        print(server.server_address[1], flush=True)
        server.serve_forever()
        """#.write(to: script, atomically: true, encoding: .utf8)
        let out = Pipe()
        let process = Process()
        self.process = process
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["python3", script.path, log.path]
        process.standardOutput = out
        process.standardError = FileHandle.nullDevice
        try withDefaultSignalMask { try process.run() }
        var line = Data()
        while !line.contains(UInt8(ascii: "\n")) {
            let chunk = out.fileHandleForReading.availableData
            if chunk.isEmpty { break }
            line.append(chunk)
        }
        guard let p = Int(String(decoding: line, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)) else {
            process.terminate()
            throw LocalServerError("python3 http.server did not start")
        }
        port = p
    }

    var url: String { "http://127.0.0.1:\(port)/hook" }

    struct Request: Decodable { var key: String; var n: Int; var body: String; var type: String?; var topic: String?; var offset: String? }

    var requests: [Request] {
        let text = (try? String(contentsOf: log, encoding: .utf8)) ?? ""
        return text.split(separator: "\n").compactMap { try? JSONDecoder().decode(Request.self, from: Data($0.utf8)) }
    }

    deinit {
        process.terminate()
        process.waitUntilExit()
    }
}

func dispatch(_ key: String, value: String = "{}", headers: [MessageHeader] = [], offset: Int64 = 7) -> Dispatch {
    Dispatch(
        key: DedupKey(raw: key, namespace: "t"),
        message: InboundMessage(topic: "orders", partition: 2, offset: offset, key: nil, value: bytes(value), headers: headers))
}

func dispatcher(_ handler: any Handler, attempts: Int = 5) -> Dispatcher {
    Dispatcher(handler: handler, concurrency: 4, maxAttempts: attempts, backoff: Backoff(initial: .milliseconds(10)),
               maxElapsed: .seconds(30), logger: quietLogger())
}

@Suite("built-in handlers: http, exec, kafka", .serialized)
struct HandlerTests {
    // MARK: http

    @Test func httpPostsTheValueWithTheDedupKeyAsIdempotencyKey() async throws {
        let server = try TestHTTPServer()
        let handler = try HTTPHandler(url: server.url, timeout: .seconds(5))
        try await handler.handle(dispatch("ok-1", value: #"{"orderNo":"o-1"}"#, headers: [header("content-type", "application/json")]))
        let r = server.requests
        #expect(r.count == 1)
        #expect(r.first?.key == "ok-1")
        #expect(r.first?.body == #"{"orderNo":"o-1"}"#)
        #expect(r.first?.type == "application/json")
        #expect(r.first?.topic == "orders" && r.first?.offset == "7")
    }

    @Test func httpRetries5xxAnd429ButNot4xx() async throws {
        let server = try TestHTTPServer()
        let handler = try HTTPHandler(url: server.url, timeout: .seconds(5))
        let results = await dispatcher(handler).run([dispatch("flaky-1"), dispatch("throttle-1"), dispatch("bad-1"), dispatch("ok-2")])
        guard case .success = results[0], case .success = results[1], case .success = results[3] else {
            Issue.record("expected success for flaky, throttle and ok: \(results)")
            return
        }
        guard case .gaveUp(let error, let attempts) = results[2] else {
            Issue.record("422 should be given up: \(results[2])")
            return
        }
        #expect(attempts == 1)
        #expect(error is PermanentFailure)
        #expect("\(error)".contains("HTTP 422"))
        let counts = Dictionary(grouping: server.requests, by: \.key).mapValues(\.count)
        #expect(counts == ["flaky-1": 3, "throttle-1": 2, "bad-1": 1, "ok-2": 1])
    }

    @Test func httpTimeoutsAndNetworkErrorsAreRetriable() async throws {
        let server = try TestHTTPServer()
        let slow = try HTTPHandler(url: server.url, timeout: .milliseconds(500))
        let started = ContinuousClock.now
        let timeoutError = await #expect(throws: (any Error).self) { try await slow.handle(dispatch("slow-1")) }
        let took = ContinuousClock.now - started
        #expect(took >= .milliseconds(400) && took < .milliseconds(2500), "timed out after \(took): \(String(describing: timeoutError))")
        #expect(timeoutError is HTTPHandler.Timeout)

        let closed = try HTTPHandler(url: "http://127.0.0.1:\(try freePort())/hook", timeout: .seconds(2))
        let refused = await #expect(throws: (any Error).self) { try await closed.handle(dispatch("ok-3")) }
        #expect(!(refused is PermanentFailure))

        #expect(throws: HandlerError.self) { _ = try HTTPHandler(url: "ftp://example.com/x", timeout: .seconds(1)) }
    }

    // MARK: exec

    @Test func execRunsTheCommandWithTheValueOnStdinAndTheKeyInTheEnvironment() async throws {
        let dir = try TemporaryDirectory(prefix: "dedupd-exec")
        let handler = ExecHandler(
            command: #"cat > "\#(dir.path)/$DEDUPD_KEY.in"; echo "$DEDUPD_TOPIC $DEDUPD_PARTITION $DEDUPD_OFFSET $DEDUPD_ATTEMPT" > "\#(dir.path)/$DEDUPD_KEY.env""#,
            timeout: .seconds(10))
        try await handler.handle(dispatch("order-9", value: "hello\nworld", offset: 42))
        #expect(try String(contentsOf: dir.file("order-9.in"), encoding: .utf8) == "hello\nworld")
        #expect(try String(contentsOf: dir.file("order-9.env"), encoding: .utf8) == "orders 2 42 1\n")
    }

    @Test func execExitStatusDecidesRetryOrFinal() async throws {
        let retry = await dispatcher(ExecHandler(command: "exit 3", timeout: .seconds(5)), attempts: 3).run([dispatch("k")])
        guard case .gaveUp(let e1, let a1) = retry[0] else { Issue.record("exit 3: \(retry)"); return }
        #expect(a1 == 3)
        #expect("\(e1)".contains("status 3"))

        let final = await dispatcher(ExecHandler(command: "exit 65", timeout: .seconds(5)), attempts: 3).run([dispatch("k")])
        guard case .gaveUp(let e2, let a2) = final[0] else { Issue.record("exit 65: \(final)"); return }
        #expect(a2 == 1)
        #expect(e2 is PermanentFailure)

        // A command that never reads its stdin: the write fails (EPIPE), dedupd lives on.
        let big = String(repeating: "x", count: 1 << 20)
        try await ExecHandler(command: "exit 0", timeout: .seconds(5)).handle(dispatch("k", value: big))
    }

    @Test func execTimeoutKillsTheWholeCommand() async throws {
        let dir = try TemporaryDirectory(prefix: "dedupd-exec")
        let pidFile = dir.file("child.pid").path
        let handler = ExecHandler(command: "sleep 30 & echo $! > \(pidFile); wait", timeout: .milliseconds(300))
        let started = ContinuousClock.now
        let error = await #expect(throws: ExecHandler.Failure.self) { try await handler.handle(dispatch("k")) }
        #expect(ContinuousClock.now - started < .seconds(3))
        #expect(error?.description.contains("killed") == true)
        let pid = try #require(Int32(String(contentsOfFile: pidFile, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)))
        // The background `sleep` was in the command's process group: killed with it (gone, or a
        // zombie waiting for whoever adopted it to reap it).
        func isGone() -> Bool {
            guard kill(pid, 0) == 0 else { return true }
            let stat = (try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)) ?? ""
            return stat.split(separator: ")").last?.split(separator: " ").first == "Z"
        }
        var gone = false
        for _ in 0..<50 where !gone {
            gone = isGone()
            if !gone { try await Task.sleep(for: .milliseconds(20)) }
        }
        #expect(gone)
    }

    // MARK: kafka, and each kind through the worker

    /// `handler.type: kafka`: each unique message forwarded once, original headers kept, plus
    /// `dedupd-dedup-key`.
    @Test func kafkaHandlerForwardsEachUniqueMessageOnceWithItsKey() async throws {
        let cluster = try MockKafkaCluster.make(brokers: 1, logger: quietLogger())
        let redis = try RedisServerProcess()
        let (topic, out) = (unique("in"), unique("out"))
        try cluster.createTopic(topic, partitions: 3)
        try cluster.createTopic(out, partitions: 2)
        var sent: [(key: [UInt8]?, value: [UInt8], headers: [MessageHeader])] = []
        for i in 0..<300 {
            let id = "m-\(i % 200)"  // 100 repeats
            sent.append((bytes("rk-\(i)"), bytes(#"{"i":\#(i)}"#), [header("message-id", id), header("tenant", "acme")]))
        }
        try await produce(cluster.bootstrapServers, topic, sent)
        let config = try workerConfig(bootstrap: cluster.bootstrapServers, topic: topic, redis: redis, [
            "handler.type": "kafka", "handler.topic": out, "handler.concurrency": "32",
        ])
        let worker = try Worker(config: config, logger: quietLogger(), exitsOnStall: false)
        try await runUntilIdle(worker)
        let forwarded = try await readTopic(cluster.bootstrapServers, out, count: 200)
        #expect(forwarded.count == 200)
        #expect(Set(forwarded.compactMap { $0.headerText(DeadLetterHeader.dedupKey) }).count == 200)
        #expect(forwarded.allSatisfy { $0.headerText(DeadLetterHeader.dedupKey) == $0.headerText("message-id") })
        #expect(forwarded.allSatisfy { $0.headerText("tenant") == "acme" && $0.key != nil })
        #expect(worker.counters.withLock { $0.dispatched } == 200, "\(worker.counters.withLock { $0 })")
    }

    /// `handler.type: http` with a dead-letter topic: 2xx once, 503/429 retried to success,
    /// 422 dead-lettered at once with `handler_failed` and attempts 1.
    @Test func httpHandlerThroughTheWorkerWithDeadLetters() async throws {
        let server = try TestHTTPServer()
        let cluster = try MockKafkaCluster.make(brokers: 1, logger: quietLogger())
        let redis = try RedisServerProcess()
        let (topic, dlq) = (unique("in"), unique("dlq"))
        try cluster.createTopic(topic, partitions: 2)
        try cluster.createTopic(dlq, partitions: 1)
        let ids = ["ok-a", "ok-b", "flaky-a", "throttle-a", "bad-a", "ok-a"]
        try await produce(cluster.bootstrapServers, topic, ids.map { (nil, bytes("v-\($0)"), [header("message-id", $0)]) })
        let config = try workerConfig(bootstrap: cluster.bootstrapServers, topic: topic, redis: redis, [
            "handler.type": "http", "handler.url": server.url, "handler.timeout": "2s", "dead_letter.topic": dlq,
        ])
        let worker = try Worker(config: config, logger: quietLogger(), exitsOnStall: false)
        try await runUntilIdle(worker)
        let counts = Dictionary(grouping: server.requests, by: \.key).mapValues(\.count)
        #expect(counts == ["ok-a": 1, "ok-b": 1, "flaky-a": 3, "throttle-a": 2, "bad-a": 1])
        let letters = try await readTopic(cluster.bootstrapServers, dlq, count: 1)
        #expect(letters.count == 1)
        #expect(letters.first?.headerText(DeadLetterHeader.dedupKey) == "bad-a")
        #expect(letters.first?.headerText(DeadLetterHeader.reason) == "handler_failed")
        #expect(letters.first?.headerText(DeadLetterHeader.attempts) == "1")
        #expect(letters.first?.value == bytes("v-bad-a"))
    }

    /// `handler.type: exec` through the worker: one run per unique message.
    @Test func execHandlerThroughTheWorker() async throws {
        let dir = try TemporaryDirectory(prefix: "dedupd-exec")
        let cluster = try MockKafkaCluster.make(brokers: 1, logger: quietLogger())
        let redis = try RedisServerProcess()
        let topic = unique("in")
        try cluster.createTopic(topic, partitions: 2)
        let ids = (0..<30).map { "e-\($0 % 20)" }
        try await produce(cluster.bootstrapServers, topic, ids.map { (nil, bytes("body-\($0)"), [header("message-id", $0)]) })
        let config = try workerConfig(bootstrap: cluster.bootstrapServers, topic: topic, redis: redis, [
            "handler.type": "exec", "handler.command": #"cat >> "\#(dir.path)/$DEDUPD_KEY""#,
        ])
        let worker = try Worker(config: config, logger: quietLogger(), exitsOnStall: false)
        try await runUntilIdle(worker)
        let files = try FileManager.default.contentsOfDirectory(atPath: dir.path).sorted()
        #expect(files == (0..<20).map { "e-\($0)" }.sorted())
        for f in files { #expect(try String(contentsOf: dir.file(f), encoding: .utf8) == "body-\(f)") }
    }
}
