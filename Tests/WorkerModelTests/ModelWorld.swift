import DedupCore
import DedupService

/// Everything around one worker, simulated: a partitioned log with a consumer group's committed
/// offsets, a seen-set that keeps state like the Redis scripts (leases expire on the model's
/// clock), handlers, and time. One `World` plays the worker's `MessageSource`, `ClaimStore`,
/// `DispatchRunner` and `LoopClock`, and decides, from a seeded generator, when each answer
/// arrives, fails or is reordered, when partitions are revoked, lost or assigned (incrementally, as
/// cooperative rebalancing does, or all at once, as eager does), when the store is
/// down or refuses one kind of request, when a handler is slow and when the worker crashes.
///
/// The world acts only when the worker polls or waits, on the worker's own task: the worker
/// awaits nothing that the world has not already answered or will answer in that call, so one
/// seed is one schedule, replayed exactly.
///
/// `@unchecked Sendable`: every member is touched only from the task that runs the worker's
/// loop (the protocols require `Sendable`; nothing here crosses a task).
final class ModelWorld: @unchecked Sendable {
    struct Crash: Error {}

    struct Violation: Error, CustomStringConvertible {
        let description: String
    }

    struct Shape {
        var partitions = 3
        var messagesPerPartition = 24
        var uniqueKeys = 40
        var maxBatch = 2
        /// Steps with faults; after them the world is calm until everything is committed.
        var faultSteps = 250
        var maxSteps = 6000
        var window: Duration = .seconds(1)
        var lease: Duration = .seconds(3)
        /// Guard: each message asks its entity (one of `entities`) to enter a state of the cycle
        /// a → b → c → a (initial a), so most moves are rejected and some are allowed.
        var guarded = false
        var entities = 5
    }

    static let guardTable = EntityGuard(
        entity: try! KeyTemplate("json:/e"), state: try! KeyTemplate("json:/s"), initial: ["a"],
        transitions: ["a": ["b"], "b": ["c"], "c": ["a"]], retention: .seconds(60))

    /// Guard: the entity and state a key's message asks for (every copy of a key asks the same).
    func guardStep(_ key: String) -> (entity: String, state: String) {
        let n = Int(key.dropFirst())!
        return ("E\(n % shape.entities)", ["a", "b", "c"][(n / shape.entities) % 3])
    }

    let shape: Shape
    var rng: SplitMix64
    let start = ContinuousClock.now
    var now: ContinuousClock.Instant
    var steps = 0
    var trace: [String] = []

    // The log and the group.
    var log: [[String]] = []
    var committed: [Int64]
    /// Per key: copies not yet committed.
    var uncommittedCopies: [String: Int] = [:]

    // The seen-set: value `p:owner` or `d:owner`, and when it expires.
    var store: [String: (value: String, expires: ContinuousClock.Instant)] = [:]
    // The compact layout's buckets: fields, and when the whole bucket expires.
    var buckets: [String: (fields: Set<[UInt8]>, expires: ContinuousClock.Instant)] = [:]
    /// The model's wall clock at `start` (Unix ms), random per seed so slot edges fall anywhere.
    let epochMillis: Int64
    var unixMillis: Int64 { epochMillis + Int64((now - start) / .milliseconds(1)) }
    /// The route's layout, as the configuration says (the worker's key groups carry it too).
    var layout: DoneLayout = .keys
    var storeDown = false
    /// The label of the one kind of request the store refuses (as Redis refuses a command an ACL
    /// user may not run), answering the others.
    var refused: String?

    // Guard: entity records like the hold/move/unhold scripts keep them.
    var entities: [String: (state: String?, hold: (id: String, target: String, owner: String, expires: ContinuousClock.Instant)?)] = [:]
    /// Keys whose transition the store judged not allowed (the worker resolves them without
    /// dispatch; a copy read again while the confirm is still to land is a local duplicate).
    var rejected: Set<String> = []
    var moves = 0, movesAfterLeaseLost = 0
    /// Keys whose entity move reached the store (whatever it answered).
    var moveSent: Set<String> = []

    // The current incarnation of the worker.
    var owner = ""
    var stop: () -> Void = {}
    var assigned: Set<Int32> = []
    var paused: Set<Int32> = []
    var holdNew = false
    var position: [Int32: Int64] = [:]
    var pendingEvents: [SourceEvent] = []
    /// Answers and round outcomes not delivered yet.
    var pending: [(label: String, deliver: () -> Void, slow: Bool)] = []
    var timer: (at: ContinuousClock.Instant, fire: @Sendable () -> Void)?
    var stopRequested = false
    /// The source failed for good (librdkafka's fatal error): it delivers and stores nothing
    /// more; the worker must stop as for SIGTERM and then throw `SourceFailure`.
    var unrecoverableError: String?
    var sourceFailures = 0
    /// The stop asked once everything is committed: the schedule ends when the worker finishes.
    var finalStop = false
    /// SIGTERMs during the faults (a rolling restart): the worker finishes and a new one starts.
    var gracefulStops = 0

    /// The worker's own counters, summed over its incarnations, to show what the schedules reached.
    struct Totals: CustomStringConvertible {
        var c = DedupCounters()
        mutating func add(_ o: DedupCounters) {
            c.consumed += o.consumed; c.dispatched += o.dispatched; c.duplicatesLocal += o.duplicatesLocal
            c.duplicatesStore += o.duplicatesStore; c.released += o.released; c.parked += o.parked
            c.renewed += o.renewed; c.leasesLost += o.leasesLost; c.confirmConflicts += o.confirmConflicts
        }
        var description: String {
            "consumed \(c.consumed), dispatched \(c.dispatched), local duplicates \(c.duplicatesLocal), store duplicates \(c.duplicatesStore), released \(c.released), parked \(c.parked), renewed \(c.renewed), leases lost \(c.leasesLost), confirm conflicts \(c.confirmConflicts)"
        }
    }

    var counters = Totals()

    // What happened.
    var dispatches: [String: Int] = [:]
    var crashes = 0
    var error: Violation?

    init(seed: UInt64, shape: Shape = Shape()) {
        self.shape = shape
        rng = SplitMix64(seed: seed)
        now = start
        epochMillis = 1_700_000_000_000 + Int64.random(in: 0..<86_400_000, using: &rng)
        committed = Array(repeating: 0, count: shape.partitions)
        for _ in 0..<shape.partitions {
            var keys: [String] = []
            for _ in 0..<shape.messagesPerPartition {
                let key = "k\(Int.random(in: 0..<shape.uniqueKeys, using: &rng))"
                keys.append(key)
                uncommittedCopies[key, default: 0] += 1
            }
            log.append(keys)
        }
    }

    var uniqueKeys: Set<String> { Set(log.joined()) }
    var faulty: Bool { steps < shape.faultSteps }
    var allCommitted: Bool { (0..<shape.partitions).allSatisfy { committed[$0] == Int64(log[$0].count) } }

    func chance(_ p: Double) -> Bool { Double.random(in: 0..<1, using: &rng) < p }

    func note(_ line: String) {
        trace.append("[\(steps) t=\(Int((now - start) / .milliseconds(1)))ms] \(line)")
        if trace.count > 60 { trace.removeFirst(trace.count - 60) }
    }

    func fail(_ message: String) {
        if error == nil { error = Violation(description: message) }
    }

    /// A new incarnation after a crash (or the first): nothing of the old one survives but the
    /// log, the committed offsets and the store.
    func restart(owner: String, stop: @escaping () -> Void) {
        self.owner = owner
        self.stop = stop
        stopRequested = false
        unrecoverableError = nil
        assigned = []
        paused = []
        holdNew = false
        position = [:]
        pending = []
        timer = nil
        pendingEvents = [.assigned((0..<Int32(shape.partitions)).map { TopicPartition(topic: "t", partition: $0) })]
        for p in 0..<Int32(shape.partitions) { assign(p) }
        note("start \(owner)")
    }

    func unassign(_ partitions: [Int32]) {
        for p in partitions {
            assigned.remove(p)
            paused.remove(p)
            position[p] = nil
        }
    }

    func assign(_ p: Int32) {
        assigned.insert(p)
        position[p] = committed[Int(p)]
        if holdNew { paused.insert(p) }
    }

    // MARK: - One step of the world

    /// Runs between the worker's actions (at each poll and wait): time passes, answers arrive,
    /// handlers finish, and while faults are on, partitions move, the store fails, the worker
    /// crashes.
    func step(fromPoll: Bool) throws {
        steps += 1
        if steps > shape.maxSteps {
            fail("no progress after \(steps) steps: committed \(committed) of \(log.map(\.count))")
        }
        // A violation ends the run at the next poll; crashes happen at polls too.
        if error != nil, fromPoll { throw Crash() }
        deliverSome()
        if faulty {
            if fromPoll, chance(0.004) {
                crashes += 1
                note("crash")
                throw Crash()
            }
            // Rebalances reach the worker in a poll (librdkafka runs them inside it), so the
            // assignment changes only there.
            // Cooperative (incremental): some partitions move away, the rest stay with their
            // window and claims; now and then they are lost (session timeout) rather than revoked.
            if fromPoll, !assigned.isEmpty, chance(0.02) {
                var moving = assigned.sorted().filter { _ in chance(0.4) }
                if moving.isEmpty { moving = [assigned.sorted().randomElement(using: &rng)!] }
                unassign(moving)
                let tps = moving.map { TopicPartition(topic: "t", partition: $0) }
                let lost = chance(0.25)
                pendingEvents.append(lost ? .lost(tps) : .revoked(tps))
                note("\(lost ? "lose" : "revoke") \(moving)")
            }
            // Eager: every partition revoked, then the whole new assignment, in one poll.
            if fromPoll, !assigned.isEmpty, chance(0.004) {
                let all = assigned.sorted()
                unassign(all)
                var next = (0..<Int32(shape.partitions)).filter { _ in chance(0.6) }
                if next.isEmpty { next = [0] }
                for p in next { assign(p) }
                pendingEvents.append(.revoked(all.map { TopicPartition(topic: "t", partition: $0) }))
                pendingEvents.append(.assigned(next.map { TopicPartition(topic: "t", partition: $0) }))
                note("eager rebalance \(all) -> \(next)")
            }
            let unassigned = (0..<Int32(shape.partitions)).filter { !assigned.contains($0) }
            if fromPoll, !unassigned.isEmpty, chance(0.1) {
                var coming = unassigned.filter { _ in chance(0.5) }
                if coming.isEmpty { coming = [unassigned.randomElement(using: &rng)!] }
                for p in coming { assign(p) }
                pendingEvents.append(.assigned(coming.map { TopicPartition(topic: "t", partition: $0) }))
                note("assign \(coming)")
            } else if fromPoll, chance(0.01) {
                // A cooperative rebalance that moves nothing here ends with an empty assignment.
                pendingEvents.append(.assigned([]))
                note("assign []")
            }
            // SIGTERM, as in a rolling restart: the worker drains its window, confirms,
            // releases the rest and finishes; the next incarnation starts from the commits.
            if fromPoll, !stopRequested, chance(0.003) {
                stopRequested = true
                gracefulStops += 1
                note("stop (SIGTERM)")
                stop()
            }
            // A fatal client error (a static member fenced): nothing more is fetched or stored.
            if fromPoll, unrecoverableError == nil, chance(0.001) {
                unrecoverableError = "FENCED_INSTANCE_ID: model"
                sourceFailures += 1
                note("source failed for good")
            }
            if !storeDown, chance(0.01) {
                storeDown = true
                note("store down")
            } else if storeDown, chance(0.08) {
                storeDown = false
                note("store up")
            }
            // An ACL change: one kind of request is refused while the others are answered.
            if refused == nil, chance(0.005) {
                refused = ["claims", "confirms", "releases", "holds", "moves"].randomElement(using: &rng)
                note("\(refused!) refused")
            } else if refused != nil, chance(0.03) {
                note("\(refused!) accepted again")
                refused = nil
            }
        } else {
            storeDown = false
            refused = nil
            for p in 0..<Int32(shape.partitions) where fromPoll && !assigned.contains(p) {
                assign(p)
                pendingEvents.append(.assigned([TopicPartition(topic: "t", partition: p)]))
            }
            if allCommitted, !finalStop {
                stopRequested = true
                finalStop = true
                note("stop")
                stop()
            }
        }
    }

    /// Delivers each pending answer with some chance, in random order (answers overtake each other).
    func deliverSome() {
        var i = 0
        pending.shuffle(using: &rng)
        while i < pending.count {
            if chance(pending[i].slow ? 0.08 : 0.5) {
                let p = pending.remove(at: i)
                note("deliver \(p.label)")
                p.deliver()
            } else {
                i += 1
            }
        }
    }

    func advance(_ d: Duration) {
        now = now + d
    }

    // MARK: - Invariants

    /// Nothing committed past a message whose key is neither dispatched nor still to be read.
    func commit(_ p: Int32, to offset: Int64) {
        let old = committed[Int(p)]
        guard offset != old else { return }
        guard offset > old else {
            fail("partition \(p): commit went back from \(old) to \(offset)")
            return
        }
        for o in old..<offset {
            let key = log[Int(p)][Int(o)]
            uncommittedCopies[key]! -= 1
            if uncommittedCopies[key] == 0, dispatches[key, default: 0] == 0, !rejected.contains(key) {
                fail("partition \(p) committed to \(offset) past offset \(o) (key \(key)): every copy of \(key) is committed and it was never dispatched")
            }
        }
        committed[Int(p)] = offset
    }

    /// A key is dispatched only while this worker holds its claim, and twice only after a
    /// crash, at most `handler.max_batch` keys per crash. Guard: only while this message holds
    /// its entity, and only if the entity's state allows the move.
    func dispatched(_ keys: [String]) {
        for key in keys {
            let storeKey = pendingKey("dedupd:model:\(key)", layout)
            if let v = store[storeKey], v.expires > now, v.value == "p:" + owner {} else {
                fail("\(key) dispatched without a claim: the store has \(store[storeKey].map { "\($0.value), \($0.expires > now ? "live" : "expired")" } ?? "nothing")")
            }
            if shape.guarded {
                let (entity, target) = guardStep(key)
                let record = entities[entityKey(entity)]
                guard let hold = record?.hold, hold.expires > now, hold.owner == owner, hold.id.hasPrefix(key + "#") else {
                    fail("\(key) dispatched without holding \(entity): \(record.map { "\($0)" } ?? "no record")")
                    continue
                }
                if !Self.guardTable.allows(from: record?.state, to: target) {
                    fail("\(key) dispatched an illegal move of \(entity): \(record?.state ?? "-") -> \(target)")
                }
            }
            dispatches[key, default: 0] += 1
        }
        let extra = dispatches.values.reduce(0) { $0 + max(0, $1 - 1) }
        if extra > crashes * shape.maxBatch {
            fail("\(extra) repeated dispatches after \(crashes) crashes (at most \(shape.maxBatch) per crash): \(dispatches.filter { $0.value > 1 }.keys.sorted())")
        }
    }

    func checkEnd() {
        let missing = uniqueKeys.filter { dispatches[$0, default: 0] == 0 && !rejected.contains($0) }
        if !missing.isEmpty { fail("never dispatched: \(missing.sorted())") }
        if !allCommitted { fail("not all committed: \(committed) of \(log.map(\.count))") }
    }

    // MARK: - The store, like the Redis scripts

    func live(_ key: String) -> String? {
        guard let v = store[key], v.expires > now else { return nil }
        return v.value
    }

    /// Where a key's pending claim is.
    func pendingKey(_ key: String, _ layout: DoneLayout) -> String {
        guard case .compact(let records) = layout else { return key }
        return records.placement(of: key).pendingKey
    }

    /// Compact layout: whether a live bucket of a slot the claim looks in holds the key's field.
    func doneInBuckets(_ key: String, _ records: CompactRecords) -> Bool {
        let p = records.placement(of: key)
        return records.liveSlots(at: unixMillis).contains { slot in
            guard let b = buckets[p.bucketKey(slot: slot)], b.expires > now else { return false }
            return b.fields.contains(p.field)
        }
    }

    func claim(_ key: String, lease: Duration, layout: DoneLayout) -> ClaimOutcome {
        if case .compact(let records) = layout, doneInBuckets(key, records) { return .done }
        let key = pendingKey(key, layout)
        switch live(key) {
        case nil:
            store[key] = ("p:" + owner, now + lease)
            return .claimed
        case "p:" + owner:
            store[key]!.expires = now + lease
            return .alreadyOwned
        case let v? where v.hasPrefix("d:"):
            return .done
        case let v?:
            return .pendingElsewhere(owner: String(v.dropFirst(2)))
        }
    }

    func confirm(_ key: String, retention: Duration, layout: DoneLayout) -> ConfirmOutcome {
        if case .compact(let records) = layout {
            // Like `HSET`, then `MGET` and `DEL` of the pending key on one server: the field goes to
            // the current slot's bucket and the pending key is deleted, whoever holds it.
            let p = records.placement(of: key)
            let v = live(p.pendingKey)
            let slot = records.slot(at: unixMillis)
            let bucket = p.bucketKey(slot: slot)
            var b: (fields: Set<[UInt8]>, expires: ContinuousClock.Instant) = buckets[bucket].flatMap { $0.expires > now ? $0 : nil } ?? ([], now)
            b.fields.insert(p.field)
            b.expires = now + .milliseconds(records.bucketTTLMillis(slot: slot, at: unixMillis))
            buckets[bucket] = b
            store[p.pendingKey] = nil
            guard v == nil || v == "p:" + owner else { return .notOwner(owner: String(v!.dropFirst(2))) }
            return v == nil ? .confirmedAfterLeaseLost : .confirmed
        }
        switch live(key) {
        case nil:
            store[key] = ("d:" + owner, now + retention)
            return .confirmedAfterLeaseLost
        case let v? where v == "p:" + owner || v.hasPrefix("d:"):
            store[key] = ("d:" + owner, now + retention)
            return .confirmed
        case let v?:
            return .notOwner(owner: String(v.dropFirst(2)))
        }
    }

    func entityKey(_ entity: String) -> String { EntityGuard.storeName(entity, namespace: "model").storeKey }

    func hold(_ step: EntityStep) -> HoldOutcome {
        var r = entities[step.entityKey] ?? (nil, nil)
        let live = r.hold.map { $0.expires > now } ?? false
        if live, let h = r.hold, !(h.id == step.holdID && h.owner == owner) { return .busy(owner: h.owner) }
        guard live || step.allowedFrom.contains(r.state ?? EntityGuard.noState) else {
            rejected.insert(String(step.holdID.prefix { $0 != "#" }))
            return .rejected(state: r.state)
        }
        r.hold = (step.holdID, step.target, owner, now + step.ttl)
        entities[step.entityKey] = r
        return .held(from: r.state)
    }

    /// Moves written under this message's live hold must be legal; one whose hold ran out is the
    /// documented lease window, counted.
    func move(_ step: EntityStep) -> MoveOutcome {
        moveSent.insert(String(step.holdID.prefix { $0 != "#" }))
        var r = entities[step.entityKey] ?? (nil, nil)
        let mine = r.hold.map { $0.id == step.holdID && $0.owner == owner && $0.expires > now } ?? false
        if !mine, let h = r.hold, h.expires > now { return .notOwner(owner: h.owner) }
        if !mine, r.state != step.target, !step.allowedFrom.contains(r.state ?? EntityGuard.noState) {
            return .superseded(state: r.state)
        }
        if mine {
            if !Self.guardTable.allows(from: r.state, to: step.target) {
                fail("move of \(step.entityKey) \(r.state ?? "-") -> \(step.target) under a live hold is illegal")
            }
            moves += 1
        } else {
            movesAfterLeaseLost += 1
        }
        r.state = step.target
        r.hold = nil
        entities[step.entityKey] = r
        return mine ? .moved : .movedAfterLeaseLost
    }

    func unhold(_ step: EntityStep) -> Bool {
        guard let h = entities[step.entityKey]?.hold, h.id == step.holdID, h.owner == owner else { return false }
        entities[step.entityKey]!.hold = nil
        return true
    }

    func release(_ key: String) -> Bool {
        guard live(key) == "p:" + owner else { return false }
        store[key] = nil
        return true
    }

    /// A request reaches the store when it is sent (requests on one connection are applied in
    /// order); its answer comes back later. While the store is down (or refuses its kind) a
    /// request fails, and may or may not have been applied (the connection broke before or after;
    /// the refused command came after others of the pipeline).
    func request<T: Sendable>(_ label: String, _ apply: () -> T) -> StoreReply<T> {
        let reply = StoreReply<T>()
        if storeDown || refused.map({ label.hasPrefix($0 + " ") }) == true {
            // A refused command in a pipeline: those before it ran.
            if chance(0.5) { _ = apply() }
            note("\(label) fails")
            pending.append(("\(label) (failure)", { reply.complete(.failure(Violation(description: "store down"))) }, false))
        } else {
            let result = apply()
            pending.append((label, { reply.complete(.success(result)) }, chance(0.05)))
        }
        return reply
    }
}

extension ModelWorld: MessageSource {
    func poll(upTo maxMessages: Int, timeout: Duration) async throws -> [SourceEvent] {
        try step(fromPoll: true)
        if unrecoverableError != nil {
            advance(max(timeout, .milliseconds(1)))
            return []
        }
        var events = pendingEvents
        pendingEvents = []
        var budget = Int.random(in: 0...maxMessages, using: &rng)
        for p in assigned.sorted() where !paused.contains(p) {
            while budget > 0, let o = position[p], o < log[Int(p)].count {
                let key = log[Int(p)][Int(o)]
                var value: [UInt8] = []
                if shape.guarded {
                    let (entity, state) = guardStep(key)
                    value = Array(#"{"e":"\#(entity)","s":"\#(state)"}"#.utf8)
                }
                events.append(.message(InboundMessage(
                    topic: "t", partition: p, offset: o, value: value,
                    headers: [MessageHeader(name: "message-id", value: Array(key.utf8))])))
                position[p] = o + 1
                budget -= 1
            }
        }
        advance(events.isEmpty ? max(timeout, .milliseconds(1)) : .microseconds(Int64.random(in: 0...3000, using: &rng)))
        return events
    }

    func storeOffsets(_ positions: [TopicPartition: Int64]) throws {
        if let unrecoverableError { throw Violation(description: "offsets not stored: \(unrecoverableError)") }
        for (tp, offset) in positions {
            guard assigned.contains(tp.partition) else {
                fail("stored offset \(offset) for partition \(tp.partition), which is not assigned")
                continue
            }
            commit(tp.partition, to: offset)
        }
    }

    func pauseFetching(_ partitions: [TopicPartition]) throws {
        holdNew = true
        for tp in partitions where assigned.contains(tp.partition) { paused.insert(tp.partition) }
    }

    func resumeFetching(_ partitions: [TopicPartition]) throws {
        holdNew = false
        for tp in partitions { paused.remove(tp.partition) }
    }

    func commit(within timeout: Duration) async throws {}
    /// Ends both the source and the runner: nothing to close in either.
    func close(within timeout: Duration) async {}
    func close() async {}
}

extension ModelWorld: ClaimStore {
    func requestClaims(_ groups: [KeyGroup], owner: String) -> StoreReply<[ClaimOutcome]> {
        request("claims \(groups.flatMap(\.keys).map { $0.split(separator: ":").last! })") {
            groups.flatMap { g in g.keys.map { claim($0, lease: g.ttl, layout: g.layout) } }
        }
    }

    func requestConfirms(_ groups: [KeyGroup], owner: String) -> StoreReply<[ConfirmOutcome]> {
        request("confirms \(groups.flatMap(\.keys).map { $0.split(separator: ":").last! })") {
            groups.flatMap { g in
                g.keys.map { storeKey in
                    // A key confirmed that no round dispatched must have been rejected.
                    let key = String(storeKey.split(separator: ":").last!)
                    if shape.guarded, dispatches[key, default: 0] == 0, !rejected.contains(key) {
                        fail("\(key) confirmed without being dispatched or rejected")
                    }
                    // A dispatched key becomes done only after its move: a crash between the
                    // two would otherwise leave the entity in its old state with the message
                    // done, and the entity's next message judged against that state.
                    if shape.guarded, dispatches[key, default: 0] > 0, !rejected.contains(key), !moveSent.contains(key) {
                        fail("\(key) confirmed before its entity move reached the store")
                    }
                    return confirm(storeKey, retention: g.ttl, layout: g.layout)
                }
            }
        }
    }

    func requestHolds(_ steps: [EntityStep], owner: String) -> StoreReply<[HoldOutcome]> {
        request("holds \(steps.map(\.holdID))") { steps.map { hold($0) } }
    }

    func requestMoves(_ steps: [EntityStep], owner: String) -> StoreReply<[MoveOutcome]> {
        request("moves \(steps.map(\.holdID))") { steps.map { move($0) } }
    }

    func requestUnholds(_ steps: [EntityStep], owner: String) -> StoreReply<[Bool]> {
        request("unholds \(steps.map(\.holdID))") { steps.map { unhold($0) } }
    }

    func requestReleases(_ keys: [String], owner: String) -> StoreReply<[Bool]> {
        request("releases \(keys.map { $0.split(separator: ":").last! })") { keys.map { release($0) } }
    }

    func requestTokenUses(_ tokens: [String], marks: [String]) -> StoreReply<[TokenOutcome]> {
        request("tokens") { tokens.map { _ in .accepted } }
    }

    func claim(_ groups: [KeyGroup], owner: String) async throws -> [ClaimOutcome] { fatalError("the worker sends requests") }
    func confirm(_ groups: [KeyGroup], owner: String) async throws -> [ConfirmOutcome] { fatalError("the worker sends requests") }
    func release(_ keys: [String], owner: String) async throws -> [Bool] { fatalError("the worker sends requests") }
    func renew(_ keys: [String], owner: String, lease: Duration) async throws -> [Bool] { fatalError("not used") }
    func inspect(_ keys: [String]) async throws -> [KeyState] { fatalError("not used") }
}

extension ModelWorld: DispatchRunner {
    func start(_ due: [Dispatch], done: @escaping @Sendable ([DispatchResult]) -> Void) {
        let keys = due.map(\.key.raw)
        note("dispatch \(keys)")
        dispatched(keys)
        pending.append(("round \(keys)", { done(Array(repeating: .success, count: due.count)) }, chance(0.3)))
    }

    func cancelAll() {}
}

extension ModelWorld: LoopClock {
    /// The worker waits for answers: the world answers something now, or lets time pass to
    /// `deadline` and fires the timer.
    func schedule(at deadline: ContinuousClock.Instant, _ fire: @escaping @Sendable () -> Void) {
        try? step(fromPoll: false)
        let prompt = pending.indices.filter { !pending[$0].slow || chance(0.08) }
        if let i = prompt.randomElement(using: &rng), chance(0.8) {
            let p = pending.remove(at: i)
            if deadline > now { advance((deadline - now) / Int.random(in: 2...8, using: &rng)) }
            note("deliver \(p.label)")
            p.deliver()
        } else if deadline > now {
            now = deadline
        }
        fire()
    }
}
