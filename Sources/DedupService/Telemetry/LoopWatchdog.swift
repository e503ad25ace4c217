import DedupCore
import Foundation
import Logging
import Synchronization

/// What the worker is waiting for right now: dispatch rounds, handler calls and Redis requests,
/// each with the time it started. The watchdog names them when the loop stalls, so the one line
/// an operator gets says where the worker was stuck.
public final class InFlightLedger: Sendable {
    public enum Kind: Sendable, Hashable {
        /// A dispatch round of `size` messages.
        case round(size: Int)
        /// One handler call (or one batch call for a whole round).
        case handler
        /// A Redis request (`claim`, `confirm`, `release`, `renew`, ...).
        case redis(String)
    }

    private struct Entry { var kind: Kind; var since: ContinuousClock.Instant }
    private let state = Mutex<(next: UInt64, entries: [UInt64: Entry])>((0, [:]))

    public init() {}

    /// Records the start of something; pass the token to `end` when it is over.
    public func begin(_ kind: Kind, now: ContinuousClock.Instant = .now) -> UInt64 {
        state.withLock { s in
            s.next += 1
            s.entries[s.next] = Entry(kind: kind, since: now)
            return s.next
        }
    }

    public func end(_ token: UInt64) {
        _ = state.withLock { $0.entries.removeValue(forKey: token) }
    }

    /// `rounds=1 (500 messages, oldest 31.2s) handlers=4 (oldest 31.0s) redis=none`.
    public func describe(now: ContinuousClock.Instant = .now) -> String {
        let entries = state.withLock { Array($0.entries.values) }
        func oldest(_ es: [Entry]) -> String {
            guard let first = es.map(\.since).min() else { return "" }
            return "oldest \(WorkerConfiguration.format(now - first))"
        }
        let rounds = entries.filter { if case .round = $0.kind { true } else { false } }
        let handlers = entries.filter { $0.kind == .handler }
        let redis = entries.filter { if case .redis = $0.kind { true } else { false } }
        let messages = rounds.reduce(0) { n, e in if case .round(let size) = e.kind { n + size } else { n } }
        let ops = Set(redis.compactMap { e -> String? in if case .redis(let op) = e.kind { op } else { nil } }).sorted()
        var parts: [String] = []
        parts.append(rounds.isEmpty ? "rounds=none" : "rounds=\(rounds.count) (\(messages) messages, \(oldest(rounds)))")
        parts.append(handlers.isEmpty ? "handlers=none" : "handlers=\(handlers.count) (\(oldest(handlers)))")
        parts.append(redis.isEmpty ? "redis=none" : "redis=\(redis.count) (\(ops.joined(separator: ",")), \(oldest(redis)))")
        return parts.joined(separator: " ")
    }
}

/// Ends a worker whose loop has stopped making passes (`http.loop_stall_timeout`).
///
/// It runs on a thread of its own, not on Swift's cooperative pool, because the stalls it exists
/// for are the ones that take the pool: a handler or a library that blocks every cooperative
/// thread stops every task, including any task that would watch the loop. When no pass happened
/// for the timeout (and the worker is not shutting down), it logs one error line naming what is
/// in flight and exits with status 70 (EX_SOFTWARE), so systemd (`Restart=on-failure`) or
/// Kubernetes starts a fresh worker. Nothing is lost: the stalled worker's claims were not
/// confirmed and its offsets not committed, so its leases expire and its messages are read again.
public final class LoopWatchdog: Sendable {
    let telemetry: WorkerTelemetry
    let timeout: Duration
    let logger: Logger
    let onStall: @Sendable (String) -> Void
    private let stopped = Mutex(false)

    /// - Parameter onStall: what happens after the error line; default: flush the operational
    ///   log and exit 70. Tests pass their own.
    public init(
        telemetry: WorkerTelemetry, timeout: Duration, logger: Logger,
        onStall: @escaping @Sendable (String) -> Void = { _ in
            OperationalLog.flush()
            exit(70)
        }
    ) {
        self.telemetry = telemetry
        self.timeout = timeout
        self.logger = logger
        self.onStall = onStall
    }

    /// How often the thread looks: a few times per timeout, at least once a second.
    var interval: Duration { min(Duration.seconds(1), max(.milliseconds(50), timeout / 4)) }

    /// Starts the watching thread. It acts on the second check in a row that finds the loop
    /// stalled, so the worker exits between the timeout and the timeout plus two intervals, and
    /// `/healthz` (which fails at the timeout) is seen failing before the worker goes.
    public func start() {
        let interval = self.interval
        let thread = Thread { [self] in
            var stalledBefore = false
            while !stopped.withLock({ $0 }) {
                usleep(useconds_t(interval.milliseconds * 1000))
                let stalled = isStalled()
                if stalled && stalledBefore, let report = check() {
                    onStall(report)
                    return
                }
                stalledBefore = stalled
            }
        }
        thread.name = "dedupd.watchdog"
        thread.start()
    }

    public func stop() { stopped.withLock { $0 = true } }

    func isStalled(now: ContinuousClock.Instant = .now) -> Bool {
        let health = telemetry.healthState
        return !health.stopping && health.stall(now: now, timeout: timeout) != nil && !stopped.withLock { $0 }
    }

    /// The stall report if the loop is stalled now (and logs it), else nil.
    func check(now: ContinuousClock.Instant = .now) -> String? {
        guard isStalled(now: now) else { return nil }
        let health = telemetry.healthState
        let inFlight = telemetry.inFlightLedger.describe(now: now)
        logger.error(
            "worker loop stalled; exiting so it can be restarted (its claims expire, its messages are read again)",
            metadata: [
                "loop.stall": "\(health.stall(now: now, timeout: timeout) ?? "")",
                "loop.last_pass": "\(WorkerConfiguration.format(now - health.lastPass)) ago",
                "pool.last_task": "\(WorkerConfiguration.format(now - health.poolBeat)) ago",
                "http.loop_stall_timeout": "\(WorkerConfiguration.format(timeout))",
                "in_flight": "\(inFlight)",
            ])
        return inFlight
    }
}
