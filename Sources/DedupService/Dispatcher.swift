import DedupCore
import Logging

/// Runs one round of due messages through the handler: up to `concurrency` calls at once, each
/// message retried with exponential backoff and jitter up to `maxAttempts` and `maxElapsed`
/// (docs/architecture.md step 5). A `PermanentFailure` is given up at once.
///
/// Tasks are per round (at most `concurrency` of them pulling from a shared index), not per
/// message, so a large round costs no more tasks than a small one.
struct Dispatcher: Sendable {
    enum Result: Sendable {
        case success
        /// Every attempt failed, the next one would pass `maxElapsed`, or the handler threw
        /// `PermanentFailure`: the last error and the attempts made.
        case gaveUp(any Error, attempts: Int)
        /// Cancelled (shutdown deadline) before the handler took it: not dispatched, not resolved.
        case abandoned
    }

    let handler: any Handler
    let concurrency: Int
    let maxAttempts: Int
    let backoff: Backoff
    /// No retry starts later than this after the first attempt. `nil`: attempts alone bound it.
    var maxElapsed: Duration? = nil
    let logger: Logger
    /// Which handler instance this is (routes may share one), so a round flushes each once.
    var handlerID = 0

    func run(_ due: [Dispatch]) async -> [Result] {
        // One call for the whole round when the handler can take it so (no task or lock per message).
        if let batch = handler as? any BatchHandler, batch.takesBatches {
            do {
                try await batch.handleBatch(due)
                return Array(repeating: .success, count: due.count)
            } catch {
                logger.info(
                    "handler failed the whole round, taking it message by message",
                    metadata: ["dispatch.round": "\(due.count)", "error": "\(error)"])
            }
        }
        let workers = min(concurrency, due.count)
        if workers <= 1 {
            var results: [Result] = []
            results.reserveCapacity(due.count)
            for d in due { results.append(await attempt(d)) }
            return results
        }
        // Lanes: messages with the same record key go to the same lane, one after another in
        // window order, so a key's copies (e.g. a customer's events, keyed by customer id) reach
        // the handler in order even with concurrency > 1; messages without a key are spread.
        var lanes = Array(repeating: [Int](), count: workers)
        for (i, d) in due.enumerated() {
            let lane = d.message.keyBytes.map { key -> Int in
                var h = Hasher()
                key.withUnsafeBytes { h.combine(bytes: $0) }
                return Int(UInt(bitPattern: h.finalize()) % UInt(workers))
            } ?? i % workers
            lanes[lane].append(i)
        }
        return await withTaskGroup(of: [(Int, Result)].self) { group in
            for lane in lanes where !lane.isEmpty {
                group.addTask {
                    var out: [(Int, Result)] = []
                    out.reserveCapacity(lane.count)
                    for i in lane { out.append((i, await attempt(due[i]))) }
                    return out
                }
            }
            var results = [Result](repeating: .abandoned, count: due.count)
            for await lane in group {
                for (i, r) in lane { results[i] = r }
            }
            return results
        }
    }

    func attempt(_ dispatch: Dispatch) async -> Result {
        var rng = SystemRandomNumberGenerator()
        var d = dispatch
        let started = ContinuousClock.now
        while true {
            if Task.isCancelled { return .abandoned }
            do {
                try await handler.handle(d)
                return .success
            } catch let error as PermanentFailure {
                return .gaveUp(error, attempts: d.attempt)
            } catch {
                if d.attempt >= maxAttempts { return .gaveUp(error, attempts: d.attempt) }
                var delay = backoff.jittered(attempt: d.attempt, using: &rng)
                if let asked = (error as? any RetryDelaying)?.retryAfter, asked > delay { delay = asked }
                if let maxElapsed, ContinuousClock.now + delay - started > maxElapsed {
                    return .gaveUp(error, attempts: d.attempt)
                }
                logger.info(
                    "handler failed, retrying",
                    metadata: ["dedup.key": "\(d.key.raw)", "handler.attempt": "\(d.attempt)", "error": "\(error)"])
                do { try await Task.sleep(for: delay) } catch {
                    return .abandoned
                }
                d.attempt += 1
            }
        }
    }
}

/// One round of handler calls (`HandlerRounds` runs each in a task of its own, beside the
/// worker's loop, unless the handler takes it on the loop's thread: `InlineRoundHandler`).
enum DispatchRound {
    struct Outcome: Sendable {
        /// One per message of the round, in order. A handler whose `flush` failed turns its
        /// messages' successes into `.gaveUp` (they were not made durable).
        var results: [Dispatcher.Result]
    }

    /// Runs `due` through the dispatcher of each message's route, routes side by side (each
    /// bounded by its own concurrency), then flushes each handler the round used.
    static func run(_ due: [Dispatch], dispatchers: [Dispatcher]) async -> Outcome {
        let routes = Set(due.map(\.route))
        var results: [Dispatcher.Result]
        if routes.count == 1, let route = routes.first {
            results = await dispatchers[route].run(due)
        } else {
            results = Array(repeating: .abandoned, count: due.count)
            let byRoute = Dictionary(grouping: due.indices, by: { due[$0].route })
            await withTaskGroup(of: ([Int], [Dispatcher.Result]).self) { group in
                for (route, indices) in byRoute {
                    group.addTask { (indices, await dispatchers[route].run(indices.map { due[$0] })) }
                }
                for await (indices, routeResults) in group {
                    for (i, r) in zip(indices, routeResults) { results[i] = r }
                }
            }
        }
        // One flush per handler instance, even when routes share it.
        var flushed: [Int: (any Error)?] = [:]
        for route in routes.sorted() {
            let id = dispatchers[route].handlerID
            guard flushed[id] == nil else { continue }
            do { try await dispatchers[route].handler.flush(); flushed[id] = .some(nil) } catch { flushed[id] = .some(error) }
        }
        guard flushed.values.contains(where: { $0 != nil }) else { return Outcome(results: results) }
        for (i, d) in due.enumerated() {
            guard case .success = results[i], case let error?? = flushed[dispatchers[d.route].handlerID] else { continue }
            results[i] = .gaveUp(error, attempts: d.attempt)
        }
        return Outcome(results: results)
    }

    /// The rest of a round whose messages a handler took on the loop's thread
    /// (`InlineRoundHandler.takeRoundWithoutWaiting`) but whose output did not take every line
    /// at once: its `flush`, which fails the whole round as in `run`.
    static func flush(_ due: [Dispatch], handler: any Handler) async -> Outcome {
        do {
            try await handler.flush()
            return Outcome(results: Array(repeating: .success, count: due.count))
        } catch {
            return Outcome(results: due.map { .gaveUp(error, attempts: $0.attempt) })
        }
    }
}

/// A handler that takes a small round on the loop's own thread: it neither waits nor suspends
/// to do so (the `log` handler appends the lines and writes what its output takes at once). Such
/// a round needs no task, and no thread is woken to run it or to hand its results back.
protocol InlineRoundHandler: BatchHandler {
    /// Whether rounds can be taken so now (the `log` handler: while its output takes writes that
    /// do not wait).
    var takesRoundsInline: Bool { get }
    /// Takes every message of `round` as `handleBatch` does and writes them as `flush` does, but
    /// without waiting for anything, a lock included.
    func takeRoundWithoutWaiting(_ round: [Dispatch]) -> InlineRound
}

enum InlineRound: Equatable {
    /// Taken and written: the round succeeded.
    case written
    /// Taken, but the output did not take every line at once: `flush` writes the rest.
    case needsFlush
    /// Nothing done (a flush on another thread holds the handler's lines): the round runs as usual.
    case notTaken
}
