/// The guard of a route (`guard.*`, docs/architecture.md "The guard"): a unique message asks its
/// entity to enter a state, and is dispatched only if its entity's recorded state allows that
/// transition. The rule of `UPDATE orders SET status = 'paid' WHERE id = ? AND status = 'created'`,
/// in front of the handler.
public struct EntityGuard: Sendable, Equatable {
    /// Which entity a message is about (`guard.entity`), e.g. `json:/orderNo`.
    public var entity: KeyTemplate
    /// The state the message asks its entity to enter (`guard.state`), e.g. `json:/status`.
    public var state: KeyTemplate
    /// States an entity with no recorded state may enter (`guard.initial`).
    public var initial: Set<String>
    /// From a state, the states allowed next (`guard.transitions`).
    public var transitions: [String: Set<String>]
    /// What becomes of a message whose transition is not allowed (`guard.on_reject`).
    public var onReject: OnReject
    /// How long an entity's state is kept after its last move (`guard.retention`).
    public var retention: Duration

    public enum OnReject: String, Sendable, CaseIterable {
        /// Resolved, counted and logged.
        case drop
        /// Also sent to the dead-letter topic (when one is configured) with reason `rejected_transition`.
        case deadLetter = "dead_letter"
    }

    /// What the store writes for "no recorded state" in an allowed-from list: no state name is
    /// empty (the configuration refuses it).
    public static let noState = ""

    public init(
        entity: KeyTemplate, state: KeyTemplate, initial: Set<String>, transitions: [String: Set<String>],
        onReject: OnReject = .drop, retention: Duration
    ) {
        self.entity = entity
        self.state = state
        self.initial = initial
        self.transitions = transitions
        self.onReject = onReject
        self.retention = retention
    }

    /// An entity's name in the store, `dedupd-entity:<namespace>:<entity>` (hashed when long, as
    /// keys are): apart from every dedup key's `dedupd:` names.
    public static func storeName(_ entity: String, namespace: String) -> DedupKey {
        DedupKey(raw: entity, namespace: namespace, prefix: "dedupd-entity")
    }

    /// Whether an entity in state `from` (nil: none recorded) may enter `to`.
    public func allows(from: String?, to: String) -> Bool {
        guard let from else { return initial.contains(to) }
        return transitions[from]?.contains(to) ?? false
    }

    /// The recorded states from which `to` is allowed (`noState` for an entity with none), what
    /// the store checks atomically. Empty: `to` is allowed from nowhere.
    public func allowedFrom(_ to: String) -> [String] {
        var out = transitions.filter { $0.value.contains(to) }.map(\.key).sorted()
        if initial.contains(to) { out.insert(Self.noState, at: 0) }
        return out
    }

    /// Every state the table names.
    public var states: Set<String> {
        transitions.values.reduce(initial.union(transitions.keys)) { $0.union($1) }
    }

    /// A table that cannot work, as (key, problem): nothing to enter, a state left from but never
    /// entered (a typo, or a state no entity can reach), a state name the store cannot keep.
    public func problem() -> (key: String, problem: String)? {
        if transitions.isEmpty { return ("guard.transitions", "is empty: give at least one state and the states allowed after it") }
        if initial.isEmpty { return ("guard.initial", "is empty: name the states an entity with no recorded state may enter") }
        let targets = transitions.values.reduce(Set<String>()) { $0.union($1) }
        for from in transitions.keys.sorted() where !initial.contains(from) && !targets.contains(from) {
            return ("guard.transitions", "state \"\(from)\" is neither in guard.initial nor a target of any transition, so no entity can reach it (a misspelt state?)")
        }
        for state in states.sorted() where state.isEmpty || state.contains(",") || state.contains("|") || state.contains("\n") {
            return ("guard.transitions", "state \"\(state)\" must be non-empty and contain no ',', '|' or newline")
        }
        return nil
    }

    /// `guard.transitions` given as one text (environment variables and flags):
    /// `created=paid|cancelled;paid=shipped|refunded`.
    public static func parseTransitions(_ text: String) -> [String: Set<String>]? {
        var out: [String: Set<String>] = [:]
        for entry in text.split(separator: ";") {
            let parts = entry.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            guard parts.count == 2 else { return nil }
            let from = parts[0].trimmingSpaces()
            guard !from.isEmpty else { return nil }
            out[from, default: []].formUnion(parts[1].split(separator: "|").map { $0.trimmingSpaces() }.filter { !$0.isEmpty })
        }
        return out
    }
}

/// One message's step of its entity's state machine, as the store sees it: hold the entity for
/// this message (the claim round trip), move it (the confirm round trip) or give it back.
public struct EntityStep: Sendable, Equatable {
    /// The entity's name in the store, `dedupd-entity:<namespace>:<entity>`: its records' keys
    /// and field derive from it (`CompactRecords.placement`).
    public var entityKey: String
    /// Names this message's hold: its dedup key and the attempt, so that giving back an earlier
    /// attempt's hold can never free a later one of the same message.
    public var holdID: String
    /// The state the message asks for.
    public var target: String
    /// Recorded states from which `target` is allowed (`EntityGuard.noState`: none recorded).
    public var allowedFrom: [String]
    /// The hold's lease.
    public var ttl: Duration
    /// Where the entity's state is kept: a field of a time-bucketed hash, as done records are,
    /// kept `guard.retention` (at least) after its last move.
    public var records: CompactRecords

    public init(entityKey: String, holdID: String, target: String, allowedFrom: [String], ttl: Duration, records: CompactRecords) {
        self.entityKey = entityKey
        self.holdID = holdID
        self.target = target
        self.allowedFrom = allowedFrom
        self.ttl = ttl
        self.records = records
    }
}

/// What the store said when a message asked to hold its entity.
public enum HoldOutcome: Sendable, Equatable {
    /// The transition is allowed from the recorded state (nil: none), and the entity is now held
    /// for this message with the requested lease (or the hold was extended).
    case held(from: String?)
    /// The recorded state (nil: none) does not allow the transition. Nothing was changed.
    case rejected(state: String?)
    /// Another message holds the entity (a transition in flight); look again later.
    case busy(owner: String)
}

/// What the store said when a dispatched message moved its entity.
public enum MoveOutcome: Sendable, Equatable {
    /// The entity was held for this message and is now in the new state.
    case moved
    /// The hold had expired and no other message held the entity: moved anyway, because the
    /// handler did take the message (or it was in the target state already: a retried move).
    case movedAfterLeaseLost
    /// The hold had expired and another message moved the entity meanwhile to a state from
    /// which this move is not allowed: nothing was written (a newer state is never overwritten).
    case superseded(state: String?)
    /// Another message holds the entity; nothing was changed.
    case notOwner(owner: String)
}

/// An entity's record as `dedupd inspect --entity` shows it.
public struct EntityState: Sendable, Equatable {
    /// The recorded state; nil when none is.
    public var state: String?
    /// A transition in flight: the message holding the entity, the state it asks for, its owner
    /// and how long the hold has left.
    public var pending: (holdID: String, target: String, owner: String, ttlMillis: Int64)?
    /// How long the recorded state is kept at least (its bucket's time to live; -1 until the
    /// bucket's TTL is set at the next slot edge); -2 when no state is recorded.
    public var ttlMillis: Int64

    public init(state: String?, pending: (holdID: String, target: String, owner: String, ttlMillis: Int64)?, ttlMillis: Int64) {
        self.state = state
        self.pending = pending
        self.ttlMillis = ttlMillis
    }

    public static func == (a: Self, b: Self) -> Bool {
        a.state == b.state && a.ttlMillis == b.ttlMillis && a.pending?.holdID == b.pending?.holdID
            && a.pending?.target == b.pending?.target && a.pending?.owner == b.pending?.owner
    }
}
