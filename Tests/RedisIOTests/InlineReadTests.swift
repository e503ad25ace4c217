import Foundation
import Synchronization
import Testing
@testable import RedisIO
import TestSupport

#if canImport(Glibc)
import Glibc
#endif

/// `RedisConnection.InlineReads`: which round trips are read on the sending thread, and that a
/// slow answer handed to the connection's queue midway arrives whole and in step.
@Suite("Small round trips read on the sending thread")
struct InlineReadTests {
    /// Sends `ECHO` of each value and returns the pending replies, with the threads that parsed them.
    private func echo(_ connection: RedisConnection, _ values: [String], threads: ThreadLog) -> RedisPending<[String]> {
        connection.send({
            RedisCommandBatch(values.map { ["ECHO", RedisArgument($0)] })
        }, parse: { reply in
            threads.note()
            return RedisReply(reply).text ?? "?"
        })
    }

    private func inline(budget: Duration = .milliseconds(500), maxBytes: Int = 1024, applies: Bool = true) -> RedisConnection.InlineReads {
        RedisConnection.InlineReads(budget: budget, maxBytes: maxBytes) { applies }
    }

    @Test func aSmallBatchFromTheChosenThreadIsReadThere() async throws {
        let redis = try await RedisFixture()
        redis.connection.readInline(inline())
        let threads = ThreadLog()
        let caller = pthread_self()
        let pending = echo(redis.connection, ["a", "b", "c"], threads: threads)
        // Answered before `send` returned, on this thread.
        #expect(pending.answeredAt != nil)
        #expect(threads.all(on: caller, count: 3))
        #expect(try await pending.value() == ["a", "b", "c"])
    }

    @Test func otherThreadsAndLargeBatchesAreReadOnTheQueue() async throws {
        let redis = try await RedisFixture()
        for (reads, values) in [(inline(applies: false), ["x"]), (inline(maxBytes: 60), ["x", "y", "z"])] {
            redis.connection.readInline(reads)
            let threads = ThreadLog()
            let caller = pthread_self()
            let pending = echo(redis.connection, values, threads: threads)
            #expect(try await pending.value() == values)
            #expect(threads.none(on: caller, count: values.count))
        }
    }

    @Test func anAnswerSlowerThanTheBudgetIsFinishedOnTheQueue() async throws {
        let redis = try await RedisFixture()
        let other = try await RedisConnection.connect(try RedisURL(redis.server.url), logger: quietLogger)
        redis.connection.readInline(inline(budget: .milliseconds(20)))
        // Every client's commands wait for a second.
        _ = try await other.command("CLIENT", "PAUSE", "1000", "ALL").throwingOnError("CLIENT PAUSE")
        let threads = ThreadLog()
        let caller = pthread_self()
        let pending = echo(redis.connection, ["slow", "answer"], threads: threads)
        #expect(pending.answeredAt == nil)
        #expect(try await pending.value() == ["slow", "answer"])
        #expect(threads.none(on: caller, count: 2))
        // The connection is still in step: the next small batch is read inline again.
        let next = echo(redis.connection, ["next"], threads: threads)
        #expect(next.answeredAt != nil)
        #expect(try await next.value() == ["next"])
    }

    /// Over TLS, a small batch whose reply spans several TLS records (16 KiB each) is read inline
    /// whole, a record per read, each waited for in `poll(2)`; a batch over `tlsMaxBytes` goes to
    /// the queue, since a TLS session's write cannot stop where the socket is full.
    @Test func overTLSASmallBatchIsReadOnTheChosenThreadToo() async throws {
        let certs = try TLSTestCertificates()
        let server = try TLSRedisServer(certs)
        let connection = try await RedisConnection.connect(
            try RedisURL("rediss://127.0.0.1:\(server.port)"), tls: RedisTLSOptions(caFile: certs.path("ca.pem")), logger: quietLogger)
        let long = String(repeating: "x", count: 40_000)
        _ = try await connection.command("SET", "long", .init(long)).throwingOnError("SET")
        connection.readInline(inline(maxBytes: 64 * 1024))
        let threads = ThreadLog()
        let caller = pthread_self()
        let pending = connection.send({
            RedisCommandBatch([["ECHO", "a"], ["GET", "long"], ["ECHO", "b"]])
        }, parse: { reply in
            threads.note()
            return RedisReply(reply).text ?? "?"
        })
        #expect(pending.answeredAt != nil)
        #expect(threads.all(on: caller, count: 3))
        #expect(try await pending.value() == ["a", long, "b"])
        let large = echo(connection, ["a", long, "b"], threads: threads)
        #expect(try await large.value() == ["a", long, "b"])
        #expect(threads.none(on: caller, count: 3))
        await connection.close()
    }

    /// A batch larger than the socket and the server's side take at once, to a server that
    /// reads nothing yet: `send` returns with the rest of the batch handed to the queue, which
    /// writes it once the server reads, then reads the answers. Every byte arrives once, in order.
    @Test func aBatchTheSocketCannotTakeAtOnceIsFinishedOnTheQueue() async throws {
        let count = 40_000
        let batch = RedisCommandBatch((0..<count).map { ["ECHO", RedisArgument(String(repeating: "v", count: 400) + "\($0)")] })
        let bytes = batch.withCompleteBytes { Array($0) }
        #expect(bytes.count > 16_000_000)
        let server = try HeldReadServer(expecting: bytes, replies: count)
        defer { server.finish() }
        let connection = try await RedisConnection.connect(try RedisURL("redis://127.0.0.1:\(server.port)"), logger: quietLogger)
        connection.readInline(inline(maxBytes: 64 << 20))
        let pending = connection.send({ [batch] in batch }, parse: { RedisReply($0).text ?? "?" })
        // Returned before the server read a byte of the batch.
        #expect(server.held)
        #expect(pending.answeredAt == nil)
        server.release()
        let replies = try await pending.value()
        #expect(replies.count == count)
        #expect(replies.allSatisfy { $0 == "OK" })
        #expect(server.receivedWhole)
    }

    /// A reply that stops midway past the budget: the queue's read goes on with the part the
    /// reader already holds. A server of our own, since redis-server does not split a reply on cue.
    @Test func aReplySplitAcrossTheBudgetArrivesWhole() async throws {
        let server = try SplitReplyServer(first: "*2\r\n$3\r\nabc\r\n$3\r\nd", rest: "ef\r\n+OK\r\n")
        defer { server.finish() }
        let connection = try await RedisConnection.connect(try RedisURL("redis://127.0.0.1:\(server.port)"), logger: quietLogger)
        connection.readInline(inline(budget: .milliseconds(50)))
        let pending = connection.send({
            RedisCommandBatch([["ANY"], ["ANY"]])
        }, parse: { RedisReply($0) })
        #expect(pending.answeredAt == nil)
        let replies = try await pending.value()
        #expect(replies.count == 2)
        #expect(replies.first == .array([.string(Array("abc".utf8)), .string(Array("def".utf8))]))
        #expect(replies.last?.text == "OK")
    }
}

/// Answers the connection's PING, then the next request with `first`, and `rest` only once
/// `first` has been out for 300 ms.
private final class SplitReplyServer: @unchecked Sendable {
    let port: Int
    private let listener: Int32
    private let thread: Thread
    private let done = DispatchSemaphore(value: 0)

    init(first: String, rest: String) throws {
        let server = try listenOnLoopback()
        (listener, port) = server
        let done = self.done
        thread = Thread {
            let client = accept(server.listener, nil, nil)
            defer { close(client) }
            var buffer = [UInt8](repeating: 0, count: 4096)
            func send(_ text: String) { _ = text.utf8CString.withUnsafeBufferPointer { Glibc.send(client, $0.baseAddress, $0.count - 1, 0) } }
            _ = recv(client, &buffer, buffer.count, 0)  // PING
            send("+PONG\r\n")
            _ = recv(client, &buffer, buffer.count, 0)  // the batch
            send(first)
            usleep(300_000)
            send(rest)
            done.wait()
        }
        thread.start()
    }

    func finish() {
        done.signal()
        close(listener)
    }
}

/// Answers the connection's PING, then reads nothing until `release()` (or 10 s), then reads
/// `expecting.count` bytes, notes whether they were exactly `expecting`, and answers `+OK` to
/// each of `replies` commands.
private final class HeldReadServer: @unchecked Sendable {
    let port: Int
    private let listener: Int32
    private let released = DispatchSemaphore(value: 0)
    private let state = Mutex<(held: Bool, whole: Bool)>((true, false))

    var held: Bool { state.withLock { $0.held } }
    var receivedWhole: Bool { state.withLock { $0.whole } }

    init(expecting: [UInt8], replies: Int) throws {
        let server = try listenOnLoopback()
        (listener, port) = server
        Thread { [self] in
            let client = accept(server.listener, nil, nil)
            defer { close(client) }
            var buffer = [UInt8](repeating: 0, count: 1 << 16)
            func send(_ bytes: [UInt8]) {
                var sent = 0
                while sent < bytes.count {
                    let n = bytes.withUnsafeBytes { Glibc.send(client, $0.baseAddress! + sent, bytes.count - sent, 0) }
                    if n <= 0 { return }
                    sent += n
                }
            }
            _ = recv(client, &buffer, buffer.count, 0)  // PING
            send(Array("+PONG\r\n".utf8))
            _ = released.wait(timeout: .now() + 10)
            state.withLock { $0.held = false }
            var received: [UInt8] = []
            received.reserveCapacity(expecting.count)
            while received.count < expecting.count {
                let n = recv(client, &buffer, min(buffer.count, expecting.count - received.count), 0)
                if n <= 0 { break }
                received += buffer[..<n]
            }
            state.withLock { $0.whole = received == expecting }
            send(Array(String(repeating: "+OK\r\n", count: replies).utf8))
            _ = recv(client, &buffer, buffer.count, 0)  // until the client closes
        }.start()
    }

    func release() { released.signal() }

    func finish() {
        released.signal()
        close(listener)
    }
}

/// A TCP socket listening on 127.0.0.1, on a port the kernel chose.
private func listenOnLoopback() throws -> (listener: Int32, port: Int) {
    let server = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    address.sin_port = 0
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    let bound = withUnsafeMutablePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
            bind(server, $0, length) == 0 && listen(server, 1) == 0 && getsockname(server, $0, &length) == 0
        }
    }
    guard bound else {
        close(server)
        throw CocoaError(.fileWriteUnknown)
    }
    return (server, Int(UInt16(bigEndian: address.sin_port)))
}
