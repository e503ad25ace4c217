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
public final class RedisClaimStore: ClaimStore {
    public let connection: RedisConnection
    /// Most keys passed to one `EVALSHA`. Default: 1000.
    public let maxKeysPerScript: Int
    private let logger: Logger
    /// Script name → SHA1 the server gave for it; empty until first use.
    private let shas = Mutex<[String: String]>([:])

    /// Called after each operation's round trip(s) with the script name (`claim`, `confirm`, ...)
    /// and how long it took, for metrics. Default: none.
    private let onRoundTrip: (@Sendable (String, Duration) -> Void)?
    /// Called when an operation's pipeline is sent, with its script name; the closure it returns
    /// is called once the answers are in (the worker's record of what is in flight). Default: none.
    private let onSend: (@Sendable (String) -> @Sendable () -> Void)?

    public init(
        connection: RedisConnection, maxKeysPerScript: Int = 1000, logger: Logger,
        onSend: (@Sendable (_ op: String) -> @Sendable () -> Void)? = nil,
        onRoundTrip: (@Sendable (_ op: String, _ duration: Duration) -> Void)? = nil
    ) {
        self.connection = connection
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

    /// One `EVALSHA`: keys `range` of batch `batch`.
    private struct Chunk: Sendable {
        var batch: Int
        var range: Range<Int>
        var count: Int { range.count }
    }

    /// A script run over the keys of `batches`: its chunks, and how to encode any of them.
    private struct ScriptPlan: Sendable {
        let batches: [ScriptBatch]
        private(set) var chunks: [Chunk] = []
        private var keyCount = 0, keyBytes = 0, argBytes = 0, argCount = 0

        init(_ batches: [ScriptBatch], maxKeysPerScript: Int) {
            self.batches = batches
            for (b, batch) in batches.enumerated() {
                for start in stride(from: 0, to: batch.keys.count, by: maxKeysPerScript) {
                    chunks.append(Chunk(batch: b, range: start..<min(start + maxKeysPerScript, batch.keys.count)))
                }
                keyCount += batch.keys.count * (batch.perKeyArgs == nil ? 1 : 2)
                keyBytes += batch.keys.reduce(0) { $0 + $1.utf8.count }
                argBytes = max(argBytes, batch.args.reduce(0) { $0 + $1.bytes.count })
                argCount = max(argCount, batch.args.count)
            }
        }

        /// One `EVALSHA` per selected chunk, after the commands of `prefix`.
        func evalsha(_ sha: String, _ selected: some Collection<Int>, after prefix: RedisCommandBatch = RedisCommandBatch()) -> RedisCommandBatch {
            var batch = prefix
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
        let plan = ScriptPlan(batches, maxKeysPerScript: maxKeysPerScript)
        if plan.chunks.isEmpty { return Request { [] } }
        let parse = Self.chunkParser(element)
        let started = ContinuousClock.now
        let answered = onSend?(script.name)
        let first = connection.send({ plan.evalsha(sha, plan.chunks.indices) }, parse: parse)
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
            return try Self.results(script, plan.chunks, replies, repliesPerKey: repliesPerKey)
        }
    }

    /// The server lost its script cache (a restart, SCRIPT FLUSH): loads `script` again and
    /// retries the `missing` chunks in one more round trip; their replies, in order.
    private func reload<Item: Sendable>(
        _ script: LuaScript, sha: String, _ missing: [Int], _ plan: ScriptPlan,
        _ parse: @escaping @Sendable (UnsafePointer<redisReply>) -> ChunkReply<Item>
    ) async throws -> [ChunkReply<Item>] {
        logger.info("redis script cache lost; loading script again", metadata: ["redis.script": "\(script.name)"])
        shas.withLock { $0 = [:] }
        var load = RedisCommandBatch()
        load.begin()
        load.append("SCRIPT")
        load.append("LOAD")
        load.append(script.source)
        let retry = try await connection.pipeline(plan.evalsha(sha, missing, after: load), parse: parse)
        let newSHA: String
        switch retry[0] {
        case .text(let text): newSHA = text
        case .error(let text): throw RedisError.fromServerReply(text, context: "SCRIPT LOAD \(script.name)")
        case .items, .malformed: throw RedisError(.protocolError, "unexpected reply in SCRIPT LOAD")
        }
        defer { shas.withLock { $0[script.name] = newSHA } }
        if newSHA == sha { return Array(retry.dropFirst()) }
        // Cannot happen (the SHA1 of the same source); fall back to one more round trip.
        return try await connection.pipeline(plan.evalsha(newSHA, missing), parse: parse)
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
        let replies = try await connection.pipeline(LuaScript.all.map { ["SCRIPT", "LOAD", RedisArgument($0.source)] })
        var loaded: [String: String] = [:]
        for (s, reply) in zip(LuaScript.all, replies) {
            guard let sha = try reply.throwingOnError("SCRIPT LOAD \(s.name)").text else {
                throw Self.unexpected(reply, in: "SCRIPT LOAD")
            }
            loaded[s.name] = sha
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
