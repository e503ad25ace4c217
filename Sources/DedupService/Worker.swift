import DedupCore
import Foundation
import KafkaIO
import Logging
import RedisIO
import ServiceLifecycle
import Synchronization

/// The dedupd pipeline as a ServiceLifecycle `Service`: consume → key → claim → delay buffer →
/// dispatch → confirm → commit (docs/architecture.md).
///
/// The worker is the executor of a `DedupEngine`: it asks the engine for the next action,
/// carries it out (poll the source, send a store request, start a dispatch round, store offsets,
/// pause, wait), and feeds what came back to the engine as events. Every rule about order is
/// the engine's; the source, the store, the handlers and the clock are protocols, so tests drive
/// this same loop with fakes.
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
        // The prefetch queue is no longer than the buffer could hold (and no shorter than a
        // batch): the memory bound that buffer.max_bytes promises covers it only that way.
        if props[KafkaConsumer.prefetchMessagesProperty] == nil {
            let bound = max(config.batchSize, config.dedup.heldMessagesAtMost)
            props[KafkaConsumer.prefetchMessagesProperty] = String(min(KafkaConsumer.prefetchMessages, bound))
        }
        // Checked at start to agree with kafka.rebalance when given by hand.
        if props[RebalanceMode.strategyProperty] == nil {
            props[RebalanceMode.strategyProperty] = config.rebalance.defaultStrategy
        }
        return props
    }

    func connectStore() async throws -> RedisClaimStore? {
        let where_ = ConfigSchema.redact(config.redis.url)
        var attempt = 0
        var rng = SystemRandomNumberGenerator()
        while !isStopRequested {
            attempt += 1
            do {
                let redis = try await RedisTarget.connect(config.redis, logger: logger)
                if attempt > 1 { logger.notice("redis reachable", metadata: ["redis.url": "\(where_)"]) }
                try await checkRequirements(redis)
                telemetry.heartbeat(redisUp: true)
                return RedisClaimStore(
                    redis: redis, logger: logger,
                    waitReplicas: config.redisWaitReplicas > 0 ? (config.redisWaitReplicas, config.redisWaitTimeout) : nil,
                    onSend: { [telemetry] op in
                        let token = telemetry.inFlightLedger.begin(.redis(op))
                        return { telemetry.inFlightLedger.end(token) }
                    },
                    onRoundTrip: { [telemetry] op, d in telemetry.recordRoundTrip(op: op, duration: d) })
            } catch let error as RedisError where error.isRetriable {
                if attempt == 1 {
                    logger.error("redis unreachable, waiting for it (fail-closed: nothing is consumed meanwhile)",
                                 metadata: ["redis.url": "\(where_)", "error": "\(error)"])
                }
                telemetry.heartbeat(redisUp: false)
                try await Task.sleep(for: Backoff().jittered(attempt: attempt, using: &rng))
            }
        }
        return nil
    }

    /// Refuses a Redis that evicts keys unless `redis.allow_eviction`; warns where the server
    /// does not say, and when it keeps nothing across a restart (`WorkerConfiguration.judge`). In a
    /// cluster every primary is checked: each has its own configuration.
    func checkRequirements(_ redis: RedisTarget) async throws {
        let verdict = config.judge(try await RedisRequirements.read(from: redis), cluster: redis.isCluster)
        for warning in verdict.warnings { logger.warning("\(warning.message)", metadata: warning.metadata) }
        if let refusal = verdict.refusals.first { throw refusal }
    }

    func runPipeline() async throws {
        guard let store = try await connectStore() else { return }
        let consumer = try KafkaConsumer.make(
            bootstrapServers: config.bootstrapServers, groupID: config.group, topics: config.topics,
            properties: kafkaProperties(), logger: logger)
        logStart()
        // The loop runs on a thread of its own (LoopThread), and its polls block that thread.
        let thread = LoopThread(name: "dedupd-loop")
        consumer.pollsBlockCaller = true
        store.answer(on: thread)
        store.readInline(Self.inlineReads(on: thread))
        defer {
            store.readInline(nil)
            store.answer(on: nil)
            thread.stop()
        }
        try await withTaskExecutorPreference(thread) {
            try await runLoop(
                source: consumer, store: store,
                rounds: HandlerRounds(dispatchers: dispatchers, handlers: handlers, ledger: telemetry.inFlightLedger),
                clock: LoopThreadClock(thread: thread))
        }
    }

    /// The loop's small round trips (64 KiB of commands: about 300 keys' claims; 16 KiB over
    /// TLS) are read on its own thread, so their answers wake no other thread. A larger batch
    /// (a full-speed fetch's) is read on the connection's queue, and so is the rest of an answer
    /// slower than the budget: the loop waits for Redis 2 ms at most.
    static func inlineReads(on thread: LoopThread) -> RedisConnection.InlineReads {
        RedisConnection.InlineReads(budget: .milliseconds(2), maxBytes: 64 * 1024) { thread.isCurrent }
    }

    var engineOptions: DedupEngine.Options {
        DedupEngine.Options(
            batchSize: config.batchSize, handlerMaxBatch: config.handlerMaxBatch, failOpen: config.failOpen,
            stopWhenIdle: config.stopWhenIdle, deadLetters: deadLetters != nil,
            // Half the shutdown deadline: the other half is for the round in flight, the
            // confirm and the commit.
            shutdownDrain: config.shutdownDeadline / 2,
            claimGather: Self.claimGather(windows: [config.dedup.window] + config.routing.routes.map(\.settings.window)),
            keyDigest: KeyDigest.hashed)
    }

    /// How long polled keys gather before their claims go out (`DedupEngine.Options`): a tenth
    /// of the shortest window (the default route's or a named one's), at most 10 ms. Against a
    /// broker that answers a fetch as soon as a produce lands (every few milliseconds at
    /// moderate rates), claims would otherwise go out once per fetch, each round trip waking the
    /// loop and the connection's thread; a tenth of the window leaves nine tenths for the answer.
    static func claimGather(windows: [Duration]) -> Duration {
        min(.milliseconds(10), (windows.min() ?? .zero) / 10)
    }

    // MARK: - The loop

    /// Runs the engine until it finishes: asks for the next action, carries it out, feeds back
    /// what came of it. Answers arrive in `inbox` from whatever thread the store or the
    /// handlers use.
    package func runLoop(
        source: some MessageSource, store: some ClaimStore, rounds: some DispatchRunner, clock: some LoopClock,
        seed: UInt64 = .random(in: 0...UInt64.max)
    ) async throws {
        let started = clock.now
        var engine = DedupEngine(
            settings: config.dedup, routing: config.routing, options: engineOptions, now: started, seed: seed)
        let inbox = AnswerInbox()
        var stopping = false
        /// When the engine stopped running: leaving the group is bounded by the shutdown deadline from here.
        var stoppingSince = started
        var cancelled = false
        /// Set when the source failed for good: the worker stops as for SIGTERM, then throws.
        var sourceFailure: String?
        while true {
            if !stopping, sourceFailure == nil, let reason = source.unrecoverableError {
                sourceFailure = reason
                logger.error(
                    "kafka client failed for good, stopping: the worker exits with an error, to be restarted with a new client",
                    metadata: ["kafka.reason": "\(reason)"])
                requestStop()
            }
            if !stopping, isStopRequested { engine.handle(.stop, now: clock.now) }
            switch engine.nextAction(now: clock.now) {
            case .poll(let timeout):
                let events = try await source.poll(upTo: config.batchSize, timeout: timeout)
                engine.handle(.polled(events), now: clock.now)
                counters.withLock { $0 = engine.counters }
                telemetry.loopPass(.init(
                    now: clock.now, counters: engine.counters, bufferMessages: engine.ledger.buffer.count,
                    bufferBytes: engine.ledger.buffer.bytes, parked: engine.ledger.parkedCount,
                    assignment: Array(engine.assignment), paused: engine.paused, redisUp: engine.storeDownSince == nil),
                    consumer: source as? KafkaConsumer)
            case .wait(let until):
                let answers: [DedupEngine.Answer]
                if cancelled {
                    answers = await inbox.next(until: until, clock: clock)
                } else {
                    // Past the shutdown deadline the task is cancelled: rounds still running are
                    // cancelled too, and what their handlers never took comes back abandoned.
                    answers = await withTaskCancellationHandler {
                        await inbox.next(until: until, clock: clock)
                    } onCancel: {
                        rounds.cancelAll()
                        inbox.expire()
                    }
                    cancelled = Task.isCancelled
                }
                engine.handle(.answered(answers), now: clock.now)
            // Guard holds and unholds are sent right after their claims or releases, on the same
            // connection: one pipelined round trip; the answer is posted once both are in.
            case .claim(let id, let groups, let holds):
                let claims = store.requestClaims(groups, owner: owner)
                let held = holds.isEmpty ? StoreReply(.success([])) : store.requestHolds(holds, owner: owner)
                claims.whenAnswered(with: held) { r in inbox.post(.claims(id, r.map(\.0), holds: (try? r.get().1) ?? [])) }
            // Guard moves go first, and the confirms only once the moves are answered. A worker
            // killed between the two must leave the entity moved and the message not yet done
            // (read again, it finds its move made and is rejected: dispatched once), never the
            // message done and its entity unmoved: the next message of the entity would then be
            // judged against the old state. Pipelining is not enough: in a cluster the two go to
            // different nodes, and a kill can cut a pipeline anywhere.
            case .confirm(let id, let groups, let moves) where moves.isEmpty:
                store.requestConfirms(groups, owner: owner).whenAnswered { inbox.post(.confirms(id, $0)) }
            case .confirm(let id, let groups, let moves):
                store.requestMoves(moves, owner: owner).whenAnswered { [owner] moved in
                    switch moved {
                    case .success(let outcomes):
                        store.requestConfirms(groups, owner: owner).whenAnswered { inbox.post(.confirms(id, $0, moves: outcomes)) }
                    case .failure(let error):
                        inbox.post(.confirms(id, .failure(error)))
                    }
                }
            case .release(let id, let keys, let unholds):
                let released = keys.isEmpty ? StoreReply(.success([])) : store.requestReleases(keys, owner: owner)
                let unheld = unholds.isEmpty ? StoreReply(.success([])) : store.requestUnholds(unholds, owner: owner)
                released.whenAnswered(with: unheld) { r in inbox.post(.releases(id, r.map(\.0))) }
            case .useTokens(let id, let tokens, let marks):
                store.requestTokenUses(tokens, marks: marks).whenAnswered { inbox.post(.tokens(id, $0)) }
            case .dispatch(let id, let due):
                rounds.start(due) { inbox.post(.round(id, $0)) }
            case .deadLetter(let id, let letters):
                guard let producer = deadLetters else {
                    inbox.post(.deadLetters(id, letters.map { _ in "no dead_letter.topic" }))
                    continue
                }
                Task {
                    let results = await producer.send(letters)
                    inbox.post(.deadLetters(id, results.map { if case .failure(let e) = $0 { "\(e)" } else { nil } }))
                }
            case .storeOffsets(let positions):
                do { try source.storeOffsets(positions) } catch {
                    logger.warning("storing offsets failed", metadata: ["error": "\(error)"])
                }
            case .pause(let partitions):
                do { try source.pauseFetching(partitions) } catch {
                    logger.warning("pausing partitions failed", metadata: ["error": "\(error)"])
                    engine.handle(.pauseFailed, now: clock.now)
                }
            case .resume(let partitions):
                do { try source.resumeFetching(partitions) } catch {
                    logger.warning("resuming partitions failed", metadata: ["error": "\(error)"])
                    engine.handle(.pauseFailed, now: clock.now)
                }
            case .report(let report):
                log(report)
            case .finished:
                // The final commit and leaving the group wait for the coordinator, and librdkafka
                // bounds neither: both end by the shutdown deadline, each given at least a second
                // so that a drain that used the whole budget still commits and sends LeaveGroup.
                let leaveBy = stoppingSince + config.shutdownDeadline
                var commitError: (any Error)?
                do { try await source.commit(within: max(.seconds(1), leaveBy - clock.now)) } catch { commitError = error }
                await source.close(within: max(.seconds(1), leaveBy - clock.now))
                await rounds.close()
                counters.withLock { $0 = engine.counters }
                logSummary(engine, commitError: commitError, elapsed: clock.now - started)
                if let sourceFailure { throw SourceFailure(reason: sourceFailure) }
                return
            }
            if !stopping, !engine.isRunning {
                stopping = true
                stoppingSince = clock.now
                telemetry.stopping()
            }
        }
    }
}
