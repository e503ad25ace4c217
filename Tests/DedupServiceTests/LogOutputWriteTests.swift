import DedupCore
import Foundation
import Synchronization
import Testing

@testable import DedupService

#if canImport(Glibc)
import Glibc
#endif

/// How the `log` handler's flush reaches its output: written by the caller when the output
/// takes it at once, the rest by the handler's writer queue, every byte once and in order.
@Suite("log handler writes")
struct LogOutputWriteTests {
    static func round(_ count: Int, valueBytes: Int) -> [Dispatch] {
        (0..<count).map { i in
            let message = InboundMessage(
                topic: "t", partition: 0, offset: Int64(i), key: nil,
                value: Array("v\(i)-".utf8) + [UInt8](repeating: UInt8(ascii: "x"), count: valueBytes),
                headers: [MessageHeader(name: "message-id", value: Array("id-\(i)".utf8))])
            return Dispatch(key: DedupKey(raw: "id-\(i)", namespace: "n"), message: message)
        }
    }

    static func expected(_ round: [Dispatch]) -> [UInt8] {
        Array(round.map(LogOutputHandler.line(for:)).joined().utf8)
    }

    /// A pipe, written as stdout is (`output: "-"` under a container runtime or a shell's `|`).
    /// Its write end stays open: the test reads exact counts, not to the end.
    static func pipeOutput() throws -> (read: Int32, handler: LogOutputHandler) {
        let (readEnd, writeEnd) = pipeEnds()
        return (readEnd, LogOutputHandler(descriptor: writeEnd))
    }

    static func pipeEnds() -> (read: Int32, write: Int32) {
        var fds: [Int32] = [0, 0]
        #expect(pipe(&fds) == 0)
        return (fds[0], fds[1])
    }

    /// Up to `count` bytes, fewer at the end of the input.
    static func read(_ fd: Int32, count: Int) -> [UInt8] {
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65_536)
        while bytes.count < count {
            let n = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress!, min($0.count, count - bytes.count)) }
            if n <= 0 { break }
            bytes += chunk[..<n]
        }
        return bytes
    }

    @Test func aRoundThePipeHasRoomForIsWrittenByTheCaller() async throws {
        let (readEnd, handler) = try Self.pipeOutput()
        defer { close(readEnd) }
        let round = Self.round(50, valueBytes: 100)
        let expected = Self.expected(round)
        #expect(expected.count < 16 * 1024)
        try await handler.handleBatch(round)
        try await handler.flush()
        #expect(handler.writerFlushes.load(ordering: .relaxed) == 0)
        #expect(handler.refusesNowait.load(ordering: .relaxed) == false)
        #expect(Self.read(readEnd, count: expected.count) == expected)
    }

    /// Larger than the pipe holds (64 KiB): the caller writes what fits, the writer queue waits
    /// for the reader and writes the rest, and the reader gets each byte once, in order.
    @Test func aRoundLargerThanThePipeIsFinishedByTheWriter() async throws {
        let (readEnd, writeEnd) = Self.pipeEnds()
        defer { close(readEnd) }
        let handler = LogOutputHandler(descriptor: writeEnd)
        let round = Self.round(1_000, valueBytes: 200)
        let next = Self.round(10, valueBytes: 10)
        let expected = Self.expected(round)
        #expect(expected.count > 3 * 65_536)
        try await handler.handleBatch(round)
        let flushed = Task { try await handler.flush() }
        // Nothing is read until the flush has handed the rest to its writer.
        let deadline = ContinuousClock.now + .seconds(10)
        while handler.writerFlushes.load(ordering: .relaxed) == 0 && ContinuousClock.now < deadline {
            await Task.yield()
        }
        #expect(handler.writerFlushes.load(ordering: .relaxed) == 1)
        // Read to the end on a thread of its own, so that a flush writing too much cannot hang.
        async let got = withCheckedContinuation { c in
            DispatchQueue.global().async { c.resume(returning: Self.read(readEnd, count: .max)) }
        }
        try await flushed.value
        // The next round fits again, and is the caller's.
        try await handler.handleBatch(next)
        try await handler.flush()
        #expect(handler.writerFlushes.load(ordering: .relaxed) == 1)
        close(writeEnd)
        let all = await got
        #expect(all.count == expected.count + Self.expected(next).count)
        let whole = all == expected + Self.expected(next)  // not the bytes themselves in a failure
        #expect(whole)
    }

    /// A named pipe opened by path (Linux gives it no `RWF_NOWAIT`): every flush goes to the
    /// writer, and arrives whole.
    @Test func aNamedPipeIsWrittenByTheWriter() async throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("log-fifo-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        #expect(mkfifo(path, 0o600) == 0)
        defer { unlink(path) }
        let readEnd = open(path, O_RDONLY | O_NONBLOCK)
        #expect(readEnd >= 0)
        defer { close(readEnd) }
        let handler = try LogOutputHandler(path: path)
        for flushes in 1...2 {
            let round = Self.round(5, valueBytes: 10)
            try await handler.handleBatch(round)
            try await handler.flush()
            #expect(handler.writerFlushes.load(ordering: .relaxed) == flushes)
            #expect(handler.refusesNowait.load(ordering: .relaxed) == true)
            #expect(Self.read(readEnd, count: Self.expected(round).count) == Self.expected(round))
        }
    }

    /// An output that fails (/dev/full: ENOSPC, or EOPNOTSUPP to `RWF_NOWAIT` first) is left to the
    /// writer, whose write reports the failure, every time.
    @Test func aFailingOutputIsReportedByTheWriter() async throws {
        let handler = try LogOutputHandler(path: "/dev/full")
        for attempt in 1...2 {
            try await handler.handleBatch(Self.round(3, valueBytes: 10))
            let error = await #expect(throws: HandlerError.self) { try await handler.flush() }
            #expect(error?.message.contains("No space left on device") == true)
            #expect(handler.writerFlushes.load(ordering: .relaxed) == attempt)
        }
    }
}
