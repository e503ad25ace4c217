import DedupCore
import Synchronization

func msg(
    _ id: String?, partition: Int32 = 0, offset: Int64, topic: String = "t", key: String? = nil,
    value: String = "{}"
) -> InboundMessage {
    InboundMessage(
        topic: topic, partition: partition, offset: offset, key: key.map { Array($0.utf8) }, value: Array(value.utf8),
        headers: id.map { [MessageHeader(name: "message-id", value: Array($0.utf8))] } ?? [])
}

/// A hand-driven clock: tests move time forward instead of sleeping.
struct TestClock {
    private(set) var now = ContinuousClock.now
    mutating func advance(_ d: Duration) { now = now + d }
}

/// An in-memory seen-set with the same semantics as the Redis scripts, on a test clock.
final class FakeClaimStore: ClaimStore {
    struct Entry { var value: String; var expires: ContinuousClock.Instant }
    let state = Mutex<(entries: [String: Entry], now: ContinuousClock.Instant, roundTrips: Int, failNext: Bool)>(
        ([:], ContinuousClock.now, 0, false))

    struct Down: Error {}

    func setNow(_ t: ContinuousClock.Instant) { state.withLock { $0.now = t } }
    func failNextCall() { state.withLock { $0.failNext = true } }
    var roundTrips: Int { state.withLock { $0.roundTrips } }
    func value(_ key: String) -> String? {
        state.withLock { s in s.entries[key].flatMap { $0.expires > s.now ? $0.value : nil } }
    }
    func put(_ key: String, _ value: String, ttl: Duration) {
        state.withLock { $0.entries[key] = Entry(value: value, expires: $0.now + ttl) }
    }

    private func op<T>(_ body: (inout [String: Entry], ContinuousClock.Instant) -> T) throws -> T {
        try state.withLock { s in
            if s.failNext { s.failNext = false; throw Down() }
            s.roundTrips += 1
            s.entries = s.entries.filter { $0.value.expires > s.now }
            return body(&s.entries, s.now)
        }
    }

    func claim(_ groups: [KeyGroup], owner: String) throws -> [ClaimOutcome] {
        try op { e, now in
            groups.flatMap { g in g.keys.map { (k: $0, lease: g.ttl) } }.map { k, lease in
                guard let v = e[k]?.value else {
                    e[k] = Entry(value: "p:" + owner, expires: now + lease)
                    return .claimed
                }
                if v.hasPrefix("d:") { return .done }
                if v == "p:" + owner { e[k]!.expires = now + lease; return .alreadyOwned }
                return .pendingElsewhere(owner: String(v.dropFirst(2)))
            }
        }
    }

    func confirm(_ groups: [KeyGroup], owner: String) throws -> [ConfirmOutcome] {
        try op { e, now in
            groups.flatMap { g in g.keys.map { (k: $0, retention: g.ttl) } }.map { k, retention in
                guard let v = e[k]?.value else {
                    e[k] = Entry(value: "d:" + owner, expires: now + retention)
                    return .confirmedAfterLeaseLost
                }
                if v == "p:" + owner || v.hasPrefix("d:") {
                    e[k] = Entry(value: "d:" + owner, expires: now + retention)
                    return .confirmed
                }
                return .notOwner(owner: String(v.dropFirst(2)))
            }
        }
    }

    func release(_ keys: [String], owner: String) throws -> [Bool] {
        try op { e, _ in
            keys.map { k in
                guard e[k]?.value == "p:" + owner else { return false }
                e[k] = nil
                return true
            }
        }
    }

    func renew(_ keys: [String], owner: String, lease: Duration) async throws -> [Bool] {
        try op { e, now in
            keys.map { k in
                guard e[k]?.value == "p:" + owner else { return false }
                e[k]!.expires = now + lease
                return true
            }
        }
    }

    func inspect(_ keys: [String]) async throws -> [KeyState] {
        try op { e, now in
            keys.map { k in
                guard let entry = e[k] else { return .absent }
                let ttl = (entry.expires - now).milliseconds
                if entry.value.hasPrefix("d:") { return .done(ttlMillis: ttl) }
                return .pending(owner: String(entry.value.dropFirst(2)), ttlMillis: ttl)
            }
        }
    }

    func requestClaims(_ groups: [KeyGroup], owner: String) -> StoreReply<[ClaimOutcome]> {
        StoreReply(Result { try claim(groups, owner: owner) })
    }

    func requestConfirms(_ groups: [KeyGroup], owner: String) -> StoreReply<[ConfirmOutcome]> {
        StoreReply(Result { try confirm(groups, owner: owner) })
    }

    func requestReleases(_ keys: [String], owner: String) -> StoreReply<[Bool]> {
        StoreReply(Result { try release(keys, owner: owner) })
    }

    func requestTokenUses(_ tokens: [String], marks: [String]) -> StoreReply<[TokenOutcome]> {
        StoreReply(.success(tokens.map { _ in .accepted }))
    }

    // Guard: entity records with the semantics of the Redis scripts (hold_entities, ...).

    struct EntityRecord { var state: String?; var hold: (id: String, target: String, owner: String, expires: ContinuousClock.Instant)? }
    let entities = Mutex<[String: EntityRecord]>([:])

    func entityState(_ key: String) -> String? { entities.withLock { $0[key]?.state } }

    func requestHolds(_ steps: [EntityStep], owner: String) -> StoreReply<[HoldOutcome]> {
        StoreReply(Result {
            try op { _, now in
                entities.withLock { records in
                    steps.map { step -> HoldOutcome in
                        var r = records[step.entityKey] ?? EntityRecord(state: nil, hold: nil)
                        let live = r.hold.map { $0.expires > now } ?? false
                        if live, let hold = r.hold, !(hold.id == step.holdID && hold.owner == owner) { return .busy(owner: hold.owner) }
                        guard live || step.allowedFrom.contains(r.state ?? EntityGuard.noState) else { return .rejected(state: r.state) }
                        r.hold = (step.holdID, step.target, owner, now + step.ttl)
                        records[step.entityKey] = r
                        return .held(from: r.state)
                    }
                }
            }
        })
    }

    func requestMoves(_ steps: [EntityStep], owner: String) -> StoreReply<[MoveOutcome]> {
        StoreReply(Result {
            try op { _, now in
                entities.withLock { records in
                    steps.map { step -> MoveOutcome in
                        var r = records[step.entityKey] ?? EntityRecord(state: nil, hold: nil)
                        let mine = r.hold.map { $0.id == step.holdID && $0.owner == owner && $0.expires > now } ?? false
                        if !mine, let hold = r.hold, hold.expires > now { return .notOwner(owner: hold.owner) }
                        if !mine, r.state != step.target, !step.allowedFrom.contains(r.state ?? EntityGuard.noState) {
                            return .superseded(state: r.state)
                        }
                        r.state = step.target
                        r.hold = nil
                        records[step.entityKey] = r
                        return mine ? .moved : .movedAfterLeaseLost
                    }
                }
            }
        })
    }

    func requestUnholds(_ steps: [EntityStep], owner: String) -> StoreReply<[Bool]> {
        StoreReply(Result {
            try op { _, _ in
                entities.withLock { records in
                    steps.map { step -> Bool in
                        guard let hold = records[step.entityKey]?.hold, hold.id == step.holdID, hold.owner == owner else { return false }
                        records[step.entityKey]!.hold = nil
                        return true
                    }
                }
            }
        })
    }
}
