import DedupCore
import KafkaIO
import Logging
import Metrics
import Synchronization

/// What the worker shows an operator besides its event log lines: swift-metrics counters, gauges
/// and timers (exported at `/metrics`), the liveness and readiness state behind `/healthz` and
/// `/readyz`, and the figures of the periodic `stats` line.
///
/// The loop calls `loopPass` once per pass; that costs one lock. Metrics and the stats line are
/// computed at most once a second (metrics) or once per `log.stats_interval` (stats), and consumer
/// lag comes from librdkafka's locally cached watermarks and positions, so nothing here waits for a
/// broker on the hot loop. Redis round trips are timed by the claim store (`recordRoundTrip`);
/// handler calls by `CountingHandler`.
public final class WorkerTelemetry: Sendable {
    /// Metric names as given to swift-metrics; swift-prometheus writes them with `_` for `.`.
    public enum Name {
        public static let consumed = "dedupd.messages.consumed.total"
        public static let dispatched = "dedupd.messages.dispatched.total"
        public static let duplicates = "dedupd.messages.duplicate.total"
        public static let invalid = "dedupd.messages.invalid.total"
        public static let failed = "dedupd.messages.failed.total"
        public static let parkedTotal = "dedupd.messages.parked.total"
        public static let released = "dedupd.claims.released.total"
        public static let deadLettered = "dedupd.messages.dead_lettered.total"
        public static let leasesLost = "dedupd.leases.lost.total"
        public static let confirmConflicts = "dedupd.confirm.conflicts.total"
        /// Guard: messages whose transition their entity's recorded state did not allow, by route.
        public static let rejectedTransitions = "dedupd.messages.rejected_transition.total"
        /// Dimension of `rejectedTransitions`: the route's name (`default` for the top level).
        public static let route = "route"
        /// `dedup.on_store_error: fail_open`: messages dispatched without a claim while Redis was down.
        public static let unclaimed = "dedupd.messages.unclaimed.total"
        /// Assignments taken from the group: one per rebalance this worker took part in.
        public static let rebalances = "dedupd.rebalances.total"
        public static let partitionsAssignedTotal = "dedupd.rebalance.partitions.assigned.total"
        public static let partitionsRevoked = "dedupd.rebalance.partitions.revoked.total"
        public static let partitionsLost = "dedupd.rebalance.partitions.lost.total"
        /// Messages read from partitions this worker then gave up, past its last stored offset:
        /// the next owner reads them again.
        public static let reread = "dedupd.rebalance.messages.reread.total"
        public static let bufferMessages = "dedupd.buffer.messages"
        public static let bufferBytes = "dedupd.buffer.bytes"
        public static let parked = "dedupd.parked.messages"
        public static let inFlight = "dedupd.handlers.in_flight"
        public static let lag = "dedupd.consumer.lag.messages"
        public static let assigned = "dedupd.partitions.assigned"
        public static let paused = "dedupd.consumer.paused"
        public static let redisUp = "dedupd.redis.up"
        public static let redisRoundTrip = "dedupd.redis.round_trip.seconds"
        public static let handlerDuration = "dedupd.handler.duration.seconds"
        /// Dimension of `duplicates`: `window` (caught in this worker's buffer) or `redis`.
        public static let caughtBy = "dedup.caught_by"
        /// Dimension of `redisRoundTrip`: the claim store operation (`claim`, `confirm`, `release`, `renew`).
        public static let redisOp = "redis.op"
    }

    final class Instruments: Sendable {
        let consumed, dispatched, duplicatesWindow, duplicatesRedis, invalid, failed, parkedTotal, released: Counter
        let deadLettered, leasesLost, confirmConflicts, unclaimed: Counter
        let rebalances, partitionsAssignedTotal, partitionsRevoked, partitionsLost, reread: Counter
        let bufferMessages, bufferBytes, parked, inFlight, lag, assigned, paused, redisUp: Gauge
        /// In seconds, aggregated (a histogram): observed once per message of a round, so a
        /// round of N costs N observations. A value histogram's bucket walk compares doubles
        /// where a timer's compares `Duration`s, and the handler is called directly: the
        /// `Recorder` wrapper converts each value through an unspecialized generic.
        let handlerDuration: any RecorderHandler
        let factory: any MetricsFactory
        let roundTripTimers: Mutex<[String: Timer]>
        /// By route index.
        let rejectedTransitions: [Counter]

        init(factory: any MetricsFactory, routeNames: [String]) {
            func counter(_ name: String, _ dims: [(String, String)] = []) -> Counter {
                Counter(label: name, dimensions: dims, factory: factory)
            }
            func gauge(_ name: String) -> Gauge { Gauge(label: name, dimensions: [], factory: factory) }
            consumed = counter(Name.consumed)
            dispatched = counter(Name.dispatched)
            duplicatesWindow = counter(Name.duplicates, [(Name.caughtBy, "window")])
            duplicatesRedis = counter(Name.duplicates, [(Name.caughtBy, "redis")])
            invalid = counter(Name.invalid)
            failed = counter(Name.failed)
            parkedTotal = counter(Name.parkedTotal)
            released = counter(Name.released)
            deadLettered = counter(Name.deadLettered)
            leasesLost = counter(Name.leasesLost)
            confirmConflicts = counter(Name.confirmConflicts)
            unclaimed = counter(Name.unclaimed)
            rebalances = counter(Name.rebalances)
            partitionsAssignedTotal = counter(Name.partitionsAssignedTotal)
            partitionsRevoked = counter(Name.partitionsRevoked)
            partitionsLost = counter(Name.partitionsLost)
            reread = counter(Name.reread)
            bufferMessages = gauge(Name.bufferMessages)
            bufferBytes = gauge(Name.bufferBytes)
            parked = gauge(Name.parked)
            inFlight = gauge(Name.inFlight)
            lag = gauge(Name.lag)
            assigned = gauge(Name.assigned)
            paused = gauge(Name.paused)
            redisUp = gauge(Name.redisUp)
            handlerDuration = factory.makeRecorder(label: Name.handlerDuration, dimensions: [], aggregate: true)
            rejectedTransitions = routeNames.map { counter(Name.rejectedTransitions, [(Name.route, $0)]) }
            self.factory = factory
            roundTripTimers = Mutex([:])
        }

        func roundTripTimer(_ op: String) -> Timer {
            roundTripTimers.withLock { timers in
                if let t = timers[op] { return t }
                let t = Timer(label: Name.redisRoundTrip, dimensions: [(Name.redisOp, op)], factory: factory)
                timers[op] = t
                return t
            }
        }
    }

    /// The state `/healthz` and `/readyz` answer from.
    public struct Health: Sendable, Equatable {
        /// Last time the loop completed a pass (or, before the loop runs, waited for Redis).
        public var lastPass: ContinuousClock.Instant
        /// Last time a task the loop started on Swift's cooperative pool ran. The loop has a
        /// thread of its own, but dispatch rounds and handlers run on the pool, and a pool whose
        /// every thread is blocked stops the worker as surely as a stopped loop: its rounds never
        /// end while the loop goes on renewing their claims.
        public var poolBeat: ContinuousClock.Instant
        public var partitionsAssigned = 0
        public var redisUp = false
        public var stopping = false

        /// What has stalled for longer than `timeout`, or nil: the loop, or the pool.
        public func stall(now: ContinuousClock.Instant, timeout: Duration) -> String? {
            if now - lastPass > timeout { return "loop stalled: no pass for \(WorkerConfiguration.format(now - lastPass))" }
            if now - poolBeat > timeout { return "cooperative pool stalled: no task ran for \(WorkerConfiguration.format(now - poolBeat))" }
            return nil
        }
    }

    /// A loop pass's view of the pipeline.
    public struct Snapshot: Sendable {
        public var now: ContinuousClock.Instant
        public var counters: DedupCounters
        public var bufferMessages: Int
        public var bufferBytes: Int
        public var parked: Int
        public var assignment: [TopicPartition]
        public var paused: Bool
        public var redisUp: Bool
    }

    let instruments: Instruments
    let health: Mutex<Health>
    let stallTimeout: Duration
    /// Rounds, handler calls and Redis requests in flight, for the watchdog's stall report.
    public let inFlightLedger = InFlightLedger()
    let inFlight = Atomic<Int>(0)
    let inFlightPeak = Atomic<Int>(0)
    let roundTrips = Mutex(RoundTripSamples())
    let publishing: Mutex<Publishing>
    /// When the loop last started a pool beat (`Health.poolBeat`), and whether it is still to run.
    let beat = Mutex<(sent: ContinuousClock.Instant?, pending: Bool)>((nil, false))

    struct Publishing: Sendable {
        var published = DedupCounters()
        var lastMetrics: ContinuousClock.Instant?
        var stats: StatsReporter?
    }

    /// - Parameters:
    ///   - factory: where metrics go; a `PrometheusMetricsFactory` for `/metrics`, a test factory in
    ///     tests. Default: none (the figures still reach the stats line and the health state).
    ///   - statsInterval: `log.stats_interval`; zero turns the stats line off.
    ///   - routeNames: by route index (`default` first), for counters per route.
    public init(
        factory: any MetricsFactory = NOOPMetricsHandler.instance, statsInterval: Duration = .zero,
        stallTimeout: Duration = .seconds(30), logger: Logger = Logger(label: "dedupd"),
        now: ContinuousClock.Instant = .now, routeNames: [String] = ["default"]
    ) {
        instruments = Instruments(factory: factory, routeNames: routeNames)
        health = Mutex(Health(lastPass: now, poolBeat: now))
        self.stallTimeout = stallTimeout
        publishing = Mutex(Publishing(stats: statsInterval > .zero ? StatsReporter(interval: statsInterval, logger: logger, now: now) : nil))
    }

    // MARK: - From the worker

    /// Liveness while the worker waits for Redis before its loop starts.
    public func heartbeat(redisUp: Bool, now: ContinuousClock.Instant = .now) {
        health.withLock {
            $0.lastPass = now
            $0.poolBeat = now
            $0.redisUp = redisUp
        }
        instruments.redisUp.record(redisUp ? 1 : 0)
    }

    public func stopping() {
        health.withLock { $0.stopping = true }
    }

    /// Called once per loop pass. `consumer` is asked for its cached lag only when a figure is due.
    public func loopPass(_ s: Snapshot, consumer: KafkaConsumer?) {
        health.withLock {
            $0.lastPass = s.now
            $0.partitionsAssigned = s.assignment.count
            $0.redisUp = s.redisUp
        }
        beatPool(now: s.now)
        let (metricsDue, statsDue) = publishing.withLock { p in
            let m = p.lastMetrics.map { s.now - $0 >= .seconds(1) } ?? true
            return (m, p.stats?.isDue(now: s.now) ?? false)
        }
        guard metricsDue || statsDue else { return }
        let lag = consumer?.cachedLag(s.assignment)
        if metricsDue { publishMetrics(s, lag: lag) }
        if statsDue {
            let rt = roundTrips.withLock { $0.takePercentiles() }
            let peak = inFlightPeak.exchange(inFlight.load(ordering: .relaxed), ordering: .relaxed)
            publishing.withLock {
                $0.stats?.tick(s, lag: lag, inFlightPeak: peak, roundTrip: rt)
            }
        }
    }

    func publishMetrics(_ s: Snapshot, lag: Int64?) {
        let c = s.counters
        let i = instruments
        let before = publishing.withLock { p in
            defer { p.published = c; p.lastMetrics = s.now }
            return p.published
        }
        func add(_ counter: Counter, _ now: Int, _ then: Int) { if now > then { counter.increment(by: now - then) } }
        add(i.consumed, c.consumed, before.consumed)
        add(i.dispatched, c.dispatched, before.dispatched)
        add(i.duplicatesWindow, c.duplicatesLocal, before.duplicatesLocal)
        add(i.duplicatesRedis, c.duplicatesStore, before.duplicatesStore)
        add(i.invalid, c.invalid, before.invalid)
        add(i.failed, c.failed, before.failed)
        add(i.parkedTotal, c.parked, before.parked)
        add(i.released, c.released, before.released)
        add(i.deadLettered, c.deadLettered, before.deadLettered)
        add(i.leasesLost, c.leasesLost, before.leasesLost)
        add(i.confirmConflicts, c.confirmConflicts, before.confirmConflicts)
        add(i.unclaimed, c.unclaimed, before.unclaimed)
        add(i.rebalances, c.rebalances, before.rebalances)
        add(i.partitionsAssignedTotal, c.partitionsAssigned, before.partitionsAssigned)
        add(i.partitionsRevoked, c.partitionsRevoked, before.partitionsRevoked)
        add(i.partitionsLost, c.partitionsLost, before.partitionsLost)
        add(i.reread, c.rereadAfterRebalance, before.rereadAfterRebalance)
        for (route, count) in c.rejectedTransitionsByRoute where route < i.rejectedTransitions.count {
            add(i.rejectedTransitions[route], count, before.rejectedTransitionsByRoute[route] ?? 0)
        }
        i.bufferMessages.record(s.bufferMessages)
        i.bufferBytes.record(s.bufferBytes)
        i.parked.record(s.parked)
        i.inFlight.record(inFlight.load(ordering: .relaxed))
        if let lag { i.lag.record(lag) }
        i.assigned.record(s.assignment.count)
        i.paused.record(s.paused ? 1 : 0)
        i.redisUp.record(s.redisUp ? 1 : 0)
    }

    /// One claim store round trip (`op`: the script, e.g. `claim`); feeds the timer and the stats percentiles.
    public func recordRoundTrip(op: String, duration: Duration) {
        instruments.roundTripTimer(op).recordNanoseconds(duration.nanoseconds)
        roundTrips.withLock { $0.add(duration) }
    }

    func handlerStarted() {
        let now = inFlight.add(1, ordering: .relaxed).newValue
        _ = inFlightPeak.max(now, ordering: .relaxed)
        instruments.inFlight.record(now)
    }

    /// Handler calls started at once (a round taken in one call is one call in flight).
    func handlersStarted(_ n: Int) {
        let now = inFlight.add(n, ordering: .relaxed).newValue
        _ = inFlightPeak.max(now, ordering: .relaxed)
        instruments.inFlight.record(now)
    }

    /// The round's time is each message's handler time (the duration metric counts messages).
    func handlersFinished(_ n: Int, timed messages: Int, after duration: Duration) {
        let now = inFlight.subtract(n, ordering: .relaxed).newValue
        instruments.inFlight.record(now)
        let seconds = duration.seconds
        for _ in 0..<messages { instruments.handlerDuration.record(seconds) }
    }

    func handlerFinished(after duration: Duration) {
        let now = inFlight.subtract(1, ordering: .relaxed).newValue
        instruments.inFlight.record(now)
        instruments.handlerDuration.record(duration.seconds)
    }

    /// Starts a task on the cooperative pool that records when it ran (`Health.poolBeat`), a few
    /// times per stall timeout and at most once a second, unless the last one has not run yet.
    func beatPool(now: ContinuousClock.Instant) {
        let every = min(.seconds(1), stallTimeout / 8)
        let due = beat.withLock { b in
            guard !b.pending, b.sent.map({ now - $0 >= every }) ?? true else { return false }
            b = (now, true)
            return true
        }
        guard due else { return }
        Task.detached { [self] in
            health.withLock { $0.poolBeat = .now }
            beat.withLock { $0.pending = false }
        }
    }

    // MARK: - Health

    public var healthState: Health { health.withLock { $0 } }

    /// `/healthz`: the loop has completed a pass within the stall timeout.
    public func liveness(now: ContinuousClock.Instant = .now) -> (ok: Bool, detail: String) {
        let h = healthState
        if let stall = h.stall(now: now, timeout: stallTimeout) {
            return (false, "\(stall) (limit \(WorkerConfiguration.format(stallTimeout)))")
        }
        return (true, "ok: last loop pass \(WorkerConfiguration.format(now - h.lastPass)) ago")
    }

    /// `/readyz`: alive, partitions assigned, Redis reachable, not shutting down.
    public func readiness(now: ContinuousClock.Instant = .now) -> (ok: Bool, detail: String) {
        let live = liveness(now: now)
        let h = healthState
        var problems: [String] = []
        if !live.ok { problems.append(live.detail) }
        if h.stopping { problems.append("shutting down") }
        if h.partitionsAssigned == 0 { problems.append("no partitions assigned") }
        if !h.redisUp { problems.append("redis unreachable") }
        if problems.isEmpty { return (true, "ready: \(h.partitionsAssigned) partitions assigned, redis up") }
        return (false, "not ready: " + problems.joined(separator: ", "))
    }
}

extension Duration {
    var nanoseconds: Int64 {
        let (s, atto) = components
        return s * 1_000_000_000 + atto / 1_000_000_000
    }

    var seconds: Double {
        let (s, atto) = components
        return Double(s) + Double(atto) * 1e-18
    }
}

/// Redis round trips since the last stats line, for p50/p99: a reservoir of at most `capacity`
/// samples (uniform over the interval), so a busy interval costs bounded memory.
struct RoundTripSamples: Sendable {
    var samples: [Duration] = []
    var seen = 0
    let capacity = 20_000
    var rng = SystemRandomNumberGenerator()

    mutating func add(_ d: Duration) {
        seen += 1
        if samples.count < capacity {
            samples.append(d)
        } else {
            let j = Int.random(in: 0..<seen, using: &rng)
            if j < capacity { samples[j] = d }
        }
    }

    /// p50 and p99 (nearest rank) and the count, then starts a new interval.
    mutating func takePercentiles() -> RoundTripPercentiles? {
        defer { samples.removeAll(keepingCapacity: true); seen = 0 }
        return RoundTripPercentiles(samples, count: seen)
    }
}

struct RoundTripPercentiles: Sendable, Equatable {
    var count: Int
    var p50: Duration
    var p99: Duration

    init?(_ samples: [Duration], count: Int) {
        guard !samples.isEmpty else { return nil }
        let sorted = samples.sorted()
        func rank(_ p: Double) -> Duration {
            let r = Int((p * Double(sorted.count)).rounded(.up))
            return sorted[min(sorted.count, max(1, r)) - 1]
        }
        self.count = count
        p50 = rank(0.50)
        p99 = rank(0.99)
    }
}

/// Wraps the worker's handler to count calls in flight (the `dedupd.handlers.in_flight` gauge and
/// the stats line's peak) and time them.
struct CountingHandler: BatchHandler, InlineRoundHandler {
    let base: any Handler
    let telemetry: WorkerTelemetry

    /// A base that takes whole rounds (the `log` handler) keeps doing so through this wrapper:
    /// one call and one clock reading per round, not per message. Any other base does not, and
    /// the Dispatcher takes its rounds message by message through `handle`.
    var takesBatches: Bool { (base as? any BatchHandler)?.takesBatches ?? false }

    /// The duration metric still counts messages (each gets the round's time).
    func handleBatch(_ round: [Dispatch]) async throws {
        guard let batch = base as? any BatchHandler else {
            for dispatch in round { try await handle(dispatch) }
            return
        }
        let start = ContinuousClock.now
        telemetry.handlersStarted(1)
        let token = telemetry.inFlightLedger.begin(.handler, now: start)
        defer {
            telemetry.inFlightLedger.end(token)
            telemetry.handlersFinished(1, timed: round.count, after: ContinuousClock.now - start)
        }
        try await batch.handleBatch(round)
    }

    var takesRoundsInline: Bool { (base as? any InlineRoundHandler)?.takesRoundsInline ?? false }

    func takeRoundWithoutWaiting(_ round: [Dispatch]) -> InlineRound {
        guard let inline = base as? any InlineRoundHandler else { return .notTaken }
        let start = ContinuousClock.now
        telemetry.handlersStarted(1)
        let token = telemetry.inFlightLedger.begin(.handler, now: start)
        let taken = inline.takeRoundWithoutWaiting(round)
        telemetry.inFlightLedger.end(token)
        telemetry.handlersFinished(1, timed: taken == .notTaken ? 0 : round.count, after: ContinuousClock.now - start)
        return taken
    }

    func handle(_ dispatch: Dispatch) async throws {
        let start = ContinuousClock.now
        telemetry.handlerStarted()
        let token = telemetry.inFlightLedger.begin(.handler, now: start)
        defer {
            telemetry.inFlightLedger.end(token)
            telemetry.handlerFinished(after: ContinuousClock.now - start)
        }
        try await base.handle(dispatch)
    }

    func flush() async throws { try await base.flush() }
    func close() async { await base.close() }
}
