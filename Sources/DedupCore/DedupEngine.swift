import DequeModule

/// The settings the dedup decisions depend on.
public struct DedupSettings: Sendable {
    /// How a message becomes its key. Default: `header:message-id`.
    public var template: KeyTemplate
    /// Separates this route's keys from others' in Redis. Default: `default`.
    public var namespace: String
    /// The dedup window `W`: how long a new message waits for repeats before dispatch. Default: 5 s.
    public var window: Duration
    /// How long a dispatched key is remembered as `done`. Default: 24 h.
    public var retention: Duration
    /// Lease of a `pending` claim; must outlive the window plus handler time. Default: window + 30 s.
    public var lease: Duration
    /// Which copy within the window is dispatched. Default: `first`.
    public var keep: KeepPolicy
    /// Larger values are bad input. Default: 1 MiB.
    public var maxMessageBytes: Int
    /// Delay buffer bounds. Default: 100,000 messages, 64 MiB.
    public var bufferMaxMessages: Int
    public var bufferMaxBytes: Int
    /// How soon a message whose key is pending under another worker is looked at again. Default: 500 ms.
    public var parkRetry: Duration
    /// A dead-letter topic is configured: bad input and given-up messages stay unresolved (their
    /// offsets uncommitted) until the caller reports them dead-lettered with `deadLettered(_:)`,
    /// so a message is never committed before the dead-letter topic acknowledged it.
    /// Default: false (they are resolved at once: logged and counted only).
    public var holdsDeadLetters: Bool
    /// Token mode: where each message's one-time token is (e.g. `header:form-token`). A new key
    /// is claimed only after its message's token was accepted. Default: off.
    public var token: KeyTemplate?

    public init(
        template: KeyTemplate,
        namespace: String = "default",
        window: Duration = .seconds(5),
        retention: Duration = .seconds(86_400),
        lease: Duration? = nil,
        keep: KeepPolicy = .first,
        maxMessageBytes: Int = 1 << 20,
        bufferMaxMessages: Int = 100_000,
        bufferMaxBytes: Int = 64 << 20,
        parkRetry: Duration = .milliseconds(500),
        holdsDeadLetters: Bool = false,
        token: KeyTemplate? = nil
    ) {
        self.template = template
        self.namespace = namespace
        self.window = window
        self.retention = retention
        self.lease = lease ?? window + .seconds(30)
        self.keep = keep
        self.maxMessageBytes = maxMessageBytes
        self.bufferMaxMessages = bufferMaxMessages
        self.bufferMaxBytes = bufferMaxBytes
        self.parkRetry = parkRetry
        self.holdsDeadLetters = holdsDeadLetters
        self.token = token
    }
}

/// Running totals, for the stats line, the shutdown summary and tests.
public struct DedupCounters: Sendable, Equatable {
    public var consumed = 0
    public var dispatched = 0
    /// Repeats resolved against this worker's own buffer, without a round trip.
    public var duplicatesLocal = 0
    /// Repeats Redis knew as `done`.
    public var duplicatesStore = 0
    public var invalid = 0
    /// Handler gave up after its last attempt.
    public var failed = 0
    /// Claims given back (revocation, shutdown, failed handler).
    public var released = 0
    /// Times a message was parked because its key was pending under another worker.
    public var parked = 0
    /// Confirms that found another owner holding the key (a copy may have been dispatched twice).
    public var confirmConflicts = 0
    /// Leases extended for messages that waited longer than half a lease.
    public var renewed = 0
    /// Buffered messages whose lease ran out and whose key another worker took meanwhile.
    public var leasesLost = 0
    /// `on_store_error: fail_open`: messages let through without a claim while Redis was down.
    public var unclaimed = 0
    /// Bad input and given-up messages the dead-letter topic acknowledged.
    public var deadLettered = 0

    public init() {}
    public var duplicates: Int { duplicatesLocal + duplicatesStore }
}

/// The dedup decisions of one worker, as a state machine with no I/O and no clock of its own:
/// the caller passes `now`, performs the store round trips the engine asks for, and feeds the
/// outcomes back. That keeps every decision testable with a fake store and a test clock.
///
/// Where a message with a new key can be, in order:
/// `claiming` (awaiting the claim round trip) → `buffered` (the window) → `inFlight` (handler)
/// → `confirming` (awaiting the confirm round trip) → resolved. A key pending under another
/// worker is `parked` and claimed again later. A repeat of a key in any of these places is
/// resolved locally as a duplicate.
public struct DedupEngine: Sendable {
    public enum Ingested: Sendable, Equatable {
        /// A new key: it will be claimed.
        case new(DedupKey)
        /// A repeat of a key this worker already holds; resolved.
        case localDuplicate(DedupKey)
        /// Could not be keyed; resolved (logged and counted by the caller).
        case bad(BadInput)
    }

    enum Place: Sendable {
        case claiming, buffered, parked, inFlight, confirming
    }

    struct Parked: Sendable {
        var message: InboundMessage
        var retryAt: ContinuousClock.Instant
    }

    public let settings: DedupSettings
    public private(set) var buffer: DelayBuffer
    public private(set) var offsets = OffsetTracker()
    public private(set) var counters = DedupCounters()

    private var places: [DedupKey: Place] = [:]
    private var claiming: [DedupKey: InboundMessage] = [:]
    private var claimOrder: [DedupKey] = []
    /// Token mode: new keys whose message's token is still to be used (then they join claimOrder).
    private var awaitingToken: [DedupKey: String] = [:]
    private var parked: [DedupKey: Parked] = [:]
    private var inFlight: [DedupKey: InboundMessage] = [:]
    private var confirming: [DedupKey: InboundMessage] = [:]
    /// When each buffered key's lease was last taken or extended, to renew it before it runs out.
    private var leaseTakenAt: [DedupKey: ContinuousClock.Instant] = [:]
    /// The same, in the order taken: the oldest leases are at the front, so finding the ones to
    /// renew costs only the ones due. Entries go stale (renewed again, or left the buffer) and
    /// are dropped when they reach the front.
    private var leaseOrder: Deque<(key: DedupKey, taken: ContinuousClock.Instant)> = []

    public init(settings: DedupSettings) {
        self.settings = settings
        self.buffer = DelayBuffer(
            window: settings.window,
            maxMessages: settings.bufferMaxMessages,
            maxBytes: settings.bufferMaxBytes
        )
    }

    // MARK: - 1-2. Consume and key

    /// Takes a consumed message: tracks its offset, computes its key, resolves repeats of keys
    /// this worker already holds.
    public mutating func ingest(_ message: InboundMessage) -> Ingested {
        counters.consumed += 1
        let tp = message.topicPartition
        offsets.track(tp, offset: message.offset)

        let key: DedupKey
        var token: String?
        do throws(BadInput) {
            if message.value.count > settings.maxMessageBytes {
                throw BadInput(
                    .tooLarge, "value is \(message.value.count) bytes, limit is \(settings.maxMessageBytes)")
            }
            key = DedupKey(raw: try settings.template.key(for: message), namespace: settings.namespace)
            token = try settings.token?.key(for: message)
        } catch {
            counters.invalid += 1
            if !settings.holdsDeadLetters { offsets.resolve(tp, offset: message.offset) }
            return .bad(error)
        }

        guard let place = places[key] else {
            places[key] = .claiming
            claiming[key] = message
            if let token {
                awaitingToken[key] = token
            } else {
                claimOrder.append(key)
            }
            return .new(key)
        }
        // A repeat of a key held here. `keep: last` swaps in the newer copy where that is still
        // possible (before dispatch); the copy that loses is resolved as a duplicate either way.
        var loser = message
        if settings.keep == .last {
            switch place {
            case .claiming:
                loser = claiming.updateValue(message, forKey: key)!
            case .parked:
                loser = parked[key]!.message
                parked[key]!.message = message
            case .buffered:
                loser = buffer.replace(key, with: message)!
            case .inFlight, .confirming:
                break
            }
        }
        counters.duplicatesLocal += 1
        offsets.resolve(loser.topicPartition, offset: loser.offset)
        return .localDuplicate(key)
    }

    // MARK: - 3. Claim

    /// Token mode: the tokens to use in the next round trip, with the marks of their messages.
    public func tokensToUse() -> (keys: [DedupKey], tokens: [String], marks: [String]) {
        var out: (keys: [DedupKey], tokens: [String], marks: [String]) = ([], [], [])
        for (key, token) in awaitingToken {
            out.keys.append(key)
            out.tokens.append(token)
            out.marks.append(TokenKey.mark(for: claiming[key]!))
        }
        return out
    }

    /// Applies the token store's answers: accepted keys go on to be claimed; the others are bad
    /// input with the token's reason, returned for the caller to log or dead-letter.
    public mutating func applyTokens(_ keys: [DedupKey], _ outcomes: [TokenOutcome]) -> [(BadInput, InboundMessage)] {
        precondition(keys.count == outcomes.count, "one outcome per key")
        var refused: [(BadInput, InboundMessage)] = []
        for (key, outcome) in zip(keys, outcomes) {
            guard let token = awaitingToken.removeValue(forKey: key), let message = claiming[key] else { continue }
            guard let reason = outcome.refusal else {
                claimOrder.append(key)
                continue
            }
            claiming[key] = nil
            places[key] = nil
            counters.invalid += 1
            if !settings.holdsDeadLetters { offsets.resolve(message.topicPartition, offset: message.offset) }
            refused.append((BadInput(reason, "token \(token) is \(reason.code.dropFirst("token_".count))"), message))
        }
        return refused
    }

    /// Keys to claim in the next round trip: new keys, parked keys whose retry time came, and
    /// buffered keys whose lease is half used (claiming a key this worker owns extends its lease,
    /// so renewals ride in the same pipelined round trip). Nothing moves until `applyClaims`, so
    /// a failed round trip simply leaves them here.
    public mutating func keysToClaim(now: ContinuousClock.Instant) -> [DedupKey] {
        var keys = claimOrder
        for (key, p) in parked where p.retryAt <= now { keys.append(key) }
        while let first = leaseOrder.first, leaseTakenAt[first.key] != first.taken {
            leaseOrder.removeFirst()
        }
        let renewBefore = now - settings.lease / 2
        for entry in leaseOrder {
            guard entry.taken <= renewBefore else { break }
            if leaseTakenAt[entry.key] == entry.taken { keys.append(entry.key) }
        }
        return keys
    }

    /// Applies the store's answers, in the order of `keys` from `keysToClaim`.
    public mutating func applyClaims(_ keys: [DedupKey], _ outcomes: [ClaimOutcome], now: ContinuousClock.Instant) {
        precondition(keys.count == outcomes.count, "one outcome per key")
        for (key, outcome) in zip(keys, outcomes) {
            let message: InboundMessage
            switch places[key] {
            case .claiming?: message = claiming.removeValue(forKey: key)!
            case .parked?: message = parked.removeValue(forKey: key)!.message
            case .buffered?:
                applyRenewal(key, outcome, now: now)
                continue
            default: continue  // revoked meanwhile
            }
            switch outcome {
            case .claimed, .alreadyOwned:
                // `alreadyOwned`: this worker claimed it before, e.g. its release failed when the
                // partition was revoked and then came back. It was never dispatched: buffer it.
                places[key] = .buffered
                takeLease(key, now: now)
                buffer.insert(key, message, now: now)
            case .done:
                places[key] = nil
                counters.duplicatesStore += 1
                offsets.resolve(message.topicPartition, offset: message.offset)
            case .pendingElsewhere:
                // A copy is in flight at another worker; its offset is not committed there, so
                // nothing is lost by waiting. Look again until it is done or its lease expires.
                places[key] = .parked
                counters.parked += 1
                parked[key] = Parked(message: message, retryAt: now + settings.parkRetry)
            }
        }
        let claimed = Set(keys)
        claimOrder.removeAll { claimed.contains($0) }
    }

    /// The answer to re-claiming a buffered key. Normally the lease is extended. If it had run
    /// out and another worker took the key meanwhile, this copy leaves the buffer: a duplicate
    /// if that worker is done, parked if its copy is still in flight.
    private mutating func applyRenewal(_ key: DedupKey, _ outcome: ClaimOutcome, now: ContinuousClock.Instant) {
        switch outcome {
        case .claimed, .alreadyOwned:
            takeLease(key, now: now)
            counters.renewed += 1
        case .done:
            guard let e = buffer.remove(key) else { return }
            places[key] = nil
            leaseTakenAt[key] = nil
            counters.leasesLost += 1
            counters.duplicatesStore += 1
            offsets.resolve(e.message.topicPartition, offset: e.message.offset)
        case .pendingElsewhere:
            guard let e = buffer.remove(key) else { return }
            leaseTakenAt[key] = nil
            counters.leasesLost += 1
            counters.parked += 1
            places[key] = .parked
            parked[key] = Parked(message: e.message, retryAt: now + settings.parkRetry)
        }
    }

    private mutating func takeLease(_ key: DedupKey, now: ContinuousClock.Instant) {
        leaseTakenAt[key] = now
        leaseOrder.append((key, now))
    }

    /// `on_store_error: fail_open`: the store did not answer, and the operator chose to let
    /// messages through unclaimed rather than stop. Dedup then rests on the window alone.
    public mutating func applyClaimsWithoutStore(_ keys: [DedupKey], now: ContinuousClock.Instant) {
        let fresh = keys.filter { places[$0] == .claiming || places[$0] == .parked }.count
        counters.unclaimed += fresh
        applyClaims(keys, Array(repeating: .claimed, count: keys.count), now: now)
    }

    public var parkedCount: Int { parked.count }

    // MARK: - 4-5. Delay buffer and dispatch

    /// Messages whose window has passed, now handed to the handler.
    public mutating func takeDue(now: ContinuousClock.Instant, limit: Int = .max) -> [Dispatch] {
        buffer.popDue(now: now, limit: limit).map { entry in
            places[entry.key] = .inFlight
            leaseTakenAt[entry.key] = nil
            inFlight[entry.key] = entry.message
            return Dispatch(key: entry.key, message: entry.message)
        }
    }

    /// The handler took the message: its key goes to the next confirm round trip.
    public mutating func dispatchSucceeded(_ key: DedupKey) {
        guard let message = inFlight.removeValue(forKey: key) else { return }
        places[key] = .confirming
        confirming[key] = message
        counters.dispatched += 1
    }

    /// The handler gave up after its last attempt. The offset is resolved (the caller has recorded
    /// the message and its reason) — or, with `holdsDeadLetters`, once the caller reports it
    /// dead-lettered — and the claim must be released so a corrected resend can pass.
    public mutating func dispatchFailed(_ key: DedupKey) {
        guard let message = inFlight.removeValue(forKey: key) else { return }
        places[key] = nil
        counters.failed += 1
        if !settings.holdsDeadLetters { offsets.resolve(message.topicPartition, offset: message.offset) }
    }

    /// With `holdsDeadLetters`: the dead-letter topic acknowledged this message (bad input or
    /// given up), so its offset is resolved. A message of a partition revoked meanwhile is ignored.
    public mutating func deadLettered(_ message: InboundMessage) {
        counters.deadLettered += 1
        offsets.resolve(message.topicPartition, offset: message.offset)
    }

    /// The handler never took the message (shutdown deadline): it is neither dispatched nor
    /// resolved, so its offset stays uncommitted and the claim must be released.
    public mutating func dispatchAbandoned(_ key: DedupKey) {
        guard inFlight.removeValue(forKey: key) != nil else { return }
        places[key] = nil
        counters.released += 1
    }

    public var inFlightCount: Int { inFlight.count }
    /// Dispatched messages whose keys are not yet confirmed in the store.
    public var confirmingCount: Int { confirming.count }

    // MARK: - 6. Confirm

    public func keysToConfirm() -> [DedupKey] { Array(confirming.keys) }

    public mutating func applyConfirms(_ keys: [DedupKey], _ outcomes: [ConfirmOutcome]) {
        precondition(keys.count == outcomes.count, "one outcome per key")
        for (key, outcome) in zip(keys, outcomes) {
            guard let message = confirming.removeValue(forKey: key) else { continue }
            places[key] = nil
            if case .notOwner = outcome { counters.confirmConflicts += 1 }
            offsets.resolve(message.topicPartition, offset: message.offset)
        }
    }

    // MARK: - 7. Commit

    /// Commit positions that advanced since the last call.
    public mutating func takeCommitPositions() -> [TopicPartition: Int64] {
        offsets.takeCommitPositions()
    }

    // MARK: - Rebalance and shutdown

    /// Partitions were taken away. Their waiting messages are dropped here without storing an
    /// offset, so the partition's next owner reads them again; returns the keys whose claims this
    /// worker must release so that owner can claim them at once.
    public mutating func revoke(_ partitions: Set<TopicPartition>) -> [DedupKey] {
        let removed = buffer.removeAll(in: partitions)
        for e in removed {
            places[e.key] = nil
            leaseTakenAt[e.key] = nil
        }
        for (key, m) in claiming where partitions.contains(m.topicPartition) {
            claiming[key] = nil
            places[key] = nil
            awaitingToken[key] = nil
        }
        claimOrder.removeAll { claiming[$0] == nil }
        for (key, p) in parked where partitions.contains(p.message.topicPartition) {
            parked[key] = nil
            places[key] = nil
        }
        for tp in partitions { offsets.forget(tp) }
        counters.released += removed.count
        return removed.map(\.key)
    }

    /// Shutdown: everything still waiting (claiming, in the window, parked) is given back: claims
    /// released, offsets not stored, so that the next worker dispatches it. Take the commit
    /// positions first; this forgets the partitions it drains.
    public mutating func drainForShutdown() -> [DedupKey] {
        var partitions = Set(claiming.values.map(\.topicPartition))
        partitions.formUnion(parked.values.map(\.message.topicPartition))
        partitions.formUnion(buffer.partitions)
        return revoke(partitions)
    }

    // MARK: - State

    /// Whether this worker currently holds the key anywhere (claiming, window, handler, confirm).
    public func isHolding(_ key: DedupKey) -> Bool { places[key] != nil }

    /// Nothing is waiting anywhere: safe to stop when idle.
    public var isIdle: Bool { places.isEmpty }

    /// When the caller must act again even if no message arrives.
    public var nextWakeup: ContinuousClock.Instant? {
        var t = buffer.nextDeadline
        for p in parked.values where t == nil || p.retryAt < t! { t = p.retryAt }
        return t
    }

    /// Backpressure: pause the partitions while this is true.
    public var shouldPause: Bool { buffer.isFull || parked.count >= settings.bufferMaxMessages }
    /// Resume once the buffer has drained well below its bounds.
    public var canResume: Bool { buffer.hasRoom && parked.count < settings.bufferMaxMessages / 2 }
}
