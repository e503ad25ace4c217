import CHiredis
import DedupCore
import Synchronization

/// The compact layout's claims and confirms on one Redis server, as plain pipelined commands
/// instead of scripts: a script call costs Redis more than the calls it makes (its arguments
/// become Lua strings, its replies Lua values), and the scripts made the compact layout cost
/// Redis more CPU per id than the keys layout (docs/performance.md, "The open targets").
///
/// Without a script's atomicity, order does the work (docs/architecture.md, "Why two workers
/// cannot dispatch one key twice"). One connection's commands run in the order sent, and each
/// step orders its two halves:
/// - a claim takes the pending key first (`SET NX PX`), then reads the field in every live
///   slot's bucket (`HEXISTS`);
/// - a confirm writes the fields first (`HSET`), then deletes the pending keys (`DEL`).
/// A claim whose `SET` finds the pending key free either ran before the other worker's claim (which
/// then fails) or after its `DEL`, hence after its `HSET`: its `HEXISTS` finds the field.
/// A claim that took the pending key and then found the field gives the key back (`DEL`); one that
/// found the key held reads who holds it (`MGET`), and extends it when it is its own (a renewal,
/// through the `renew` script): one more round trip, only for those keys.
///
/// Not in a cluster: while a slot migrates, a redirect (`ASK`) can run one command of a pair on
/// the target after the other ran on the source, and the order is gone; there the scripts run.
extension RedisClaimStore {
    // The per-key commands' constant arguments, encoded once.
    private static let setName = EncodedArguments(["SET"])
    private static let hexistsName = EncodedArguments(["HEXISTS"])
    private static let hsetName = EncodedArguments(["HSET"])
    private static let emptyValue = EncodedArguments([""])
    private static let mgetName = EncodedArguments(["MGET"])
    private static let delName = EncodedArguments(["DEL"])

    /// Who holds a pending key, read from its value without building a string for this worker's
    /// own claims (the common answer).
    enum Holder: Sendable, Equatable {
        /// No pending key: it ran out or was deleted.
        case none
        /// `p:<this worker>`.
        case mine
        /// `d:<owner>`: a done record of the keys layout (read during an upgrade).
        case done
        /// Another worker's claim: its owner.
        case other(String)

        init(_ r: redisReply, mine: borrowing [UInt8]) {
            guard r.type == REDIS_REPLY_STRING, let str = r.str else { self = .none; return }
            let bytes = UnsafeRawBufferPointer(start: str, count: r.len)
            if bytes.elementsEqual(mine) {
                self = .mine
            } else if bytes.starts(with: "d:".utf8) {
                self = .done
            } else {
                self = .other(RedisClaimStore.owner(of: String(decoding: bytes, as: UTF8.self)))
            }
        }
    }

    /// One reply of the pipeline, as much of it as an outcome needs.
    enum CompactReply: Sendable {
        case null
        case integer(Int64)
        case text
        /// An `MGET` of pending keys: each one's holder.
        case holders([Holder])
        case error(String)

        init(_ reply: UnsafePointer<redisReply>, mine: borrowing [UInt8]) {
            let r = reply.pointee
            switch r.type {
            case REDIS_REPLY_NIL: self = .null
            case REDIS_REPLY_INTEGER: self = .integer(r.integer)
            case REDIS_REPLY_ERROR: self = .error(String(decoding: UnsafeRawBufferPointer(start: r.str, count: r.len), as: UTF8.self))
            case REDIS_REPLY_STRING, REDIS_REPLY_STATUS: self = .text
            case REDIS_REPLY_ARRAY:
                self = .holders((0..<r.elements).map { Holder(r.element[$0]!.pointee, mine: mine) })
            default: self = .error("unexpected reply type \(r.type)")
            }
        }
    }

    /// The groups as compact items with the slots a claim reads (`confirming`: the one slot a
    /// confirm writes), or nil when they go through the scripts: a cluster, a group in the keys
    /// layout, or a store built with `compactScripts`.
    func compactCommandItems(_ groups: [KeyGroup], confirming: Bool) -> [(items: CompactItems, lease: Int64)]? {
        guard sendsCompactCommands(groups) else { return nil }
        let now = unixMillis()
        var out: [(items: CompactItems, lease: Int64)] = []
        out.reserveCapacity(groups.count)
        for group in groups {
            guard case .compact(let records) = group.layout else { return nil }
            let slots = confirming ? [records.slot(at: now)] : records.liveSlots(at: now)
            out.append((CompactItems(group.keys, records, slots: slots, digests: group.digests), Self.millis(group.ttl)))
        }
        return out
    }

    /// Whether these groups go as commands (`compactCommandItems`), without computing their items.
    func sendsCompactCommands(_ groups: [KeyGroup]) -> Bool {
        !redis.isCluster && compactCommands && !groups.isEmpty
            && groups.allSatisfy { if case .compact = $0.layout { true } else { false } }
    }

    /// Claims as `SET NX PX` of the pending key, then `HEXISTS` of each live bucket, per key. The
    /// `SET` answers only whether it took the key (a `GET` option costs Redis more than the rare
    /// reads it saves); who holds a key it did not take is read after, for those keys alone.
    func sendCompactClaims(_ groups: [(items: CompactItems, lease: Int64)], owner: String) -> Request<ClaimOutcome> {
        let mine = Array("p:\(owner)".utf8)
        let started = ContinuousClock.now
        let answered = onSend?("claim")
        let first = redis.send({
            var batch = RedisCommandBatch()
            // A name is its store key and under 64 bytes more; a command's own bytes fewer.
            batch.reserve(bytes: groups.reduce(0) { $0 + $1.items.storeKeys.count * (1 + $1.items.slots.count) * 160 }, arguments: 0)
            batch.withOwnStorage { batch in
                for (items, lease) in groups {
                    let setTail = EncodedArguments([RedisArgument(bytes: mine), "NX", "PX", RedisArgument(lease)])
                    let names = items.names
                    for item in items.storeKeys.indices {
                        let key = items.storeKeys[item], spot = items.spots[item]
                        batch.begin(arguments: 6)
                        batch.append(Self.setName)
                        batch.appendPendingKey(of: key, at: spot, names)
                        batch.append(setTail)
                        for slot in items.slots.indices {
                            batch.begin(arguments: 3)
                            batch.append(Self.hexistsName)
                            batch.appendBucketKey(of: key, at: spot, slotAt: slot, names)
                            batch.appendField(of: spot)
                        }
                    }
                }
            }
            return batch
        }, slots: [], parse: { CompactReply($0, mine: mine) })
        return Request { [self] in
            defer {
                answered?()
                onRoundTrip?("claim", (first.answeredAt ?? .now) - started)
            }
            let replies = try await first.value()
            var outcomes: [ClaimOutcome] = []
            // By (group, item): pending keys taken and then found done, to give back; keys held
            // already, whose holder is read.
            var giveBack: [(Int, Int)] = [], held: [(Int, Int, Int)] = []
            var r = 0
            outcomes.reserveCapacity(groups.reduce(0) { $0 + $1.items.storeKeys.count })
            for (g, (items, _)) in groups.enumerated() {
                for item in items.storeKeys.indices {
                    // The `SET`'s reply, then one `HEXISTS` reply per live slot: matched in place,
                    // without copying a reply or slicing the array per key.
                    let taken: Bool
                    switch replies[r] {
                    case .text: taken = true
                    case .null: taken = false
                    case .error(let text): throw RedisError.fromServerReply(text, context: "a compact claim")
                    default: throw RedisError(.protocolError, "unexpected reply to SET NX of a pending claim: \(replies[r])")
                    }
                    var found = false
                    for k in r + 1 ..< r + 1 + items.slots.count {
                        switch replies[k] {
                        case .integer(let n): found = found || n == 1
                        case .error(let text): throw RedisError.fromServerReply(text, context: "a compact claim")
                        default: break
                        }
                    }
                    r += 1 + items.slots.count
                    if found {
                        if taken { giveBack.append((g, item)) }
                        outcomes.append(.done)
                    } else if taken {
                        outcomes.append(.claimed)
                    } else {
                        held.append((g, item, outcomes.count))
                        outcomes.append(.pendingElsewhere(owner: ""))
                    }
                }
            }
            guard !giveBack.isEmpty || !held.isEmpty else { return outcomes }
            let holders = try await followUp(groups, giveBack: giveBack, read: held.map { ($0.0, $0.1) }, mine: mine)
            // The holders: the keys layout's record (read during an upgrade) is done; this worker's
            // own claim is extended (a renewal) by the `renew` script, which checks the owner and
            // extends in one step (it may have run out since the `MGET`); a key gone meanwhile is
            // looked at again later.
            var mineByLease: [Int64: (at: [Int], keys: [String])] = [:]
            for ((g, item, index), holder) in zip(held, holders) {
                switch holder {
                case .mine:
                    let (items, lease) = groups[g]
                    mineByLease[lease, default: ([], [])].at.append(index)
                    mineByLease[lease, default: ([], [])].keys.append(items.records.placement(of: items.storeKeys[item]).pendingKey)
                case .done: outcomes[index] = .done
                case .other(let owner): outcomes[index] = .pendingElsewhere(owner: owner)
                case .none: break
                }
            }
            for (lease, mineHeld) in mineByLease {
                for (index, renewed) in zip(mineHeld.at, try await renew(mineHeld.keys, owner: owner, lease: .milliseconds(lease))) where renewed {
                    outcomes[index] = .alreadyOwned
                }
            }
            return outcomes
        }
    }

    /// One more round trip over some items' pending keys: one `DEL` of those to give back, one
    /// `MGET` of those whose holder is read. The holders, in order.
    private func followUp(
        _ groups: [(items: CompactItems, lease: Int64)], giveBack: [(Int, Int)], read: [(Int, Int)], mine: [UInt8]
    ) async throws -> [Holder] {
        let replies = try await redis.send({
            var batch = RedisCommandBatch()
            for (list, command) in [(giveBack, "DEL"), (read, "MGET")] where !list.isEmpty {
                batch.begin(arguments: 1 + list.count)
                batch.append(command)
                for (g, item) in list {
                    let items = groups[g].items
                    batch.appendPendingKey(of: items.storeKeys[item], at: items.spots[item], items.names)
                }
            }
            return batch
        }, slots: [], parse: { CompactReply($0, mine: mine) }).value()
        for reply in replies {
            if case .error(let text) = reply { throw RedisError.fromServerReply(text, context: "a compact claim's pending keys") }
        }
        guard !read.isEmpty else { return [] }
        guard case .holders(let holders) = replies.last, holders.count == read.count else {
            throw RedisError(.protocolError, "unexpected reply to MGET of pending claims: \(String(describing: replies.last))")
        }
        return holders
    }

    /// Confirms as `HSET` of the field in the current slot's bucket per key, then one `MGET` and one
    /// `DEL` of the batch's pending keys: a command per key costs Redis its fixed part each time
    /// (reading, looking up and timing the command, logging it to the AOF), and the batch's
    /// pending keys share them. Every field is written before any pending key goes, which is the
    /// order the claims rely on. A key whose pending claim is another worker's (this one's lease ran
    /// out and the other took it) is recorded all the same and the other's claim is gone: the
    /// message was dispatched here, so it is done; the other worker's confirm finds no claim and
    /// records it again. A holder that changes between the `MGET` and the `DEL` (a lease running
    /// out, another worker's claim of a key already recorded) changes only what is reported.
    func sendCompactConfirms(_ groups: [(items: CompactItems, lease: Int64)], owner: String) -> Request<ConfirmOutcome> {
        let mine = Array("p:\(owner)".utf8)
        let started = ContinuousClock.now
        let answered = onSend?("confirm")
        let first = redis.send({
            var batch = RedisCommandBatch()
            batch.reserve(bytes: groups.reduce(0) { $0 + $1.items.storeKeys.count * 240 }, arguments: 0)
            batch.withOwnStorage { batch in
                for (items, _) in groups {
                    let names = items.names
                    for item in items.storeKeys.indices {
                        let key = items.storeKeys[item], spot = items.spots[item]
                        batch.begin(arguments: 4)
                        batch.append(Self.hsetName)
                        batch.appendBucketKey(of: key, at: spot, slotAt: 0, names)
                        batch.appendField(of: spot)
                        batch.append(Self.emptyValue)
                    }
                }
                let keys = groups.reduce(0) { $0 + $1.items.storeKeys.count }
                guard keys > 0 else { return }
                batch.begin(arguments: 1 + keys)
                batch.append(Self.mgetName)
                let pendingKeys = batch.byteCount
                for (items, _) in groups {
                    let names = items.names
                    for item in items.storeKeys.indices {
                        batch.appendPendingKey(of: items.storeKeys[item], at: items.spots[item], names)
                    }
                }
                // The same names, copied: the DEL goes after the MGET and every HSET.
                let pendingKeysEnd = batch.byteCount
                batch.begin(arguments: 1 + keys)
                batch.append(Self.delName)
                batch.repeatArguments(from: pendingKeys, to: pendingKeysEnd, count: keys)
            }
            return batch
        }, slots: [], parse: { CompactReply($0, mine: mine) })
        return Request { [self] in
            defer {
                answered?()
                onRoundTrip?("confirm", (first.answeredAt ?? .now) - started)
            }
            let replies = try await first.value()
            for reply in replies {
                if case .error(let text) = reply { throw RedisError.fromServerReply(text, context: "a compact confirm") }
            }
            guard !replies.isEmpty else { return [] }
            let keys = replies.count - 2
            guard keys >= 0, case .holders(let holders) = replies[keys], holders.count == keys else {
                throw RedisError(.protocolError, "unexpected reply to MGET of pending claims")
            }
            let outcomes = holders.map { holder -> ConfirmOutcome in
                switch holder {
                case .none: .confirmedAfterLeaseLost
                case .mine, .done: .confirmed
                case .other(let owner): .notOwner(owner: owner)
                }
            }
            if let (count, timeout) = waitReplicas { try await waitForReplicas(count, timeout: timeout, slots: []) }
            return outcomes
        }
    }
}

extension RedisCommandBatch {
    /// A compact item's pending key as an argument, its name written in place (`GroupNames`).
    /// The name is written from the store key's bytes, lent once, and sized from their count.
    @inline(__always)
    mutating func appendPendingKey(of storeKey: String, at spot: CompactRecords.Spot, _ names: CompactRecords.GroupNames) {
        storeKey.withUTF8InPlace { key in
            appendArgument(atMost: key.count + CompactRecords.nameOverhead) { names.writePendingKey(of: key, at: spot, to: &$0) }
        }
    }

    /// A compact item's bucket in the group's slot `slot` as an argument, written in place.
    @inline(__always)
    mutating func appendBucketKey(of storeKey: String, at spot: CompactRecords.Spot, slotAt slot: Int, _ names: CompactRecords.GroupNames) {
        storeKey.withUTF8InPlace { key in
            appendArgument(atMost: key.count + CompactRecords.nameOverhead) { names.writeBucketKey(of: key, at: spot, slotAt: slot, to: &$0) }
        }
    }

    /// A compact item's field (12 digest bytes) as an argument.
    @inline(__always)
    mutating func appendField(of spot: CompactRecords.Spot) {
        appendArgument(length: CompactRecords.Spot.fieldLength) { spot.writeField(to: &$0) }
    }
}
