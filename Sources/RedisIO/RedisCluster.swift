import CHiredis
import Logging
import Synchronization

/// A Redis Cluster: the slot map, and one `RedisConnection` per primary it has sent to.
///
/// Every command carries the hash slot of its keys (`ClusterSlot`). A pipeline is split by the
/// primary that serves each command's slot, and the per-node pipelines are sent side by side,
/// so a batch costs one round trip per node, in parallel. Replies come back in command order.
///
/// Redirections are followed: `MOVED` (the slot has a new owner for good) updates the slot map,
/// re-sends the command there and refreshes the whole map before the next pipeline; `ASK` (the
/// slot is being migrated and this key has already moved) re-sends the command to the target
/// after `ASKING`. `TRYAGAIN` (a multi-key command during a migration) is retried shortly. After
/// at most `maxRedirections` hops the call fails with a retriable error, as does a node that
/// cannot be reached: the worker fails closed and retries, and the slot map is read again first
/// (after a failover, from a surviving node).
///
/// Only primaries are used: claims and confirms are writes, and a replica's reads may be stale.
public final class RedisCluster: Sendable {
    /// Where the map was first read from, and read again when every known node fails.
    public let seeds: [RedisURL]
    let connectTimeout: Duration
    let commandTimeout: Duration
    let tls: RedisTLSOptions
    private let logger: Logger
    static let maxRedirections = 5

    struct Topology {
        /// Per slot, an index into `primaries`, or -1 while no node serves the slot.
        var owner = [Int16](repeating: -1, count: ClusterSlot.count)
        var primaries: [Node] = []
        var stale = false
    }

    /// A node as the cluster announces it.
    struct Node: Hashable, Sendable, CustomStringConvertible {
        var host: String
        var port: Int
        var description: String { RedisURL.peer(host: host, port: port) }
    }

    private let topology = Mutex(Topology())
    private let connections = Mutex<[Node: RedisConnection]>([:])
    /// Commands redirected so far, by `MOVED` and by `ASK` (for tests and debugging).
    private let redirected = Mutex((moved: 0, ask: 0))
    /// Which round trips `send` reads on the caller's thread (`readInline`); none by default.
    private let inline = Mutex<RedisConnection.InlineReads?>(nil)
    var redirections: (moved: Int, ask: Int) { redirected.withLock { $0 } }

    private init(seeds: [RedisURL], connectTimeout: Duration, commandTimeout: Duration, tls: RedisTLSOptions, logger: Logger) {
        self.seeds = seeds
        self.connectTimeout = connectTimeout
        self.commandTimeout = commandTimeout
        self.tls = tls
        self.logger = logger
    }

    /// Reads the slot map from the first seed that answers. Throws when none does, naming each
    /// seed's error, or when the node is not in cluster mode.
    public static func connect(
        seeds: [RedisURL], connectTimeout: Duration = .seconds(2), commandTimeout: Duration = .seconds(5),
        tls: RedisTLSOptions = RedisTLSOptions(), logger: Logger
    ) async throws -> RedisCluster {
        precondition(!seeds.isEmpty, "a cluster needs at least one seed node")
        let cluster = RedisCluster(seeds: seeds, connectTimeout: connectTimeout, commandTimeout: commandTimeout, tls: tls, logger: logger)
        try await cluster.refreshTopology()
        return cluster
    }

    /// The primaries the map currently lists.
    var primaries: [Node] { topology.withLock { $0.primaries } }

    /// The primary that serves `slot`, if any.
    func primary(for slot: UInt16) -> Node? {
        topology.withLock { t in
            let index = Int(t.owner[Int(slot)])
            return index < 0 ? nil : t.primaries[index]
        }
    }

    // MARK: - Topology

    /// Reads `CLUSTER SLOTS` from a known primary, else from a seed; the first that answers wins.
    func refreshTopology() async throws {
        var candidates = primaries
        for seed in seeds where !candidates.contains(Node(host: seed.host, port: seed.port)) {
            candidates.append(Node(host: seed.host, port: seed.port))
        }
        var failures: [String] = []
        for node in candidates {
            do {
                let connection = try await connection(to: node)
                let reply = try await connection.command("CLUSTER", "SLOTS")
                if case .error(let text) = reply {
                    if text.contains("cluster support disabled") {
                        throw RedisError(.serverReply, "\(node) is not in cluster mode (\(text)); use redis.mode: standalone for it", retriable: false)
                    }
                    throw RedisError.fromServerReply(text, context: "CLUSTER SLOTS at \(node)")
                }
                let map = try Self.parseSlots(reply, answeredBy: node)
                topology.withLock { $0 = map }
                let covered = map.owner.reduce(0) { $0 + ($1 >= 0 ? 1 : 0) }
                logger.debug("redis cluster map read", metadata: [
                    "redis.node": "\(node)", "redis.primaries": "\(map.primaries.count)", "redis.slots_covered": "\(covered)",
                ])
                return
            } catch let error as RedisError where error.code == .auth || error.code == .serverReply && !error.isRetriable {
                throw error
            } catch {
                failures.append("\(node): \(error)")
            }
        }
        throw RedisError(.connection, "no Redis Cluster node answered CLUSTER SLOTS (\(failures.joined(separator: "; ")))")
    }

    /// `CLUSTER SLOTS`: `[[start, end, [host, port, id, ...], replica...], ...]`. An empty host
    /// means "the address you reached me at".
    static func parseSlots(_ reply: RedisReply, answeredBy node: Node) throws -> Topology {
        guard case .array(let ranges) = reply else {
            throw RedisError(.protocolError, "CLUSTER SLOTS at \(node): expected an array")
        }
        var map = Topology()
        var index: [Node: Int16] = [:]
        for range in ranges {
            guard case .array(let fields) = range, fields.count >= 3,
                  let start = fields[0].int, let end = fields[1].int, 0 <= start, start <= end, end < ClusterSlot.count,
                  case .array(let primary) = fields[2], primary.count >= 2,
                  let host = primary[0].text, let port = primary[1].int
            else {
                throw RedisError(.protocolError, "CLUSTER SLOTS at \(node): unexpected entry")
            }
            let owner = Node(host: host.isEmpty || host == "?" ? node.host : host, port: Int(port))
            let i: Int16
            if let known = index[owner] {
                i = known
            } else {
                i = Int16(map.primaries.count)
                index[owner] = i
                map.primaries.append(owner)
            }
            for slot in Int(start)...Int(end) { map.owner[slot] = i }
        }
        return map
    }

    /// The connection to `node`, opened on first use with the seeds' user, password and TLS.
    func connection(to node: Node) async throws -> RedisConnection {
        if let known = connections.withLock({ $0[node] }) { return known }
        var url = seeds[0]
        url.host = node.host
        url.port = node.port
        url.database = 0
        let opened = try await RedisConnection.connect(
            url, connectTimeout: connectTimeout, commandTimeout: commandTimeout, tls: tls, logger: logger)
        let (kept, extra) = connections.withLock { all -> (RedisConnection, RedisConnection?) in
            if let raced = all[node] { return (raced, opened) }
            all[node] = opened
            return (opened, nil)
        }
        if let extra { await extra.close() }
        return kept
    }

    public func close() async {
        for connection in connections.withLock({ all in defer { all = [:] }; return Array(all.values) }) {
            await connection.close()
        }
    }

    // MARK: - Routed pipelines

    /// What came back for one command: its parsed reply, or where the cluster sent it instead.
    private enum Routed<T: Sendable>: Sendable {
        case value(T)
        case moved(slot: Int, to: Node)
        case ask(to: Node)
        case tryAgain
        /// The ACL user may not run `ASKING`: the command after it would be sent back by `MOVED`
        /// until the hops run out, so the refusal is the answer.
        case askingRefused(String)
    }

    /// Where one command goes next.
    private struct Target: Hashable {
        var node: Node
        var asking: Bool
    }

    /// One node's share of a hop: which commands it carries, and their replies on their way.
    private struct Sent<T: Sendable>: Sendable {
        var indices: [Int]
        var asking: Bool
        var node: Node
        var replies: RedisPending<[Routed<T>]>
    }

    /// How far a routed pipeline has come: the replies so far, the commands to send again and
    /// where `ASK` sent them, and how many hops were sent.
    private struct Progress<T: Sendable>: Sendable {
        var results: [T?]
        var remaining: [Int]
        var asked: [Int: Node] = [:]
        var hops = 0

        init(count: Int) {
            results = Array(repeating: nil, count: count)
            remaining = Array(0..<count)
        }
    }

    /// Sends each command of `batch` to the primary of its slot (`slots[i]` for command `i`) and
    /// returns the replies in command order, following `MOVED`, `ASK` and `TRYAGAIN`.
    func pipeline<T: Sendable>(
        _ batch: RedisCommandBatch, slots: [UInt16], parse: @escaping @Sendable (UnsafePointer<redisReply>) throws -> T
    ) async throws -> [T] {
        precondition(slots.count == batch.commandCount, "one slot per command")
        if batch.commandCount == 0 { return [] }
        if topology.withLock({ $0.stale }) { try await refreshTopology() }
        return try await finish(batch, slots: slots, Self.router(parse), Progress(count: batch.commandCount))
    }

    /// Sends hop after hop until every command has its reply, or fails after `maxRedirections`.
    private func finish<T: Sendable>(
        _ batch: RedisCommandBatch, slots: [UInt16], _ routed: @escaping @Sendable (UnsafePointer<redisReply>) throws -> Routed<T>,
        _ start: Progress<T>
    ) async throws -> [T] {
        var progress = start
        while !progress.remaining.isEmpty {
            guard progress.hops <= Self.maxRedirections else {
                throw RedisError(.connection, "redis cluster: still redirected after \(Self.maxRedirections) hops (slots are moving)")
            }
            if progress.hops > 0 && progress.remaining.allSatisfy({ progress.asked[$0] == nil }) {
                // Every retry is a TRYAGAIN or a MOVED: give the cluster a moment.
                try await Task.sleep(for: .milliseconds(10 * progress.hops))
            }
            // Sent side by side: each node's pipeline starts before any is awaited.
            var sent: [Sent<T>] = []
            for (target, indices) in try targets(progress.remaining, slots: slots, asked: progress.asked) {
                let connection: RedisConnection
                do {
                    connection = try await self.connection(to: target.node)
                } catch {
                    topology.withLock { $0.stale = true }
                    throw error
                }
                let sub = batch.commands(indices, askingFirst: target.asking)
                sent.append(Sent(indices: indices, asking: target.asking, node: target.node, replies: connection.send({ sub }, parse: routed)))
            }
            try take(sent, await Self.answers(sent), into: &progress)
        }
        return progress.results.map { $0! }
    }

    /// Each node's answer for a hop, once all are in.
    private static func answers<T: Sendable>(_ sent: [Sent<T>]) async -> [Result<[Routed<T>], any Error>] {
        var answers: [Result<[Routed<T>], any Error>] = []
        for one in sent {
            do { answers.append(.success(try await one.replies.value())) } catch { answers.append(.failure(error)) }
        }
        return answers
    }

    /// Where each of `remaining` goes next: the node `ASK` named, else its slot's primary.
    private func targets(_ remaining: [Int], slots: [UInt16], asked: [Int: Node]) throws -> [Target: [Int]] {
        try topology.withLock { t in
            var groups: [Target: [Int]] = [:]
            for index in remaining {
                if let node = asked[index] {
                    groups[Target(node: node, asking: true), default: []].append(index)
                    continue
                }
                let owner = Int(t.owner[Int(slots[index])])
                guard owner >= 0 else {
                    t.stale = true
                    throw RedisError(.connection, "redis cluster: no primary serves slot \(slots[index]) (CLUSTERDOWN?)")
                }
                groups[Target(node: t.primaries[owner], asking: false), default: []].append(index)
            }
            return groups
        }
    }

    /// Takes in one hop's answers (`answers[i]` for `sent[i]`): replies into `results`,
    /// redirections into the map and `remaining`. A node that failed marks the map stale and
    /// fails the pipeline, once every answer of the hop is in.
    private func take<T: Sendable>(_ sent: [Sent<T>], _ answers: [Result<[Routed<T>], any Error>], into progress: inout Progress<T>) throws {
        progress.asked = [:]
        progress.hops += 1
        var next: [Int] = []
        var failure: (any Error)?
        for (one, answer) in zip(sent, answers) {
            let replies: [Routed<T>]
            switch answer {
            case .success(let r): replies = r
            case .failure(let error):
                topology.withLock { $0.stale = true }
                logger.info("redis cluster node failed", metadata: ["redis.node": "\(one.node)", "error": "\(error)"])
                failure = failure ?? error
                continue
            }
            let routed = one.asking ? Self.droppingAskingAcks(replies) : replies
            for (index, answer) in zip(one.indices, routed) {
                switch answer {
                case .value(let value):
                    progress.results[index] = value
                case .moved(let slot, let to):
                    redirected.withLock { $0.moved += 1 }
                    topology.withLock { t in
                        t.stale = true
                        if let i = t.primaries.firstIndex(of: to) {
                            t.owner[slot] = Int16(i)
                        } else {
                            t.owner[slot] = Int16(t.primaries.count)
                            t.primaries.append(to)
                        }
                    }
                    next.append(index)
                case .ask(let to):
                    redirected.withLock { $0.ask += 1 }
                    progress.asked[index] = to
                    next.append(index)
                case .tryAgain:
                    next.append(index)
                case .askingRefused(let text):
                    failure = failure ?? RedisError.fromServerReply(text, context: "ASKING at \(one.node)")
                }
            }
        }
        if let failure { throw failure }
        progress.remaining = next
    }

    /// `pipeline`, sent now and awaited later (the claim store's `send`). From the thread that
    /// `readInline` names, while the map is fresh and every node the batch goes to is connected,
    /// the first hop is written and read on that thread: to every node first, then each node's
    /// replies, for at most the budget in all. When they all came back without a redirection the
    /// replies are here before `send` returns; anything else (a slow node, `MOVED`, `ASK`, a
    /// failed node) goes on in a task, as every round trip does without inline reads.
    func send<T: Sendable>(
        _ build: @escaping @Sendable () -> RedisCommandBatch, slots: [UInt16],
        parse: @escaping @Sendable (UnsafePointer<redisReply>) throws -> T
    ) -> RedisPending<[T]> {
        let pending = RedisPending<[T]>()
        if let inline = inline.withLock({ $0 }), inline.applies(), let route = inlineRoute(slots) {
            sendInline(build(), slots: slots, route, parse, inline, pending)
            return pending
        }
        Task {
            do { pending.complete(.success(try await self.pipeline(build(), slots: slots, parse: parse))) } catch {
                pending.complete(.failure(error))
            }
        }
        return pending
    }

    /// Sets (or with nil, ends) inline reads for `send`: see `RedisConnection.InlineReads`.
    func readInline(_ reads: RedisConnection.InlineReads?) { inline.withLock { $0 = reads } }

    /// Each node's commands and its open connection, while the map is fresh and every slot has a
    /// primary that this cluster has connected to; else nil.
    private func inlineRoute(_ slots: [UInt16]) -> [(node: Node, connection: RedisConnection, indices: [Int])]? {
        guard !topology.withLock({ $0.stale }), let groups = try? targets(Array(slots.indices), slots: slots, asked: [:]) else { return nil }
        return connections.withLock { all in
            var route: [(node: Node, connection: RedisConnection, indices: [Int])] = []
            route.reserveCapacity(groups.count)
            for (target, indices) in groups {
                guard let connection = all[target.node] else { return nil }
                route.append((target.node, connection, indices))
            }
            return route
        }
    }

    /// The first hop on the caller's thread (see `send`); the rest, if any, in a task.
    private func sendInline<T: Sendable>(
        _ batch: RedisCommandBatch, slots: [UInt16], _ route: [(node: Node, connection: RedisConnection, indices: [Int])],
        _ parse: @escaping @Sendable (UnsafePointer<redisReply>) throws -> T,
        _ inline: RedisConnection.InlineReads, _ pending: RedisPending<[T]>
    ) {
        precondition(slots.count == batch.commandCount, "one slot per command")
        let routed = Self.router(parse)
        var sent: [Sent<T>] = []
        var unread: [(RedisConnection, RedisConnection.Unread)] = []
        for (node, connection, indices) in route {
            let (replies, left) = connection.sendUnread(batch.commands(indices, askingFirst: false), parse: routed, inline)
            sent.append(Sent(indices: indices, asking: false, node: node, replies: replies))
            if let left { unread.append((connection, left)) }
        }
        let deadline = ContinuousClock.now + inline.budget
        for (connection, left) in unread { connection.readSent(left, until: deadline) }

        var progress = Progress<T>(count: batch.commandCount)
        let answers = sent.compactMap { $0.replies.result }
        if answers.count == sent.count {
            do {
                try take(sent, answers, into: &progress)
            } catch {
                return pending.complete(.failure(error))
            }
            if progress.remaining.isEmpty { return pending.complete(.success(progress.results.map { $0! })) }
        }
        let taken = answers.count == sent.count
        let start = progress
        Task {
            do {
                var progress = start
                if !taken { try self.take(sent, await Self.answers(sent), into: &progress) }
                pending.complete(.success(try await self.finish(batch, slots: slots, routed, progress)))
            } catch {
                pending.complete(.failure(error))
            }
        }
    }

    /// Runs `commands` on every primary; one array of replies per primary.
    func onEveryPrimary(_ commands: [[RedisArgument]]) async throws -> [(node: String, replies: [RedisReply])] {
        if topology.withLock({ $0.stale }) { try await refreshTopology() }
        var out: [(node: String, replies: [RedisReply])] = []
        for node in primaries {
            let connection = try await connection(to: node)
            out.append(("\(node)", try await connection.pipeline(commands)))
        }
        return out
    }

    /// A parser that turns redirections into routing answers and hands every other reply on.
    private static func router<T: Sendable>(
        _ parse: @escaping @Sendable (UnsafePointer<redisReply>) throws -> T
    ) -> @Sendable (UnsafePointer<redisReply>) throws -> Routed<T> {
        { reply in
            let r = reply.pointee
            if r.type == REDIS_REPLY_ERROR, let str = r.str {
                let text = String(decoding: UnsafeRawBufferPointer(start: str, count: r.len), as: UTF8.self)
                let words = text.split(separator: " ")
                if words.count == 3, words[0] == "MOVED" || words[0] == "ASK", let slot = Int(words[1]),
                   let node = Self.node(words[2]) {
                    return words[0] == "MOVED" ? .moved(slot: slot, to: node) : .ask(to: node)
                }
                if words.first == "TRYAGAIN" { return .tryAgain }
                if words.first == "NOPERM", text.contains("'asking'") { return .askingRefused(text) }
            }
            return .value(try parse(reply))
        }
    }

    /// An ASKING group's replies alternate: ASKING's OK (parsed like any reply, and dropped here,
    /// unless it was refused), then the command's own reply.
    private static func droppingAskingAcks<T>(_ replies: [Routed<T>]) -> [Routed<T>] {
        stride(from: 1, to: replies.count, by: 2).map { i in
            if case .askingRefused = replies[i - 1] { replies[i - 1] } else { replies[i] }
        }
    }

    /// "host:port" (the host may be an IPv6 literal with colons).
    private static func node(_ text: Substring) -> Node? {
        guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]) else { return nil }
        return Node(host: String(text[..<colon]), port: port)
    }
}
