/// What Redis said about one key when this worker tried to claim it (docs/architecture.md step 3).
public enum ClaimOutcome: Sendable, Equatable {
    /// The key was absent; it is now `pending` under this worker with the requested lease.
    case claimed
    /// The key is already `pending` under this same owner (a copy this worker claimed earlier); the lease was renewed.
    case alreadyOwned
    /// The key is `done`: a handler already took a copy within the retention period. This message is a duplicate.
    case done
    /// The key is `pending` under another worker: a copy is in flight there. Park this one and look again.
    case pendingElsewhere(owner: String)
}

/// What Redis said when this worker confirmed a dispatched key.
public enum ConfirmOutcome: Sendable, Equatable {
    /// The key was `pending` under this owner and is now `done` with the retention TTL.
    case confirmed
    /// The key had expired (lease ran out before confirm); it is now `done` anyway, because the handler did take it.
    case confirmedAfterLeaseLost
    /// Another owner holds the key; nothing was changed. Only the owner may confirm.
    case notOwner(owner: String)
}

/// A key's state as `dedupd inspect` shows it.
public enum KeyState: Sendable, Equatable {
    case absent
    case pending(owner: String, ttlMillis: Int64)
    case done(ttlMillis: Int64)
}

/// The seen-set: where dedup keys are claimed, confirmed and released.
///
/// Every method takes a whole batch and must cost one round trip to the store
/// (pipelined), whatever the batch size: this is what keeps dedupd close to the
/// speed of the store. Results are in the order of the keys given.
/// Keys arrive already namespaced and length-bounded (see `DedupKey`).
/// Store keys that share one time to live (a lease for claims, a retention for confirms).
public struct KeyGroup: Sendable, Equatable {
    public var keys: [String]
    public var ttl: Duration
    /// Where the group's done records are (its route's `dedup.layout`): claims look there, confirms
    /// write there. Default: `.keys`.
    public var layout: DoneLayout
    /// Each key's digest (`KeyDigest(of:)`), taken before, in the order of `keys`; empty when not
    /// known, and the store takes them itself.
    public var digests: [KeyDigest]
    public init(_ keys: [String], ttl: Duration, layout: DoneLayout = .keys, digests: [KeyDigest] = []) {
        self.keys = keys
        self.ttl = ttl
        self.layout = layout
        self.digests = digests
    }
}

public protocol ClaimStore: Sendable {
    /// Claims each key for `owner` with a `pending` lease (each group its own, e.g. one per
    /// route), all groups in one round trip. Atomic per key (compare-and-set). Results follow
    /// the keys of the groups, in order.
    func claim(_ groups: [KeyGroup], owner: String) async throws -> [ClaimOutcome]
    /// Marks each key `done` for its group's retention, if `owner` still holds it (or it expired).
    func confirm(_ groups: [KeyGroup], owner: String) async throws -> [ConfirmOutcome]
    /// Deletes each key that is `pending` under `owner`; returns whether it was deleted.
    func release(_ keys: [String], owner: String) async throws -> [Bool]
    /// Extends the lease of each key still `pending` under `owner`; returns whether it was extended.
    func renew(_ keys: [String], owner: String, lease: Duration) async throws -> [Bool]
    /// Reads each key's state without changing it.
    func inspect(_ keys: [String]) async throws -> [KeyState]

    // The worker's requests: each is sent before the call returns (so requests reach the store
    // in the order they were made, and a release always precedes a later claim of its key), and
    // answered through the reply while the worker goes on.

    /// `claim`, sent now.
    func requestClaims(_ groups: [KeyGroup], owner: String) -> StoreReply<[ClaimOutcome]>
    /// `confirm`, sent now.
    func requestConfirms(_ groups: [KeyGroup], owner: String) -> StoreReply<[ConfirmOutcome]>
    /// `release`, sent now.
    func requestReleases(_ keys: [String], owner: String) -> StoreReply<[Bool]>
    /// Token mode: uses each token for the message identified by its mark (see `TokenStore.use`), sent now.
    func requestTokenUses(_ tokens: [String], marks: [String]) -> StoreReply<[TokenOutcome]>

    // Guard (docs/architecture.md "The guard"): an entity's record is its state and at most one
    // hold (a message's transition in flight: its hold id, target state, owner and lease).

    /// Per step, atomically: the entity held by another unexpired hold is `busy`; else a
    /// recorded state (or none) not in `allowedFrom` is `rejected`; else the entity is now held
    /// for the step with its lease (extended, if this same hold had it). Sent now.
    func requestHolds(_ steps: [EntityStep], owner: String) -> StoreReply<[HoldOutcome]>
    /// Per step: the entity held by this step's hold (or by none) enters its target state, kept
    /// for the step's time to live, and the hold is gone; held by another, nothing changes. Sent now.
    func requestMoves(_ steps: [EntityStep], owner: String) -> StoreReply<[MoveOutcome]>
    /// Per step: the hold is removed if it is this step's; returns whether it was. Sent now.
    func requestUnholds(_ steps: [EntityStep], owner: String) -> StoreReply<[Bool]>
}

/// Why the store failed a request, as the operator needs to know it: the outage's log line names
/// it, since only a refusal or a full store needs someone to change something.
public enum StoreFailure: Sendable, Equatable {
    /// No answer: the server is down, unreachable, slow or failing over.
    case unavailable
    /// The server refused the worker: a wrong password, a user not allowed a command.
    case refused
    /// The server is out of memory and refuses writes (`maxmemory` with `noeviction`).
    case full
}

/// A store error that says which `StoreFailure` it is (any other error is `.unavailable`).
public protocol StoreFailureClassifying: Error {
    var storeFailure: StoreFailure { get }
}

/// What a store without entity records answers a guard request with.
public struct GuardUnsupported: Error, CustomStringConvertible {
    public init() {}
    public var description: String { "this claim store keeps no entity records (guard)" }
}

extension ClaimStore {
    public func requestHolds(_ steps: [EntityStep], owner: String) -> StoreReply<[HoldOutcome]> {
        StoreReply(.failure(GuardUnsupported()))
    }
    public func requestMoves(_ steps: [EntityStep], owner: String) -> StoreReply<[MoveOutcome]> {
        StoreReply(.failure(GuardUnsupported()))
    }
    public func requestUnholds(_ steps: [EntityStep], owner: String) -> StoreReply<[Bool]> {
        StoreReply(.failure(GuardUnsupported()))
    }
}

extension ClaimStore {
    /// Claims keys that all share one lease.
    public func claim(_ keys: [String], owner: String, lease: Duration) async throws -> [ClaimOutcome] {
        try await claim([KeyGroup(keys, ttl: lease)], owner: owner)
    }

    /// Confirms keys that all share one retention.
    public func confirm(_ keys: [String], owner: String, retention: Duration) async throws -> [ConfirmOutcome] {
        try await confirm([KeyGroup(keys, ttl: retention)], owner: owner)
    }
}
