import CHiredis
import Foundation
import DedupCore
import Logging
import Synchronization

/// The seen-set in Redis (docs/architecture.md step 3), on one `RedisConnection`.
///
/// Every batch method is one round trip whatever the batch size: the keys are
/// cut into chunks of at most `maxKeysPerScript`, each chunk is one `EVALSHA`
/// of a Lua script (compare-and-set per key, atomic per chunk), and all chunks
/// go in one pipeline. The compact layout's claims and confirms on one server are plain
/// pipelined commands instead (`CompactCommands`). Scripts are loaded with `SCRIPT LOAD` on first use;
/// when the server answers `NOSCRIPT` (its script cache was flushed, e.g. by a
/// restart), the script is loaded again and only the failed chunks are retried,
/// once, in one more round trip.
///
/// In a Redis Cluster a script may only touch keys of one slot: a batch's keys are grouped by
/// slot, each chunk holds keys of one slot, and the cluster sends each chunk to its primary
/// (one round trip per node, side by side). Scripts are loaded on every primary.
public final class RedisClaimStore: ClaimStore {
    public let redis: RedisTarget
    /// Most keys passed to one `EVALSHA`. Default: 1000.
    public let maxKeysPerScript: Int
    private let logger: Logger
    /// Script name → SHA1 the server gave for it; empty until first use.
    private let shas = Mutex<[String: String]>([:])
    /// Compact layout: per route's buckets, the slot whose buckets this store set TTLs for last.
    private let swept = Mutex<[SweepScope: Int64]>([:])
    let waitReplicas: (count: Int, timeout: Duration)?
    /// Whether compact claims and confirms on one server go as plain commands (`CompactCommands`)
    /// rather than scripts; false only when built with `compactScripts` (the bench compares both).
    let compactCommands: Bool

    /// Called after each operation's round trip(s) with the script name (`claim`, `confirm`, ...)
    /// and how long it took, for metrics. Default: none.
    let onRoundTrip: (@Sendable (String, Duration) -> Void)?
    /// Called when an operation's pipeline is sent, with its script name; the closure it returns
    /// is called once the answers are in (the worker's record of what is in flight). Default: none.
    let onSend: (@Sendable (String) -> @Sendable () -> Void)?
    /// Wall-clock time in Unix milliseconds: which slot a compact confirm writes and which slots a
    /// claim reads (workers agree on slots through their clocks; see `CompactRecords.clockSkew`).
    /// Default: the system clock; tests move it.
    let unixMillis: @Sendable () -> Int64
    private let replies = Mutex<(any TaskExecutor)?>(nil)

    /// Where the tasks that wait for the answers of `requestClaims` and the other `request...`
    /// methods run once the answers are in: the executor of the loop that posted the requests,
    /// so an answer wakes that loop's thread and no other. Default: the global executor.
    public func answer(on executor: (any TaskExecutor)?) { replies.withLock { $0 = executor } }

    /// Lets small round trips sent from the thread `reads.applies` names be read on that thread
    /// (`RedisConnection.InlineReads`; in a cluster, `RedisCluster.send`). nil ends it.
    public func readInline(_ reads: RedisConnection.InlineReads?) {
        switch redis {
        case .server(let connection): connection.readInline(reads)
        case .cluster(let cluster): cluster.readInline(reads)
        }
    }

    public convenience init(
        connection: RedisConnection, maxKeysPerScript: Int = 1000, logger: Logger,
        onSend: (@Sendable (_ op: String) -> @Sendable () -> Void)? = nil,
        onRoundTrip: (@Sendable (_ op: String, _ duration: Duration) -> Void)? = nil,
        unixMillis: (@Sendable () -> Int64)? = nil, compactScripts: Bool = false
    ) {
        self.init(
            redis: .server(connection), maxKeysPerScript: maxKeysPerScript, logger: logger, onSend: onSend, onRoundTrip: onRoundTrip,
            unixMillis: unixMillis, compactScripts: compactScripts)
    }

    /// `waitReplicas`: after a batch's confirms, `WAIT` until that many replicas of each primary
    /// written to have them, at most `timeout` (`redis.wait_replicas`): one more round trip that
    /// shrinks what a failover can lose.
    public init(
        redis: RedisTarget, maxKeysPerScript: Int = 1000, logger: Logger,
        waitReplicas: (count: Int, timeout: Duration)? = nil,
        onSend: (@Sendable (_ op: String) -> @Sendable () -> Void)? = nil,
        onRoundTrip: (@Sendable (_ op: String, _ duration: Duration) -> Void)? = nil,
        unixMillis: (@Sendable () -> Int64)? = nil, compactScripts: Bool = false
    ) {
        self.compactCommands = !compactScripts
        self.unixMillis = unixMillis ?? { Int64((Date().timeIntervalSince1970 * 1000).rounded(.down)) }
        self.redis = redis
        self.waitReplicas = waitReplicas
        self.maxKeysPerScript = max(1, maxKeysPerScript)
        self.logger = logger
        self.onSend = onSend
        self.onRoundTrip = onRoundTrip
    }

    public func claim(_ groups: [KeyGroup], owner: String) async throws -> [ClaimOutcome] {
        try await sendClaims(groups, owner: owner).outcomes()
    }

    public func confirm(_ groups: [KeyGroup], owner: String) async throws -> [ConfirmOutcome] {
        // Scripts first: a confirm sent before they are loaded waits for them, and its bucket
        // sweep must not go ahead of the fields it sets TTLs for.
        if !sendsCompactCommands(groups) { _ = try await loadedSHA(.confirm) }
        return try await sendConfirms(groups, owner: owner).outcomes()
    }

    /// `claim`, sent now; the caller awaits `outcomes()` when it needs them. The compact layout on
    /// one server sends plain commands (`CompactCommands`), everything else a script per chunk.
    public func sendClaims(_ groups: [KeyGroup], owner: String) -> Request<ClaimOutcome> {
        if let items = compactCommandItems(groups, confirming: false) {
            return sendCompactClaims(items, owner: owner)
        }
        return send(.claim, batches(groups, owner: owner, confirming: false), element: Self.claimOutcome)
    }

    /// `confirm`, sent now; the caller awaits `outcomes()` when it needs them.
    public func sendConfirms(_ groups: [KeyGroup], owner: String) -> Request<ConfirmOutcome> {
        let request = if let items = compactCommandItems(groups, confirming: true) {
            sendCompactConfirms(items, owner: owner)
        } else {
            send(.confirm, batches(groups, owner: owner, confirming: true), element: Self.confirmOutcome)
        }
        return sweepingBuckets(of: groups, after: request, what: "a compact bucket")
    }

    /// `request`, then the bucket sweep its groups call for (`sweepBuckets`), answered together:
    /// a sweep that failed fails the request.
    private func sweepingBuckets<T: Sendable>(of groups: [KeyGroup], after request: Request<T>, what: String) -> Request<T> {
        guard let (sweep, marks) = sweepBuckets(groups) else { return request }
        return Request {
            do {
                let outcomes = try await request.outcomes()
                for reply in try await sweep.value() {
                    if case .error(let text) = reply { throw RedisError.fromServerReply(text, context: "PEXPIRE of \(what)") }
                }
                return outcomes
            } catch {
                // Left marked swept, those slots' buckets would never get their TTL (a broken
                // connection, a user without PEXPIRE): the request's retry sweeps them again.
                self.unmark(marks)
                throw error
            }
        }
    }

    /// `release`, sent now; the caller awaits `outcomes()` when it needs them.
    public func sendReleases(_ keys: [String], owner: String) -> Request<Bool> {
        send(.release, [ScriptBatch(keys: keys, args: [RedisArgument(owner)], perKeyArgs: nil)], element: Self.flag)
    }

    /// `use` (token mode), sent now; the caller awaits `outcomes()` when it needs them.
    public func sendTokenUses(_ tokens: [String], marks: [String]) -> Request<TokenOutcome> {
        precondition(tokens.count == marks.count, "one mark per token")
        return send(
            .useTokens, [ScriptBatch(keys: tokens, args: [], perKeyArgs: marks.map { RedisArgument($0) })],
            element: Self.tokenOutcome)
    }

    public func requestClaims(_ groups: [KeyGroup], owner: String) -> StoreReply<[ClaimOutcome]> {
        reply(sendClaims(groups, owner: owner))
    }

    public func requestConfirms(_ groups: [KeyGroup], owner: String) -> StoreReply<[ConfirmOutcome]> {
        reply(sendConfirms(groups, owner: owner))
    }

    public func requestReleases(_ keys: [String], owner: String) -> StoreReply<[Bool]> {
        reply(sendReleases(keys, owner: owner))
    }

    public func requestTokenUses(_ tokens: [String], marks: [String]) -> StoreReply<[TokenOutcome]> {
        reply(sendTokenUses(tokens, marks: marks))
    }

    // MARK: - Guard

    public func requestHolds(_ steps: [EntityStep], owner: String) -> StoreReply<[HoldOutcome]> {
        let now = unixMillis()
        return reply(send(.holdEntities, Self.entityBatches(steps, owner: owner) { step, p in
            let slots = step.records.liveSlots(at: now)
            return ([p.pendingKey] + slots.map { p.bucketKey(slot: $0) }, [
                RedisArgument(bytes: p.field), RedisArgument(step.holdID), RedisArgument(step.target),
                RedisArgument("|" + step.allowedFrom.joined(separator: "|") + "|"), RedisArgument(Self.millis(step.ttl)),
            ])
        }, element: Self.holdOutcome))
    }

    public func requestMoves(_ steps: [EntityStep], owner: String) -> StoreReply<[MoveOutcome]> {
        let now = unixMillis()
        let request = send(.moveEntities, Self.entityBatches(steps, owner: owner) { step, p in
            let current = step.records.slot(at: now)
            let others = step.records.liveSlots(at: now).filter { $0 != current }
            return ([p.pendingKey, p.bucketKey(slot: current)] + others.map { p.bucketKey(slot: $0) },
                    [RedisArgument(bytes: p.field), RedisArgument(step.holdID), RedisArgument(step.target),
                     RedisArgument("|" + step.allowedFrom.joined(separator: "|") + "|")])
        }, element: Self.moveOutcome)
        // The entity buckets get their TTLs the way done records' buckets do: one group per
        // route (its namespace and settings), not per entity.
        var groups: [KeyGroup] = []
        for step in steps {
            let namespace = step.entityKey.split(separator: ":", maxSplits: 2).prefix(2)
            if groups.contains(where: { $0.layout == .compact(step.records) && $0.keys[0].split(separator: ":", maxSplits: 2).prefix(2) == namespace }) {
                continue
            }
            groups.append(KeyGroup([step.entityKey], ttl: step.records.retention, layout: .compact(step.records)))
        }
        return reply(sweepingBuckets(of: groups, after: request, what: "an entity bucket"))
    }

    public func requestUnholds(_ steps: [EntityStep], owner: String) -> StoreReply<[Bool]> {
        reply(send(.unholdEntities, Self.entityBatches(steps, owner: owner) { step, p in
            ([p.pendingKey], [RedisArgument(step.holdID)])
        }, element: Self.flag))
    }

    /// `requestHolds`, awaited.
    public func hold(_ steps: [EntityStep], owner: String) async throws -> [HoldOutcome] {
        try await requestHolds(steps, owner: owner).value()
    }

    /// `requestMoves`, awaited.
    public func move(_ steps: [EntityStep], owner: String) async throws -> [MoveOutcome] {
        try await requestMoves(steps, owner: owner).value()
    }

    /// `requestUnholds`, awaited.
    public func unhold(_ steps: [EntityStep], owner: String) async throws -> [Bool] {
        try await requestUnholds(steps, owner: owner).value()
    }

    /// The steps as script items: each entity's keys (all with its hash tag) and arguments, from
    /// its placement. Steps of routes with different settings (or a slot count that differs)
    /// make separate batches; the answers stay in the steps' order.
    private static func entityBatches(
        _ steps: [EntityStep], owner: String, item: (EntityStep, CompactRecords.Placement) -> ([String], [RedisArgument])
    ) -> [ScriptBatch] {
        var batches: [ScriptBatch] = []
        for step in steps {
            let (keys, args) = item(step, step.records.placement(of: step.entityKey))
            if var last = batches.last, last.keysPerItem == keys.count, last.argsPerItem == args.count {
                last.keys += keys
                last.perKeyArgs! += args
                batches[batches.count - 1] = last
            } else {
                batches.append(ScriptBatch(
                    keys: keys, args: [RedisArgument(owner), RedisArgument(keys.count)], perKeyArgs: args, argsPerItem: args.count,
                    keysPerItem: keys.count))
            }
        }
        return batches
    }

    @Sendable private static func holdOutcome(_ element: UnsafePointer<redisReply>) -> HoldOutcome? {
        guard let text = text(element), let code = text.utf8.first else { return nil }
        let rest = String(text.dropFirst())
        switch code {
        case UInt8(ascii: "h"): return .held(from: rest.isEmpty ? nil : rest)
        case UInt8(ascii: "r"): return .rejected(state: rest.isEmpty ? nil : rest)
        case UInt8(ascii: "b"): return .busy(owner: rest)
        default: return nil
        }
    }

    @Sendable private static func moveOutcome(_ element: UnsafePointer<redisReply>) -> MoveOutcome? {
        guard let text = text(element), let code = text.utf8.first else { return nil }
        switch code {
        case UInt8(ascii: "m"): return .moved
        case UInt8(ascii: "l"): return .movedAfterLeaseLost
        case UInt8(ascii: "n"): return .notOwner(owner: String(text.dropFirst()))
        case UInt8(ascii: "s"): return .superseded(state: text.count > 1 ? String(text.dropFirst()) : nil)
        default: return nil
        }
    }

    /// The request is on its way already; a task only waits for its answers (and reloads a
    /// script the server lost). It starts on the caller's thread and runs there until it waits
    /// for the answers: starting it on the pool would wake a thread only to have it wait.
    private func reply<Item: Sendable>(_ request: Request<Item>) -> StoreReply<[Item]> {
        let reply = StoreReply<[Item]>()
        Task.immediate(executorPreference: replies.withLock { $0 }) {
            do { reply.complete(.success(try await request.outcomes())) } catch { reply.complete(.failure(error)) }
        }
        return reply
    }

    @Sendable private static func claimOutcome(_ element: UnsafePointer<redisReply>) -> ClaimOutcome? {
        // One byte is one of the script's own answers; anything longer is the foreign value.
        switch shortCode(element) {
        case UInt8(ascii: "c"): return .claimed
        case UInt8(ascii: "o"): return .alreadyOwned
        case UInt8(ascii: "d"): return .done
        default: return text(element).map { .pendingElsewhere(owner: owner(of: $0)) }
        }
    }

    @Sendable private static func confirmOutcome(_ element: UnsafePointer<redisReply>) -> ConfirmOutcome? {
        switch shortCode(element) {
        case UInt8(ascii: "c"): return .confirmed
        case UInt8(ascii: "l"): return .confirmedAfterLeaseLost
        default: return text(element).map { .notOwner(owner: owner(of: $0)) }
        }
    }

    public func release(_ keys: [String], owner: String) async throws -> [Bool] {
        try await run(.release, keys: keys, args: [RedisArgument(owner)], element: Self.flag)
    }

    public func renew(_ keys: [String], owner: String, lease: Duration) async throws -> [Bool] {
        try await run(.renew, keys: keys, args: [RedisArgument(owner), RedisArgument(Self.millis(lease))], element: Self.flag)
    }

    public func inspect(_ keys: [String]) async throws -> [KeyState] {
        let replies = try await run(.inspect, keys: keys, args: [], repliesPerKey: 2) { RedisReply($0) }
        var states: [KeyState] = []
        states.reserveCapacity(keys.count)
        for i in stride(from: 0, to: replies.count, by: 2) {
            guard let ttl = replies[i + 1].int else { throw Self.unexpected(replies[i + 1], in: "inspect") }
            switch replies[i] {
            case .null:
                states.append(.absent)
            case let reply:
                guard let value = reply.text else { throw Self.unexpected(reply, in: "inspect") }
                if value.hasPrefix("d:") {
                    states.append(.done(ttlMillis: ttl))
                } else {
                    states.append(.pending(owner: Self.owner(of: value), ttlMillis: ttl))
                }
            }
        }
        return states
    }

    // MARK: - Scripts

    /// One `EVALSHA`'s reply, read on the connection's queue: the per-key results, or the
    /// server's error (NOSCRIPT is retried), or what came instead of the expected array.
    private enum ChunkReply<Item: Sendable>: Sendable {
        case items([Item])
        case error(String)
        /// A bulk string: the SHA that `SCRIPT LOAD` answers when a lost script is loaded again.
        case text(String)
        case malformed(String)
    }

    /// Items run through one script with the same arguments (e.g. one lease). An item is one
    /// claimed key and passes `keysPerItem` keys (`keys` holds them item after item), all with the
    /// hash tag of its first key. `perKeyArgs`, when given, holds `argsPerItem` arguments per
    /// item, passed with its chunk after `args`. `compact`, when given, writes each item's keys and
    /// its one argument instead. `script` nil: the operation's own script.
    private struct ScriptBatch: Sendable {
        var keys: [String]
        var args: [RedisArgument]
        var perKeyArgs: [RedisArgument]? = nil
        var argsPerItem = 1
        var keysPerItem = 1
        var script: LuaScript? = nil
        var compact: CompactItems? = nil
        var itemCount: Int { compact?.storeKeys.count ?? keys.count / keysPerItem }

        init(
            keys: [String], args: [RedisArgument], perKeyArgs: [RedisArgument]? = nil, argsPerItem: Int = 1, keysPerItem: Int = 1,
            script: LuaScript? = nil
        ) {
            (self.keys, self.args, self.perKeyArgs, self.argsPerItem, self.keysPerItem, self.script) =
                (keys, args, perKeyArgs, argsPerItem, keysPerItem, script)
        }

        init(_ compact: CompactItems, args: [RedisArgument], script: LuaScript) {
            (self.keys, self.args, self.keysPerItem, self.script, self.compact) = ([], args, compact.keysPerItem, script, compact)
        }

        /// Appends item `item`'s keys.
        func appendKeys(ofItem item: Int, to batch: inout RedisCommandBatch) {
            if let compact { return compact.appendKeys(ofItem: item, to: &batch) }
            for k in item * keysPerItem..<(item + 1) * keysPerItem { batch.append(keys[k]) }
        }

        /// Appends item `item`'s own arguments (a compact item's: its field).
        func appendArguments(ofItem item: Int, to batch: inout RedisCommandBatch) {
            if let compact { return batch.appendField(of: compact.spots[item]) }
            guard let perKeyArgs else { return }
            for j in item * argsPerItem..<(item + 1) * argsPerItem { batch.append(perKeyArgs[j].bytes) }
        }

        /// The cluster slot of item `item` (that of its first key; its other keys share its tag).
        func clusterSlot(ofItem item: Int) -> UInt16 {
            guard let compact else { return ClusterSlot.of(keys[item * keysPerItem]) }
            var name: [UInt8] = []
            compact.names.appendPendingKey(of: compact.storeKeys[item], at: compact.spots[item], to: &name)
            return name.withUnsafeBufferPointer { ClusterSlot.of(bytes: $0) }
        }

        /// Bytes and arguments the items add to a command batch, for reserving its room.
        var encodedSize: (bytes: Int, arguments: Int) {
            guard let compact else {
                return (keys.reduce(0) { $0 + $1.utf8.count } + (perKeyArgs?.reduce(0) { $0 + $1.bytes.count } ?? 0),
                        keys.count + (perKeyArgs?.count ?? 0))
            }
            // A name is its store key plus a tag, a kind and a slot: under 40 bytes more.
            let names = compact.storeKeys.reduce(0) { $0 + $1.utf8.count + 40 } * keysPerItem
            return (names + 12 * itemCount, (keysPerItem + 1) * itemCount)
        }
    }

    /// A compact layout's claims or confirms: an item is a store key, its keys are its pending
    /// key and its bucket in each of `slots`, its argument is its field; all are written from its
    /// `Spot` when the command is encoded, so no name is built as a string.
    struct CompactItems: Sendable {
        var records: CompactRecords
        var storeKeys: [String]
        var spots: [CompactRecords.Spot]
        var slots: [Int64]
        /// The pending keys' and the buckets' names.
        var names: CompactRecords.GroupNames
        var keysPerItem: Int { 1 + slots.count }

        /// `digests`: the keys' digests when known (`KeyGroup.digests`), else taken here.
        init(_ storeKeys: [String], _ records: CompactRecords, slots: [Int64], digests: [KeyDigest] = []) {
            self.records = records
            self.storeKeys = storeKeys
            self.spots = digests.count == storeKeys.count ? digests.map { records.spot(of: $0) } : storeKeys.map { records.spot(of: $0) }
            self.slots = slots
            self.names = CompactRecords.GroupNames(records, slots: slots, firstKey: storeKeys.first)
        }

        func appendKeys(ofItem item: Int, to batch: inout RedisCommandBatch) {
            let key = storeKeys[item], spot = spots[item]
            batch.appendPendingKey(of: key, at: spot, names)
            for slot in slots.indices { batch.appendBucketKey(of: key, at: spot, slotAt: slot, names) }
        }
    }

    /// Claim and confirm scripts of the keys layout take `owner` and the group's time to live in
    /// milliseconds; compact groups get their own batch (`compactClaims`, `compactConfirms`).
    private func batches(_ groups: [KeyGroup], owner: String, confirming: Bool) -> [ScriptBatch] {
        let now = unixMillis()
        return groups.map { group in
            switch group.layout {
            case .keys:
                return ScriptBatch(keys: group.keys, args: [RedisArgument(owner), RedisArgument(Self.millis(group.ttl))])
            case .compact(let records):
                return confirming
                    ? Self.compactConfirms(group.keys, records, owner: owner, now: now, digests: group.digests)
                    : Self.compactClaims(group.keys, records, owner: owner, lease: group.ttl, now: now, digests: group.digests)
            }
        }
    }

    /// Per key: its pending key and the bucket of each live slot.
    private static func compactClaims(
        _ keys: [String], _ records: CompactRecords, owner: String, lease: Duration, now: Int64, digests: [KeyDigest]
    ) -> ScriptBatch {
        let items = CompactItems(keys, records, slots: records.liveSlots(at: now), digests: digests)
        return ScriptBatch(
            items, args: [RedisArgument(owner), RedisArgument(millis(lease)), RedisArgument(items.keysPerItem)], script: .claimCompact)
    }

    /// Per key: its pending key and the current slot's bucket.
    private static func compactConfirms(_ keys: [String], _ records: CompactRecords, owner: String, now: Int64, digests: [KeyDigest]) -> ScriptBatch {
        ScriptBatch(
            CompactItems(keys, records, slots: [records.slot(at: now)], digests: digests), args: [RedisArgument(owner), RedisArgument(millis(records.lease))],
            script: .confirmCompact)
    }

    /// One route's buckets: the namespace and the settings that name them.
    private struct SweepScope: Hashable {
        var prefix: String
        var namespace: String
        var records: CompactRecords
    }

    /// Sets the TTL of compact buckets, once per bucket and slot rather than per confirmed key
    /// (a `PEXPIRE` per key is a large share of a key's Redis CPU; docs/performance-history.md). The first confirm this store sends in
    /// a slot sets the TTL of every bucket of the slots since its last sweep up to the one before
    /// (now complete); its first confirm ever also covers the current slot and the slots a
    /// stopped worker may have left without one. A bucket written after a sweep of its slot keeps
    /// the TTL (`HSET` does not clear it); one written after the last sweep gets it at the next
    /// slot edge from whichever worker confirms first. Single-key `PEXPIRE`s, pipelined after
    /// the confirm on the same connection (routed per key in a cluster): nil when none is due.
    private func sweepBuckets(_ groups: [KeyGroup]) -> (RedisPending<[RedisReply]>, [SweepMark])? {
        let now = unixMillis()
        var marks: [SweepMark] = []
        // Per slot to sweep: the scope's names (`<prefix>:<namespace>:`) and the TTL. The
        // commands are written straight into the batch: a worker's first sweep covers every
        // bucket of several slots, tens of thousands of commands.
        var sweeps: [(records: CompactRecords, scope: String, slot: Int64, ttl: Int64)] = []
        for group in groups {
            guard case .compact(let records) = group.layout, let key = group.keys.first else { continue }
            let parts = key.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
            guard parts.count == 3 else { continue }
            let scope = SweepScope(prefix: String(parts[0]), namespace: String(parts[1]), records: records)
            let current = records.slot(at: now)
            let range: ClosedRange<Int64>? = swept.withLock { swept in
                let last = swept[scope]
                if let last, last >= current { return nil }
                swept[scope] = current
                marks.append(SweepMark(scope: scope, before: last, after: current))
                guard let last else { return current - Int64(records.slotsPerRetention) - 3...current }
                return last...(current - 1)
            }
            guard let range else { continue }
            for slot in range {
                sweeps.append((records, scope.prefix + ":" + scope.namespace + ":", slot, records.bucketTTLMillis(slot: slot, at: now)))
            }
        }
        guard !sweeps.isEmpty else { return nil }
        let all = sweeps
        let slots: [UInt16] = redis.isCluster ? sweeps.flatMap { s in
            (0..<s.records.buckets).map { bucket in
                var name: [UInt8] = []
                s.records.appendBucketKey(of: s.scope, bucket: bucket, slot: s.slot, to: &name)
                return name.withUnsafeBufferPointer { ClusterSlot.of(bytes: $0) }
            }
        } : []
        let pending = redis.send({
            var batch = RedisCommandBatch()
            for s in all {
                for bucket in 0..<s.records.buckets {
                    batch.begin(arguments: 3)
                    batch.append("PEXPIRE")
                    batch.appendArgument(atMost: CompactRecords.maxNameLength(of: s.scope)) {
                        s.records.writeBucketKey(of: s.scope, at: s.records.spot(ofBucket: bucket), slot: s.slot, to: &$0)
                    }
                    batch.append(s.ttl)
                }
            }
            return batch
        }, slots: slots, parse: { RedisReply($0) })
        return (pending, marks)
    }

    /// A sweep's move of a scope's last swept slot, undone when the sweep fails.
    private struct SweepMark: Sendable {
        var scope: SweepScope
        var before: Int64?
        var after: Int64
    }

    /// Undoes a failed sweep's marks, unless a later sweep moved them on.
    private func unmark(_ marks: [SweepMark]) {
        swept.withLock { swept in
            for mark in marks where swept[mark.scope] == mark.after { swept[mark.scope] = mark.before }
        }
    }

    /// One `EVALSHA`: items `items` of batch `batch`, all in hash slot `slot` in a cluster.
    private struct Chunk: Sendable {
        var batch: Int
        var items: [Int]
        var slot: UInt16 = 0
        var count: Int { items.count }
    }

    /// How one batch's items are cut into `EVALSHA` chunks, with each chunk's hash slot. In a
    /// Redis Cluster a chunk may only hold items of one slot: the slot of an item's first key,
    /// `batch.keys[item * batch.keysPerItem]` (all of an item's keys share its hash tag), so
    /// items are grouped by slot, in order within a slot. Standalone, any items may share a
    /// chunk: runs of `maxItems`, in order (slot 0).
    private static func chunkItems(_ batch: ScriptBatch, maxItems: Int, bySlot: Bool) -> [(slot: UInt16, items: [Int])] {
        let n = batch.itemCount
        guard bySlot else { return stride(from: 0, to: n, by: maxItems).map { (0, Array($0..<min($0 + maxItems, n))) } }
        let slots = (0..<n).map { batch.clusterSlot(ofItem: $0) }
        let order = slots.indices.sorted { (slots[$0], $0) < (slots[$1], $1) }
        var out: [(slot: UInt16, items: [Int])] = []
        for item in order {
            if let last = out.last, last.slot == slots[item], last.items.count < maxItems {
                out[out.count - 1].items.append(item)
            } else {
                out.append((slots[item], [item]))
            }
        }
        return out
    }

    /// A script run over the items of `batches`: its chunks, and how to encode any of them.
    private struct ScriptPlan: Sendable {
        let batches: [ScriptBatch]
        let script: LuaScript
        private(set) var chunks: [Chunk] = []
        /// Where each batch's first result goes in the answer.
        private(set) var offsets: [Int] = []
        private(set) var itemCount = 0
        private var keyCount = 0, keyBytes = 0, argBytes = 0, argCount = 0

        init(_ script: LuaScript, _ batches: [ScriptBatch], maxKeysPerScript: Int, bySlot: Bool) {
            self.script = script
            self.batches = batches
            for (b, batch) in batches.enumerated() {
                offsets.append(itemCount)
                itemCount += batch.itemCount
                for (slot, items) in RedisClaimStore.chunkItems(batch, maxItems: maxKeysPerScript, bySlot: bySlot) {
                    chunks.append(Chunk(batch: b, items: items, slot: slot))
                }
                let size = batch.encodedSize
                keyCount += size.arguments
                keyBytes += size.bytes
                argBytes = max(argBytes, batch.args.reduce(0) { $0 + $1.bytes.count })
                argCount = max(argCount, batch.args.count)
            }
        }

        /// The scripts the plan's chunks run.
        var scripts: [LuaScript] {
            var seen: [LuaScript] = []
            for batch in batches where !seen.contains(batch.script ?? script) { seen.append(batch.script ?? script) }
            return seen
        }

        func script(of chunk: Int) -> LuaScript { batches[chunks[chunk].batch].script ?? script }

        /// The slot of each selected chunk's command.
        func slots(_ selected: some Collection<Int>) -> [UInt16] { selected.map { chunks[$0].slot } }

        /// One `EVALSHA` per selected chunk; `shas` maps script names to SHAs.
        func evalsha(_ shas: [String: String], _ selected: some Collection<Int>) -> RedisCommandBatch {
            var batch = RedisCommandBatch()
            batch.reserve(
                bytes: keyBytes + selected.count * (64 + argBytes),
                arguments: keyCount + selected.count * (3 + argCount))
            for index in selected {
                let chunk = chunks[index]
                let source = batches[chunk.batch]
                let m = source.keysPerItem
                batch.begin()
                batch.append("EVALSHA")
                batch.append(shas[(source.script ?? script).name] ?? "")
                batch.append(chunk.count * m)
                for item in chunk.items { source.appendKeys(ofItem: item, to: &batch) }
                for arg in source.args { batch.append(arg.bytes) }
                for item in chunk.items { source.appendArguments(ofItem: item, to: &batch) }
            }
            return batch
        }
    }

    /// A script's round trip on its way (`sendClaims`, `sendConfirms`): the caller works while
    /// Redis answers, then awaits `outcomes()`.
    public struct Request<Item: Sendable>: Sendable {
        let finish: @Sendable () async throws -> [Item]

        /// Redis's answers, one per key in key order. When the server had lost the script, it
        /// is loaded again and the failed chunks retried here (one more round trip).
        public func outcomes() async throws -> [Item] { try await finish() }
    }

    private func run<Item: Sendable>(
        _ script: LuaScript, keys: [String], args: [RedisArgument], perKeyArgs: [RedisArgument]? = nil,
        repliesPerKey: Int = 1, element: @escaping @Sendable (UnsafePointer<redisReply>) -> Item?
    ) async throws -> [Item] {
        try await run(script, [ScriptBatch(keys: keys, args: args, perKeyArgs: perKeyArgs)], repliesPerKey: repliesPerKey, element: element)
    }

    /// Runs `script` over the keys of all batches in one pipeline and returns the per-key
    /// results, in key order (batch after batch). `element` turns one element of a chunk's reply
    /// array into a result while hiredis still owns it (nil: not a value the script returns, a
    /// protocol error).
    private func run<Item: Sendable>(
        _ script: LuaScript, _ batches: [ScriptBatch], repliesPerKey: Int = 1,
        element: @escaping @Sendable (UnsafePointer<redisReply>) -> Item?
    ) async throws -> [Item] {
        _ = try await loadedSHA(script)
        return try await send(script, batches, repliesPerKey: repliesPerKey, element: element).outcomes()
    }

    /// `run`, sent now and awaited later. Before the scripts are loaded (first use) the request
    /// only starts when it is awaited: loading them is a round trip of its own.
    private func send<Item: Sendable>(
        _ script: LuaScript, _ batches: [ScriptBatch], repliesPerKey: Int = 1,
        element: @escaping @Sendable (UnsafePointer<redisReply>) -> Item?
    ) -> Request<Item> {
        let plan = ScriptPlan(script, batches, maxKeysPerScript: maxKeysPerScript, bySlot: redis.isCluster)
        let known = shas.withLock { $0 }
        guard plan.scripts.allSatisfy({ known[$0.name] != nil }) else {
            return Request { try await self.run(script, batches, repliesPerKey: repliesPerKey, element: element) }
        }
        if plan.chunks.isEmpty { return Request { [] } }
        let parse = Self.chunkParser(element)
        let started = ContinuousClock.now
        let answered = onSend?(script.name)
        let first = redis.send({ plan.evalsha(known, plan.chunks.indices) }, slots: plan.slots(plan.chunks.indices), parse: parse)
        return Request { [self] in
            // The duration of the round trip(s), not of the caller's work before it awaited them.
            var reloaded = false
            defer {
                answered?()
                onRoundTrip?(script.name, (reloaded ? .now : first.answeredAt ?? .now) - started)
            }
            var replies = try await first.value()
            let missing = replies.indices.filter {
                if case .error(let text) = replies[$0] { return text.hasPrefix("NOSCRIPT") }
                return false
            }
            if !missing.isEmpty {
                reloaded = true
                for (slot, reply) in zip(missing, try await reload(known, missing, plan, parse)) {
                    replies[slot] = reply
                }
            }
            let results = try Self.results(plan, replies, repliesPerKey: repliesPerKey)
            if script == .confirm, let (count, timeout) = waitReplicas {
                try await waitForReplicas(count, timeout: timeout, slots: plan.slots(plan.chunks.indices))
            }
            return results
        }
    }

    /// The server lost its script cache (a restart, SCRIPT FLUSH, a replica promoted in a
    /// cluster): loads the scripts again (on every primary) and retries the `missing` chunks,
    /// in one more round trip; their replies, in order.
    private func reload<Item: Sendable>(
        _ known: [String: String], _ missing: [Int], _ plan: ScriptPlan,
        _ parse: @escaping @Sendable (UnsafePointer<redisReply>) -> ChunkReply<Item>
    ) async throws -> [ChunkReply<Item>] {
        var scripts: [LuaScript] = []
        for index in missing where !scripts.contains(plan.script(of: index)) { scripts.append(plan.script(of: index)) }
        logger.info("redis script cache lost; loading script again", metadata: ["redis.script": "\(scripts.map(\.name).joined(separator: ","))"])
        shas.withLock { $0 = [:] }
        for script in scripts { _ = try await loadedSHA(script) }
        let reloaded = shas.withLock { $0 }
        return try await redis.pipeline(plan.evalsha(reloaded, missing), slots: plan.slots(missing), parse: parse)
    }

    /// `WAIT count timeout` on each primary the confirms went to; fewer replicas in time is
    /// logged, not an error (the records are on the primary, and the worker must go on).
    func waitForReplicas(_ count: Int, timeout: Duration, slots: [UInt16]) async throws {
        let fewest = try await redis.waitForReplicas(count, timeout: timeout, slots: slots)
        if fewest < count {
            logger.warning("fewer redis replicas than redis.wait_replicas acknowledged a batch's confirms in redis.wait_timeout",
                           metadata: ["redis.replicas_acked": "\(fewest)", "redis.wait_replicas": "\(count)"])
        }
    }

    /// Reads one chunk's reply while hiredis still owns it.
    private static func chunkParser<Item: Sendable>(
        _ element: @escaping @Sendable (UnsafePointer<redisReply>) -> Item?
    ) -> @Sendable (UnsafePointer<redisReply>) -> ChunkReply<Item> {
        { reply in
            let r = reply.pointee
            switch r.type {
            case REDIS_REPLY_ERROR:
                return .error(String(decoding: UnsafeRawBufferPointer(start: r.str, count: r.len), as: UTF8.self))
            case REDIS_REPLY_STRING:
                return .text(Self.text(reply) ?? "")
            case REDIS_REPLY_ARRAY:
                var items: [Item] = []
                items.reserveCapacity(r.elements)
                for i in 0..<r.elements {
                    guard let e = r.element[i], let item = element(e) else {
                        return .malformed("element \(i): \(Self.describe(r.element[i].map { RedisReply($0) } ?? .null))")
                    }
                    items.append(item)
                }
                return .items(items)
            default:
                return .malformed(Self.describe(RedisReply(reply)))
            }
        }
    }

    /// The per-item results of all chunks, in item order; a chunk that did not answer with one
    /// result per item fails the whole request.
    private static func results<Item: Sendable>(
        _ plan: ScriptPlan, _ replies: [ChunkReply<Item>], repliesPerKey: Int
    ) throws -> [Item] {
        var results = [Item?](repeating: nil, count: plan.itemCount * repliesPerKey)
        for (index, reply) in replies.enumerated() {
            let chunk = plan.chunks[index]
            let name = plan.script(of: index).name
            switch reply {
            case .items(let items) where items.count == chunk.count * repliesPerKey:
                let offset = plan.offsets[chunk.batch]
                for (n, item) in chunk.items.enumerated() {
                    for r in 0..<repliesPerKey { results[(offset + item) * repliesPerKey + r] = items[n * repliesPerKey + r] }
                }
            case .items(let items):
                throw RedisError(.protocolError, "script \(name) returned an array of \(items.count) for \(chunk.count) keys")
            case .error(let text):
                throw RedisError.fromServerReply(text, context: "EVALSHA \(name)")
            case .text(let text):
                throw RedisError(.protocolError, "script \(name) returned a string of \(text.utf8.count) bytes for \(chunk.count) keys")
            case .malformed(let what):
                throw RedisError(.protocolError, "script \(name) returned \(what) for \(chunk.count) keys")
            }
        }
        return results.map { $0! }
    }

    /// The SHA of `script`, loading all scripts in one pipeline the first time.
    private func loadedSHA(_ script: LuaScript) async throws -> String {
        if let sha = shas.withLock({ $0[script.name] }) { return sha }
        var loaded: [String: String] = [:]
        for (_, replies) in try await redis.onEveryPrimary(LuaScript.all.map { ["SCRIPT", "LOAD", RedisArgument($0.source)] }) {
            for (s, reply) in zip(LuaScript.all, replies) {
                guard let sha = try reply.throwingOnError("SCRIPT LOAD \(s.name)").text else {
                    throw Self.unexpected(reply, in: "SCRIPT LOAD")
                }
                loaded[s.name] = sha
            }
        }
        shas.withLock { $0.merge(loaded) { _, new in new } }
        logger.debug("redis scripts loaded")
        guard let sha = loaded[script.name] else {
            throw RedisError(.protocolError, "script \(script.name) was not loaded")
        }
        return sha
    }

    // MARK: - Helpers

    /// Milliseconds for PX/PEXPIRE: rounded up, at least 1.
    static func millis(_ duration: Duration) -> Int64 {
        let (seconds, attoseconds) = duration.components
        let ms = seconds.multipliedReportingOverflow(by: 1000)
        if ms.overflow { return Int64.max / 2 }
        let fraction = (attoseconds + 999_999_999_999_999) / 1_000_000_000_000_000
        return max(1, ms.partialValue + fraction)
    }

    /// "p:owner" → "owner"; any other foreign value is returned whole.
    static func owner(of value: String) -> String {
        value.hasPrefix("p:") ? String(value.dropFirst(2)) : value
    }

    /// The byte of a one-byte bulk string or status reply (the scripts' own answers), else nil.
    private static func shortCode(_ reply: UnsafePointer<redisReply>) -> UInt8? {
        let r = reply.pointee
        guard r.type == REDIS_REPLY_STRING || r.type == REDIS_REPLY_STATUS, r.len == 1, let str = r.str else { return nil }
        return UInt8(bitPattern: str[0])
    }

    /// The text of a bulk string or status reply, else nil.
    private static func text(_ reply: UnsafePointer<redisReply>) -> String? {
        let r = reply.pointee
        guard r.type == REDIS_REPLY_STRING || r.type == REDIS_REPLY_STATUS else { return nil }
        guard let str = r.str, r.len > 0 else { return "" }
        return String(decoding: UnsafeRawBufferPointer(start: str, count: r.len), as: UTF8.self)
    }

    /// An integer reply of 1 or 0 (release, renew, use of a token mark), else nil.
    @Sendable private static func flag(_ reply: UnsafePointer<redisReply>) -> Bool? {
        let r = reply.pointee
        guard r.type == REDIS_REPLY_INTEGER else { return nil }
        return r.integer == 1
    }

    private static func unexpected(_ reply: RedisReply, in operation: String) -> RedisError {
        RedisError(.protocolError, "unexpected reply in \(operation): \(describe(reply))")
    }

    private static func describe(_ reply: RedisReply) -> String {
        switch reply {
        case .array(let items): return "an array of \(items.count)"
        case .string(let b): return "a string of \(b.count) bytes"
        case .status(let s): return "status \(s)"
        case .integer(let i): return "integer \(i)"
        case .null: return "null"
        case .error(let e): return "error \(e)"
        }
    }
}

extension RedisClaimStore: TokenStore {
    public func issue(_ tokens: [String], ttl: Duration, memory: Duration) async throws {
        _ = try await run(.issueTokens, keys: tokens, args: [RedisArgument(Self.millis(ttl)), RedisArgument(Self.millis(memory))]) {
            RedisReply($0)
        }
    }

    public func use(_ tokens: [String], marks: [String]) async throws -> [TokenOutcome] {
        precondition(tokens.count == marks.count, "one mark per token")
        return try await run(.useTokens, keys: tokens, args: [], perKeyArgs: marks.map { RedisArgument($0) }, element: Self.tokenOutcome)
    }

    @Sendable static func tokenOutcome(_ element: UnsafePointer<redisReply>) -> TokenOutcome? {
        switch shortCode(element) {
        case UInt8(ascii: "a"): .accepted
        case UInt8(ascii: "u"): .unknown
        case UInt8(ascii: "e"): .expired
        case UInt8(ascii: "r"): .reused
        default: nil
        }
    }
}

/// A refused AUTH, a command the ACL user may not run and a full Redis are the operator's to fix.
extension RedisError: StoreFailureClassifying {
    public var storeFailure: StoreFailure {
        switch code {
        case .auth: .refused
        case .outOfMemory: .full
        default: .unavailable
        }
    }
}
