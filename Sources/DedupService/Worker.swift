import DedupCore
import Foundation
import KafkaIO
import Logging
import RedisIO
import ServiceLifecycle
import Synchronization

/// The dedupd pipeline as a ServiceLifecycle `Service`: consume → key → claim → delay buffer →
/// dispatch → confirm → commit (DESIGN.md "The flow of one message").
///
/// One loop owns all pipeline state (`DedupEngine`), so the hot path has no locks and no actor
/// hops; the blocking C calls run on the adapters' own threads, one hop per batch. Each pass:
/// poll a batch, ingest it, claim its new keys in one round trip, dispatch what is due, confirm
/// in one round trip, store the offsets that became safe, and apply backpressure.
public final class Worker: Service {
    public let config: WorkerConfiguration
    public let owner: String
    let logger: Logger
    /// One per distinct handler (routes with the same handler settings share one).
    let handlers: [any Handler]
    /// A dispatcher per route (index 0: the default route), with the route's concurrency and retries.
    let dispatchers: [Dispatcher]
    /// `dead_letter.topic`'s producer; `nil` when unset (bad input is logged and counted only).
    let deadLetters: DeadLetterProducer?
    let stopRequested = Mutex(false)
    /// The pipeline's counters, published once per loop pass (per batch) for the demo and
    /// tests that run a worker in process.
    public let counters = Mutex(DedupCounters())

    /// Metrics, health state and the stats line (Telemetry/WorkerTelemetry.swift).
    public let telemetry: WorkerTelemetry

    /// Whether `run` starts a `LoopWatchdog`, which exits the process when the loop stalls.
    let exitsOnStall: Bool

    /// `handler` replaces the default route's built-in handler, `routeHandlers` those of named
    /// routes (by route name): the way a library user plugs in Swift handlers. `exitsOnStall`:
    /// whether a stalled loop ends the process (`LoopWatchdog`); a worker embedded in a process
    /// that must outlive it (a test) passes false and relies on `/healthz` alone.
    public init(
        config: WorkerConfiguration, handler: (any Handler)? = nil, routeHandlers: [String: any Handler] = [:],
        logger: Logger = Logger(label: "dedupd"), telemetry: WorkerTelemetry? = nil, exitsOnStall: Bool = true
    ) throws {
        self.config = config
        self.exitsOnStall = exitsOnStall
        self.logger = logger
        self.owner = Self.makeOwnerID()
        let telemetry = telemetry ?? WorkerTelemetry(statsInterval: config.statsInterval, stallTimeout: config.loopStallTimeout, logger: logger)
        self.telemetry = telemetry
        var handlers: [any Handler] = []
        var byIdentity: [String: Int] = [:]
        var dispatchers: [Dispatcher] = []
        let names = ["default"] + config.routes.map(\.name)
        for (route, h) in config.handlersByRoute.enumerated() {
            let given = route == 0 ? handler : routeHandlers[names[route]]
            let id: Int
            if given == nil, let known = byIdentity[h.identity] {
                id = known
            } else {
                let base = try given ?? BuiltinHandlers.make(
                    h, bootstrapServers: config.bootstrapServers, kafkaProperties: config.kafkaProperties, logger: logger)
                id = handlers.count
                handlers.append(CountingHandler(base: base, telemetry: telemetry))
                if given == nil { byIdentity[h.identity] = id }
            }
            dispatchers.append(Dispatcher(
                handler: handlers[id], concurrency: h.concurrency, maxAttempts: h.maxAttempts, backoff: h.backoff,
                maxElapsed: h.maxElapsed, logger: logger, handlerID: id))
        }
        self.handlers = handlers
        self.dispatchers = dispatchers
        self.deadLetters = try config.deadLetterTopic.map {
            try DeadLetterProducer.make(
                bootstrapServers: config.deadLetterBootstrapServers, topic: $0, timeout: config.deadLetterTimeout,
                properties: config.kafkaProperties, logger: logger)
        }
    }

    /// `host-pid-random`: unique per process, so a restarted worker never confirms a dead one's claims.
    static func makeOwnerID() -> String {
        let host = ProcessInfo.processInfo.hostName.split(separator: ".").first.map(String.init) ?? "host"
        return "\(host)-\(getpid())-\(String(UInt32.random(in: 0...UInt32.max), radix: 16))"
    }

    /// Asks the loop to stop (the same path as SIGTERM).
    public func requestStop() { stopRequested.withLock { $0 = true } }
    var isStopRequested: Bool { stopRequested.withLock { $0 } }

    public func run() async throws {
        // The watchdog runs on its own thread for as long as the loop does (LoopWatchdog).
        let watchdog = exitsOnStall ? LoopWatchdog(telemetry: telemetry, timeout: config.loopStallTimeout, logger: logger) : nil
        watchdog?.start()
        defer { watchdog?.stop() }
        try await withGracefulShutdownHandler {
            try await runPipeline()
        } onGracefulShutdown: { [self] in
            logger.info("shutdown requested")
            requestStop()
        }
    }

    // MARK: - Set-up

    func kafkaProperties() -> [String: String] {
        var props = config.kafkaProperties
        if let id = config.groupInstanceID { props["group.instance.id"] = id }
        return props
    }

    func connectStore() async throws -> RedisClaimStore? {
        var url = try RedisURL(config.redisURL)
        if let password = config.redisPassword { url.password = password }
        var attempt = 0
        var rng = SystemRandomNumberGenerator()
        while !isStopRequested {
            attempt += 1
            do {
                let connection = try await RedisConnection.connect(
                    url, connectTimeout: config.redisConnectTimeout, commandTimeout: config.redisCommandTimeout,
                    tls: RedisTLSOptions(config.redisTLS), logger: logger)
                if attempt > 1 { logger.notice("redis reachable", metadata: ["redis.url": "\(url.redacted)"]) }
                try await checkRequirements(connection)
                telemetry.heartbeat(redisUp: true)
                return RedisClaimStore(
                    connection: connection, logger: logger,
                    onSend: { [telemetry] op in
                        let token = telemetry.inFlightLedger.begin(.redis(op))
                        return { telemetry.inFlightLedger.end(token) }
                    },
                    onRoundTrip: { [telemetry] op, d in telemetry.recordRoundTrip(op: op, duration: d) })
            } catch let error as RedisError where error.isRetriable {
                if attempt == 1 {
                    logger.error("redis unreachable, waiting for it (fail-closed: nothing is consumed meanwhile)",
                                 metadata: ["redis.url": "\(url.redacted)", "error": "\(error)"])
                }
                telemetry.heartbeat(redisUp: false)
                try await Task.sleep(for: Backoff().jittered(attempt: attempt, using: &rng))
            }
        }
        return nil
    }

    /// Refuses a Redis that evicts keys unless `redis.allow_eviction`; warns where the server
    /// does not say, and when it keeps nothing across a restart (RedisRequirements).
    func checkRequirements(_ connection: RedisConnection) async throws {
        let found = try await RedisRequirements.read(from: connection)
        if let refusal = found.configRefusal {
            logger.warning(
                "redis refused CONFIG GET, so its eviction policy is unknown: dedupd needs maxmemory-policy noeviction (an evicted done record lets a duplicate through)",
                metadata: ["redis.reply": "\(refusal)"])
        }
        if let problem = found.evictionProblem {
            guard config.redisAllowEviction else {
                throw ConfigError(key: "redis.allow_eviction", value: "false", problem: problem)
            }
            logger.warning("redis evicts keys with a TTL; running anyway (redis.allow_eviction: true)",
                           metadata: ["redis.maxmemory_policy": "\(found.maxmemoryPolicy ?? "")"])
        }
        if found.persistenceOff == true {
            logger.warning("redis persists nothing (appendonly no, no save points): a restart of Redis forgets every done record")
        }
    }

    // MARK: - The loop

    func runPipeline() async throws {
        let started = ContinuousClock.now
        guard let store = try await connectStore() else { return }
        let consumer = try KafkaConsumer.make(
            bootstrapServers: config.bootstrapServers, groupID: config.group, topics: config.topics,
            properties: kafkaProperties(), logger: logger)
        logger.info(
            "worker started",
            metadata: [
                "dedup.owner": "\(owner)", "kafka.group": "\(config.group)",
                "kafka.topics": "\(config.topics.joined(separator: ","))",
                "dedup.key": "\(config.dedup.template)", "dedup.window": "\(WorkerConfiguration.format(config.dedup.window))",
                "dedup.retention": "\(WorkerConfiguration.format(config.dedup.retention))",
                "handler.type": "\(config.handler.type)",
            ])
        for route in config.routes {
            logger.info(
                "route",
                metadata: [
                    "route.name": "\(route.name)", "route.match": "\(route.match)", "dedup.key": "\(route.dedup.template)",
                    "dedup.namespace": "\(route.dedup.namespace)", "dedup.window": "\(WorkerConfiguration.format(route.dedup.window))",
                    "dedup.keep": "\(route.dedup.keep.rawValue)", "handler.type": "\(route.handler.type)",
                    "handler.concurrency": "\(route.handler.concurrency)",
                ])
        }
        if !config.routes.isEmpty {
            logger.info("unmatched messages", metadata: ["routing.unmatched": "\(config.unmatched.rawValue)"])
        }

        var state = LoopState(engine: DedupEngine(settings: config.dedup, routing: config.routing), lastActivity: started)
        let clock = ContinuousClock()
        var rng = SystemRandomNumberGenerator()

        while !isStopRequested {
            let now = clock.now
            let timeout = state.pollTimeout(now: now, failOpen: config.failOpen)
            let events = await consumer.poll(maxMessages: config.batchSize, timeout: timeout)
            await ingest(events, state: &state, store: store, consumer: consumer, now: clock.now)
            // The last round's confirms were answered by Redis while this batch was polled and keyed.
            await finishRequests(&state, rng: &rng)

            if state.storeUsable(now: clock.now) {
                // Releases first: a revoked partition that came straight back may be re-read
                // in this very batch, and its keys must be free before they are claimed again.
                await releaseRound(state: &state, store: store, rng: &rng)
                if config.usesTokens { await tokenRound(state: &state, store: store, rng: &rng) }
                // The claims are answered while this pass dispatches. Not when they renew a
                // lease: that answer decides whether a buffered copy may still be dispatched.
                state.requests = sendClaims(&state, store: store, now: clock.now)
                if state.engine.claimRenewals > 0 { await finishRequests(&state, rng: &rng) }
            } else if config.failOpen {
                let keys = state.engine.keysToClaim(now: clock.now)
                if !keys.isEmpty { state.engine.applyClaimsWithoutStore(keys, now: clock.now) }
            }
            // Rounds are bounded by handler.max_batch: the keys of one round are confirmed
            // together, so that is the most the crash window (handler done, confirm not yet in
            // Redis) can ever repeat.
            // Fail-closed also means: no dispatch while Redis is down or a round is still
            // unconfirmed, so at most one round is ever exposed to the crash window, and no
            // lease is relied on that could not be renewed.
            // As many rounds per pass as the batch needs (one round per pass would cap dispatch at
            // handler.max_batch per poll, below what one poll brings in); each is confirmed before
            // the next starts, so the crash window stays one round. The last round's confirms are
            // answered while the next batch is polled.
            var rounds = 0
            var again = false
            repeat {
                rounds += 1
                var finished = false
                if state.round == nil,
                    config.failOpen || (state.storeDownSince == nil && state.engine.confirmingCount == 0)
                {
                    let due = state.engine.takeDue(now: clock.now, limit: config.handlerMaxBatch)
                    if !due.isEmpty { state.round = startRound(due) }
                }
                if let round = state.round, let outcome = await round.outcome(waitingUpTo: Self.roundWait) {
                    state.round = nil
                    applyRound(round.due, outcome, state: &state)
                    finished = true
                }
                await deadLetterRound(state: &state)
                again = finished && rounds <= config.batchSize / max(1, config.handlerMaxBatch)
                    && !isStopRequested && (state.engine.nextDeadline.map { $0 <= clock.now } ?? false)
                if again {
                    await finishRequests(&state, rng: &rng)
                    await confirmRound(state: &state, store: store, rng: &rng)
                }
            } while again
            await finishRequests(&state, rng: &rng)

            // The claims were applied above, before anything more is ingested (what `applyClaims`
            // requires of late answers). The last round's confirms go out now and are applied
            // after the next poll, before the next round starts.
            startConfirms(&state, store: store)
            storeOffsets(&state, consumer: consumer)
            await applyBackpressure(&state, consumer: consumer)

            counters.withLock { $0 = state.engine.counters }
            telemetry.loopPass(.init(
                now: clock.now, counters: state.engine.counters, bufferMessages: state.engine.buffer.count,
                bufferBytes: state.engine.buffer.bytes, parked: state.engine.parkedCount, assignment: Array(state.assignment),
                paused: state.paused, redisUp: state.storeDownSince == nil), consumer: consumer)
            // Idle counts from the first assignment: joining the group takes seconds, and a worker
            // that never gets partitions (more workers than partitions) gives up after 30 s more.
            if let idle = config.stopWhenIdle, state.isQuiet, clock.now - state.lastActivity >= idle,
                state.everAssigned || clock.now - started >= idle + .seconds(30)
            {
                logger.info("idle, stopping", metadata: ["run.stop_when_idle": "\(WorkerConfiguration.format(idle))"])
                break
            }
        }
        telemetry.stopping()
        await finishRequests(&state, rng: &rng)
        await shutdown(state: &state, store: store, consumer: consumer, started: started)
    }

    struct LoopState {
        var engine: DedupEngine
        var lastActivity: ContinuousClock.Instant
        var assignment: Set<TopicPartition> = []
        var everAssigned = false
        /// The latest offset stored per partition (what the final commit sends), for the summary.
        var storedPositions: [TopicPartition: Int64] = [:]
        /// Consumption is paused: the whole assignment is, and the consumer holds new assignments
        /// paused, so partitions a rebalance brings in the meantime arrive paused too.
        var paused = false
        var pausedForBackpressure = false
        /// Claims to give back (revocation, failed handler), kept until Redis took them.
        var toRelease: [DedupKey] = []
        /// Fail-closed store outage: no claim is made and consumption is paused until this time.
        var storeDownSince: ContinuousClock.Instant?
        var storeRetryAt: ContinuousClock.Instant?
        var storeFailures = 0
        /// The dispatch round in flight, if any; at most one at a time.
        var round: DispatchRound?
        /// Claims or confirms sent to Redis and not yet answered, if any; at most one at a time.
        var requests: PendingRequests?
        /// Bad input and given-up messages not yet acknowledged by `dead_letter.topic`.
        var deadLetters = DeadLetterQueue()

        func storeUsable(now: ContinuousClock.Instant) -> Bool {
            guard let retry = storeRetryAt else { return true }
            return now >= retry
        }

        var isQuiet: Bool { engine.isIdle && toRelease.isEmpty && deadLetters.isEmpty && round == nil && requests == nil }

        /// Block in poll no longer than until the next deadline, the next store retry, or 100 ms.
        /// While the store is down, deadlines cannot be acted on (nothing is dispatched), so only
        /// the retry time counts: the loop waits instead of spinning.
        func pollTimeout(now: ContinuousClock.Instant, failOpen: Bool) -> Duration {
            // With a round in flight, the pass itself waits for it (Worker.roundWait); with
            // requests in flight, their answers are applied right after this poll.
            if round != nil || requests != nil { return .zero }
            var t = Duration.milliseconds(100)
            if storeDownSince == nil || failOpen, let wake = engine.nextWakeup { t = min(t, wake - now) }
            if let retry = storeRetryAt { t = min(t, retry - now) }
            guard t > .zero else { return .zero }
            // librdkafka counts poll timeouts in whole milliseconds: a deadline 0.4 ms away must
            // be waited for as 1 ms, not polled for as 0 ms, or the loop spins through empty
            // passes until it passes. A due message is then dispatched up to 1 ms late.
            return .milliseconds((t / .milliseconds(1)).rounded(.up))
        }
    }

    func ingest(
        _ events: [KafkaConsumer.ConsumerEvent], state: inout LoopState, store: RedisClaimStore,
        consumer: KafkaConsumer, now: ContinuousClock.Instant
    ) async {
        for event in events {
            switch event {
            case .message(let message):
                state.lastActivity = now
                if case .bad(let bad) = state.engine.ingest(message) {
                    badInput(bad, message, state: &state)
                }
            case .assigned(let partitions):
                state.lastActivity = now
                // While `paused`, the consumer held them: they arrive paused, like the rest.
                state.assignment.formUnion(partitions)
                state.everAssigned = true
            case .revoked(let partitions):
                state.lastActivity = now
                let set = Set(partitions)
                state.assignment.subtract(set)
                let released = state.engine.revoke(set)
                state.deadLetters.drop(partitions: set)
                if !released.isEmpty {
                    logger.info(
                        "partitions revoked with messages in the window; releasing their claims",
                        metadata: ["dedup.released": "\(released.count)"])
                    state.toRelease.append(contentsOf: released)
                }
                // A round in flight is not interrupted: its messages keep their claims until the
                // handler finishes and they are confirmed (the next owner sees them pending and
                // waits) or released (the next owner claims them).
                let inFlight = state.round?.due.filter { set.contains($0.message.topicPartition) }.count ?? 0
                if inFlight > 0 {
                    logger.info(
                        "partitions revoked with messages in a handler; their claims stay until it finishes",
                        metadata: ["dispatch.in_flight": "\(inFlight)"])
                }
            case .error(let error):
                // KafkaIO has already logged it with librdkafka's own level; librdkafka recovers
                // from transport errors by itself.
                logger.debug("kafka error event", metadata: ["error": "\(error)"])
            }
        }
    }

    /// Token mode: uses the tokens of this batch's new keys in one round trip; refused ones are
    /// bad input (dead-lettered when a topic is configured), accepted ones go on to be claimed.
    func tokenRound(state: inout LoopState, store: RedisClaimStore, rng: inout SystemRandomNumberGenerator) async {
        let pending = state.engine.tokensToUse()
        guard !pending.keys.isEmpty else { return }
        do {
            let outcomes = try await store.use(pending.storeKeys, marks: pending.marks)
            storeSucceeded(&state)
            for (bad, message) in state.engine.applyTokens(pending.keys, outcomes) {
                badInput(bad, message, state: &state)
            }
        } catch {
            storeFailed(&state, error: error, rng: &rng)
        }
    }

    /// One Redis round trip in flight: the claims of a batch (new keys, parked keys due,
    /// renewals), or the confirms of the last dispatch round.
    enum PendingRequests {
        /// The window and the lease count from `sentAt`: the window then ends one round trip
        /// sooner, and a lease believed to start earlier is renewed earlier.
        case claims([DedupKey], sentAt: ContinuousClock.Instant, RedisClaimStore.Request<ClaimOutcome>)
        case confirms([DedupKey], RedisClaimStore.Request<ConfirmOutcome>)
    }

    /// Sends the engine's claims without waiting for the answers; nil when there are none.
    func sendClaims(_ state: inout LoopState, store: RedisClaimStore, now: ContinuousClock.Instant) -> PendingRequests? {
        let keys = state.engine.keysToClaim(now: now)
        guard !keys.isEmpty else { return nil }
        return .claims(keys, sentAt: now, store.sendClaims(state.engine.storeGroups(keys, ttl: \.lease), owner: owner))
    }

    /// Sends the engine's confirms without waiting for the answers; nil when there are none.
    func sendConfirms(_ state: inout LoopState, store: RedisClaimStore) -> PendingRequests? {
        let keys = state.engine.keysToConfirm()
        guard !keys.isEmpty else { return nil }
        return .confirms(keys, store.sendConfirms(state.engine.storeGroups(keys, ttl: \.retention), owner: owner))
    }

    /// Waits for the round trip in flight, if any, and applies Redis's answers. A failed one
    /// moves nothing: its keys are simply sent again once Redis answers.
    func finishRequests(_ state: inout LoopState, rng: inout SystemRandomNumberGenerator) async {
        guard let requests = state.requests else { return }
        state.requests = nil
        switch requests {
        case .claims(let keys, let sentAt, let request):
            do {
                let outcomes = try await request.outcomes()
                storeSucceeded(&state)
                // Claims for keys no longer held (their partition was revoked while the answer
                // was on its way) are given back rather than left to expire.
                state.toRelease.append(contentsOf: state.engine.applyClaims(keys, outcomes, now: sentAt))
            } catch {
                storeFailed(&state, error: error, rng: &rng)
                if config.failOpen { state.engine.applyClaimsWithoutStore(keys, now: ContinuousClock.now) }
            }
        case .confirms(let keys, let request):
            do {
                let outcomes = try await request.outcomes()
                storeSucceeded(&state)
                applyConfirms(keys, outcomes, state: &state)
            } catch {
                storeFailed(&state, error: error, rng: &rng)
            }
        }
    }

    /// fail_open with Redis down: dispatched messages are resolved without a `done` record
    /// (there is nowhere to write it) and releases are dropped (the claims expire by themselves).
    func resolveWithoutStore(_ state: inout LoopState) {
        let keys = state.engine.keysToConfirm()
        if !keys.isEmpty {
            state.engine.applyConfirms(keys, Array(repeating: .confirmedAfterLeaseLost, count: keys.count))
        }
        state.toRelease.removeAll()
    }

    /// Sends the last round's confirms (nothing else may be in flight), or with fail_open and
    /// Redis down resolves them without a store.
    func startConfirms(_ state: inout LoopState, store: RedisClaimStore) {
        if state.storeUsable(now: .now) {
            state.requests = sendConfirms(&state, store: store)
        } else if config.failOpen {
            resolveWithoutStore(&state)
        }
    }

    /// Confirms the last round now: the next round may start only after that.
    func confirmRound(state: inout LoopState, store: RedisClaimStore, rng: inout SystemRandomNumberGenerator) async {
        startConfirms(&state, store: store)
        await finishRequests(&state, rng: &rng)
    }

    func applyConfirms(_ keys: [DedupKey], _ outcomes: [ConfirmOutcome], state: inout LoopState) {
        for (key, outcome) in zip(keys, outcomes) {
            if case .notOwner(let other) = outcome {
                logger.warning(
                    "confirm found another owner: the lease ran out while this copy was in the handler, so another worker may have dispatched the key too; raise dedup.lease",
                    metadata: ["dedup.key": "\(key.raw)", "dedup.other_owner": "\(other)"])
            }
        }
        state.engine.applyConfirms(keys, outcomes)
    }

    func releaseRound(state: inout LoopState, store: RedisClaimStore, rng: inout SystemRandomNumberGenerator) async {
        // A key taken up again since (re-read after its partition came back) is not released.
        state.toRelease.removeAll { state.engine.isHolding($0) }
        guard !state.toRelease.isEmpty else { return }
        do {
            _ = try await store.release(state.toRelease.map(\.storeKey), owner: owner)
            storeSucceeded(&state)
            state.toRelease.removeAll()
        } catch {
            storeFailed(&state, error: error, rng: &rng)
        }
    }

    func storeSucceeded(_ state: inout LoopState) {
        if let since = state.storeDownSince {
            logger.notice("redis reachable again, resuming", metadata: [
                "redis.down_for": "\(WorkerConfiguration.format(ContinuousClock.now - since))"])
        }
        state.storeDownSince = nil
        state.storeRetryAt = nil
        state.storeFailures = 0
    }

    /// Fail-closed: a store error pauses consumption and retries with backoff and jitter. The
    /// transition is logged once, not once per message or per retry.
    func storeFailed(_ state: inout LoopState, error: any Error, rng: inout SystemRandomNumberGenerator) {
        state.storeFailures += 1
        let now = ContinuousClock.now
        if state.storeDownSince == nil {
            state.storeDownSince = now
            if config.failOpen {
                logger.error(
                    "redis unavailable; on_store_error=fail_open: dispatching without claims until it answers (repeats outside the window will pass)",
                    metadata: ["error": "\(error)"])
            } else {
                logger.error(
                    "redis unavailable, pausing consumption until it answers (fail-closed: nothing unclaimed is dispatched)",
                    metadata: ["error": "\(error)"])
            }
        }
        state.storeRetryAt = now + Backoff(initial: .milliseconds(100), maximum: .seconds(5))
            .jittered(attempt: state.storeFailures, using: &rng)
    }

    // MARK: - Dispatch

    /// How long a pass waits for its dispatch round before going back to polling. A fast
    /// handler (log, kafka) finishes well within it, so the round is applied in the same pass;
    /// a slow one (a webhook retrying with backoff) keeps running beside the loop, which goes on
    /// polling so the worker stays in its group (max.poll.interval.ms) and keeps claiming.
    static let roundWait: Duration = .milliseconds(50)

    func startRound(_ due: [Dispatch]) -> DispatchRound {
        let dispatchers = self.dispatchers
        let ledger = telemetry.inFlightLedger
        let token = ledger.begin(.round(size: due.count))
        return DispatchRound(due: due) {
            defer { ledger.end(token) }
            return await DispatchRound.run(due, dispatchers: dispatchers)
        }
    }

    func applyRound(_ due: [Dispatch], _ outcome: DispatchRound.Outcome, state: inout LoopState) {
        for (dispatch, result) in zip(due, outcome.results) {
            switch result {
            case .success:
                state.engine.dispatchSucceeded(dispatch.key)
            case .gaveUp(let error, let attempts):
                handlerGaveUp(dispatch, error: error, attempts: attempts, state: &state)
                state.engine.dispatchFailed(dispatch.key)
                state.toRelease.append(dispatch.key)
            case .abandoned:
                state.engine.dispatchAbandoned(dispatch.key)
                state.toRelease.append(dispatch.key)
            }
        }
    }

    // MARK: - Commit and backpressure

    func storeOffsets(_ state: inout LoopState, consumer: KafkaConsumer) {
        let positions = state.engine.takeCommitPositions()
        guard !positions.isEmpty else { return }
        state.storedPositions.merge(positions) { _, new in new }
        do { try consumer.storeOffsets(positions) } catch {
            logger.warning("storing offsets failed", metadata: ["error": "\(error)"])
        }
    }

    func applyBackpressure(_ state: inout LoopState, consumer: KafkaConsumer) async {
        let mustPause = state.engine.shouldPause || (state.storeDownSince != nil && !config.failOpen)
        if mustPause && !state.paused {
            consumer.holdNewAssignments(true)
            do {
                try consumer.pause(Array(state.assignment))
                state.paused = true
                state.pausedForBackpressure = state.engine.shouldPause
                if state.engine.shouldPause {
                    logger.info("buffer full, pausing consumption", metadata: [
                        "buffer.messages": "\(state.engine.buffer.count)", "buffer.bytes": "\(state.engine.buffer.bytes)"])
                }
            } catch {
                consumer.holdNewAssignments(false)
                logger.warning("pausing partitions failed", metadata: ["error": "\(error)"])
            }
        } else if !mustPause && state.paused && state.engine.canResume {
            do {
                try consumer.resume(Array(state.assignment))
                consumer.holdNewAssignments(false)
                if state.pausedForBackpressure { logger.info("buffer drained, resuming consumption") }
                state.paused = false
                state.pausedForBackpressure = false
            } catch {
                logger.warning("resuming partitions failed", metadata: ["error": "\(error)"])
            }
        }
    }

    // MARK: - Shutdown

    /// Stop fetching, confirm what was dispatched, give back what still waits in the window,
    /// store and synchronously commit what is resolved, leave the group.
    func shutdown(state: inout LoopState, store: RedisClaimStore, consumer: KafkaConsumer, started: ContinuousClock.Instant) async {
        var rng = SystemRandomNumberGenerator()
        if let round = state.round {
            // In-flight handlers may finish; past run.shutdown_deadline ServiceLifecycle cancels
            // this task, which cancels the round, and its unfinished messages stay uncommitted.
            logger.info("waiting for the dispatch round in flight", metadata: ["dispatch.round": "\(round.due.count)"])
            applyRound(round.due, await round.finish(), state: &state)
            state.round = nil
        }
        state.storeRetryAt = nil
        await confirmRound(state: &state, store: store, rng: &rng)
        await deadLetterRound(state: &state, force: true)
        storeOffsets(&state, consumer: consumer)
        let waiting = state.engine.drainForShutdown()
        state.toRelease.append(contentsOf: waiting)
        state.storeRetryAt = nil
        await releaseRound(state: &state, store: store, rng: &rng)
        var commitError: (any Error)?
        do { try await consumer.commitSync() } catch { commitError = error }
        await consumer.close()
        for handler in handlers { await handler.close() }
        let c = state.engine.counters
        counters.withLock { $0 = c }
        let elapsed = ContinuousClock.now - started
        var metadata: Logger.Metadata = [
            "consumed": "\(c.consumed)", "dispatched": "\(c.dispatched)", "duplicates": "\(c.duplicates)",
            "duplicates.local": "\(c.duplicatesLocal)", "duplicates.redis": "\(c.duplicatesStore)",
            "invalid": "\(c.invalid)", "failed": "\(c.failed)", "released": "\(c.released)",
            "released.unconfirmed": "\(state.toRelease.count)",
            "renewed": "\(c.renewed)", "dead_lettered": "\(c.deadLettered)", "leases_lost": "\(c.leasesLost)", "unclaimed": "\(c.unclaimed)",
            "kafka.committed": "\(state.storedPositions.sorted { ($0.key.topic, $0.key.partition) < ($1.key.topic, $1.key.partition) }.map { "\($0.key)=\($0.value)" }.joined(separator: ","))",
            "elapsed": "\(WorkerConfiguration.format(elapsed))",
        ]
        if let commitError { metadata["error"] = "\(commitError)" }
        logger.notice(commitError == nil ? "shutdown complete, offsets committed" : "shutdown complete, final commit failed",
                      metadata: metadata)
    }
}
