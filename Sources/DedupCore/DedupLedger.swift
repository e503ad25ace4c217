import DequeModule

/// Keys this ledger sent to the store in one request, under the ticket that names the request.
/// The answer is applied with the same value: an entry takes an answer only while it still waits
/// on that ticket, so an answer for an entry that was revoked, resolved, re-ingested or already
/// answered is recognised as stale here.
public struct LedgerRequest: Sendable, Equatable {
    public let ticket: UInt64
    public var keys: [DedupKey]
    /// How many of `keys` renew the lease of a buffered key (claiming a key this worker owns
    /// extends its lease, so renewals ride in the claim round trip).
    public var renewals: Int

}

extension LedgerRequest: RandomAccessCollection {
    public var startIndex: Int { keys.startIndex }
    public var endIndex: Int { keys.endIndex }
    public subscript(i: Int) -> DedupKey { keys[i] }
}

/// Where every key of one worker is, and the decisions about one key: keying, local repeats, what
/// to claim, what a claim or confirm answer means, the delay buffer, the offsets that became
/// safe. No I/O and no clock of its own (the caller passes `now`). `DedupEngine` drives it: it
/// decides when requests go out and feeds their answers back.
///
/// Where a message with a new key can be, in order:
/// `claiming` (awaiting the claim round trip) → `buffered` (the window) → `inFlight` (handler)
/// → `confirming` (awaiting the confirm round trip) → resolved. A key pending under another
/// worker is `parked` and claimed again later. A repeat of a key in any of these places is
/// resolved locally as a duplicate.
///
/// Each key has one `Entry` that moves from place to place, so a message costs one dictionary
/// entry for its whole stay, not one per place. Several routes share one ledger: each entry
/// carries its route, whose settings (key, window, lease, retention, keep, token) apply to it,
/// and offsets are tracked per partition across routes, so a commit never passes a message
/// still waiting in any route.
public struct DedupLedger: Sendable {
    public enum Ingested: Sendable, Equatable {
        /// A new key: it will be claimed.
        case new(DedupKey)
        /// A repeat of a key this worker already holds; resolved.
        case localDuplicate(DedupKey)
        /// Could not be keyed (or no route takes it); resolved or held for the dead-letter topic.
        case bad(BadInput)
    }

    enum Place: UInt8, Sendable {
        case awaitingToken, claiming, buffered, parked, inFlight, confirming
    }

    struct Entry: Sendable {
        var place: Place
        var route: Int
        var message: InboundMessage
        var size: Int
        /// `buffered`: when the window ends; `parked`: when to claim again.
        var deadline: ContinuousClock.Instant
        /// `buffered`: when its lease was last taken or extended, to renew it before it runs out.
        var leaseTakenAt: ContinuousClock.Instant?
        /// Token mode, `awaitingToken`: the token to use.
        var token: String?
        /// The ticket of the store request this entry waits on; 0 while it waits on none. Tickets
        /// are never reused, so an entry created again for the same key never matches an old one.
        var awaiting: UInt64 = 0

        /// What a free slot of `EntryTable` holds: no buffers to keep alive.
        static let vacant = Entry(
            place: .claiming, route: 0, message: InboundMessage(topic: "", partition: 0, offset: 0, value: []),
            size: 0, deadline: ContinuousClock.Instant.now, leaseTakenAt: nil, token: nil)
    }

    /// The default route's settings; its size and buffer bounds apply to the whole worker.
    public let settings: DedupSettings
    public let routing: Routing
    /// Settings by route index: 0 is the default route, i the i-th named route.
    public let routeSettings: [DedupSettings]
    public private(set) var buffer: DelayBuffer
    public private(set) var offsets = OffsetTracker()
    public private(set) var counters = DedupCounters()

    private var entries = EntryTable()
    /// New keys waiting for their claim to be sent, in arrival order.
    private var claimOrder: [DedupKey] = []
    /// Token mode: new keys whose message's token is still to be used (then they join claimOrder).
    private var awaitingToken: [DedupKey] = []
    private var parkedKeys: Set<DedupKey> = []
    /// Dispatched keys whose confirm is still to be sent.
    private var confirming: [DedupKey] = []
    /// Dispatched keys not yet confirmed (sent or not).
    public private(set) var confirmingCount = 0
    public private(set) var inFlightCount = 0
    /// Buffered leases in the order taken: the oldest are at the front, so finding the ones to
    /// renew costs only the ones due. Entries go stale (renewed again, or left the buffer) and
    /// are dropped when they reach the front.
    private var leaseOrder: Deque<(key: DedupKey, taken: ContinuousClock.Instant)> = []
    private var lastTicket: UInt64 = 0

    public init(settings: DedupSettings, routing: Routing = Routing()) {
        self.settings = settings
        self.routing = routing
        self.routeSettings = [settings] + routing.routes.map(\.settings)
        self.buffer = DelayBuffer(
            lanes: routeSettings.count, maxMessages: settings.bufferMaxMessages, maxBytes: settings.bufferMaxBytes)
    }

    var hasRoutes: Bool { routeSettings.count > 1 }

    /// A ticket no request had before.
    public mutating func newTicket() -> UInt64 {
        lastTicket += 1
        return lastTicket
    }

    // MARK: - 1-2. Consume and key

    /// Takes a consumed message: tracks its offset, picks its route, computes its key, resolves
    /// repeats of keys this worker already holds.
    public mutating func ingest(_ message: InboundMessage) -> Ingested {
        counters.consumed += 1
        let tp = message.topicPartition
        offsets.track(tp, offset: message.offset)

        let key: DedupKey
        let route: Int
        var token: String?
        do throws(BadInput) {
            if message.value.count > settings.maxMessageBytes {
                throw BadInput(
                    .tooLarge, "value is \(message.value.count) bytes, limit is \(settings.maxMessageBytes)")
            }
            guard let r = hasRoutes || routing.unmatched != .default ? routing.route(for: message) : 0 else {
                throw BadInput(.noRoute, "no route matches (routes: \(routing.routes.map(\.name).joined(separator: ", ")))")
            }
            route = r
            let s = routeSettings[r]
            key = DedupKey(raw: try s.template.key(for: message), namespace: s.namespace)
            token = try s.token?.key(for: message)
        } catch {
            counters.invalid += 1
            if !settings.holdsDeadLetters { offsets.resolve(tp, offset: message.offset) }
            return .bad(error)
        }

        guard let i = entries.index(forKey: key) else {
            let place: Place = token == nil ? .claiming : .awaitingToken
            entries.insertNew(Entry(
                place: place, route: route, message: message, size: message.approximateSize,
                deadline: .now, leaseTakenAt: nil, token: token), for: key)
            if token == nil { claimOrder.append(key) } else { awaitingToken.append(key) }
            return .new(key)
        }
        // A repeat of a key held here. `keep: last` swaps in the newer copy where that is still
        // possible (before dispatch); the copy that loses is resolved as a duplicate either way.
        var loser = message
        if routeSettings[entries.values[i].route].keep == .last {
            switch entries.values[i].place {
            case .awaitingToken, .claiming, .parked, .buffered:
                let size = message.approximateSize
                if entries.values[i].place == .buffered { buffer.resized(by: size - entries.values[i].size) }
                loser = entries.values[i].message
                entries.values[i].message = message
                entries.values[i].size = size
            case .inFlight, .confirming:
                break
            }
        }
        counters.duplicatesLocal += 1
        offsets.resolve(loser.topicPartition, offset: loser.offset)
        return .localDuplicate(key)
    }

    // MARK: - 3. Claim

    /// Token mode: the tokens to use in the next round trip (their Redis keys, in each route's
    /// namespace), with the marks of their messages. They wait on `request.ticket` until answered.
    public mutating func tokensToUse() -> (keys: LedgerRequest, storeKeys: [String], marks: [String]) {
        let ticket = newTicket()
        var out: (keys: LedgerRequest, storeKeys: [String], marks: [String]) = (
            LedgerRequest(ticket: ticket, keys: [], renewals: 0), [], []
        )
        for key in awaitingToken {
            guard let i = entries.index(forKey: key), entries.values[i].awaiting == 0, let token = entries.values[i].token else {
                continue
            }
            entries.values[i].awaiting = ticket
            let e = entries.values[i]
            out.keys.keys.append(key)
            out.storeKeys.append(TokenKey.storeKey(token, namespace: routeSettings[e.route].namespace))
            out.marks.append(TokenKey.mark(for: e.message))
        }
        return out
    }

    /// Applies the token store's answers: accepted keys go on to be claimed; the others are bad
    /// input with the token's reason, returned for the caller to log or dead-letter. A key that
    /// no longer waits on this request (revoked meanwhile) is left alone.
    public mutating func applyTokens(_ request: LedgerRequest, _ outcomes: [TokenOutcome]) -> [(BadInput, InboundMessage)] {
        precondition(request.keys.count == outcomes.count, "one outcome per key")
        var refused: [(BadInput, InboundMessage)] = []
        for (key, outcome) in zip(request.keys, outcomes) {
            guard let i = entries.index(forKey: key), entries.values[i].awaiting == request.ticket,
                entries.values[i].place == .awaitingToken
            else { continue }
            entries.values[i].awaiting = 0
            let token = entries.values[i].token ?? ""
            guard let reason = outcome.refusal else {
                entries.values[i].place = .claiming
                entries.values[i].token = nil
                claimOrder.append(key)
                continue
            }
            let message = entries.remove(at: i).value.message
            counters.invalid += 1
            if !settings.holdsDeadLetters { offsets.resolve(message.topicPartition, offset: message.offset) }
            refused.append((BadInput(reason, "token \(token) is \(reason.code.dropFirst("token_".count))"), message))
        }
        awaitingToken.removeAll { [entries] in Self.place($0, in: entries) != .awaitingToken }
        return refused
    }

    /// The token round trip failed: its keys wait for the next one.
    public mutating func requestFailed(_ request: LedgerRequest) {
        var reclaim: [DedupKey] = []
        var reconfirm: [DedupKey] = []
        for key in request.keys {
            guard let i = entries.index(forKey: key), entries.values[i].awaiting == request.ticket else { continue }
            entries.values[i].awaiting = 0
            switch entries.values[i].place {
            case .claiming: reclaim.append(key)
            case .confirming: reconfirm.append(key)
            default: break
            }
        }
        if !reclaim.isEmpty { claimOrder.insert(contentsOf: reclaim, at: 0) }
        if !reconfirm.isEmpty { confirming.insert(contentsOf: reconfirm, at: 0) }
    }

    /// Keys to claim in the next round trip: new keys, parked keys whose retry time came, and
    /// buffered keys whose lease is half used (claiming a key this worker owns extends its lease,
    /// so renewals ride in the same pipelined round trip). A key already waiting on a request is
    /// not asked again. With several routes the keys come grouped by route, so `storeGroups`
    /// cuts them into few groups.
    public mutating func keysToClaim(now: ContinuousClock.Instant) -> LedgerRequest {
        var keys = claimOrder
        claimOrder.removeAll(keepingCapacity: true)
        for key in parkedKeys {
            if let i = entries.index(forKey: key), entries.values[i].awaiting == 0, entries.values[i].deadline <= now {
                keys.append(key)
            }
        }
        while let first = leaseOrder.first, leaseTaken(first.key) != first.taken {
            leaseOrder.removeFirst()
        }
        var renewals = 0
        for entry in leaseOrder {
            guard let i = entries.index(forKey: entry.key), entries.values[i].leaseTakenAt == entry.taken else { continue }
            // Leases differ per route, so a young lease of one route may precede an old one of
            // another: with routes the whole queue is looked at (it is ordered by time taken).
            guard entry.taken <= now - routeSettings[entries.values[i].route].lease / 2 else {
                if hasRoutes { continue } else { break }
            }
            guard entries.values[i].awaiting == 0 else { continue }
            keys.append(entry.key)
            renewals += 1
        }
        let ticket = keys.isEmpty ? 0 : newTicket()
        for key in keys {
            if let i = entries.index(forKey: key) { entries.values[i].awaiting = ticket }
        }
        return LedgerRequest(ticket: ticket, keys: groupedByRoute(keys), renewals: renewals)
    }

    /// Whether a buffered key's lease is half used and its renewal not yet sent.
    public mutating func renewalDue(now: ContinuousClock.Instant) -> Bool {
        while let first = leaseOrder.first, leaseTaken(first.key) != first.taken {
            leaseOrder.removeFirst()
        }
        for entry in leaseOrder {
            guard let i = entries.index(forKey: entry.key), entries.values[i].leaseTakenAt == entry.taken else { continue }
            guard entry.taken <= now - routeSettings[entries.values[i].route].lease / 2 else {
                if hasRoutes { continue } else { return false }
            }
            if entries.values[i].awaiting == 0 { return true }
        }
        return false
    }

    /// The store keys of `keys` cut into groups of one time to live (`\.lease` for claims,
    /// `\.retention` for confirms), in the order of `keys`, for one round trip.
    public func storeGroups(_ keys: [DedupKey], ttl: KeyPath<DedupSettings, Duration>) -> [KeyGroup] {
        guard hasRoutes else {
            return keys.isEmpty ? [] : [KeyGroup(keys.map(\.storeKey), ttl: settings[keyPath: ttl], layout: settings.doneLayout)]
        }
        var groups: [KeyGroup] = []
        for key in keys {
            let s = routeSettings[route(key)]
            let t = s[keyPath: ttl], layout = s.doneLayout
            if groups.last?.ttl == t, groups.last?.layout == layout {
                groups[groups.count - 1].keys.append(key.storeKey)
            } else {
                groups.append(KeyGroup([key.storeKey], ttl: t, layout: layout))
            }
        }
        return groups
    }

    /// Where each key's pending claim is in the store: its store key in the keys layout, its own
    /// pending key in the compact layout (what a release deletes).
    public func pendingStoreKeys(_ keys: [DedupKey]) -> [String] {
        keys.map { key in
            switch (hasRoutes ? routeSettings[route(key)] : settings).doneLayout {
            case .keys: key.storeKey
            case .compact(let records): records.placement(of: key.storeKey).pendingKey
            }
        }
    }

    private func groupedByRoute(_ keys: [DedupKey]) -> [DedupKey] {
        guard hasRoutes, keys.count > 1 else { return keys }
        return keys.map { (key: $0, route: route($0)) }.enumerated()
            .sorted { ($0.element.route, $0.offset) < ($1.element.route, $1.offset) }.map(\.element.key)
    }

    /// Applies the store's answers to `request`, in the order of its keys. An answer applies
    /// only to an entry that still waits on this request; any other answer is stale (the entry
    /// was revoked, resolved or created again since) and changes nothing here. Returns the keys
    /// the store says this worker now holds although nothing here waits on them any more: they
    /// are to be released.
    @discardableResult
    public mutating func applyClaims(_ request: LedgerRequest, _ outcomes: [ClaimOutcome], now: ContinuousClock.Instant) -> [DedupKey] {
        precondition(request.keys.count == outcomes.count, "one outcome per key")
        var orphans: [DedupKey] = []
        for (key, outcome) in zip(request.keys, outcomes) {
            guard let i = entries.index(forKey: key), entries.values[i].awaiting == request.ticket else {
                switch outcome {
                case .claimed, .alreadyOwned: if entries.index(forKey: key) == nil { orphans.append(key) }
                case .done, .pendingElsewhere: break
                }
                continue
            }
            entries.values[i].awaiting = 0
            switch entries.values[i].place {
            case .claiming: break
            case .parked: parkedKeys.remove(key)
            case .buffered:
                applyRenewal(at: i, key, outcome, now: now)
                continue
            case .awaitingToken, .inFlight, .confirming: continue
            }
            switch outcome {
            case .claimed, .alreadyOwned:
                // `alreadyOwned`: this worker claimed it before, e.g. its release failed when the
                // partition was revoked and then came back. It was never dispatched: buffer it.
                let route = entries.values[i].route
                let deadline = now + routeSettings[route].window
                entries.values[i].place = .buffered
                entries.values[i].deadline = deadline
                entries.values[i].leaseTakenAt = now
                leaseOrder.append((key, now))
                buffer.add(key, lane: route, deadline: deadline, size: entries.values[i].size)
            case .done:
                let message = entries.remove(at: i).value.message
                counters.duplicatesStore += 1
                offsets.resolve(message.topicPartition, offset: message.offset)
            case .pendingElsewhere:
                // A copy is in flight at another worker; its offset is not committed there, so
                // nothing is lost by waiting. Look again until it is done or its lease expires.
                park(at: i, key, now: now)
            }
        }
        return orphans
    }

    private mutating func park(at i: Int, _ key: DedupKey, now: ContinuousClock.Instant) {
        entries.values[i].place = .parked
        entries.values[i].deadline = now + settings.parkRetry
        entries.values[i].leaseTakenAt = nil
        parkedKeys.insert(key)
        counters.parked += 1
    }

    /// The answer to re-claiming a buffered key. Normally the lease is extended. If it had run
    /// out and another worker took the key meanwhile, this copy leaves the buffer: a duplicate
    /// if that worker is done, parked if its copy is still in flight.
    private mutating func applyRenewal(
        at i: Int, _ key: DedupKey, _ outcome: ClaimOutcome, now: ContinuousClock.Instant
    ) {
        switch outcome {
        case .claimed, .alreadyOwned:
            entries.values[i].leaseTakenAt = now
            leaseOrder.append((key, now))
            counters.renewed += 1
        case .done:
            let e = entries.remove(at: i).value
            buffer.removed(size: e.size)
            counters.leasesLost += 1
            counters.duplicatesStore += 1
            offsets.resolve(e.message.topicPartition, offset: e.message.offset)
        case .pendingElsewhere:
            buffer.removed(size: entries.values[i].size)
            counters.leasesLost += 1
            park(at: i, key, now: now)
        }
    }

    /// `on_store_error: fail_open`: the store did not answer, and the operator chose to let
    /// messages through unclaimed rather than stop. Dedup then rests on the window alone.
    public mutating func applyClaimsWithoutStore(_ request: LedgerRequest, now: ContinuousClock.Instant) {
        counters.unclaimed += request.keys.filter { key in
            guard let i = entries.index(forKey: key), entries.values[i].awaiting == request.ticket else { return false }
            return entries.values[i].place == .claiming || entries.values[i].place == .parked
        }.count
        applyClaims(request, Array(repeating: .claimed, count: request.keys.count), now: now)
    }

    public var parkedCount: Int { parkedKeys.count }

    // MARK: - 4-5. Delay buffer and dispatch

    // Lookups read fields in place (`index(forKey:)`, then `values[i]`, an array element): a
    // copy of the entry would retain every buffer of its message on each look.
    private func place(_ key: DedupKey) -> Place? { Self.place(key, in: entries) }

    private static func place(_ key: DedupKey, in entries: EntryTable) -> Place? {
        guard let i = entries.index(forKey: key) else { return nil }
        return entries.values[i].place
    }

    private func route(_ key: DedupKey) -> Int {
        guard let i = entries.index(forKey: key) else { return 0 }
        return entries.values[i].route
    }

    private func leaseTaken(_ key: DedupKey) -> ContinuousClock.Instant? {
        guard let i = entries.index(forKey: key) else { return nil }
        return entries.values[i].leaseTakenAt
    }

    private static func isLive(_ slot: DelayBuffer.Slot, in entries: EntryTable) -> Bool {
        guard let i = entries.index(forKey: slot.key) else { return false }
        return entries.values[i].place == .buffered && entries.values[i].deadline == slot.deadline
    }

    private func isLive(_ slot: DelayBuffer.Slot) -> Bool { Self.isLive(slot, in: entries) }

    /// The earliest moment a buffered message becomes due.
    public var nextDeadline: ContinuousClock.Instant? { buffer.nextDeadline(isLive: isLive) }

    /// Messages whose window has passed, now handed to the handler.
    public mutating func takeDue(now: ContinuousClock.Instant, limit: Int = .max) -> [Dispatch] {
        let slots: [DelayBuffer.Slot]
        do {
            // A scoped copy for the check (the buffer is mutated meanwhile, so it cannot read
            // `self`); it ends before `entries` is mutated below, which then needs no copy.
            let entries = self.entries
            slots = buffer.popDue(now: now, limit: limit) { Self.isLive($0, in: entries) }
        }
        var due: [Dispatch] = []
        due.reserveCapacity(slots.count)
        for slot in slots {
            let i = self.entries.index(forKey: slot.key)!
            self.entries.values[i].place = .inFlight
            self.entries.values[i].leaseTakenAt = nil
            buffer.removed(size: self.entries.values[i].size)
            // The message moves to the handler; the entry keeps only where it came from (for its
            // offset and a revocation), so no buffer of it is retained twice.
            var message = InboundMessage(
                topic: self.entries.values[i].message.topic, partition: self.entries.values[i].message.partition,
                offset: self.entries.values[i].message.offset, value: [])
            swap(&message, &self.entries.values[i].message)
            due.append(Dispatch(key: slot.key, message: message, route: self.entries.values[i].route))
        }
        inFlightCount += due.count
        return due
    }

    /// The handler took the message: its key goes to the next confirm round trip.
    public mutating func dispatchSucceeded(_ key: DedupKey) {
        guard let i = entries.index(forKey: key), entries.values[i].place == .inFlight else { return }
        entries.values[i].place = .confirming
        confirming.append(key)
        confirmingCount += 1
        inFlightCount -= 1
        counters.dispatched += 1
    }

    /// The handler gave up after its last attempt. The offset is resolved (the caller has recorded
    /// the message and its reason) — or, with `holdsDeadLetters`, once the caller reports it
    /// dead-lettered — and the claim must be released so a corrected resend can pass.
    public mutating func dispatchFailed(_ key: DedupKey) {
        guard let i = entries.index(forKey: key), entries.values[i].place == .inFlight else { return }
        let message = entries.remove(at: i).value.message
        inFlightCount -= 1
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
        guard let i = entries.index(forKey: key), entries.values[i].place == .inFlight else { return }
        entries.remove(at: i)
        inFlightCount -= 1
        counters.released += 1
    }

    // MARK: - 6. Confirm

    /// Dispatched keys whose confirm is not sent yet, grouped by route (see
    /// `storeGroups(_:ttl: \.retention)`); they wait on `ticket` until answered.
    public mutating func keysToConfirm() -> LedgerRequest {
        let keys = groupedByRoute(confirming)
        confirming.removeAll(keepingCapacity: true)
        let ticket = keys.isEmpty ? 0 : newTicket()
        for key in keys {
            if let i = entries.index(forKey: key) { entries.values[i].awaiting = ticket }
        }
        return LedgerRequest(ticket: ticket, keys: keys, renewals: 0)
    }

    /// Whether a confirm is still to be sent.
    public var hasConfirmsToSend: Bool { !confirming.isEmpty }

    /// Resolves the keys the store confirmed. Returns the keys another owner held (the lease ran
    /// out while the copy was in the handler), for the caller to report.
    @discardableResult
    public mutating func applyConfirms(_ request: LedgerRequest, _ outcomes: [ConfirmOutcome]) -> [(DedupKey, String)] {
        precondition(request.keys.count == outcomes.count, "one outcome per key")
        var conflicts: [(DedupKey, String)] = []
        for (key, outcome) in zip(request.keys, outcomes) {
            guard let i = entries.index(forKey: key), entries.values[i].awaiting == request.ticket,
                entries.values[i].place == .confirming
            else { continue }
            let message = entries.remove(at: i).value.message
            confirmingCount -= 1
            if case .notOwner(let other) = outcome {
                counters.confirmConflicts += 1
                conflicts.append((key, other))
            }
            offsets.resolve(message.topicPartition, offset: message.offset)
        }
        return conflicts
    }

    // MARK: - 7. Commit

    /// Commit positions that advanced since the last call.
    public mutating func takeCommitPositions() -> [TopicPartition: Int64] {
        offsets.takeCommitPositions()
    }

    // MARK: - Rebalance and shutdown

    /// Partitions were taken away. Their waiting messages are dropped here without storing an
    /// offset, so the partition's next owner reads them again; returns the keys whose claims this
    /// worker must release so that owner can claim them at once. Messages in a handler or
    /// awaiting their confirm stay: the round is not interrupted. Answers still on their way for
    /// the dropped entries find nothing waiting on them.
    public mutating func revoke(_ partitions: Set<TopicPartition>) -> [DedupKey] {
        var released: [(key: DedupKey, deadline: ContinuousClock.Instant)] = []
        var dropped: [DedupKey] = []
        for (key, e) in entries.all where partitions.contains(e.message.topicPartition) {
            switch e.place {
            case .buffered:
                released.append((key, e.deadline))
                buffer.removed(size: e.size)
                dropped.append(key)
            case .awaitingToken, .claiming, .parked:
                dropped.append(key)
            case .inFlight, .confirming:
                continue
            }
        }
        for key in dropped { entries.removeValue(forKey: key) }
        if !dropped.isEmpty {
            claimOrder.removeAll { [entries] in Self.place($0, in: entries) == nil }
            awaitingToken.removeAll { [entries] in Self.place($0, in: entries) == nil }
            parkedKeys = parkedKeys.filter { place($0) != nil }
        }
        if buffer.isEmpty { buffer.clearSlots() }
        // Shutdown counts too: its partitions move to another worker in a rebalance.
        for tp in partitions { counters.rereadAfterRebalance += offsets.forget(tp) }
        counters.released += released.count
        return released.sorted { $0.deadline < $1.deadline }.map(\.key)
    }

    /// Shutdown: everything still waiting (claiming, in the window, parked) is given back: claims
    /// released, offsets not stored, so that the next worker dispatches it. Take the commit
    /// positions first; this forgets the partitions it drains.
    public mutating func drainForShutdown() -> [DedupKey] {
        var partitions = Set<TopicPartition>()
        for e in entries.entries where e.place != .inFlight && e.place != .confirming {
            partitions.insert(e.message.topicPartition)
        }
        return revoke(partitions)
    }

    // MARK: - State

    /// Whether this worker currently holds the key anywhere (claiming, window, handler, confirm).
    public func isHolding(_ key: DedupKey) -> Bool { entries.index(forKey: key) != nil }

    /// Nothing is waiting anywhere: safe to stop when idle.
    public var isIdle: Bool { entries.isEmpty }

    /// When something here becomes due even if no message arrives: a window ends, or a parked
    /// key is to be claimed again.
    public var nextWakeup: ContinuousClock.Instant? {
        var t = nextDeadline
        for key in parkedKeys {
            guard let i = entries.index(forKey: key), entries.values[i].awaiting == 0 else { continue }
            let retry = entries.values[i].deadline
            if t == nil || retry < t! { t = retry }
        }
        return t
    }

    /// Backpressure: pause the partitions while this is true.
    public var shouldPause: Bool { buffer.isFull || parkedKeys.count >= settings.bufferMaxMessages }
    /// Resume once the buffer has drained well below its bounds.
    public var canResume: Bool { buffer.hasRoom && parkedKeys.count < settings.bufferMaxMessages / 2 }
}
