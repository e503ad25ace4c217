import DedupCore
import Foundation
import Synchronization
import Testing
import TestSupport

@testable import DedupService

#if canImport(Glibc)
import Glibc
#endif

/// Small rounds of the `log` handler are taken on the caller's thread (the loop's), inside
/// `HandlerRounds.start`: no task, no thread woken; everything else still runs in a task, and
/// no line is written twice or lost on the way from one path to the other.
@Suite("rounds taken on the loop's thread")
struct InlineRoundTests {
    final class Spawns: Sendable {
        let count = Atomic<Int>(0)
    }

    /// A started round's results, once it ended.
    final class Round: Sendable {
        private let results = Mutex<[DispatchResult]?>(nil)

        var hasEnded: Bool { results.withLock { $0 != nil } }

        func end(_ r: [DispatchResult]) { results.withLock { $0 = r } }

        /// Whether it ended with every message a success, waiting for it up to 10 s.
        func succeeded(count: Int) async -> Bool {
            let deadline = ContinuousClock.now + .seconds(10)
            while !hasEnded && ContinuousClock.now < deadline { await Task.yield() }
            guard let results = results.withLock({ $0 }) else { return false }
            return results.count == count && results.allSatisfy { if case .success = $0 { true } else { false } }
        }
    }

    /// Rounds through the worker's wrapper around `handler`, counting the tasks spawned.
    static func rounds(_ handler: LogOutputHandler) -> (HandlerRounds, spawned: Spawns) {
        let counting = CountingHandler(base: handler, telemetry: WorkerTelemetry(stallTimeout: .seconds(30)))
        let dispatchers = [Dispatcher(
            handler: counting, concurrency: 1, maxAttempts: 1, backoff: Backoff(initial: .milliseconds(1)),
            maxElapsed: .seconds(1), logger: quietLogger())]
        let spawned = Spawns()
        let rounds = HandlerRounds(dispatchers: dispatchers, handlers: [counting], ledger: InFlightLedger()) { operation in
            spawned.count.add(1, ordering: .relaxed)
            return Task(operation: operation)
        }
        return (rounds, spawned)
    }

    static func start(_ rounds: HandlerRounds, _ due: [Dispatch]) -> Round {
        let round = Round()
        rounds.start(due) { round.end($0) }
        return round
    }

    /// Reads `fd` to its end on a thread of its own.
    static func readToEnd(_ fd: Int32) -> Task<[UInt8], Never> {
        Task {
            await withCheckedContinuation { c in
                DispatchQueue.global().async { c.resume(returning: LogOutputWriteTests.read(fd, count: .max)) }
            }
        }
    }

    @Test func aSmallRoundEndsInsideStart() async throws {
        let (readEnd, handler) = try LogOutputWriteTests.pipeOutput()
        defer { close(readEnd) }
        let (rounds, spawned) = Self.rounds(handler)
        let due = LogOutputWriteTests.round(HandlerRounds.inlineRoundLimit, valueBytes: 100)
        let round = Self.start(rounds, due)
        #expect(round.hasEnded)
        #expect(await round.succeeded(count: due.count))
        #expect(spawned.count.load(ordering: .relaxed) == 0)
        #expect(handler.writerFlushes.load(ordering: .relaxed) == 0)
        let expected = LogOutputWriteTests.expected(due)
        #expect(LogOutputWriteTests.read(readEnd, count: expected.count) == expected)
    }

    @Test func aLargerRoundRunsInATask() async throws {
        let (readEnd, handler) = try LogOutputWriteTests.pipeOutput()
        defer { close(readEnd) }
        let (rounds, spawned) = Self.rounds(handler)
        let due = LogOutputWriteTests.round(HandlerRounds.inlineRoundLimit + 1, valueBytes: 10)
        // Not whether it has ended when `start` returns: the task may have run by then.
        let round = Self.start(rounds, due)
        #expect(await round.succeeded(count: due.count))
        #expect(spawned.count.load(ordering: .relaxed) == 1)
        let expected = LogOutputWriteTests.expected(due)
        #expect(LogOutputWriteTests.read(readEnd, count: expected.count) == expected)
    }

    /// The pipe is nearly full and nobody reads: the round's lines are taken on the caller's
    /// thread, and a task flushes them, written once when the reader comes.
    @Test func aRoundThePipeCannotTakeAtOnceIsFlushedByATask() async throws {
        let (readEnd, writeEnd) = LogOutputWriteTests.pipeEnds()
        defer { close(readEnd) }
        let filler = [UInt8](repeating: UInt8(ascii: "f"), count: 60_000)
        #expect(filler.withUnsafeBytes { write(writeEnd, $0.baseAddress!, $0.count) } == filler.count)
        let handler = LogOutputHandler(descriptor: writeEnd)
        let (rounds, spawned) = Self.rounds(handler)
        let due = LogOutputWriteTests.round(20, valueBytes: 1_000)
        let round = Self.start(rounds, due)
        #expect(!round.hasEnded)
        #expect(spawned.count.load(ordering: .relaxed) == 1)
        let got = Self.readToEnd(readEnd)
        #expect(await round.succeeded(count: due.count))
        close(writeEnd)
        let all = await got.value
        #expect(all.count == filler.count + LogOutputWriteTests.expected(due).count)
        let whole = all == filler + LogOutputWriteTests.expected(due)  // not the bytes themselves in a failure
        #expect(whole)
    }

    /// While the writer queue holds the lines across a write the pipe has no room for, a round
    /// is not taken on the caller's thread (which would wait for the pipe's reader) but runs
    /// in a task, and its lines follow the earlier ones once the reader comes.
    @Test func aRoundIsNotTakenWhileTheWriterHoldsTheLines() async throws {
        let (readEnd, writeEnd) = LogOutputWriteTests.pipeEnds()
        defer { close(readEnd) }
        let handler = LogOutputHandler(descriptor: writeEnd)
        let (rounds, spawned) = Self.rounds(handler)
        let first = LogOutputWriteTests.round(400, valueBytes: 400)
        #expect(LogOutputWriteTests.expected(first).count > 2 * 65_536)
        try await handler.handleBatch(first)
        let flushed = Task { try await handler.flush() }
        var deadline = ContinuousClock.now + .seconds(10)
        while !(handler.writerFlushes.load(ordering: .relaxed) == 1 && handler.linesAreBusy) && ContinuousClock.now < deadline {
            await Task.yield()
        }
        #expect(handler.linesAreBusy)

        // Tried from a thread of its own, so that a try that waits fails this test instead of hanging it.
        let tried = Mutex<InlineRound?>(nil)
        Thread { let r = handler.takeRoundWithoutWaiting([]); tried.withLock { $0 = r } }.start()
        deadline = ContinuousClock.now + .seconds(5)
        while tried.withLock({ $0 == nil }) && ContinuousClock.now < deadline { await Task.yield() }
        #expect(tried.withLock { $0 } == .notTaken)
        guard tried.withLock({ $0 }) != nil else {
            // The try waits for the lock: let the writer finish so that it, and this test, end.
            _ = LogOutputWriteTests.read(readEnd, count: LogOutputWriteTests.expected(first).count)
            try await flushed.value
            return
        }

        let second = LogOutputWriteTests.round(5, valueBytes: 10)
        let round = Self.start(rounds, second)
        #expect(spawned.count.load(ordering: .relaxed) == 1)
        let got = Self.readToEnd(readEnd)
        try await flushed.value
        #expect(await round.succeeded(count: second.count))
        close(writeEnd)
        let all = await got.value
        let expected = LogOutputWriteTests.expected(first) + LogOutputWriteTests.expected(second)
        #expect(all.count == expected.count)
        let whole = all == expected
        #expect(whole)
    }
}
