import DequeModule

/// Keys this ledger sent to the store in one request, under the ticket that names the request.
/// The answer is applied with the same value: an entry takes an answer only while it still waits
/// on that ticket, so an answer for an entry that was revoked, resolved, re-ingested or already
/// answered is recognised as stale here.
public struct LedgerRequest: Sendable, Equatable {
    public let ticket: UInt64
    /// Set only through `append` (and `init`), so `digests` stays in step with it.
    public internal(set) var keys: [DedupKey]
    /// How many of `keys` renew the lease of a buffered key (claiming a key this worker owns
    /// extends its lease, so renewals ride in the claim round trip).
    public var renewals: Int
    /// Guard: the keys of `keys` whose message holds (claims) or moves (confirms) its entity in
    /// the same round trip, in the order of `keys`, and those steps.
    public var holdKeys: [DedupKey] = []
    public var holds: [EntityStep] = []
    /// The entry each key was sent for, in the order of `keys`: the answers find it without a
    /// look-up (`DedupLedger.waiting`).
    var refs: [EntryRef] = []
    /// Each key's digest when its route keeps the compact layout (`Entry.digest`), in the order
    /// of `keys`: the store names the key's records from it without hashing the key again.
    var digests: [KeyDigest?] = []

    init(ticket: UInt64, keys: [DedupKey] = [], renewals: Int = 0) {
        self.ticket = ticket
        self.keys = keys
        self.renewals = renewals
        digests = Array(repeating: nil, count: keys.count)
    }

    /// A key and the entry it was sent for. The key is moved in: a copy would retain its string
    /// once more.
    @inline(__always)
    mutating func append(_ key: consuming DedupKey, _ ref: EntryRef, digest: KeyDigest? = nil) {
        keys.append(key)
        refs.append(ref)
        digests.append(digest)
    }
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
        /// Guard: an earlier message of the same entity is still on its way here; this one is
        /// claimed once that one is resolved (transitions are judged in offset order).
        case awaitingEntity
    }

    /// A guarded message's part in its entity's state machine.
    struct GuardStep: Sendable {
        /// The entity's store key, and the entity as the template read it (for logs).
        var entityKey: String
        var entity: String
        /// The state the message asks for.
        var target: String
        /// The ticket of the claim request that last asked for the entity (the hold's attempt).
        var attempt: UInt64 = 0
        /// The store said the entity is held for this attempt.
        var held = false
        /// The transition was not allowed: the message is confirmed (a repeat of it is a
        /// duplicate) without being dispatched, and its entity does not move.
        var rejected = false
        /// Rejected and on its way to the dead-letter topic, whose acknowledgement resolves it.
        var deadLettered = false
    }

    /// A message whose transition was not allowed: resolved without dispatch.
    public struct Rejection: Sendable {
        public var key: DedupKey
        public var message: InboundMessage
        public var route: Int
        public var entity: String
        /// The recorded state (nil: none).
        public var from: String?
        public var to: String
        /// It goes to the dead-letter topic (`on_reject: dead_letter` with a topic configured).
        public var deadLetter: Bool
    }

    struct Entry: Sendable {
        var place: Place
        var route: Int
        var message: InboundMessage
        var size: Int
        /// `buffered`: when the window ends; `parked`: when to claim again; `claiming` straight
        /// from a poll: when its window ends, counted from the poll (claims may wait
        /// `DedupEngine.Options.claimGather` before they go out, and that wait is the window's).
        var deadline: Moment
        /// `buffered`: when its lease was last taken or extended, to renew it before it runs out.
        var leaseTakenAt: Moment?
        /// Token mode, `awaitingToken`: the token to use.
        var token: String?
        /// The ticket of the store request this entry waits on; 0 while it waits on none. Tickets
        /// are never reused, so an entry created again for the same key never matches an old one.
        var awaiting: UInt64 = 0
        /// Guard: the message's step; nil on routes without a guard.
        var step: GuardStep? = nil
        /// The store key's SHA-256 digest on a compact route, taken once when the key's first
        /// message arrives, so its claims and confirms do not hash it again.
        var digest: KeyDigest? = nil

        /// The `deadline` of an entry in a place where nothing reads it (waiting for its entity
        /// or its token, with a handler, being confirmed): a constant, so taking in a message
        /// does not read the clock.
        static let noDeadline = Moment(.now)

        /// What a free slot of `EntryTable` holds: no buffers to keep alive. Made anew each time:
        /// a copy of a stored one retained its empty buffers, per removed entry.
        static var vacant: Entry {
            Entry(
                place: .claiming, route: 0, message: InboundMessage(topic: "", partition: 0, offset: 0, bytes: .empty),
                size: 0, deadline: noDeadline, leaseTakenAt: nil, token: nil)
        }
    }

    /// The default route's settings; its size and buffer bounds apply to the whole worker.
    public let settings: DedupSettings
    public let routing: Routing
    /// Settings by route index: 0 is the default route, i the i-th named route.
    public let routeSettings: [DedupSettings]
    /// Half of each route's lease: a buffered key's lease is renewed once this much has passed.
    private let halfLeases: [Duration]
    public private(set) var buffer: DelayBuffer
    public private(set) var offsets = OffsetTracker()
    public private(set) var counters = DedupCounters()

    private var entries = EntryTable()
    /// New entries waiting for their claim to be sent, in arrival order.
    private var claimOrder: [EntryRef] = []
    /// Keys waiting for their claim to be sent (new, or again after a failed round trip).
    public var keysToClaimCount: Int { claimOrder.count }
    /// Token mode: new keys whose message's token is still to be used (then they join claimOrder).
    private var awaitingToken: [DedupKey] = []
    private var parkedKeys: Set<DedupKey> = []
    /// Dispatched entries whose confirm is still to be sent.
    private var confirming: [EntryRef] = []
    /// Dispatched keys not yet confirmed (sent or not).
    public private(set) var confirmingCount = 0
    public private(set) var inFlightCount = 0
    /// Buffered leases in the order taken: the oldest are at the front, so finding the ones to
    /// renew costs only the ones due. Entries go stale (renewed again, or left the buffer) and
    /// are dropped when they reach the front.
    private var leaseOrder: Deque<LeaseMark> = []
    /// A struct rather than a tuple: a tuple holding a key is copied and destroyed through the
    /// runtime's generic tuple witnesses, several times per message in the scans below.
    private struct LeaseMark {
        var entry: EntryRef
        var taken: Moment
    }
    private var lastTicket: UInt64 = 0
    /// Guard: per entity (store key), the keys of its messages here in arrival order; the first
    /// is the one being judged or dispatched, the rest wait (`awaitingEntity`).
    private var entityLines: [String: Deque<DedupKey>] = [:]
    private var awaitingEntityCount = 0
    /// Guard: holds to give back (their message left without moving its entity), and messages
    /// whose transition was rejected, for the caller to take.
    private var unholds: [EntityStep] = []
    private var rejections: [Rejection] = []
    /// Hashes a compact route's new key once, when its first message arrives (`DedupEngine.Options.keyDigest`).
    private let keyDigest: @Sendable (String) -> KeyDigest
    /// Each route's key template beside its `DedupKey.head` (spelled once). A class: reading a
    /// route's element retains it once, where reading the template and the head out of arrays of
    /// values copied two of their strings per message (a retain and a release each).
    private let routeKeys: [RouteKeys]

    /// Unchecked: nothing in it changes after `init`, and its bytes are freed only with it.
    private final class RouteKeys: @unchecked Sendable {
        let template: KeyTemplate
        /// The head's UTF-8 bytes, in memory of its own: the closures that make a key capture a
        /// pointer, where the head's string was retained and released twice per message.
        private let head: UnsafeMutableRawBufferPointer

        init(template: KeyTemplate, head: String) {
            self.template = template
            self.head = .allocate(byteCount: head.utf8.count, alignment: 1)
            self.head.copyBytes(from: head.utf8)
        }

        deinit { head.deallocate() }

        func key(for message: InboundMessage) throws(BadInput) -> DedupKey {
            try template.dedupKey(for: message, head: UnsafeRawBufferPointer(head))
        }
    }

    public init(settings: DedupSettings, routing: Routing = Routing(), keyDigest: @escaping @Sendable (String) -> KeyDigest = KeyDigest.init(of:)) {
        self.keyDigest = keyDigest
        self.settings = settings
        self.routing = routing
        self.routeSettings = [settings] + routing.routes.map(\.settings)
        self.halfLeases = routeSettings.map { $0.lease / 2 }
        self.routeKeys = routeSettings.map { RouteKeys(template: $0.template, head: DedupKey.head(namespace: $0.namespace)) }
        self.buffer = DelayBuffer(lanes: routeSettings.count)
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
        switch admit(message, polledAt: nil) {
        case .new(let slot): .new(entries.key(at: slot))
        case .localDuplicate(let slot): .localDuplicate(entries.key(at: slot))
        case .bad(let bad, _): .bad(bad)
        }
    }

    /// What `admit` did with a message: the slot of its key's entry, or why it was refused (with
    /// the message handed back, for its report and dead letter).
    enum Admission {
        case new(slot: Int)
        case localDuplicate(slot: Int)
        case bad(BadInput, InboundMessage)
    }

    /// `ingest` without handing the key back: the engine needs only the refusals, and the key
    /// returned per message was a copy of its string (a retain and a release) the loop never read.
    /// The message moves into its entry, or back out in `.bad`: the caller gives it up.
    /// `polledAt`: when the poll that brought it returned (its window counts from there); nil
    /// counts the window from its claim, as for keys that wait for something before it.
    mutating func admit(_ message: consuming InboundMessage, polledAt: Moment?) -> Admission {
        counters.consumed += 1
        offsets.track(message)

        var key: DedupKey
        let route: Int
        var token: String?
        do throws(BadInput) {
            if message.valueCount > settings.maxMessageBytes {
                throw BadInput(
                    .tooLarge, "value is \(message.valueCount) bytes, limit is \(settings.maxMessageBytes)")
            }
            guard let r = hasRoutes || routing.unmatched != .default ? routing.route(for: message) : 0 else {
                throw BadInput(.noRoute, "no route matches (routes: \(routing.routes.map(\.name).joined(separator: ", ")))")
            }
            route = r
            key = try routeKeys[r].key(for: message)
            token = try routeSettings[r].token?.key(for: message)
        } catch {
            counters.invalid += 1
            if !settings.holdsDeadLetters { offsets.resolve(message) }
            return .bad(error, message)
        }

        guard let i = entries.index(forKey: key) else {
            var digest: KeyDigest?
            if case .compact = routeSettings[route].layout { digest = key.withStoreKey(keyDigest) }
            var step: GuardStep?
            if let g = routeSettings[route].entityGuard {
                do throws(BadInput) {
                    let entity = try g.entity.key(for: message)
                    step = GuardStep(
                        entityKey: EntityGuard.storeName(entity, namespace: routeSettings[route].namespace).storeKey,
                        entity: entity, target: try g.state.key(for: message))
                } catch {
                    counters.invalid += 1
                    if !settings.holdsDeadLetters { offsets.resolve(message) }
                    return .bad(BadInput(error.reason, "guard: " + error.detail), message)
                }
            }
            var place: Place = token == nil ? .claiming : .awaitingToken
            if let step {
                // One message of an entity at a time: the next is judged against the state the
                // earlier one leaves.
                if entityLines[step.entityKey] == nil {
                    entityLines[step.entityKey] = [key]
                } else {
                    entityLines[step.entityKey]!.append(key)
                    place = .awaitingEntity
                    awaitingEntityCount += 1
                }
            }
            if place == .awaitingToken { awaitingToken.append(key) }
            // The key's and the message's last use: both move into the table.
            let size = message.approximateSize
            var deadline = Entry.noDeadline
            if place == .claiming, let polledAt { deadline = polledAt + routeSettings[route].window }
            let slot = entries.insertNew(Entry(
                place: place, route: route, message: message, size: size,
                deadline: deadline, leaseTakenAt: nil, token: token, step: step, digest: digest), for: consume key)
            if place == .claiming { claimOrder.append(entries.ref(at: slot)) }
            return .new(slot: slot)
        }
        // A repeat of a key held here. `keep: last` swaps in the newer copy where that is still
        // possible (before dispatch); the copy that loses (`message` after the swap) is resolved
        // as a duplicate either way.
        if routeSettings[entries.values[i].route].keep == .last {
            switch entries.values[i].place {
            case .awaitingToken, .claiming, .parked, .buffered:
                let size = message.approximateSize
                if entries.values[i].place == .buffered { buffer.resized(by: size - entries.values[i].size) }
                swap(&entries.values[i].message, &message)
                entries.resize(at: i, to: size)
            case .inFlight, .confirming, .awaitingEntity:
                break
            }
        }
        counters.duplicatesLocal += 1
        offsets.resolve(message)
        return .localDuplicate(slot: i)
    }

    // MARK: - 3. Claim

    /// Token mode: the tokens to use in the next round trip (their Redis keys, in each route's
    /// namespace), with the marks of their messages. They wait on `request.ticket` until answered.
    public mutating func tokensToUse() -> (keys: LedgerRequest, storeKeys: [String], marks: [String]) {
        let ticket = newTicket()
        var out: (keys: LedgerRequest, storeKeys: [String], marks: [String]) = (
            LedgerRequest(ticket: ticket), [], []
        )
        for key in awaitingToken {
            guard let i = entries.index(forKey: key), entries.values[i].awaiting == 0, let token = entries.values[i].token else {
                continue
            }
            entries.values[i].awaiting = ticket
            let e = entries.values[i]
            out.keys.append(key, entries.ref(at: i))
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
        for (j, outcome) in outcomes.enumerated() {
            guard let i = waiting(request, j), entries.values[i].place == .awaitingToken else { continue }
            entries.values[i].awaiting = 0
            let token = entries.values[i].token ?? ""
            guard let reason = outcome.refusal else {
                entries.values[i].place = .claiming
                entries.values[i].token = nil
                claimOrder.append(request.refs[j])
                continue
            }
            let message = removeEntry(at: i).message
            counters.invalid += 1
            if !settings.holdsDeadLetters { offsets.resolve(message) }
            refused.append((BadInput(reason, "token \(token) is \(reason.code.dropFirst("token_".count))"), message))
        }
        awaitingToken.removeAll { [entries] in Self.place($0, in: entries) != .awaitingToken }
        return refused
    }

    /// A claim, confirm or token round trip failed: its keys wait for the next one.
    public mutating func requestFailed(_ request: LedgerRequest) {
        var reclaim: [EntryRef] = []
        var reconfirm: [EntryRef] = []
        for j in request.keys.indices {
            guard let i = waiting(request, j) else { continue }
            let key = request.keys[j]
            entries.values[i].awaiting = 0
            switch entries.values[i].place {
            case .claiming, .parked:
                if entries.values[i].place == .claiming { reclaim.append(request.refs[j]) }
                // Guard: the hold may have been taken although the answer was lost; the next
                // attempt holds under a new id, so this one's is given back first (releases go
                // out before claims, on the entity's connection), or it would block the entity
                // for a lease.
                if let step = entries.values[i].step, step.attempt == request.ticket {
                    unholds.append(storeStep(key, step, route: entries.values[i].route))
                }
            case .confirming: reconfirm.append(request.refs[j])
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
        var due = claimOrder
        claimOrder.removeAll(keepingCapacity: true)
        let moment = Moment(now)
        for key in parkedKeys {
            if let i = entries.index(forKey: key), entries.values[i].awaiting == 0, entries.values[i].deadline <= moment {
                due.append(entries.ref(at: i))
            }
        }
        var renewals = 0
        forEachLeaseDue(now: now) { [entries] i in
            due.append(entries.ref(at: i))
            renewals += 1
            return true
        }
        let ticket = due.isEmpty ? 0 : newTicket()
        var request = LedgerRequest(ticket: ticket, renewals: renewals)
        request.keys.reserveCapacity(due.count)
        request.refs.reserveCapacity(due.count)
        request.digests.reserveCapacity(due.count)
        for ref in groupedByRoute(due) {
            guard let i = entries.index(of: ref) else { continue }
            request.append(entries.key(at: i), ref, digest: entries.values[i].digest)
            entries.values[i].awaiting = ticket
            guard var step = entries.values[i].step else { continue }
            // A renewal extends the hold it has; any other claim asks anew, as a new attempt.
            if entries.values[i].place != .buffered {
                step.attempt = ticket
                step.held = false
                entries.values[i].step = step
            } else if !step.held {
                continue
            }
            let key = request.keys[request.keys.count - 1]
            request.holdKeys.append(key)
            request.holds.append(storeStep(key, step, route: entries.values[i].route))
        }
        return request
    }

    /// The store's view of a message's step.
    private func storeStep(_ key: DedupKey, _ step: GuardStep, route: Int) -> EntityStep {
        let s = routeSettings[route], g = s.entityGuard!
        return EntityStep(
            entityKey: step.entityKey, holdID: key.raw + "#" + String(step.attempt), target: step.target,
            allowedFrom: g.allowedFrom(step.target), ttl: s.lease, records: s.entityRecords)
    }

    /// Whether a buffered key's lease is half used and its renewal not yet sent.
    public mutating func renewalDue(now: ContinuousClock.Instant) -> Bool {
        var due = false
        forEachLeaseDue(now: now) { _ in
            due = true
            return false
        }
        return due
    }

    /// Calls `body` with the slot of each buffered entry whose lease is half used and has no claim
    /// in flight, oldest first, until it returns false. Marks at the front whose lease was renewed
    /// since or left are dropped first.
    private mutating func forEachLeaseDue(now: ContinuousClock.Instant, _ body: (Int) -> Bool) {
        let now = Moment(now)
        while let first = leaseOrder.first, leaseTaken(first.entry) != first.taken {
            leaseOrder.removeFirst()
        }
        for mark in leaseOrder {
            guard let i = entries.index(of: mark.entry), entries.values[i].leaseTakenAt == mark.taken else { continue }
            // Leases differ per route, so a young lease of one route may precede an old one of
            // another: with routes the whole queue is looked at (it is ordered by time taken).
            guard mark.taken <= now - halfLeases[entries.values[i].route] else {
                if hasRoutes { continue } else { return }
            }
            guard entries.values[i].awaiting == 0 else { continue }
            guard body(i) else { return }
        }
    }

    /// The store keys of `keys` cut into groups of one time to live (`\.lease` for claims,
    /// `\.retention` for confirms), in the order of `keys`, for one round trip.
    public func storeGroups(_ request: LedgerRequest, ttl: KeyPath<DedupSettings, Duration>) -> [KeyGroup] {
        let keys = request.keys, digests = request.digests
        guard hasRoutes else {
            return keys.isEmpty ? [] : [Self.withDigests(KeyGroup(Self.storeKeys(of: keys), ttl: settings[keyPath: ttl], layout: settings.doneLayout), digests[...])]
        }
        var groups: [KeyGroup] = []
        var starts: [Int] = []
        for i in keys.indices {
            let s = routeSettings[route(keys[i])]
            let t = s[keyPath: ttl], layout = s.doneLayout
            if groups.last?.ttl == t, groups.last?.layout == layout {
                groups[groups.count - 1].keys.append(keys[i].storeKey)
            } else {
                groups.append(KeyGroup([keys[i].storeKey], ttl: t, layout: layout))
                starts.append(i)
            }
        }
        return groups.indices.map { g in
            Self.withDigests(groups[g], digests[starts[g] ..< starts[g] + groups[g].keys.count])
        }
    }

    /// The keys' store keys, each read in place: `map(\.storeKey)` copied every key (a retain
    /// and a release of its string) only to read one property.
    private static func storeKeys(of keys: [DedupKey]) -> [String] {
        var out: [String] = []
        out.reserveCapacity(keys.count)
        for i in keys.indices { out.append(keys[i].storeKey) }
        return out
    }

    /// The group with its keys' digests (`digests`, in the order of its keys) when every key has
    /// one (a compact route's keys do).
    private static func withDigests(_ group: KeyGroup, _ digests: ArraySlice<KeyDigest?>) -> KeyGroup {
        guard case .compact = group.layout else { return group }
        var group = group
        group.digests.reserveCapacity(digests.count)
        for digest in digests {
            guard let digest else { group.digests = []; return group }
            group.digests.append(digest)
        }
        return group
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

    private func groupedByRoute(_ refs: [EntryRef]) -> [EntryRef] {
        guard hasRoutes, refs.count > 1 else { return refs }
        return refs.map { ref in (ref: ref, route: entries.index(of: ref).map { entries.values[$0].route } ?? 0) }.enumerated()
            .sorted { ($0.element.route, $0.offset) < ($1.element.route, $1.offset) }.map(\.element.ref)
    }

    /// The slot of the entry that `request`'s `j`-th key was sent for, while that entry still
    /// waits on `request` (an answer to anything else is stale).
    private func waiting(_ request: LedgerRequest, _ j: Int) -> Int? {
        guard let i = entries.index(of: request.refs[j]), entries.values[i].awaiting == request.ticket else { return nil }
        return i
    }

    /// Applies the store's answers to `request`, in the order of its keys. An answer applies
    /// only to an entry that still waits on this request; any other answer is stale (the entry
    /// was revoked, resolved or created again since) and changes nothing here. Returns the keys
    /// the store says this worker now holds although nothing here waits on them any more: they
    /// are to be released.
    ///
    /// Guard: `holds` answers the request's `holds`. A key whose claim and hold both succeeded is
    /// buffered; a rejected transition is confirmed without dispatch (the rejection left for
    /// `takeRejections`); an entity held by another message parks the key; a
    /// hold taken for a key that turned out a duplicate, pending elsewhere or stale is given back.
    @discardableResult
    public mutating func applyClaims(
        _ request: LedgerRequest, _ outcomes: [ClaimOutcome], holds: [HoldOutcome] = [], now: ContinuousClock.Instant
    ) -> [DedupKey] {
        precondition(request.keys.count == outcomes.count, "one outcome per key")
        precondition(holds.isEmpty || holds.count == request.holds.count, "one hold outcome per hold")
        let now = Moment(now)
        var orphans: [DedupKey] = []
        var h = 0
        // The key is read from the request where it is needed: a local copy of it costs a
        // retain and a release of its string per claimed key.
        for (j, outcome) in outcomes.enumerated() {
            var hold: HoldOutcome?
            var holdStep: EntityStep?
            if h < request.holdKeys.count, request.holdKeys[h] == request.keys[j] {
                holdStep = request.holds[h]
                hold = holds.isEmpty ? nil : holds[h]
                h += 1
            }
            let held: Bool = if case .held = hold { true } else { false }
            guard let i = waiting(request, j) else {
                switch outcome {
                case .claimed, .alreadyOwned: if entries.index(forKey: request.keys[j]) == nil { orphans.append(request.keys[j]) }
                case .done, .pendingElsewhere: break
                }
                if held, let holdStep { unholds.append(holdStep) }
                continue
            }
            entries.values[i].awaiting = 0
            // The window of a key claimed straight from its poll counts from the poll; any other
            // (parked, next of its entity, after its token) from when this claim was sent.
            var windowEnd = now + routeSettings[entries.values[i].route].window
            switch entries.values[i].place {
            case .claiming:
                if entries.values[i].deadline != Entry.noDeadline, entries.values[i].deadline < windowEnd {
                    windowEnd = entries.values[i].deadline
                }
            case .parked: parkedKeys.remove(request.keys[j])
            case .buffered:
                applyRenewal(at: i, request.keys[j], outcome, hold: hold, holdStep: holdStep, now: now)
                continue
            case .awaitingToken, .inFlight, .confirming, .awaitingEntity: continue
            }
            if held, let holdStep {
                switch outcome {
                case .claimed, .alreadyOwned: break
                // The message is not this worker's to dispatch: the entity goes back.
                case .done, .pendingElsewhere: unholds.append(holdStep)
                }
            }
            switch outcome {
            case .claimed, .alreadyOwned:
                switch hold {
                case .held?, nil:
                    entries.values[i].step?.held = held
                case .rejected(let state)?:
                    reject(at: i, request.keys[j], from: state)
                    continue
                case .busy?:
                    counters.entityBusy += 1
                    park(at: i, request.keys[j], now: now)
                    continue
                }
                // `alreadyOwned`: this worker claimed it before, e.g. its release failed when the
                // partition was revoked and then came back. It was never dispatched: buffer it.
                let route = entries.values[i].route
                entries.values[i].place = .buffered
                entries.values[i].leaseTakenAt = now
                leaseOrder.append(LeaseMark(entry: entries.ref(at: i), taken: now))
                entries.values[i].deadline = buffer.add(
                    entries.ref(at: i), lane: route, due: windowEnd, size: entries.values[i].size)
            case .done:
                let message = removeEntry(at: i).message
                counters.duplicatesStore += 1
                offsets.resolve(message)
            case .pendingElsewhere:
                // A copy is in flight at another worker; its offset is not committed there, so
                // nothing is lost by waiting. Look again until it is done or its lease expires.
                park(at: i, request.keys[j], now: now)
            }
        }
        return orphans
    }

    /// Guard: the transition is not allowed from the entity's recorded state. The message is
    /// never dispatched; it goes to the next confirm like a dispatched one (its key becomes done,
    /// so a repeat of it is a duplicate) but its entity does not move. It is resolved once
    /// confirmed, or, going to the dead-letter topic, once that acknowledged it.
    private mutating func reject(at i: Int, _ key: DedupKey, from: String?) {
        let e = entries.values[i]
        counters.rejectedTransitions += 1
        counters.rejectedTransitionsByRoute[e.route, default: 0] += 1
        let deadLetter = routeSettings[e.route].entityGuard?.onReject == .deadLetter && settings.holdsDeadLetters
        entries.values[i].place = .confirming
        entries.values[i].step?.rejected = true
        entries.values[i].step?.deadLettered = deadLetter
        confirming.append(entries.ref(at: i))
        confirmingCount += 1
        rejections.append(Rejection(
            key: key, message: e.message, route: e.route, entity: e.step?.entity ?? "", from: from, to: e.step?.target ?? "",
            deadLetter: deadLetter))
    }

    /// Removes an entry; a guarded message leaves its entity's line, and the next message of that
    /// entity here (if any) goes on to be claimed.
    @discardableResult
    private mutating func removeEntry(at i: Int) -> Entry {
        let (key, e) = entries.remove(at: i)
        if let step = e.step { leaveLine(key, step.entityKey) }
        return e
    }

    private mutating func leaveLine(_ key: DedupKey, _ entityKey: String) {
        guard var line = entityLines[entityKey] else { return }
        if let j = line.firstIndex(of: key) { line.remove(at: j) }
        // Members dropped meanwhile (a revoked partition) leave with it.
        while let first = line.first, entries.index(forKey: first) == nil { line.removeFirst() }
        guard let head = line.first else {
            entityLines[entityKey] = nil
            return
        }
        entityLines[entityKey] = line
        guard let h = entries.index(forKey: head), entries.values[h].place == .awaitingEntity else { return }
        awaitingEntityCount -= 1
        if entries.values[h].token == nil {
            entries.values[h].place = .claiming
            claimOrder.append(entries.ref(at: h))
        } else {
            entries.values[h].place = .awaitingToken
            awaitingToken.append(head)
        }
    }

    /// Guard: holds to give back, taken by the caller (they go out with the next releases).
    public mutating func takeUnholds() -> [EntityStep] {
        defer { unholds.removeAll() }
        return unholds
    }

    /// Guard: rejected transitions since the last call, for the caller to log and dead-letter.
    public mutating func takeRejections() -> [Rejection] {
        defer { rejections.removeAll() }
        return rejections
    }

    private mutating func park(at i: Int, _ key: DedupKey, now: Moment) {
        entries.values[i].place = .parked
        entries.values[i].deadline = now + settings.parkRetry
        entries.values[i].leaseTakenAt = nil
        entries.values[i].step?.held = false
        parkedKeys.insert(key)
        counters.parked += 1
    }

    /// The answer to re-claiming a buffered key. Normally the lease is extended. If it had run
    /// out and another worker took the key meanwhile, this copy leaves the buffer: a duplicate
    /// if that worker is done, parked if its copy is still in flight. Guard: the entity's hold is
    /// extended with it; a hold that ran out meanwhile takes the copy out of the buffer too, to be
    /// judged again (parked) or rejected (another message moved the entity where this one's
    /// transition is not allowed).
    private mutating func applyRenewal(
        at i: Int, _ key: DedupKey, _ outcome: ClaimOutcome, hold: HoldOutcome?, holdStep: EntityStep?,
        now: Moment
    ) {
        let held: Bool = if case .held = hold { true } else { false }
        switch outcome {
        case .claimed, .alreadyOwned:
            switch hold {
            case .held?, nil:
                entries.values[i].leaseTakenAt = now
                leaseOrder.append(LeaseMark(entry: entries.ref(at: i), taken: now))
                counters.renewed += 1
            case .rejected(let state)?:
                buffer.removed(size: entries.values[i].size)
                entries.values[i].leaseTakenAt = nil
                counters.leasesLost += 1
                reject(at: i, key, from: state)
            case .busy?:
                buffer.removed(size: entries.values[i].size)
                counters.leasesLost += 1
                counters.entityBusy += 1
                park(at: i, key, now: now)
            }
        case .done:
            let e = removeEntry(at: i)
            buffer.removed(size: e.size)
            counters.leasesLost += 1
            counters.duplicatesStore += 1
            offsets.resolve(e.message)
            if held, let holdStep { unholds.append(holdStep) }
        case .pendingElsewhere:
            buffer.removed(size: entries.values[i].size)
            counters.leasesLost += 1
            park(at: i, key, now: now)
            if held, let holdStep { unholds.append(holdStep) }
        }
    }

    /// `on_store_error: fail_open`: the store did not answer, and the operator chose to let
    /// messages through unclaimed rather than stop. Dedup then rests on the window alone.
    public mutating func applyClaimsWithoutStore(_ request: LedgerRequest, now: ContinuousClock.Instant) {
        counters.unclaimed += request.keys.indices.filter { j in
            guard let i = waiting(request, j) else { return false }
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

    private func leaseTaken(_ entry: EntryRef) -> Moment? {
        guard let i = entries.index(of: entry) else { return nil }
        return entries.values[i].leaseTakenAt
    }

    private static func isLive(_ slot: DelayBuffer.Slot, in entries: EntryTable) -> Bool {
        guard let i = entries.index(of: slot.entry) else { return false }
        return entries.values[i].place == .buffered && entries.values[i].deadline == slot.due
    }

    /// The earliest moment a buffered message becomes due.
    public var nextDeadline: ContinuousClock.Instant? {
        // The table, not `self`: a method reference would copy the whole ledger per call.
        let entries = entries
        return buffer.nextDeadline { Self.isLive($0, in: entries) }
    }

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
            let i = self.entries.index(of: slot.entry)!
            self.entries.values[i].place = .inFlight
            self.entries.values[i].leaseTakenAt = nil
            buffer.removed(size: self.entries.values[i].size)
            // The message moves to the handler; the entry keeps only where it came from (for its
            // offset and a revocation), so no buffer of it is retained twice.
            var message = InboundMessage(
                topic: self.entries.values[i].message.topic, partition: self.entries.values[i].message.partition,
                offset: self.entries.values[i].message.offset, bytes: .empty)
            swap(&message, &self.entries.values[i].message)
            // Moved, the message into the dispatch and the dispatch into the list: left to the
            // optimizer, one of the two was copied (its buffers retained and released again).
            var dispatch = Dispatch(key: self.entries.key(at: i), message: consume message, route: self.entries.values[i].route)
            dispatch.entry = slot.entry
            due.append(consume dispatch)
        }
        inFlightCount += due.count
        return due
    }

    /// The handler took the message: its key goes to the next confirm round trip.
    public mutating func dispatchSucceeded(_ key: DedupKey) {
        guard let i = entries.index(forKey: key) else { return }
        dispatchSucceeded(at: i)
    }

    /// `dispatchSucceeded` for a dispatch of `takeDue`, whose entry it finds by its ref.
    mutating func dispatchSucceeded(_ dispatch: Dispatch) {
        guard let ref = dispatch.entry else { return dispatchSucceeded(dispatch.key) }
        guard let i = entries.index(of: ref) else { return }
        dispatchSucceeded(at: i)
    }

    private mutating func dispatchSucceeded(at i: Int) {
        guard entries.values[i].place == .inFlight else { return }
        entries.values[i].place = .confirming
        confirming.append(entries.ref(at: i))
        confirmingCount += 1
        inFlightCount -= 1
        counters.dispatched += 1
    }

    /// The handler gave up after its last attempt. The offset is resolved (the caller has recorded
    /// the message and its reason) — or, with `holdsDeadLetters`, once the caller reports it
    /// dead-lettered — and the claim must be released so a corrected resend can pass.
    public mutating func dispatchFailed(_ key: DedupKey) {
        guard let i = entries.index(forKey: key), entries.values[i].place == .inFlight else { return }
        giveBackHold(at: i, key)
        let message = removeEntry(at: i).message
        inFlightCount -= 1
        counters.failed += 1
        if !settings.holdsDeadLetters { offsets.resolve(message) }
    }

    /// With `holdsDeadLetters`: the dead-letter topic acknowledged this message (bad input or
    /// given up), so its offset is resolved. A message of a partition revoked meanwhile is ignored.
    public mutating func deadLettered(_ message: InboundMessage) {
        counters.deadLettered += 1
        offsets.resolve(message)
    }

    /// The handler never took the message (shutdown deadline): it is neither dispatched nor
    /// resolved, so its offset stays uncommitted and the claim must be released.
    public mutating func dispatchAbandoned(_ key: DedupKey) {
        guard let i = entries.index(forKey: key), entries.values[i].place == .inFlight else { return }
        giveBackHold(at: i, key)
        removeEntry(at: i)
        inFlightCount -= 1
        counters.released += 1
    }

    /// Guard: the message leaves without moving its entity; a hold it has goes back.
    private mutating func giveBackHold(at i: Int, _ key: DedupKey) {
        guard let step = entries.values[i].step, step.held else { return }
        unholds.append(storeStep(key, step, route: entries.values[i].route))
    }

    // MARK: - 6. Confirm

    /// Dispatched keys whose confirm is not sent yet, grouped by route (see
    /// `storeGroups(_:ttl: \.retention)`); they wait on `ticket` until answered.
    public mutating func keysToConfirm() -> LedgerRequest {
        let due = groupedByRoute(confirming)
        confirming.removeAll(keepingCapacity: true)
        let ticket = due.isEmpty ? 0 : newTicket()
        var request = LedgerRequest(ticket: ticket)
        request.keys.reserveCapacity(due.count)
        request.refs.reserveCapacity(due.count)
        request.digests.reserveCapacity(due.count)
        for ref in due {
            guard let i = entries.index(of: ref) else { continue }
            request.append(entries.key(at: i), ref, digest: entries.values[i].digest)
            entries.values[i].awaiting = ticket
            // Guard: the entity moves to the message's state in the same round trip.
            if let step = entries.values[i].step, !step.rejected {
                let key = request.keys[request.keys.count - 1]
                request.holdKeys.append(key)
                request.holds.append(storeStep(key, step, route: entries.values[i].route))
            }
        }
        return request
    }

    /// Whether a confirm is still to be sent.
    public var hasConfirmsToSend: Bool { !confirming.isEmpty }
    /// Token mode: whether messages wait for their token to be used.
    public var hasTokensToUse: Bool { !awaitingToken.isEmpty }

    /// Resolves the keys the store confirmed. Returns the keys another owner held (the lease ran
    /// out while the copy was in the handler), for the caller to report.
    /// Guard: `moves` answers the request's moves; a move that found another message holding the
    /// entity is a conflict too.
    @discardableResult
    public mutating func applyConfirms(
        _ request: LedgerRequest, _ outcomes: [ConfirmOutcome], moves: [MoveOutcome] = []
    ) -> [(DedupKey, String)] {
        precondition(request.keys.count == outcomes.count, "one outcome per key")
        precondition(moves.isEmpty || moves.count == request.holds.count, "one move outcome per move")
        var conflicts: [(DedupKey, String)] = []
        var h = 0
        // The key is read from the request where it is needed: a local copy of it retains its
        // string once per key.
        for (j, outcome) in outcomes.enumerated() {
            var move: MoveOutcome?
            if h < request.holdKeys.count, request.holdKeys[h] == request.keys[j] {
                move = moves.isEmpty ? nil : moves[h]
                h += 1
            }
            guard let i = waiting(request, j), entries.values[i].place == .confirming else { continue }
            let e = removeEntry(at: i)
            let message = e.message
            confirmingCount -= 1
            if case .notOwner(let other) = outcome {
                counters.confirmConflicts += 1
                conflicts.append((request.keys[j], other))
            } else if case .notOwner(let other)? = move {
                counters.confirmConflicts += 1
                conflicts.append((request.keys[j], "entity held by " + other))
            } else if case .superseded(let state)? = move {
                counters.confirmConflicts += 1
                conflicts.append((request.keys[j], "entity moved on to " + (state ?? "(no state)")))
            }
            if e.step?.deadLettered != true { offsets.resolve(message) }
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
        var released: [(key: DedupKey, deadline: Moment)] = []
        var dropped: [DedupKey] = []
        for (key, e) in entries.all where partitions.contains(e.message.topicPartition) {
            switch e.place {
            case .buffered:
                released.append((key, e.deadline))
                buffer.removed(size: e.size)
                dropped.append(key)
            case .awaitingToken, .claiming, .parked, .awaitingEntity:
                dropped.append(key)
            case .inFlight, .confirming:
                continue
            }
        }
        for key in dropped {
            // Read the place now: dropping the head of a line promotes the next, which may be
            // dropped too.
            guard let i = entries.index(forKey: key) else { continue }
            if entries.values[i].place == .awaitingEntity { awaitingEntityCount -= 1 }
            // Only a buffered message holds its entity; its hold goes back with its claim.
            giveBackHold(at: i, key)
            removeEntry(at: i)
        }
        if !dropped.isEmpty {
            claimOrder.removeAll { [entries] in entries.index(of: $0) == nil }
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
            let retry = entries.values[i].deadline.instant
            if t == nil || retry < t! { t = retry }
        }
        return t
    }

    /// Every message the worker holds, wherever in the flow it is: waiting for its claim or for
    /// another worker's lease, in the window, with a handler, waiting for its confirm.
    public var heldMessages: Int { entries.count }
    /// Their sizes as the buffer bounds count them (`InboundMessage.approximateSize`).
    public var heldBytes: Int { entries.bytes }

    /// Backpressure: pause the partitions while this is true. The buffer's bounds apply to every
    /// message held, not only to those in the window: a worker short of CPU or waiting on Redis
    /// or a handler holds many outside it, and the memory bound that `buffer.max_bytes` promises
    /// must cover them too.
    public var shouldPause: Bool { heldMessages >= settings.bufferMaxMessages || heldBytes >= settings.bufferMaxBytes }
    /// Resume once what is held has drained well below the bounds (to half of both): the gap
    /// avoids pausing and resuming on every batch.
    public var canResume: Bool { heldMessages <= settings.bufferMaxMessages / 2 && heldBytes <= settings.bufferMaxBytes / 2 }
}
