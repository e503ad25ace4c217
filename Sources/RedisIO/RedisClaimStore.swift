import CHiredis
import DedupCore
import Logging
import Synchronization

/// The seen-set in Redis (docs/architecture.md step 3), on one `RedisConnection`.
///
/// Every batch method is one round trip whatever the batch size: the keys are
/// cut into chunks of at most `maxKeysPerScript`, each chunk is one `EVALSHA`
/// of a Lua script (compare-and-set per key, atomic per chunk), and all chunks
/// go in one pipeline. Scripts are loaded with `SCRIPT LOAD` on first use;
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
    private let waitReplicas: (count: Int, timeout: Duration)?

    /// Called after each operation's round trip(s) with the script name (`claim`, `confirm`, ...)
    /// and how long it took, for metrics. Default: none.
    private let onRoundTrip: (@Sendable (String, Duration) -> Void)?
    /// Called when an operation's pipeline is sent, with its script name; the closure it returns
    /// is called once the answers are in (the worker's record of what is in flight). Default: none.
    private let onSend: (@Sendable (String) -> @Sendable () -> Void)?

    public convenience init(
        connection: RedisConnection, maxKeysPerScript: Int = 1000, logger: Logger,
        onSend: (@Sendable (_ op: String) -> @Sendable () -> Void)? = nil,
        onRoundTrip: (@Sendable (_ op: String, _ duration: Duration) -> Void)? = nil
    ) {
        self.init(redis: .server(connection), maxKeysPerScript: maxKeysPerScript, logger: logger, onSend: onSend, onRoundTrip: onRoundTrip)
    }

    /// `waitReplicas`: after a batch's confirms, `WAIT` until that many replicas of each primary
    /// written to have them, at most `timeout` (`redis.wait_replicas`): one more round trip that
    /// shrinks what a failover can lose.
    public init(
        redis: RedisTarget, maxKeysPerScript: Int = 1000, logger: Logger,
        waitReplicas: (count: Int, timeout: Duration)? = nil,
        onSend: (@Sendable (_ op: String) -> @Sendable () -> Void)? = nil,
        onRoundTrip: (@Sendable (_ op: String, _ duration: Duration) -> Void)? = nil
    ) {
        self.redis = redis
        self.waitReplicas = waitReplicas
        self.maxKeysPerScript = max(1, maxKeysPerScript)
        self.logger = logger
        self.onSend = onSend
        self.onRoundTrip = onRoundTrip
    }

    public func claim(_ groups: [KeyGroup], owner: String) async throws -> [ClaimOutcome] {
        try await run(.claim, Self.batches(groups, owner: owner), element: Self.claimOutcome)
    }

    public func confirm(_ groups: [KeyGroup], owner: String) async throws -> [ConfirmOutcome] {
        try await run(.confirm, Self.batches(groups, owner: owner), element: Self.confirmOutcome)
    }

    /// `claim`, sent now; the caller awaits `outcomes()` when it needs them.
    public func sendClaims(_ groups: [KeyGroup], owner: String) -> Request<ClaimOutcome> {
        send(.claim, Self.batches(groups, owner: owner), element: Self.claimOutcome)
    }

    /// `confirm`, sent now; the caller awaits `outcomes()` when it needs them.
    public func sendConfirms(_ groups: [KeyGroup], owner: String) -> Request<ConfirmOutcome> {
        send(.confirm, Self.batches(groups, owner: owner), element: Self.confirmOutcome)
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
        Self.reply(sendClaims(groups, owner: owner))
    }

    public func requestConfirms(_ groups: [KeyGroup], owner: String) -> StoreReply<[ConfirmOutcome]> {
        Self.reply(sendConfirms(groups, owner: owner))
    }

    public func requestReleases(_ keys: [String], owner: String) -> StoreReply<[Bool]> {
        Self.reply(sendReleases(keys, owner: owner))
    }

    public func requestTokenUses(_ tokens: [String], marks: [String]) -> StoreReply<[TokenOutcome]> {
        Self.reply(sendTokenUses(tokens, marks: marks))
    }

    /// The request is on its way already; a task only waits for its answers (and reloads a
    /// script the server lost).
    private static func reply<Item: Sendable>(_ request: Request<Item>) -> StoreReply<[Item]> {
        let reply = StoreReply<[Item]>()
        Task {
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

    /// Keys run through one script with the same arguments (e.g. one lease).
    /// `perKeyArgs`, when given, holds one argument per key, passed with its chunk after `args`.
    private struct ScriptBatch: Sendable {
        var keys: [String]
        var args: [RedisArgument]
        var perKeyArgs: [RedisArgument]? = nil
    }

    /// Claim and confirm scripts take `owner` and the group's time to live in milliseconds.
    private static func batches(_ groups: [KeyGroup], owner: String) -> [ScriptBatch] {
        groups.map { ScriptBatch(keys: $0.keys, args: [RedisArgument(owner), RedisArgument(millis($0.ttl))]) }
    }

    /// One `EVALSHA`: keys `range` of batch `batch`, all in hash slot `slot` in a cluster.
    private struct Chunk: Sendable {
        var batch: Int
        var range: Range<Int>
        var slot: UInt16 = 0
        var count: Int { range.count }
    }

    /// A script run over the keys of `batches`: its chunks, and how to encode any of them.
    private struct ScriptPlan: Sendable {
        private(set) var batches: [ScriptBatch]
        private(set) var chunks: [Chunk] = []
        /// Cluster only: per batch, the original index of each key after grouping by slot.
        private var orders: [[Int]] = []
        private var keyCount = 0, keyBytes = 0, argBytes = 0, argCount = 0

        init(_ batches: [ScriptBatch], maxKeysPerScript: Int, bySlot: Bool) {
            self.batches = batches
            for b in batches.indices {
                if bySlot {
                    groupBySlot(b, maxKeysPerScript: maxKeysPerScript)
                } else {
                    for start in stride(from: 0, to: batches[b].keys.count, by: maxKeysPerScript) {
                        chunks.append(Chunk(batch: b, range: start..<min(start + maxKeysPerScript, batches[b].keys.count)))
                    }
                }
                let batch = batches[b]
                keyCount += batch.keys.count * (batch.perKeyArgs == nil ? 1 : 2)
                keyBytes += batch.keys.reduce(0) { $0 + $1.utf8.count }
                argBytes = max(argBytes, batch.args.reduce(0) { $0 + $1.bytes.count })
                argCount = max(argCount, batch.args.count)
            }
        }

        /// Reorders batch `b`'s keys so that keys of one slot are adjacent, and cuts chunks
        /// that never cross a slot.
        private mutating func groupBySlot(_ b: Int, maxKeysPerScript: Int) {
            let batch = batches[b]
            let slots = batch.keys.map(ClusterSlot.of)
            let order = slots.indices.sorted { (slots[$0], $0) < (slots[$1], $1) }
            batches[b].keys = order.map { batch.keys[$0] }
            batches[b].perKeyArgs = batch.perKeyArgs.map { args in order.map { args[$0] } }
            orders += Array(repeating: [], count: b - orders.count) + [order]
            var start = 0
            while start < order.count {
                let slot = slots[order[start]]
                var end = start + 1
                while end < order.count, end - start < maxKeysPerScript, slots[order[end]] == slot { end += 1 }
                chunks.append(Chunk(batch: b, range: start..<end, slot: slot))
                start = end
            }
        }

        /// The slot of each selected chunk's command (after those of `prefix`).
        func slots(_ selected: some Collection<Int>) -> [UInt16] { selected.map { chunks[$0].slot } }

        /// Per-key results in the order the keys were given: undoes `groupBySlot`.
        func inKeyOrder<Item>(_ results: [Item], repliesPerKey: Int) -> [Item] {
            guard !orders.isEmpty else { return results }
            var out = results
            var offset = 0
            for (b, batch) in batches.enumerated() {
                if b < orders.count, !orders[b].isEmpty {
                    for (position, original) in orders[b].enumerated() {
                        for r in 0..<repliesPerKey {
                            out[offset + original * repliesPerKey + r] = results[offset + position * repliesPerKey + r]
                        }
                    }
                }
                offset += batch.keys.count * repliesPerKey
            }
            return out
        }

        /// One `EVALSHA` per selected chunk.
        func evalsha(_ sha: String, _ selected: some Collection<Int>) -> RedisCommandBatch {
            var batch = RedisCommandBatch()
            batch.reserve(
                bytes: keyBytes + selected.count * (64 + argBytes),
                arguments: keyCount + selected.count * (3 + argCount))
            for index in selected {
                let chunk = chunks[index]
                let source = batches[chunk.batch]
                batch.begin()
                batch.append("EVALSHA")
                batch.append(sha)
                batch.append(chunk.count)
                for key in source.keys[chunk.range] { batch.append(key) }
                for arg in source.args { batch.append(arg.bytes) }
                if let perKeyArgs = source.perKeyArgs { for arg in perKeyArgs[chunk.range] { batch.append(arg.bytes) } }
            }
            return batch
        }
    }

    /// A script's round trip on its way (`sendClaims`, `sendConfirms`): the caller works while
    /// Redis answers, then awaits `outcomes()`.
    public struct Request<Item: Sendable>: Sendable {
        fileprivate let finish: @Sendable () async throws -> [Item]

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
        guard let sha = shas.withLock({ $0[script.name] }) else {
            return Request { try await self.run(script, batches, repliesPerKey: repliesPerKey, element: element) }
        }
        let plan = ScriptPlan(batches, maxKeysPerScript: maxKeysPerScript, bySlot: redis.isCluster)
        if plan.chunks.isEmpty { return Request { [] } }
        let parse = Self.chunkParser(element)
        let started = ContinuousClock.now
        let answered = onSend?(script.name)
        let first = redis.send({ plan.evalsha(sha, plan.chunks.indices) }, slots: plan.slots(plan.chunks.indices), parse: parse)
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
                for (slot, reply) in zip(missing, try await reload(script, sha: sha, missing, plan, parse)) {
                    replies[slot] = reply
                }
            }
            let results = plan.inKeyOrder(try Self.results(script, plan.chunks, replies, repliesPerKey: repliesPerKey), repliesPerKey: repliesPerKey)
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
        _ script: LuaScript, sha: String, _ missing: [Int], _ plan: ScriptPlan,
        _ parse: @escaping @Sendable (UnsafePointer<redisReply>) -> ChunkReply<Item>
    ) async throws -> [ChunkReply<Item>] {
        logger.info("redis script cache lost; loading script again", metadata: ["redis.script": "\(script.name)"])
        shas.withLock { $0 = [:] }
        let newSHA = try await loadedSHA(script)
        return try await redis.pipeline(plan.evalsha(newSHA, missing), slots: plan.slots(missing), parse: parse)
    }

    /// `WAIT count timeout` on each primary the confirms went to; fewer replicas in time is
    /// logged, not an error (the records are on the primary, and the worker must go on).
    private func waitForReplicas(_ count: Int, timeout: Duration, slots: [UInt16]) async throws {
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

    /// The per-key results of all chunks, in key order; a chunk that did not answer with one
    /// result per key fails the whole request.
    private static func results<Item: Sendable>(
        _ script: LuaScript, _ chunks: [Chunk], _ replies: [ChunkReply<Item>], repliesPerKey: Int
    ) throws -> [Item] {
        var results: [Item] = []
        results.reserveCapacity(chunks.reduce(0) { $0 + $1.count } * repliesPerKey)
        for (chunk, reply) in zip(chunks, replies) {
            switch reply {
            case .items(let items) where items.count == chunk.count * repliesPerKey:
                results.append(contentsOf: items)
            case .items(let items):
                throw RedisError(.protocolError, "script \(script.name) returned an array of \(items.count) for \(chunk.count) keys")
            case .error(let text):
                throw RedisError.fromServerReply(text, context: "EVALSHA \(script.name)")
            case .text(let text):
                throw RedisError(.protocolError, "script \(script.name) returned a string of \(text.utf8.count) bytes for \(chunk.count) keys")
            case .malformed(let what):
                throw RedisError(.protocolError, "script \(script.name) returned \(what) for \(chunk.count) keys")
            }
        }
        return results
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
    private static func owner(of value: String) -> String {
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
