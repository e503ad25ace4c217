import CHiredis
import Dispatch
import Logging

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// One blocking hiredis connection to one Redis server.
///
/// hiredis contexts are not thread-safe and every call blocks on the socket, so
/// every C call on the context runs on one dedicated serial `DispatchQueue`,
/// never on Swift's cooperative pool. A `pipeline` is one hop to that queue:
/// all commands are appended, then all replies read (one round trip).
///
/// Reconnect: when hiredis reports an I/O or protocol error the context is
/// freed and the call throws a retriable `RedisError`; the next call connects
/// again (AUTH and SELECT included), so a restarted redis-server is picked up
/// without restarting the process. A connection the server has closed while
/// idle is noticed before sending (the socket is readable), and replaced at once.
///
/// The password is never logged.
///
/// `@unchecked Sendable` is safe because all mutable state (`context`,
/// `closed`, `connects`) is read and written only on `queue`, a serial queue;
/// the remaining stored properties are immutable `Sendable` values.
public final class RedisConnection: @unchecked Sendable {
    public let url: RedisURL
    public let connectTimeout: Duration
    public let commandTimeout: Duration
    private let logger: Logger
    private let queue: DispatchQueue

    // Only touched on `queue`.
    private var context: UnsafeMutablePointer<redisContext>?
    private var closed = false
    private var connects = 0

    private init(url: RedisURL, connectTimeout: Duration, commandTimeout: Duration, logger: Logger) {
        self.url = url
        self.connectTimeout = connectTimeout
        self.commandTimeout = commandTimeout
        var logger = logger
        logger[metadataKey: "redis.server"] = "\(url.host):\(url.port)/\(url.database)"
        self.logger = logger
        self.queue = DispatchQueue(label: "dedupd.redis.\(url.host):\(url.port)")
        Self.ignoreSIGPIPE
    }

    deinit {
        // No call can be in flight: every queued block holds a strong reference.
        if let context { redisFree(context) }
    }

    /// hiredis writes with `write(2)`: a write to a socket the server has closed
    /// would raise SIGPIPE and kill the process. Ignored once, process-wide.
    private static let ignoreSIGPIPE: Void = {
        _ = signal(SIGPIPE, SIG_IGN)
    }()

    /// Connects (TCP, AUTH, SELECT). Throws if the first connection fails, so a
    /// wrong address or password is reported at start.
    public static func connect(
        _ url: RedisURL,
        connectTimeout: Duration = .seconds(2),
        commandTimeout: Duration = .seconds(5),
        logger: Logger
    ) async throws -> RedisConnection {
        let connection = RedisConnection(
            url: url, connectTimeout: connectTimeout, commandTimeout: commandTimeout, logger: logger)
        try await connection.onQueue { _ = try connection.connectedContext() }
        return connection
    }

    /// Sends all commands, then reads all replies: one round trip. Error replies
    /// are returned in place (`.error`); a broken connection throws.
    public func pipeline(_ commands: [[RedisArgument]]) async throws -> [RedisReply] {
        if commands.isEmpty { return [] }
        var batch = RedisCommandBatch()
        for command in commands {
            batch.begin()
            for arg in command { batch.append(arg.bytes) }
        }
        return try await pipeline(batch) { RedisReply($0) }
    }

    /// Sends an encoded batch of commands in one round trip and turns each reply into a `T` with
    /// `parse` while hiredis still owns it, on the connection's queue. The claim store reads its
    /// per-key results this way without a `RedisReply` tree (an array and a `String` per key).
    /// `parse` must not keep the pointer. A broken connection throws.
    func pipeline<T: Sendable>(
        _ batch: RedisCommandBatch, parse: @escaping @Sendable (UnsafePointer<redisReply>) throws -> T
    ) async throws -> [T] {
        if batch.commandCount == 0 { return [] }
        return try await onQueue { try self.runPipeline(batch, parse) }
    }

    /// Like `pipeline(_:parse:)`, but returns as soon as the batch is handed to the connection's
    /// queue; `build` runs there too, so encoding a large batch does not hold up the caller.
    func send<T: Sendable>(
        _ build: @escaping @Sendable () -> RedisCommandBatch,
        parse: @escaping @Sendable (UnsafePointer<redisReply>) throws -> T
    ) -> RedisPending<[T]> {
        let pending = RedisPending<[T]>()
        queue.async {
            pending.complete(Result {
                let batch = build()
                return batch.commandCount == 0 ? [] : try self.runPipeline(batch, parse)
            })
        }
        return pending
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
            self.closed = true
            self.dropContext()
        }
    }

    // MARK: - On the queue

    private func onQueue<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
        try await withCheckedThrowingContinuation { continuation in
            queue.async {
                continuation.resume(with: Result { try body() })
            }
        }
    }

    private func runPipeline<T>(_ batch: RedisCommandBatch, _ parse: (UnsafePointer<redisReply>) throws -> T) throws -> [T] {
        let ctx = try connectedContext()
        do {
            return try Self.roundTrip(ctx, batch, parse)
        } catch let error as RedisError {
            logger.info("redis connection lost", metadata: ["error.message": "\(error.message)"])
            dropContext()
            throw error
        }
    }

    private func dropContext() {
        if let context {
            redisFree(context)
            self.context = nil
        }
    }

    /// The current context, after (re)connecting if needed.
    private func connectedContext() throws -> UnsafeMutablePointer<redisContext> {
        if closed { throw RedisError(.closed, "connection to \(url.redacted) was closed") }
        if let context {
            if Self.peerHasClosed(context) {
                logger.debug("redis connection closed by server while idle; reconnecting")
                dropContext()
            } else {
                return context
            }
        }
        let ctx = try openContext()
        context = ctx
        connects += 1
        if connects == 1 {
            logger.info("redis connected")
        } else {
            logger.info("redis reconnected", metadata: ["redis.connects": "\(connects)"])
        }
        return ctx
    }

    private func openContext() throws -> UnsafeMutablePointer<redisContext> {
        let maybeCtx = url.host.withCString { redisConnectWithTimeout($0, Int32(url.port), Self.makeTimeval(connectTimeout)) }
        guard let ctx = maybeCtx else {
            throw RedisError(.connection, "cannot allocate a hiredis context")
        }
        if ctx.pointee.err != 0 {
            let error = Self.contextError(ctx, action: "connecting to \(url.host):\(url.port)")
            redisFree(ctx)
            throw error
        }
        guard redisSetTimeout(ctx, Self.makeTimeval(commandTimeout)) == REDIS_OK else {
            let error = Self.contextError(ctx, action: "setting the command timeout")
            redisFree(ctx)
            throw error
        }
        var setup = RedisCommandBatch()
        if let password = url.password {
            setup.begin()
            setup.append("AUTH")
            if let user = url.user { setup.append(user) }
            setup.append(password)
        }
        if url.database != 0 {
            setup.begin()
            setup.append("SELECT")
            setup.append(url.database)
        }
        if setup.commandCount == 0 { return ctx }
        do {
            let replies = try Self.roundTrip(ctx, setup) { RedisReply($0) }
            var index = 0
            if url.password != nil {
                if case .error(let text) = replies[0] {
                    // Never include the password; the server's text does not contain it.
                    let who = url.user.map { "user '\($0)'" } ?? "the default user"
                    throw RedisError(.auth, "AUTH as \(who) at \(url.host):\(url.port) was refused: \(text)")
                }
                index = 1
            }
            if url.database != 0 {
                if case .error(let text) = replies[index] {
                    let error = RedisError.fromServerReply(text, context: "SELECT \(url.database)")
                    if error.code == .auth {
                        throw RedisError(.auth, "\(url.host):\(url.port) requires AUTH (no password in URL): \(text)")
                    }
                    throw error
                }
            }
        } catch {
            redisFree(ctx)
            throw error
        }
        return ctx
    }

    /// Appends every command to the output buffer, then reads one reply per command and parses
    /// it before freeing it. Every reply is read even when `parse` throws, so the connection
    /// stays in step; the first error is thrown afterwards.
    private static func roundTrip<T>(
        _ ctx: UnsafeMutablePointer<redisContext>, _ batch: RedisCommandBatch, _ parse: (UnsafePointer<redisReply>) throws -> T
    ) throws -> [T] {
        try append(ctx, batch)
        var replies: [T] = []
        replies.reserveCapacity(batch.commandCount)
        var parseError: (any Error)?
        for _ in 0..<batch.commandCount {
            var raw: UnsafeMutableRawPointer?
            guard redisGetReply(ctx, &raw) == REDIS_OK else {
                if let raw { freeReplyObject(raw) }
                throw contextError(ctx, action: "reading a reply")
            }
            guard let raw else {
                throw RedisError(.protocolError, "hiredis returned no reply")
            }
            defer { freeReplyObject(raw) }
            guard parseError == nil else { continue }
            do {
                replies.append(try parse(UnsafePointer(raw.assumingMemoryBound(to: redisReply.self))))
            } catch {
                parseError = error
            }
        }
        if let parseError { throw parseError }
        return replies
    }

    /// Hands every command of `batch` to hiredis (`redisAppendCommandArgv`), with argv pointers
    /// into the batch's one contiguous buffer, valid for the duration of each call.
    private static func append(_ ctx: UnsafeMutablePointer<redisContext>, _ batch: RedisCommandBatch) throws {
        var argv: [UnsafePointer<CChar>?] = []
        argv.reserveCapacity(batch.lengths.count)
        let status: Int32 = batch.bytes.withUnsafeBufferPointer { bytes in
            let base = UnsafeRawPointer(bytes.baseAddress!).assumingMemoryBound(to: CChar.self)
            var offset = 0
            for length in batch.lengths {
                argv.append(base + offset)
                offset += length
            }
            return argv.withUnsafeMutableBufferPointer { argvPointer in
                batch.lengths.withUnsafeBufferPointer { lengthPointer in
                    var first = 0
                    for count in batch.argumentCounts {
                        let status = redisAppendCommandArgv(
                            ctx, Int32(count), argvPointer.baseAddress! + first, lengthPointer.baseAddress! + first)
                        if status != REDIS_OK { return status }
                        first += count
                    }
                    return REDIS_OK
                }
            }
        }
        guard status == REDIS_OK else {
            throw contextError(ctx, action: "appending a command")
        }
    }

    /// True if the server closed the socket (or sent something unsolicited) while
    /// we were idle: RESP2 never sends without a request, so a readable socket
    /// between calls means EOF or garbage. One `poll(2)` with a zero timeout.
    private static func peerHasClosed(_ ctx: UnsafeMutablePointer<redisContext>) -> Bool {
        var pfd = pollfd(fd: ctx.pointee.fd, events: Int16(POLLIN), revents: 0)
        let n = poll(&pfd, 1, 0)
        return n != 0
    }

    private static func contextError(_ ctx: UnsafeMutablePointer<redisContext>, action: String) -> RedisError {
        let text = withUnsafePointer(to: ctx.pointee.errstr) {
            $0.withMemoryRebound(to: CChar.self, capacity: MemoryLayout.size(ofValue: ctx.pointee.errstr)) {
                String(cString: $0)
            }
        }
        let message = "\(action): \(text.isEmpty ? "unknown error" : text)"
        switch ctx.pointee.err {
        case REDIS_ERR_PROTOCOL:
            return RedisError(.protocolError, message, retriable: true)
        case REDIS_ERR_IO where text.contains("temporarily unavailable") || text.contains("timed out"):
            // hiredis 0.14 reports a socket timeout (SO_RCVTIMEO) as EAGAIN.
            return RedisError(.timeout, message)
        default:
            return RedisError(.connection, message)
        }
    }

    private static func makeTimeval(_ duration: Duration) -> timeval {
        let (seconds, attoseconds) = duration.components
        let micros = max(0, attoseconds / 1_000_000_000_000)
        if seconds <= 0 && micros == 0 {
            return timeval(tv_sec: 0, tv_usec: 1000)
        }
        return timeval(tv_sec: Int(seconds), tv_usec: Int(micros))
    }
}
