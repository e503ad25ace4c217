import CHiredis
import Dispatch
import Logging
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// One blocking connection to one Redis server, plaintext or TLS (`RedisSocket`: the socket and
/// the TLS session are RedisIO's own, hiredis's reader decodes the replies).
///
/// Every call blocks on the socket, so every I/O call runs on one dedicated serial
/// `DispatchQueue`, never on Swift's cooperative pool. A `pipeline` is one hop to that queue:
/// all commands are written, then all replies read (one round trip).
///
/// Reconnect: on an I/O or protocol error the socket is closed and the call throws a retriable
/// `RedisError`; the next call connects again (TLS handshake, AUTH and SELECT included), so a
/// restarted redis-server is picked up without restarting the process. A connection the server
/// has closed while idle is noticed before sending (the socket is readable), and replaced at once.
///
/// The password is never logged.
///
/// Small round trips sent from one chosen thread (`InlineReads`: the worker's loop) are read on
/// that thread instead: `queue.sync` runs the write and the read there while the queue is idle,
/// so the answer needs no thread woken to wait for it and none to hand it back. An answer slower
/// than the budget is left to the queue's thread, which reads the rest.
///
/// `@unchecked Sendable` is safe because all mutable state (`socket`, `closed`, `connects`,
/// `unfinished`) is read and written only on `queue`, a serial queue (by its own thread or by a
/// caller inside `queue.sync`); `inline` and `queued` are synchronized themselves, and the
/// remaining stored properties are immutable `Sendable` values.
public final class RedisConnection: @unchecked Sendable {
    /// Which round trips `send` reads on the caller's thread: batches of at most `maxBytes`,
    /// sent from a thread for which `applies` is true, each read there for at most `budget`.
    /// That thread blocks meanwhile, so it must be one that may: never one of Swift's
    /// cooperative pool. `maxBytes` bounds the work the caller waits for Redis to do; the
    /// write itself never waits for room: a plaintext socket takes what it can at once
    /// (`MSG_DONTWAIT`) and the queue's thread writes the rest. A TLS session cannot write that
    /// way, so over TLS only batches of at most `tlsMaxBytes` are read inline: no more than a new
    /// socket's send buffer (Linux's `tcp_wmem` default, 16 KiB) holds, which is empty once the
    /// previous round trip was answered. Only a buffer shrunk under memory pressure (to
    /// `tcp_wmem`'s minimum) could make that write wait, and then no longer than the socket's
    /// send timeout.
    public struct InlineReads: Sendable {
        public static let tlsMaxBytes = 16 * 1024

        public var budget: Duration
        public var maxBytes: Int
        public var applies: @Sendable () -> Bool

        public init(budget: Duration, maxBytes: Int, applies: @escaping @Sendable () -> Bool) {
            self.budget = budget
            self.maxBytes = maxBytes
            self.applies = applies
        }
    }

    public let url: RedisURL
    public let connectTimeout: Duration
    public let commandTimeout: Duration
    private let logger: Logger
    private let queue: DispatchQueue
    /// For `rediss://` URLs: trust roots and client certificate, loaded once.
    private let tls: RedisTLSContext?
    /// `redis.mode: sentinel`: asked for the primary's address at every connect (`url` then
    /// gives the user, password, database and scheme, not the address).
    private let sentinels: RedisSentinels?

    private let inline = Mutex<InlineReads?>(nil)
    /// Blocks handed to `queue` and not yet finished: `send` reads inline only when it is 0, so
    /// the caller never waits in `queue.sync` for another round trip.
    private let queued = Atomic<Int>(0)

    // Only touched on `queue`.
    private var socket: RedisSocket?
    private var closed = false
    private var connects = 0
    /// Whether the last round trip met `READONLY` (logged once until one does not).
    private var demoted = false
    /// A round trip written on the caller's thread whose replies are not all read: whatever runs
    /// on the queue next reads them first, so the socket's replies stay in step.
    private var unfinished: Unread?

    /// The replies of a round trip written by `sendUnread`, for `readSent`. Touched only on the
    /// connection's queue.
    final class Unread: @unchecked Sendable {
        /// Reads replies until `deadline` (nil: all of them, after writing what the socket did not
        /// take at once); returns what completes the caller once every reply is in, else nil.
        fileprivate let read: (ContinuousClock.Instant?) -> (@Sendable () -> Void)?

        fileprivate init(_ read: @escaping (ContinuousClock.Instant?) -> (@Sendable () -> Void)?) { self.read = read }
    }

    private init(
        url: RedisURL, sentinels: RedisSentinels?, connectTimeout: Duration, commandTimeout: Duration, tls: RedisTLSContext?,
        logger: Logger
    ) {
        self.url = url
        self.sentinels = sentinels
        self.tls = tls
        self.connectTimeout = connectTimeout
        self.commandTimeout = commandTimeout
        var logger = logger
        logger[metadataKey: "redis.server"] = "\(sentinels?.description ?? url.peer)/\(url.database)"
        self.logger = logger
        self.queue = DispatchQueue(label: "dedupd.redis.\(url.host):\(url.port)")
        Self.ignoreSIGPIPE
    }

    /// The server for logs: `host:port`, or with Sentinels, the primary's name and the Sentinels.
    public var node: String { sentinels?.description ?? url.peer }
    /// The URL without its password, or with Sentinels, the primary's name, the Sentinels and the database.
    public var redactedTarget: String { sentinels.map { "\($0.description)/\(url.database)" } ?? url.redacted }

    /// A write to a socket the server has closed raises SIGPIPE, which would kill the process
    /// (OpenSSL writes with write(2)). Ignored once, process-wide.
    private static let ignoreSIGPIPE: Void = {
        _ = signal(SIGPIPE, SIG_IGN)
    }()

    /// Connects (TCP, TLS for `rediss://`, AUTH, SELECT, PING). Throws if the first connection
    /// fails, so a wrong address, password or certificate is reported at start. `tls` applies to
    /// `rediss://` URLs only. With `sentinels`, the address is the primary's as the Sentinels
    /// tell it, asked again at every reconnect.
    public static func connect(
        _ url: RedisURL,
        sentinels: RedisSentinels? = nil,
        connectTimeout: Duration = .seconds(2),
        commandTimeout: Duration = .seconds(5),
        tls: RedisTLSOptions = RedisTLSOptions(),
        logger: Logger
    ) async throws -> RedisConnection {
        let connection = RedisConnection(
            url: url, sentinels: sentinels, connectTimeout: connectTimeout, commandTimeout: commandTimeout,
            tls: url.tls ? try RedisTLSContext(tls) : nil, logger: logger)
        try await connection.onQueue { _ = try connection.connectedSocket() }
        return connection
    }

    /// Sends all commands, then reads all replies: one round trip. Error replies
    /// are returned in place (`.error`); a broken connection throws.
    public func pipeline(_ commands: [[RedisArgument]]) async throws -> [RedisReply] {
        if commands.isEmpty { return [] }
        return try await pipeline(RedisCommandBatch(commands)) { RedisReply($0) }
    }

    /// Sends an encoded batch of commands in one round trip and turns each reply into a `T` with
    /// `parse` while it is still in the socket's reply arena, on the connection's queue. The
    /// claim store reads its per-key results this way without a `RedisReply` tree (an array and
    /// a `String` per key).
    /// `parse` must not keep the pointer. A broken connection throws.
    func pipeline<T: Sendable>(
        _ batch: RedisCommandBatch, parse: @escaping @Sendable (UnsafePointer<redisReply>) throws -> T
    ) async throws -> [T] {
        if batch.commandCount == 0 { return [] }
        return try await onQueue { try self.runPipeline(batch, parse) }
    }

    /// Like `pipeline(_:parse:)`, but returns as soon as the batch is handed to the connection's
    /// queue; `build` runs there too, so encoding a large batch does not hold up the caller.
    /// With `InlineReads` set and the caller its thread, a small batch is written and read on the
    /// caller's thread (below).
    func send<T: Sendable>(
        _ build: @escaping @Sendable () -> RedisCommandBatch,
        parse: @escaping @Sendable (UnsafePointer<redisReply>) throws -> T
    ) -> RedisPending<[T]> {
        let pending = RedisPending<[T]>()
        if let inline = inline.withLock({ $0 }), queued.load(ordering: .acquiring) == 0, inline.applies() {
            queue.sync {
                if let unread = write(build(), parse, inline, pending) { read(unread, until: .now + inline.budget) }
            }
            return pending
        }
        enqueue {
            let result = Result {
                let batch = build()
                return batch.commandCount == 0 ? [] : try self.runPipeline(batch, parse)
            }
            return { pending.complete(result) }
        }
        return pending
    }

    /// `send`'s first half, for a cluster writing to several nodes before it reads any: while the
    /// connection is idle, writes `batch` on the caller's thread (`inline`'s thread) and leaves its
    /// replies for `readSent`; nil when the round trip went to the queue's thread instead, as
    /// `send` hands it over (a batch over `maxBytes`, a socket to open again, a busy connection).
    func sendUnread<T: Sendable>(
        _ batch: RedisCommandBatch, parse: @escaping @Sendable (UnsafePointer<redisReply>) throws -> T,
        _ inline: InlineReads
    ) -> (replies: RedisPending<[T]>, unread: Unread?) {
        let pending = RedisPending<[T]>()
        if queued.load(ordering: .acquiring) == 0 {
            return (pending, queue.sync { write(batch, parse, inline, pending) })
        }
        enqueueRoundTrip(batch, parse, pending)
        return (pending, nil)
    }

    /// `send`'s second half: reads the replies `sendUnread` left until `deadline`, on the caller's
    /// thread; the rest of an answer slower than that goes to the queue's thread.
    func readSent(_ unread: Unread, until deadline: ContinuousClock.Instant) {
        queue.sync { read(unread, until: deadline) }
    }

    /// Sets (or with nil, ends) inline reads for `send`.
    public func readInline(_ reads: InlineReads?) { inline.withLock { $0 = reads } }

    /// On the queue, on the caller's thread: writes `batch` and returns its replies to read; a
    /// batch over `maxBytes`, a socket to open again, or the part of the batch the socket does not
    /// take at once go to the queue's thread (nil).
    private func write<T>(
        _ batch: RedisCommandBatch, _ parse: @escaping @Sendable (UnsafePointer<redisReply>) throws -> T,
        _ inline: InlineReads, _ pending: RedisPending<[T]>
    ) -> Unread? {
        if batch.commandCount == 0 {
            pending.complete(.success([]))
            return nil
        }
        guard batch.byteCount <= inline.maxBytes, unfinished == nil, !closed, let socket,
              !socket.isTLS || batch.byteCount <= InlineReads.tlsMaxBytes, !socket.peerHasClosed() else {
            enqueueRoundTrip(batch, parse, pending)
            return nil
        }
        var written = 0
        do {
            written = try batch.withCompleteBytes { bytes in
                if socket.isTLS {
                    try socket.write(bytes)
                    return bytes.count
                }
                return try socket.writeWithoutWaiting(bytes)
            }
        } catch {
            lost(error)
            pending.complete(.failure(error))
            return nil
        }
        var replies = Replies<T>(expected: batch.commandCount)
        let unread = Unread { deadline in
            do {
                if written < batch.byteCount {
                    try batch.withCompleteBytes { try socket.write(UnsafeRawBufferPointer(rebasing: $0[written...])) }
                    written = batch.byteCount
                }
                guard try replies.read(from: socket, parse, until: deadline) else { return nil }
            } catch {
                self.lost(error)
                return { pending.complete(.failure(error)) }
            }
            self.dropIfDemoted(replies)
            let result = Result { try replies.all() }
            return { pending.complete(result) }
        }
        unfinished = unread
        if written < batch.byteCount {
            enqueue { self.finishUnfinished() ?? {} }
            return nil
        }
        return unread
    }

    /// On the queue, on the caller's thread: reads `unread`'s replies until `deadline`, unless a
    /// block on the queue has read them meanwhile; hands the rest to the queue's thread.
    private func read(_ unread: Unread, until deadline: ContinuousClock.Instant) {
        guard unfinished === unread else { return }
        if let complete = unread.read(deadline) {
            unfinished = nil
            complete()
        } else {
            enqueue { self.finishUnfinished() ?? {} }
        }
    }

    /// Reads the rest of a round trip written on the caller's thread, if any; returns what
    /// completes its caller.
    private func finishUnfinished() -> (@Sendable () -> Void)? {
        guard let rest = unfinished else { return nil }
        unfinished = nil
        return rest.read(nil)
    }

    /// The whole round trip of `batch` on the queue's thread.
    private func enqueueRoundTrip<T>(
        _ batch: RedisCommandBatch, _ parse: @escaping @Sendable (UnsafePointer<redisReply>) throws -> T, _ pending: RedisPending<[T]>
    ) {
        enqueue {
            let result = Result { try self.runPipeline(batch, parse) }
            return { pending.complete(result) }
        }
    }

    /// `body` on the queue's thread, counted in `queued` until it ends; what it returns (the
    /// caller's completion) runs after that, so a caller that has its answer finds the
    /// connection idle again.
    private func enqueue(_ body: @escaping @Sendable () -> @Sendable () -> Void) {
        queued.add(1, ordering: .relaxed)
        queue.async {
            let complete = body()
            self.queued.subtract(1, ordering: .releasing)
            complete()
        }
    }

    /// Sends one command and returns its reply (an error reply is returned, not thrown).
    public func command(_ args: [RedisArgument]) async throws -> RedisReply {
        try await pipeline([args])[0]
    }

    /// Sends one command and returns its reply (an error reply is returned, not thrown).
    public func command(_ args: RedisArgument...) async throws -> RedisReply {
        try await command(args)
    }

    /// PING; throws unless the server answers PONG. Used for health and outage detection.
    public func ping() async throws {
        let reply = try await command("PING").throwingOnError("PING")
        guard reply.text == "PONG" else {
            throw RedisError(.protocolError, "unexpected reply to PING: \(reply)")
        }
    }

    /// How many times a TCP connection was established (1 after `connect`; more after reconnects).
    public var connectCount: Int {
        get async { (try? await onQueue { self.connects }) ?? 0 }
    }

    /// Closes the connection; later calls throw `.closed`.
    public func close() async {
        _ = try? await onQueue {
            self.finishUnfinished()?()
            self.closed = true
            self.socket = nil
        }
    }

    // MARK: - On the queue

    private func onQueue<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
        try await withCheckedThrowingContinuation { continuation in
            enqueue {
                let result = Result { try body() }
                return { continuation.resume(with: result) }
            }
        }
    }

    private func runPipeline<T>(_ batch: RedisCommandBatch, _ parse: (UnsafePointer<redisReply>) throws -> T) throws -> [T] {
        let socket = try connectedSocket()
        let replies: Replies<T>
        do {
            replies = try Self.roundTrip(socket, batch, parse)
        } catch {
            lost(error)
            throw error
        }
        dropIfDemoted(replies)
        return try replies.all()
    }

    /// A primary demoted to a replica (a failover) keeps its clients' connections and answers
    /// every write `READONLY`. The socket is dropped so the next call connects again, by name, to
    /// what `redis.url` names now: a managed service's primary endpoint follows the failover, and
    /// a worker that kept the old connection would wait for good.
    ///
    /// Logged once while every new connection meets a replica (`redis.url` names one).
    private func dropIfDemoted<T>(_ replies: Replies<T>) {
        guard replies.sawReadOnly else {
            demoted = false
            return
        }
        if !demoted {
            logger.notice("redis answered READONLY (the node is now a replica), connecting again", metadata: ["redis.url": "\(redactedTarget)"])
        }
        demoted = true
        socket = nil
    }

    /// After an I/O or protocol error (a `RedisError`) the socket is out of step: it is dropped,
    /// and the next call connects again.
    private func lost(_ error: any Error) {
        guard let error = error as? RedisError else { return }
        logger.info("redis connection lost", metadata: ["error.message": "\(error.message)"])
        socket = nil
    }

    /// The current socket, after (re)connecting if needed.
    private func connectedSocket() throws -> RedisSocket {
        finishUnfinished()?()
        if closed { throw RedisError(.closed, "connection to \(url.redacted) was closed") }
        if let socket {
            if socket.peerHasClosed() {
                logger.debug("redis connection closed by server while idle; reconnecting")
                self.socket = nil
            } else {
                return socket
            }
        }
        let opened = try openSocket()
        socket = opened
        connects += 1
        if connects == 1 {
            logger.info("redis connected", metadata: url.tls ? ["redis.tls": "true"] : [:])
        } else {
            logger.info("redis reconnected", metadata: ["redis.connects": "\(connects)"])
        }
        return opened
    }

    /// Connects, then AUTH, SELECT and PING in one round trip: the PING makes a server that
    /// cannot speak with us (a TLS-only port reached with redis://) fail here, at connect.
    private func openSocket() throws -> RedisSocket {
        let (host, port) = try sentinels?.locate(connectTimeout: connectTimeout, commandTimeout: commandTimeout, tls: tls)
            ?? (url.host, url.port)
        let peer = RedisURL.peer(host: host, port: port)
        let socket = try RedisSocket.connect(
            host: host, port: port, connectTimeout: connectTimeout, commandTimeout: commandTimeout, tls: tls)
        var setup = RedisCommandBatch()
        setup.appendAuth(url)
        if url.database != 0 {
            setup.begin()
            setup.append("SELECT")
            setup.append(url.database)
        }
        setup.begin()
        setup.append("PING")
        let replies: [RedisReply]
        do {
            replies = try Self.roundTrip(socket, setup) { RedisReply($0) }.all()
        } catch let error as RedisError where !url.tls && (error.code == .timeout || error.code == .connection || error.code == .protocolError) {
            // A TLS-only port takes the plaintext PING for a broken handshake: it waits or hangs up.
            throw RedisError(error.code, "\(error.message) (no answer to PING; if the server only accepts TLS on this port, use rediss://)")
        }
        var index = 0
        if url.password != nil {
            if case .error(let text) = replies[0] {
                // Never include the password; the server's text does not contain it.
                let who = url.user.map { "user '\($0)'" } ?? "the default user"
                throw RedisError(.auth, "AUTH as \(who) at \(peer) was refused: \(text)")
            }
            index = 1
        }
        if url.database != 0 {
            if case .error(let text) = replies[index] { throw setupError(text, command: "SELECT \(url.database)", at: peer) }
            index += 1
        }
        if case .error(let text) = replies[index] { throw setupError(text, command: "PING", at: peer) }
        if sentinels != nil { logger.info("redis primary located by sentinel", metadata: ["redis.primary": "\(peer)"]) }
        return socket
    }

    /// `NOAUTH` means no password was given and the server wants one; anything else (`NOPERM`:
    /// the user may not run the command) is the server's own error for that command.
    private func setupError(_ text: String, command: String, at peer: String) -> RedisError {
        if text.hasPrefix("NOAUTH") {
            return RedisError(.auth, "\(peer) requires AUTH (no password in URL): \(text)")
        }
        return RedisError.fromServerReply(text, context: "\(command) at \(peer)")
    }

    /// Writes every command, then reads and parses one reply per command (`Replies`).
    static func roundTrip<T>(
        _ socket: RedisSocket, _ batch: RedisCommandBatch, _ parse: (UnsafePointer<redisReply>) throws -> T
    ) throws -> Replies<T> {
        try batch.withCompleteBytes { try socket.write($0) }
        var replies = Replies<T>(expected: batch.commandCount)
        _ = try replies.read(from: socket, parse, until: nil)
        return replies
    }
}

/// The replies of one round trip as they are read: each parsed before the next is read (a reply
/// is valid only until then: `RedisSocket.nextReply`). Every reply is read even when `parse`
/// throws, so the connection stays in step; the first such error is thrown by `all()`.
struct Replies<T> {
    let expected: Int
    var parsed: [T] = []
    var read = 0
    var parseError: (any Error)?
    /// Whether a reply was `-READONLY ...` (`dropIfDemoted`).
    var sawReadOnly = false

    init(expected: Int) {
        self.expected = expected
        parsed.reserveCapacity(expected)
    }

    /// Reads until every reply is in (true) or `deadline` passes first (false; call again to go
    /// on). Throws on an I/O or protocol error.
    mutating func read(
        from socket: RedisSocket, _ parse: (UnsafePointer<redisReply>) throws -> T, until deadline: ContinuousClock.Instant?
    ) throws -> Bool {
        while read < expected {
            guard let reply = try socket.nextReply(until: deadline) else { return false }
            read += 1
            if reply.pointee.type == REDIS_REPLY_ERROR, Self.isReadOnly(reply.pointee) { sawReadOnly = true }
            guard parseError == nil else { continue }
            do {
                parsed.append(try parse(reply))
            } catch {
                parseError = error
            }
        }
        return true
    }

    func all() throws -> [T] {
        if let parseError { throw parseError }
        return parsed
    }

    private static func isReadOnly(_ reply: redisReply) -> Bool {
        guard let str = reply.str, reply.len >= 8 else { return false }
        return memcmp(str, "READONLY", 8) == 0
    }
}

extension RedisCommandBatch {
    /// `AUTH [user] password` with the URL's credentials; nothing without a password.
    mutating func appendAuth(_ url: RedisURL) {
        guard let password = url.password else { return }
        begin()
        append("AUTH")
        if let user = url.user { append(user) }
        append(password)
    }
}
