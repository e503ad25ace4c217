import DedupCore
import Logging
import Synchronization

/// The seen-set in Redis (DESIGN.md step 3), on one `RedisConnection`.
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

    public init(
        connection: RedisConnection, maxKeysPerScript: Int = 1000, logger: Logger,
        onRoundTrip: (@Sendable (_ op: String, _ duration: Duration) -> Void)? = nil
    ) {
        self.connection = connection
        self.maxKeysPerScript = max(1, maxKeysPerScript)
        self.logger = logger
        self.onRoundTrip = onRoundTrip
    }

    public func claim(_ groups: [KeyGroup], owner: String) async throws -> [ClaimOutcome] {
        let replies = try await run(.claim, groups.map {
            ScriptBatch(keys: $0.keys, args: [RedisArgument(owner), RedisArgument(Self.millis($0.ttl))])
        })
        return try replies.map { reply in
            switch reply.text {
            case "c": return .claimed
            case "o": return .alreadyOwned
            case "d": return .done
            case let value?: return .pendingElsewhere(owner: Self.owner(of: value))
            case nil: throw Self.unexpected(reply, in: "claim")
            }
        }
    }

    public func confirm(_ groups: [KeyGroup], owner: String) async throws -> [ConfirmOutcome] {
        let replies = try await run(.confirm, groups.map {
            ScriptBatch(keys: $0.keys, args: [RedisArgument(owner), RedisArgument(Self.millis($0.ttl))])
        })
        return try replies.map { reply in
            switch reply.text {
            case "c": return .confirmed
            case "l": return .confirmedAfterLeaseLost
            case let value?: return .notOwner(owner: Self.owner(of: value))
            case nil: throw Self.unexpected(reply, in: "confirm")
            }
        }
    }

    public func release(_ keys: [String], owner: String) async throws -> [Bool] {
        try await run(.release, keys: keys, args: [RedisArgument(owner)]).map { try Self.flag($0, in: "release") }
    }

    public func renew(_ keys: [String], owner: String, lease: Duration) async throws -> [Bool] {
        try await run(.renew, keys: keys, args: [RedisArgument(owner), RedisArgument(Self.millis(lease))])
            .map { try Self.flag($0, in: "renew") }
    }

    public func inspect(_ keys: [String]) async throws -> [KeyState] {
        let replies = try await run(.inspect, keys: keys, args: [], repliesPerKey: 2)
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

    /// Keys run through one script with the same arguments (e.g. one lease).
    /// `perKeyArgs`, when given, holds one argument per key, passed with its chunk after `args`.
    private struct ScriptBatch {
        var keys: [String]
        var args: [RedisArgument]
        var perKeyArgs: [RedisArgument]? = nil
    }

    /// One script chunk: keys `range` of batch `batch`.
    private struct Chunk {
        var batch: Int
        var range: Range<Int>
        var count: Int { range.count }
    }

    private func run(
        _ script: LuaScript, keys: [String], args: [RedisArgument], perKeyArgs: [RedisArgument]? = nil,
        repliesPerKey: Int = 1
    ) async throws -> [RedisReply] {
        try await run(script, [ScriptBatch(keys: keys, args: args, perKeyArgs: perKeyArgs)], repliesPerKey: repliesPerKey)
    }

    /// Runs `script` over the keys of all batches in one pipeline and returns the per-key
    /// results, in key order (batch after batch).
    private func run(_ script: LuaScript, _ batches: [ScriptBatch], repliesPerKey: Int = 1) async throws -> [RedisReply] {
        var chunks: [Chunk] = []
        for (b, batch) in batches.enumerated() {
            for start in stride(from: 0, to: batch.keys.count, by: maxKeysPerScript) {
                chunks.append(Chunk(batch: b, range: start..<min(start + maxKeysPerScript, batch.keys.count)))
            }
        }
        if chunks.isEmpty { return [] }
        var sha = try await loadedSHA(script)
        let started = ContinuousClock.now
        defer { onRoundTrip?(script.name, ContinuousClock.now - started) }
        func evalsha(_ sha: String, _ chunk: Chunk) -> [RedisArgument] {
            let batch = batches[chunk.batch]
            var command: [RedisArgument] = ["EVALSHA", RedisArgument(sha), RedisArgument(chunk.count)]
            command.reserveCapacity(3 + chunk.count * (batch.perKeyArgs == nil ? 1 : 2) + batch.args.count)
            for key in batch.keys[chunk.range] { command.append(RedisArgument(key)) }
            command.append(contentsOf: batch.args)
            if let perKeyArgs = batch.perKeyArgs { command.append(contentsOf: perKeyArgs[chunk.range]) }
            return command
        }
        var replies = try await connection.pipeline(chunks.map { evalsha(sha, $0) })

        let missing = replies.indices.filter {
            if case .error(let text) = replies[$0] { return text.hasPrefix("NOSCRIPT") }
            return false
        }
        if !missing.isEmpty {
            logger.info("redis script cache lost; loading script again", metadata: ["redis.script": "\(script.name)"])
            shas.withLock { $0 = [:] }
            let retry = try await connection.pipeline(
                [["SCRIPT", "LOAD", RedisArgument(script.source)]] + missing.map { evalsha(sha, chunks[$0]) })
            guard let newSHA = try retry[0].throwingOnError("SCRIPT LOAD \(script.name)").text else {
                throw Self.unexpected(retry[0], in: "SCRIPT LOAD")
            }
            if newSHA != sha {
                // Cannot happen (the SHA1 of the same source); fall back to one more round trip.
                sha = newSHA
                let again = try await connection.pipeline(missing.map { evalsha(sha, chunks[$0]) })
                for (slot, index) in missing.enumerated() { replies[index] = again[slot] }
            } else {
                for (slot, index) in missing.enumerated() { replies[index] = retry[slot + 1] }
            }
            shas.withLock { $0[script.name] = sha }
        }

        var results: [RedisReply] = []
        results.reserveCapacity(chunks.reduce(0) { $0 + $1.count } * repliesPerKey)
        for (chunk, reply) in zip(chunks, replies) {
            switch try reply.throwingOnError("EVALSHA \(script.name)") {
            case .array(let items) where items.count == chunk.count * repliesPerKey:
                results.append(contentsOf: items)
            case let other:
                throw RedisError(.protocolError,
                                 "script \(script.name) returned \(Self.describe(other)) for \(chunk.count) keys")
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

    private static func flag(_ reply: RedisReply, in operation: String) throws -> Bool {
        guard let v = reply.int else { throw unexpected(reply, in: operation) }
        return v == 1
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
        _ = try await run(.issueTokens, keys: tokens, args: [RedisArgument(Self.millis(ttl)), RedisArgument(Self.millis(memory))])
    }

    public func use(_ tokens: [String], marks: [String]) async throws -> [TokenOutcome] {
        precondition(tokens.count == marks.count, "one mark per token")
        return try await run(.useTokens, keys: tokens, args: [], perKeyArgs: marks.map { RedisArgument($0) })
            .map { reply in
                switch reply.text {
                case "a": .accepted
                case "u": .unknown
                case "e": .expired
                case "r": .reused
                default: throw Self.unexpected(reply, in: "use tokens")
                }
            }
    }
}
