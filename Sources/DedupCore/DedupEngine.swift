/// Names one store request (claims, confirms, releases, token uses) or one batch of dead letters.
/// Every answer the engine takes names the request it answers.
public struct RequestID: Hashable, Sendable, CustomStringConvertible {
    public let rawValue: UInt64
    public var description: String { "r\(rawValue)" }
}

/// Names one dispatch round.
public struct RoundID: Hashable, Sendable, CustomStringConvertible {
    public let rawValue: UInt64
    public var description: String { "d\(rawValue)" }
}

/// What the source (the Kafka consumer) reports, in the order it happened.
public enum SourceEvent: Sendable {
    case message(InboundMessage)
    /// Added to this worker's assignment. Eager rebalancing assigns the whole new assignment
    /// after revoking the whole old one; cooperative rebalancing adds only the partitions that
    /// move here (possibly none), and the rest stay as they are.
    case assigned([TopicPartition])
    /// Taken away in a rebalance: eager, the whole assignment; cooperative, only the
    /// partitions that move elsewhere.
    case revoked([TopicPartition])
    /// Taken away without a rebalance (the session timed out, the member was fenced): handled
    /// like `revoked`; another member may already own them.
    case lost([TopicPartition])
}

/// What happened to one message of a dispatch round.
public enum DispatchResult: Sendable {
    case success
    /// The handler gave up: its last error and the attempts made.
    case gaveUp(error: String, attempts: Int)
    /// Never taken by the handler (shutdown deadline): not dispatched, not resolved.
    case abandoned
}

/// The dedup pipeline of one worker as a state machine (docs/architecture.md): no I/O and no
/// clock of its own. The executor (`Worker`) feeds it events with `handle(_:now:)` and asks
/// `nextAction(now:)` what to do, until `.finished`.
///
/// Every rule about order lives here: which requests may be in flight together, when a round
/// may start, when offsets are stored, when to pause, when to poll and when to wait. The
/// per-key decisions are the `DedupLedger`'s; the engine adds request ids, store health and
/// retry, dead letters, backpressure and shutdown.
///
/// In flight at once: at most one claim request (new keys, parked keys, lease renewals), one
/// confirm request, one release request, one token request, one dispatch round and one batch of
/// dead letters. Each answer is matched to its request by id; an answer for entries that moved
/// on meanwhile is recognised as stale by the ledger.
public struct DedupEngine: Sendable {
    /// How the loop runs, beside the dedup settings.
    public struct Options: Sendable {
        /// Most messages one poll returns. Default: 1000.
        public var batchSize: Int
        /// Most messages in one dispatch round; the keys of one round are confirmed together,
        /// so this bounds what a crash between handler and confirm can repeat. Default: 500.
        public var handlerMaxBatch: Int
        /// `on_store_error: fail_open`. Default: false (fail-closed).
        public var failOpen: Bool
        /// Stop once nothing happened for this long. Default: never.
        public var stopWhenIdle: Duration?
        /// Bad input and given-up messages go to a dead-letter topic. Default: false.
        public var deadLetters: Bool
        /// Longest blocking poll. Default: 100 ms.
        public var maxPollWait: Duration
        /// Longest wait for answers before polling again, so a slow handler never keeps the
        /// consumer from polling (`max.poll.interval.ms`). Default: 50 ms.
        public var maxAnswerWait: Duration
        /// How long new keys may wait for more before their claims go out, unless a consumer
        /// batch's worth is waiting: one claim round trip for the messages of several fetches,
        /// where a broker that answers each fetch as soon as anything arrives would have one per
        /// fetch. Must be well inside the window (a claim answered after its message's window
        /// ended delays its dispatch). Default: zero (claims go out at once).
        public var claimGather: Duration
        /// On stop, how long the window may keep running: messages due within it are dispatched
        /// rather than released, so the partitions' next owner (a rolling restart's) reads
        /// nothing again. Nothing new is polled meanwhile. Default: zero (release at once).
        public var shutdownDrain: Duration
        /// How a new key of a compact route is hashed (`KeyDigest(of:)`'s SHA-256). The worker
        /// passes the Redis adapter's `KeyDigest.hashed`, which allocates nothing; any function
        /// given must return the same digest, since the store finds done records by it.
        public var keyDigest: @Sendable (String) -> KeyDigest

        public init(
            batchSize: Int = ConfigSchema.defaultCount("consumer.batch_size"),
            handlerMaxBatch: Int = ConfigSchema.defaultCount("handler.max_batch"), failOpen: Bool = false, stopWhenIdle: Duration? = nil,
            deadLetters: Bool = false, maxPollWait: Duration = .milliseconds(100), maxAnswerWait: Duration = .milliseconds(50),
            shutdownDrain: Duration = .zero, claimGather: Duration = .zero,
            keyDigest: @escaping @Sendable (String) -> KeyDigest = KeyDigest.init(of:)
        ) {
            self.keyDigest = keyDigest
            self.claimGather = claimGather
            self.shutdownDrain = shutdownDrain
            self.batchSize = batchSize
            self.handlerMaxBatch = handlerMaxBatch
            self.failOpen = failOpen
            self.stopWhenIdle = stopWhenIdle
            self.deadLetters = deadLetters
            self.maxPollWait = maxPollWait
            self.maxAnswerWait = maxAnswerWait
        }
    }

    /// Events the executor feeds in.
    public enum Event: Sendable {
        /// What one poll returned (`.poll` action).
        case polled([SourceEvent])
        /// What arrived while waiting (`.wait` action); empty when the wait timed out.
        case answered([Answer])
        /// A `.pause` or `.resume` could not be carried out; it is tried again.
        case pauseFailed
        /// SIGTERM or `requestStop()`.
        case stop
    }

    /// The answer to a request or a round.
    public enum Answer: Sendable {
        /// `holds`: the answers to the request's entity holds (guard), in order.
        case claims(RequestID, Result<[ClaimOutcome], any Error>, holds: [HoldOutcome] = [])
        /// `moves`: the answers to the request's entity moves (guard), in order.
        case confirms(RequestID, Result<[ConfirmOutcome], any Error>, moves: [MoveOutcome] = [])
        case releases(RequestID, Result<[Bool], any Error>)
        case tokens(RequestID, Result<[TokenOutcome], any Error>)
        case round(RoundID, [DispatchResult])
        /// Per dead letter in order: nil when the topic acknowledged it, else the error.
        case deadLetters(RequestID, [String?])
    }

    /// What the executor does next.
    public enum Action: Sendable {
        /// Poll the source, blocking at most `timeout`, and feed `.polled`.
        case poll(timeout: Duration)
        /// Wait for answers until `until`, and feed `.answered` with what arrived.
        case wait(until: ContinuousClock.Instant)
        /// Send claims; owning keys again extends their lease (renewals ride here). Guard: the
        /// entity holds go in the same round trip, and a failure of either fails both.
        case claim(RequestID, [KeyGroup], holds: [EntityStep])
        /// Confirm dispatched keys; guard: their entities move first, and the keys are confirmed
        /// only once the moves are answered (a done key with its entity unmoved would let the
        /// entity's next message be judged against the old state). A failure of either fails the
        /// request, which is sent again: a move already made finds its target state and answers
        /// as moved.
        case confirm(RequestID, [KeyGroup], moves: [EntityStep])
        /// Release claims; guard: give back entity holds of messages that left without moving.
        case release(RequestID, [String], unholds: [EntityStep])
        case useTokens(RequestID, tokens: [String], marks: [String])
        /// Run a round through the handlers.
        case dispatch(RoundID, [Dispatch])
        case deadLetter(RequestID, [DeadLetter])
        case storeOffsets([TopicPartition: Int64])
        /// Pause these partitions and hold partitions assigned from now on paused too.
        case pause([TopicPartition])
        /// Resume these partitions and stop holding new ones.
        case resume([TopicPartition])
        /// Something to tell the operator.
        case report(Report)
        /// Stopped: everything is confirmed or released and the offsets stored; commit and close.
        case finished
    }

    /// State changes worth a log line; the executor words them.
    public enum Report: Sendable {
        case badInput(BadInput, InboundMessage)
        case handlerGaveUp(Dispatch, error: String, attempts: Int)
        case confirmConflict(DedupKey, otherOwner: String)
        case storeDown(error: String, cause: StoreFailure)
        case storeUp(downFor: Duration)
        case deadLettersFailing(pending: Int, error: String)
        case deadLettersAcknowledged(downFor: Duration)
        case revokedWithWindow(released: Int)
        /// Guard: a message whose transition its entity's recorded state does not allow.
        case rejectedTransition(DedupLedger.Rejection)
        case revokedWithHandler(inFlight: Int)
        case bufferFull(messages: Int, bytes: Int)
        case bufferDrained
        case idle(Duration)
        case waitingForRound(Int)
        /// Stopping: the window keeps running until `until` for this many messages.
        case drainingWindow(messages: Int, within: Duration)
    }

    enum State: Sendable {
        case running
        /// Stop requested: nothing is polled or claimed; what is in flight is answered, then each
        /// step below is sent once and answered before the next.
        case stopping(Shutdown)
        case finished
    }

    enum Shutdown: Int, Sendable, Comparable {
        /// Until `drainUntil`: what is in the window and due by then is dispatched and confirmed.
        case drain
        case settle, confirm, deadLetters, storeOffsets, release, done
        static func < (a: Self, b: Self) -> Bool { a.rawValue < b.rawValue }
    }

    enum Outstanding: Sendable {
        /// The window and the lease count from `sentAt`: the window then ends one round trip
        /// sooner, and a lease believed to start earlier is renewed earlier.
        case claims(LedgerRequest, sentAt: ContinuousClock.Instant)
        case confirms(LedgerRequest)
        case releases([DedupKey], unholds: [EntityStep])
        case tokens(LedgerRequest)
        case deadLetters([DeadLetter])
    }

    public let options: Options
    public private(set) var ledger: DedupLedger
    var state: State = .running
    /// Store requests and dead-letter batches in flight, by id.
    var outstanding: [RequestID: Outstanding] = [:]
    var claimInFlight: RequestID?
    /// When the oldest polled key still to be claimed arrived (`Options.claimGather`).
    var claimsGatheringSince: ContinuousClock.Instant?
    var confirmInFlight: RequestID?
    var releaseInFlight: RequestID?
    var tokensInFlight: RequestID?
    var deadLettersInFlight: RequestID?
    /// The round in flight, with its messages.
    var round: (id: RoundID, due: [Dispatch])?
    /// Whether the claim in flight renews a buffered lease: its answer decides whether that copy
    /// may still be dispatched, so no round starts before it.
    var renewalsInFlight = false
    /// A wait ended since the last poll: poll next, so the consumer is polled between waits.
    var pollDue = true
    var reports: [Report] = []
    /// Set by `.stop`: the end of the shutdown drain.
    var drainUntil: ContinuousClock.Instant?
    /// Set by `.stop`: until when failed confirms are tried again (three quarters of the shutdown
    /// deadline, `shutdownDrain` being half of it), leaving the rest for the steps after them.
    var confirmRetryUntil: ContinuousClock.Instant?
    var drainReported = false

    /// Claims to give back (revocation, failed handler, stale claim answers), until Redis took them.
    public private(set) var toRelease: [DedupKey] = []
    /// Guard: entity holds to give back, until Redis took them.
    public private(set) var toUnhold: [EntityStep] = []
    /// Bad input and given-up messages not yet acknowledged by the dead-letter topic.
    public private(set) var deadLetters: [DeadLetter] = []
    var deadLetterRetry = Retry(backoff: Backoff(initial: .milliseconds(200), maximum: .seconds(5)))
    var storeRetry = Retry(backoff: Backoff(initial: .milliseconds(100), maximum: .seconds(5)))
    /// The kinds of store request that failed in the current outage (`storeAnswered`).
    var storeFailing: Set<StoreRequestKind> = []

    enum StoreRequestKind: Hashable, Sendable { case claims, confirms, releases, tokens }

    public private(set) var assignment: Set<TopicPartition> = []
    public private(set) var paused = false
    var pausedForBackpressure = false
    var everAssigned = false
    let started: ContinuousClock.Instant
    var lastActivity: ContinuousClock.Instant
    /// The latest offset stored per partition (what the final commit sends), for the summary.
    public private(set) var storedPositions: [TopicPartition: Int64] = [:]

    /// Jitter for the retry delays; seeded, so a test replays the same delays.
    var rng: SplitMix64

    public init(settings: DedupSettings, routing: Routing = Routing(), options: Options = Options(),
                now: ContinuousClock.Instant, seed: UInt64 = UInt64.random(in: 0...UInt64.max)) {
        self.ledger = DedupLedger(settings: settings, routing: routing, keyDigest: options.keyDigest)
        self.options = options
        self.started = now
        self.lastActivity = now
        self.rng = SplitMix64(seed: seed)
    }

    /// Rebalance counts live here, the rest in the ledger.
    var rebalanceCounts = DedupCounters()

    public var counters: DedupCounters {
        var c = ledger.counters
        c.rebalances = rebalanceCounts.rebalances
        c.partitionsAssigned = rebalanceCounts.partitionsAssigned
        c.partitionsRevoked = rebalanceCounts.partitionsRevoked
        c.partitionsLost = rebalanceCounts.partitionsLost
        c.unconfirmedAtStop = rebalanceCounts.unconfirmedAtStop
        return c
    }
    /// The store answered nothing since this time (fail-closed: consumption is paused).
    public var storeDownSince: ContinuousClock.Instant? { storeRetry.downSince }
    public var isFinished: Bool { if case .finished = state { true } else { false } }
    /// Not stopping yet.
    public var isRunning: Bool { if case .running = state { true } else { false } }

    // MARK: - Events

    public mutating func handle(_ event: consuming Event, now: ContinuousClock.Instant) {
        switch consume event {
        case .polled(var events):
            pollDue = false
            // Each message moves on into its entry (`take`, `admit`): `popLast` moves an element
            // out, where a `for` loop would copy each (retaining its buffers) and the array
            // release the originals after. Reversed first, by the buffer's swaps (moves), so the
            // messages come out in the order they were polled.
            events.withUnsafeMutableBufferPointer { $0.reverse() }
            let polledAt = Moment(now)
            while let e = events.popLast() { take(e, now: now, polledAt: polledAt) }
            if claimsGatheringSince == nil, ledger.keysToClaimCount > 0 { claimsGatheringSince = now }
        case .answered(let answers):
            pollDue = true
            for a in answers { take(a, now: now) }
        case .pauseFailed:
            paused.toggle()
        case .stop:
            if case .running = state {
                drainUntil = now + options.shutdownDrain
                confirmRetryUntil = now + options.shutdownDrain * 3 / 2
                state = .stopping(.drain)
            }
        }
    }

    mutating func take(_ event: consuming SourceEvent, now: ContinuousClock.Instant, polledAt: Moment) {
        lastActivity = now
        switch consume event {
        case .message(let message):
            if case .bad(let bad, let message) = ledger.admit(message, polledAt: polledAt) { badInput(bad, message) }
        case .assigned(let partitions):
            // Incremental: partitions already held keep their window, claims, leases and pause.
            // While paused, the source holds new ones: they arrive paused, like the rest.
            rebalanceCounts.rebalances += 1
            rebalanceCounts.partitionsAssigned += partitions.count
            assignment.formUnion(partitions)
            everAssigned = true
        case .revoked(let partitions):
            rebalanceCounts.partitionsRevoked += partitions.count
            drop(partitions)
        case .lost(let partitions):
            rebalanceCounts.partitionsLost += partitions.count
            drop(partitions)
        }
    }

    /// Lets go of partitions revoked or lost in a rebalance.
    mutating func drop(_ partitions: [TopicPartition]) {
        // Only what was taken is dropped: the entries, claims and offsets of the partitions
        // that stay are untouched, so their window keeps running through the rebalance.
        let set = Set(partitions)
        assignment.subtract(set)
        let released = ledger.revoke(set)
        deadLetters.removeAll { set.contains($0.message.topicPartition) }
        if !released.isEmpty {
            reports.append(.revokedWithWindow(released: released.count))
            toRelease.append(contentsOf: released)
        }
        // A round in flight is not interrupted: its messages keep their claims until the
        // handler finishes and they are confirmed (the next owner sees them pending and
        // waits) or released (the next owner claims them).
        let inFlight = round?.due.filter { set.contains($0.message.topicPartition) }.count ?? 0
        if inFlight > 0 { reports.append(.revokedWithHandler(inFlight: inFlight)) }
    }

    mutating func take(_ answer: Answer, now: ContinuousClock.Instant) {
        switch answer {
        case .claims(let id, let result, let holds):
            guard case .claims(let request, let sentAt)? = outstanding.removeValue(forKey: id) else { return }
            claimInFlight = nil
            renewalsInFlight = false
            switch result {
            case .success(let outcomes):
                storeAnswered(.claims, now: now)
                // Claims for keys no longer held (their partition was revoked while the answer
                // was on its way) are given back rather than left to expire.
                toRelease.append(contentsOf: ledger.applyClaims(request, outcomes, holds: holds, now: sentAt))
                for rejection in ledger.takeRejections() {
                    reports.append(.rejectedTransition(rejection))
                    if rejection.deadLetter {
                        deadLetters.append(DeadLetter(
                            message: rejection.message, reason: DeadLetter.rejectedTransition,
                            error: "entity \(rejection.entity): \(rejection.from ?? "(no state)") -> \(rejection.to) is not allowed",
                            dedupKey: rejection.key.raw))
                    }
                }
            case .failure(let error):
                storeFailed(.claims, error, now: now)
                if options.failOpen { ledger.applyClaimsWithoutStore(request, now: now) } else { ledger.requestFailed(request) }
            }
        case .confirms(let id, let result, let moves):
            guard case .confirms(let request)? = outstanding.removeValue(forKey: id) else { return }
            confirmInFlight = nil
            switch result {
            case .success(let outcomes):
                storeAnswered(.confirms, now: now)
                for (key, other) in ledger.applyConfirms(request, outcomes, moves: moves) {
                    reports.append(.confirmConflict(key, otherOwner: other))
                }
            case .failure(let error):
                storeFailed(.confirms, error, now: now)
                ledger.requestFailed(request)
            }
        case .releases(let id, let result):
            guard case .releases(let keys, let unholds)? = outstanding.removeValue(forKey: id) else { return }
            releaseInFlight = nil
            switch result {
            case .success: storeAnswered(.releases, now: now)
            case .failure(let error):
                storeFailed(.releases, error, now: now)
                toRelease.insert(contentsOf: keys, at: 0)
                toUnhold.insert(contentsOf: unholds, at: 0)
            }
        case .tokens(let id, let result):
            guard case .tokens(let request)? = outstanding.removeValue(forKey: id) else { return }
            tokensInFlight = nil
            switch result {
            case .success(let outcomes):
                storeAnswered(.tokens, now: now)
                for (bad, message) in ledger.applyTokens(request, outcomes) { badInput(bad, message) }
            case .failure(let error):
                storeFailed(.tokens, error, now: now)
                ledger.requestFailed(request)
            }
        case .round(let id, let results):
            guard let round, round.id == id else { return }
            self.round = nil
            // By index: iterating the pairs would copy each dispatch, retaining its key and
            // message, only to read them.
            for i in 0..<min(round.due.count, results.count) {
                switch results[i] {
                case .success:
                    ledger.dispatchSucceeded(round.due[i])
                case .gaveUp(let error, let attempts):
                    let dispatch = round.due[i]
                    reports.append(.handlerGaveUp(dispatch, error: error, attempts: attempts))
                    if options.deadLetters {
                        deadLetters.append(DeadLetter(
                            message: dispatch.message, reason: DeadLetter.handlerFailed, error: error,
                            dedupKey: dispatch.key.raw, attempts: attempts))
                    }
                    ledger.dispatchFailed(dispatch.key)
                    toRelease.append(dispatch.key)
                case .abandoned:
                    ledger.dispatchAbandoned(round.due[i].key)
                    toRelease.append(round.due[i].key)
                }
            }
        case .deadLetters(let id, let errors):
            guard case .deadLetters(let letters)? = outstanding.removeValue(forKey: id) else { return }
            deadLettersInFlight = nil
            var failed: [DeadLetter] = []
            var firstError: String?
            for (letter, error) in zip(letters, errors) {
                if let error {
                    failed.append(letter)
                    if firstError == nil { firstError = error }
                } else if assignment.contains(letter.message.topicPartition) {
                    // A letter of a partition revoked meanwhile is read and dead-lettered again by
                    // its next owner; its offset is not this worker's to resolve.
                    ledger.deadLettered(letter.message)
                }
            }
            deadLetters.insert(contentsOf: failed, at: 0)
            if let firstError {
                if deadLetterRetry.failed(now: now, rng: &rng) {
                    reports.append(.deadLettersFailing(pending: failed.count, error: firstError))
                }
            } else if let downFor = deadLetterRetry.succeeded(now: now) {
                reports.append(.deadLettersAcknowledged(downFor: downFor))
            }
        }
    }

    mutating func badInput(_ bad: BadInput, _ message: InboundMessage) {
        reports.append(.badInput(bad, message))
        if options.deadLetters { deadLetters.append(DeadLetter(badInput: bad, message: message)) }
    }

    /// An outage ends when each kind of request that failed in it has been answered since, or
    /// has nothing left to send. An answer to another kind says only that Redis runs, not that
    /// it takes the failed commands: an ACL user without `HSET` is granted every claim and
    /// refused every confirm, and ending the outage at each granted claim would report it again
    /// at the next confirm and start its backoff over. A kind with nothing left to send (its keys'
    /// partition was revoked) could never end the outage, and a fail-closed worker would
    /// dispatch nothing for good.
    mutating func storeAnswered(_ kind: StoreRequestKind, now: ContinuousClock.Instant) {
        guard storeRetry.downSince != nil else { return }
        storeFailing.remove(kind)
        storeFailing = storeFailing.filter { hasToSend($0) }
        guard storeFailing.isEmpty else { return }
        if let downFor = storeRetry.succeeded(now: now) { reports.append(.storeUp(downFor: downFor)) }
    }

    /// Whether a request of this kind is in flight or waits to be sent.
    func hasToSend(_ kind: StoreRequestKind) -> Bool {
        switch kind {
        case .claims: claimInFlight != nil || ledger.keysToClaimCount > 0
        case .confirms: confirmInFlight != nil || ledger.hasConfirmsToSend
        case .releases: releaseInFlight != nil || !toRelease.isEmpty || !toUnhold.isEmpty
        case .tokens: tokensInFlight != nil || ledger.hasTokensToUse
        }
    }

    /// Fail-closed: a store error pauses consumption and retries with backoff and jitter. The
    /// transition is reported once, not once per message or per retry.
    mutating func storeFailed(_ kind: StoreRequestKind, _ error: any Error, now: ContinuousClock.Instant) {
        storeFailing.insert(kind)
        if storeRetry.failed(now: now, rng: &rng) {
            reports.append(.storeDown(error: "\(error)", cause: (error as? any StoreFailureClassifying)?.storeFailure ?? .unavailable))
        }
    }

    // MARK: - Actions

    /// What to do next. Call again after carrying it out (and feeding its outcome, for `.poll`
    /// and `.wait`), until `.finished`.
    public mutating func nextAction(now: ContinuousClock.Instant) -> Action {
        if !reports.isEmpty { return .report(reports.removeFirst()) }
        switch state {
        case .running:
            if let action = runningAction(now: now) { return action }
            if let action = idleStop(now: now) { return action }
            return waitOrPoll(now: now)
        case .stopping(let step):
            return stoppingAction(step, now: now)
        case .finished:
            return .finished
        }
    }

    var hasInFlight: Bool { !outstanding.isEmpty || round != nil }

    var storeUsable: Bool { storeRetry.retryAt == nil }

    mutating func runningAction(now: ContinuousClock.Instant, draining: Bool = false) -> Action? {
        storeRetry.expire(now: now)
        deadLetterRetry.expire(now: now)
        if storeUsable {
            // Releases first: a revoked partition that came straight back may be re-read, and
            // its keys must be free before they are claimed again.
            if let action = releaseAction() { return action }
            if tokensInFlight == nil, let action = tokensAction() { return action }
            if claimInFlight == nil, draining || claimsGathered(now: now) {
                claimsGatheringSince = nil
                let request = ledger.keysToClaim(now: now)
                if !request.isEmpty {
                    let id = RequestID(rawValue: request.ticket)
                    claimInFlight = id
                    renewalsInFlight = request.renewals > 0
                    outstanding[id] = .claims(request, sentAt: now)
                    return .claim(id, ledger.storeGroups(request, ttl: \.lease), holds: request.holds)
                }
            }
        } else if options.failOpen, claimInFlight == nil {
            let request = ledger.keysToClaim(now: now)
            if !request.isEmpty { ledger.applyClaimsWithoutStore(request, now: now) }
        }
        // One round at a time, and (fail-closed) only with the store up and the last round
        // confirmed: at most one round is ever exposed to the crash window (handler done, confirm
        // not yet in Redis). No round while a lease is due for renewal or being renewed: a copy
        // is dispatched only while its lease has at least half its time left.
        if round == nil, options.failOpen || (!renewalsInFlight && !ledger.renewalDue(now: now)),
            options.failOpen || (storeRetry.downSince == nil && ledger.confirmingCount == 0)
        {
            let due = ledger.takeDue(now: now, limit: options.handlerMaxBatch)
            if !due.isEmpty {
                let id = RoundID(rawValue: ledger.newTicket())
                round = (id, due)
                return .dispatch(id, due)
            }
        }
        if confirmInFlight == nil, ledger.hasConfirmsToSend {
            if storeUsable { return confirmAction() }
            if options.failOpen {
                // Redis down: dispatched messages are resolved without a `done` record (there is
                // nowhere to write it) and releases are dropped (the claims expire by themselves).
                let request = ledger.keysToConfirm()
                ledger.applyConfirms(request, Array(repeating: .confirmedAfterLeaseLost, count: request.keys.count))
                toRelease.removeAll()
            }
        }
        if deadLettersInFlight == nil, deadLetterRetry.retryAt == nil, let action = deadLetterAction() { return action }
        if let action = storeOffsetsAction() { return action }
        // Draining polls nothing, so there is nothing to pause or resume.
        return draining ? nil : backpressureAction(now: now)
    }

    /// Whether the polled keys waiting for a claim have gathered long enough, or are a consumer
    /// batch's worth, to go out (`Options.claimGather`). The wait starts with a poll that
    /// brought keys to claim; with none waiting from a poll, claims (retries after a failed
    /// round trip, parked keys, renewals, the next message of a guarded entity) go out at once.
    func claimsGathered(now: ContinuousClock.Instant) -> Bool {
        guard let since = claimsGatheringSince else { return true }
        return now >= since + options.claimGather || ledger.keysToClaimCount >= options.batchSize
    }

    mutating func releaseAction() -> Action? {
        guard releaseInFlight == nil else { return nil }
        // A key taken up again since (re-read after its partition came back) is not released:
        // its new claim is this worker's own.
        toRelease.removeAll { ledger.isHolding($0) }
        // An entity hold is never taken up again under the same id (each attempt has its own),
        // so giving one back is always right.
        toUnhold.append(contentsOf: ledger.takeUnholds())
        guard !toRelease.isEmpty || !toUnhold.isEmpty else { return nil }
        let id = RequestID(rawValue: ledger.newTicket())
        let keys = toRelease, unholds = toUnhold
        toRelease.removeAll()
        toUnhold.removeAll()
        releaseInFlight = id
        outstanding[id] = .releases(keys, unholds: unholds)
        return .release(id, ledger.pendingStoreKeys(keys), unholds: unholds)
    }

    mutating func tokensAction() -> Action? {
        let pending = ledger.tokensToUse()
        guard !pending.keys.isEmpty else { return nil }
        let id = RequestID(rawValue: pending.keys.ticket)
        tokensInFlight = id
        outstanding[id] = .tokens(pending.keys)
        return .useTokens(id, tokens: pending.storeKeys, marks: pending.marks)
    }

    mutating func confirmAction() -> Action? {
        let request = ledger.keysToConfirm()
        guard !request.isEmpty else { return nil }
        let id = RequestID(rawValue: request.ticket)
        confirmInFlight = id
        outstanding[id] = .confirms(request)
        return .confirm(id, ledger.storeGroups(request, ttl: \.retention), moves: request.holds)
    }

    mutating func deadLetterAction() -> Action? {
        guard options.deadLetters, !deadLetters.isEmpty else { return nil }
        let id = RequestID(rawValue: ledger.newTicket())
        let letters = deadLetters
        deadLetters.removeAll()
        deadLettersInFlight = id
        outstanding[id] = .deadLetters(letters)
        return .deadLetter(id, letters)
    }

    mutating func storeOffsetsAction() -> Action? {
        let positions = ledger.takeCommitPositions()
        guard !positions.isEmpty else { return nil }
        storedPositions.merge(positions) { _, new in new }
        return .storeOffsets(positions)
    }

    mutating func backpressureAction(now: ContinuousClock.Instant) -> Action? {
        let full = ledger.shouldPause
        // Fail-closed, the store down: paused until the retry time. Then consumption resumes
        // whether or not a request is waiting to go out; were the worker to wait for a request
        // to succeed first, a worker whose every waiting key was revoked meanwhile would never
        // send one and stay paused for good. A failing retry pauses it again.
        let mustPause = full || (storeRetry.retryAt != nil && !options.failOpen)
        if mustPause && !paused {
            paused = true
            pausedForBackpressure = full
            if full { reports.append(.bufferFull(messages: ledger.heldMessages, bytes: ledger.heldBytes)) }
            return .pause(Array(assignment))
        }
        if !mustPause && paused && ledger.canResume {
            paused = false
            // Idle time counts from here: nothing arrived while paused because nothing was read.
            lastActivity = now
            if pausedForBackpressure { reports.append(.bufferDrained) }
            pausedForBackpressure = false
            return .resume(Array(assignment))
        }
        return nil
    }

    /// Idle counts from the first assignment: joining the group takes seconds, and a worker that
    /// never gets partitions (more workers than partitions) gives up after 30 s more. A paused
    /// worker is not idle: its topic may hold more than it has read.
    mutating func idleStop(now: ContinuousClock.Instant) -> Action? {
        guard let idle = options.stopWhenIdle, !paused, ledger.isIdle, toRelease.isEmpty, toUnhold.isEmpty, deadLetters.isEmpty, !hasInFlight,
            now - lastActivity >= idle, everAssigned || now - started >= idle + .seconds(30)
        else { return nil }
        state = .stopping(.settle)
        return .report(.idle(idle))
    }

    /// With anything in flight: poll without blocking once after each wait, then wait for the
    /// answers. With nothing in flight: block in poll until the next deadline, the next store
    /// retry, or `maxPollWait`.
    mutating func waitOrPoll(now: ContinuousClock.Instant) -> Action {
        if hasInFlight && !pollDue {
            var until = now + options.maxAnswerWait
            if let wake = actionableWakeup(), wake > now { until = min(until, wake) }
            return .wait(until: until)
        }
        return .poll(timeout: hasInFlight ? .zero : pollTimeout(now: now))
    }

    /// When something becomes due that the engine could act on. While the store is down
    /// (fail-closed), deadlines cannot be acted on (nothing is dispatched), so only the retry
    /// time counts: the loop waits instead of spinning.
    func actionableWakeup() -> ContinuousClock.Instant? {
        var t: ContinuousClock.Instant?
        if storeRetry.downSince == nil || options.failOpen { t = ledger.nextWakeup }
        // Gathered claims go out when their time is up; not while the store is down (they
        // could not), or while a claim is in flight (its answer wakes the loop).
        if storeUsable, claimInFlight == nil, let since = claimsGatheringSince {
            let go = since + options.claimGather
            t = t.map { min($0, go) } ?? go
        }
        for retry in [storeRetry.retryAt, deadLettersInFlight == nil && !deadLetters.isEmpty ? deadLetterRetry.retryAt : nil] {
            if let retry { t = t.map { min($0, retry) } ?? retry }
        }
        return t
    }

    /// Block in poll no longer than until the next thing due, or `maxPollWait`; in whole
    /// milliseconds rounded up (librdkafka's unit): a deadline 0.4 ms away is waited for as 1 ms,
    /// not polled for as 0 ms, or the loop would spin through empty passes until it passes.
    public func pollTimeout(now: ContinuousClock.Instant) -> Duration {
        var t = options.maxPollWait
        if let wake = actionableWakeup() { t = min(t, wake - now) }
        guard t > .zero else { return .zero }
        return .milliseconds((t / .milliseconds(1)).rounded(.up))
    }

    // MARK: - Shutdown

    /// Stop fetching; let what is in flight finish; confirm what was dispatched; send the dead
    /// letters; store the offsets that are resolved; give back what still waits in the window.
    /// Retry times are ignored: each step is tried once.
    mutating func stoppingAction(_ step: Shutdown, now: ContinuousClock.Instant) -> Action {
        if step == .drain { return drainAction(now: now) }
        if hasInFlight {
            if step == .settle, let round, !reports.contains(where: { if case .waitingForRound = $0 { true } else { false } }) {
                state = .stopping(.confirm)
                return .report(.waitingForRound(round.due.count))
            }
            return .wait(until: now + .seconds(1))
        }
        switch step {
        case .drain:
            state = .stopping(.settle)
        case .settle:
            state = .stopping(.confirm)
        case .confirm:
            // A dispatched message whose confirm fails (Redis down at that moment) would be
            // dispatched again by the partition's next owner once its lease ran out: confirms are
            // tried again with the store's backoff until `confirmRetryUntil`, then once more.
            storeRetry.expire(now: now)
            if ledger.hasConfirmsToSend, !options.failOpen, let until = confirmRetryUntil, now < until {
                if storeUsable, let action = confirmAction() { return action }
                return .wait(until: min(storeRetry.retryAt ?? until, until))
            }
            state = .stopping(.deadLetters)
            if ledger.hasConfirmsToSend, let action = confirmAction() { return action }
        case .deadLetters:
            state = .stopping(.storeOffsets)
            if let action = deadLetterAction() { return action }
        case .storeOffsets:
            state = .stopping(.release)
            if let action = storeOffsetsAction() { return action }
        case .release:
            state = .stopping(.done)
            toRelease.append(contentsOf: ledger.drainForShutdown())
            if let action = releaseAction() { return action }
        case .done:
            rebalanceCounts.unconfirmedAtStop = ledger.confirmingCount
            state = .finished
            return .finished
        }
        return nextAction(now: now)
    }

    /// The window keeps running, without polling, while a buffered message is due before
    /// `drainUntil` or an answer it needs is on its way: claims, rounds and confirms go on as
    /// while running. A message due later (a window longer than the drain) is released as
    /// before; so is what is parked behind another worker.
    mutating func drainAction(now: ContinuousClock.Instant) -> Action {
        let until = drainUntil ?? now
        let dueInTime = ledger.nextDeadline.map { $0 <= until } ?? false
        if now < until, hasInFlight || ledger.hasConfirmsToSend || dueInTime {
            if !drainReported {
                drainReported = true
                reports.append(.drainingWindow(messages: ledger.buffer.count, within: until - now))
                return nextAction(now: now)
            }
            if let action = runningAction(now: now, draining: true) { return action }
            var wake = hasInFlight ? now + options.maxAnswerWait : until
            if let next = actionableWakeup(), next > now { wake = min(wake, next) }
            return .wait(until: min(wake, until))
        }
        state = .stopping(.settle)
        return nextAction(now: now)
    }

    /// What the shutdown summary reports: claims that could not be given back.
    public var unreleasedCount: Int { toRelease.count + toUnhold.count }
    public var roundInFlight: Int { round?.due.count ?? 0 }
}

/// The retry state of something that can fail (the store, the dead-letter topic): since when it
/// fails, and when to try again (exponential backoff with jitter).
struct Retry: Sendable {
    let backoff: Backoff
    var failures = 0
    var downSince: ContinuousClock.Instant?
    var retryAt: ContinuousClock.Instant?

    /// Returns true when this failure starts an outage (report it once).
    mutating func failed(now: ContinuousClock.Instant, rng: inout SplitMix64) -> Bool {
        failures += 1
        retryAt = now + backoff.jittered(attempt: failures, using: &rng)
        guard downSince == nil else { return false }
        downSince = now
        return true
    }

    /// Returns how long it was down, when this success ends an outage.
    mutating func succeeded(now: ContinuousClock.Instant) -> Duration? {
        defer { failures = 0; downSince = nil; retryAt = nil }
        return downSince.map { now - $0 }
    }

    /// The retry time came: requests may go out again (the outage lasts until one succeeds).
    mutating func expire(now: ContinuousClock.Instant) {
        if let t = retryAt, now >= t { retryAt = nil }
    }
}
