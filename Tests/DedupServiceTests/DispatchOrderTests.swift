import Foundation
import DedupCore
import Synchronization
import Testing
import TestSupport
@testable import DedupService

/// What is and is not ordered when a route dispatches with concurrency > 1: copies with the same
/// record key reach the handler one after another in window order; other messages overlap.
@Suite struct DispatchOrderTests {
    /// Records each call's start and end; the first attempt of every third message fails, so a
    /// retry (with backoff) sits in the middle of its key's sequence.
    final class Recorder: Handler {
        let log = Mutex<[(key: String, offset: Int64, event: String)]>([])
        let inFlight = Mutex((now: 0, peak: 0))

        func handle(_ d: Dispatch) async throws {
            let recordKey = String(decoding: d.message.key ?? [], as: UTF8.self)
            inFlight.withLock { $0.now += 1; $0.peak = max($0.peak, $0.now) }
            log.withLock { $0.append((recordKey, d.message.offset, "start")) }
            try await Task.sleep(for: .milliseconds(Int.random(in: 1...5)))
            inFlight.withLock { $0.now -= 1 }
            if d.message.offset % 3 == 0 && d.attempt == 1 {
                log.withLock { $0.append((recordKey, d.message.offset, "fail")) }
                throw CancellationError()
            }
            log.withLock { $0.append((recordKey, d.message.offset, "end")) }
        }
    }

    @Test func sameRecordKeyKeepsItsOrderAcrossConcurrentLanes() async throws {
        let recorder = Recorder()
        let d = Dispatcher(handler: recorder, concurrency: 4, maxAttempts: 3, backoff: Backoff(initial: .milliseconds(2)),
                           maxElapsed: .seconds(10), logger: quietLogger())
        // Lanes are chosen by a seeded hash of the record key, so six customers all fell into
        // one lane about once in a thousand runs and nothing could overlap; with 24 that is
        // about once in 10^14.
        let customers = (1...24).map { "c\($0)" }
        let due = (0..<60).map { i in
            Dispatch(key: DedupKey(raw: "k\(i)", namespace: "t"), message: InboundMessage(
                topic: "orders", partition: 0, offset: Int64(i), key: Array(customers[i % customers.count].utf8),
                value: [], headers: []))
        }
        let results = await d.run(due)
        #expect(results.allSatisfy { if case .success = $0 { true } else { false } })
        let log = recorder.log.withLock { $0 }
        for c in customers {
            let ends = log.filter { $0.key == c && $0.event == "end" }.map(\.offset)
            #expect(ends == ends.sorted(), "customer \(c) finished out of order: \(ends)")
            // Sequential per key: a call starts only after the previous one of its key ended.
            var open = false
            for e in log where e.key == c {
                if e.event == "start" { #expect(!open, "two calls of \(c) overlapped"); open = true } else { open = false }
            }
        }
        #expect(recorder.inFlight.withLock { $0.peak } > 1, "different keys run side by side")
    }
}

/// `HandlerRounds` keeps each running round's task, to cancel at shutdown, and forgets it when
/// the round ends, also when the round ended before `start` had registered it (a short round
/// on another thread can: the woken thread may run before the one that started it).
@Suite struct HandlerRoundsTests {
    struct Instant: Handler {
        func handle(_ d: Dispatch) async throws {}
    }

    static func rounds(spawn: (@Sendable (@escaping @Sendable () async -> Void) -> Task<Void, Never>)? = nil) -> HandlerRounds {
        let handler = Instant()
        let dispatchers = [Dispatcher(handler: handler, concurrency: 1, maxAttempts: 1, backoff: Backoff(initial: .milliseconds(1)),
                                      maxElapsed: .seconds(1), logger: quietLogger())]
        guard let spawn else { return HandlerRounds(dispatchers: dispatchers, handlers: [handler], ledger: InFlightLedger()) }
        return HandlerRounds(dispatchers: dispatchers, handlers: [handler], ledger: InFlightLedger(), spawn: spawn)
    }

    /// Starts `count` one-message rounds from a thread of its own, as the worker's loop does, and
    /// returns once every round's `done` has run.
    static func run(_ rounds: HandlerRounds, count: Int) async {
        let ended = Atomic<Int>(0)
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            Thread {
                for i in 0..<count {
                    let due = [Dispatch(key: DedupKey(raw: "k\(i)", namespace: "t"), message: InboundMessage(
                        topic: "t", partition: 0, offset: Int64(i), key: nil, value: [], headers: []))]
                    rounds.start(due) { results in
                        #expect(results.count == 1)
                        ended.add(1, ordering: .relaxed)
                    }
                }
                c.resume()
            }.start()
        }
        let deadline = ContinuousClock.now + .seconds(30)
        while ended.load(ordering: .relaxed) < count && ContinuousClock.now < deadline { await Task.yield() }
        #expect(ended.load(ordering: .relaxed) == count)
    }

    @Test func everyEndedRoundIsForgotten() async {
        let rounds = Self.rounds()
        await Self.run(rounds, count: 2_000)
        #expect(rounds.runningCount == 0)
    }

    @Test func aRoundThatEndsBeforeItIsRegisteredIsForgottenToo() async {
        // Each round's task has ended when `start` goes on to register it.
        let rounds = Self.rounds { operation in
            let ended = DispatchSemaphore(value: 0)
            let task = Task {
                await operation()
                ended.signal()
            }
            ended.wait()
            return task
        }
        await Self.run(rounds, count: 50)
        #expect(rounds.runningCount == 0)
    }
}
