import CHiredis
import COpenSSL
import DedupCore

#if canImport(Glibc)
import Glibc
#endif

/// TLS settings for `rediss://` (the `redis.tls.*` keys). The server's certificate is always
/// verified: against `caFile`, or the system's trust store when it is nil.
public struct RedisTLSOptions: Sendable, Hashable {
    /// PEM bundle of the certificate authorities to trust (`redis.tls.ca_file`).
    public var caFile: String?
    /// PEM client certificate (chain) and its key, for servers that ask for one.
    public var certificateFile: String?
    public var keyFile: String?
    /// The name the server's certificate must carry; default: the URL's host.
    public var serverName: String?

    public init(caFile: String? = nil, certificateFile: String? = nil, keyFile: String? = nil, serverName: String? = nil) {
        self.caFile = caFile
        self.certificateFile = certificateFile
        self.keyFile = keyFile
        self.serverName = serverName
    }
}

extension RedisTLSOptions {
    /// The files loaded the way a connection loads them, without connecting: `nil` when they load,
    /// else the setting whose file does not, the file, and OpenSSL's reason.
    public func fileProblem() -> TLSFileProblem? {
        guard caFile != nil || certificateFile != nil || keyFile != nil, let ctx = SSL_CTX_new(TLS_client_method()) else { return nil }
        defer { SSL_CTX_free(ctx) }
        return RedisTLSContext.load(self, into: ctx)
    }
}

/// An OpenSSL client context made once from `RedisTLSOptions`: trust roots, client certificate.
///
/// `@unchecked Sendable`: the `SSL_CTX` is only read after `init` (OpenSSL allows `SSL_new` from
/// several threads on one context), and freed in `deinit`.
final class RedisTLSContext: @unchecked Sendable {
    let options: RedisTLSOptions
    let context: OpaquePointer

    /// Throws `RedisError(.tls)` naming the setting whose file cannot be read or parsed.
    init(_ options: RedisTLSOptions) throws {
        guard let ctx = SSL_CTX_new(TLS_client_method()) else {
            throw RedisError(.tls, "cannot create a TLS context: \(Self.lastError())", retriable: false)
        }
        context = ctx
        self.options = options
        _ = dedupd_ssl_ctx_set_min_tls12(ctx)
        SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, nil)
        if let problem = Self.load(options, into: ctx) {
            throw RedisError(.tls, "\(problem.setting) = \(problem.file): \(problem.reason)", retriable: false)
        }
    }

    /// Loads the trust roots and the client certificate and key into `ctx`; the first that fails.
    static func load(_ options: RedisTLSOptions, into ctx: OpaquePointer) -> TLSFileProblem? {
        if let ca = options.caFile {
            guard SSL_CTX_load_verify_locations(ctx, ca, nil) == 1 else {
                return TLSFileProblem(setting: "redis.tls.ca_file", file: ca, reason: "cannot load certificate authorities: \(lastError())")
            }
        } else {
            SSL_CTX_set_default_verify_paths(ctx)
        }
        if let cert = options.certificateFile {
            guard SSL_CTX_use_certificate_chain_file(ctx, cert) == 1 else {
                return TLSFileProblem(setting: "redis.tls.cert_file", file: cert, reason: "cannot load the client certificate: \(lastError())")
            }
        }
        if let key = options.keyFile {
            guard SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) == 1, SSL_CTX_check_private_key(ctx) == 1 else {
                return TLSFileProblem(
                    setting: "redis.tls.key_file", file: key,
                    reason: "cannot load the client key or it does not match redis.tls.cert_file: \(lastError())")
            }
        }
        return nil
    }

    deinit { SSL_CTX_free(context) }

    /// The oldest queued OpenSSL error as text (and the queue emptied), or "unknown error".
    static func lastError() -> String {
        var text = ""
        while case let code = ERR_get_error(), code != 0 {
            if text.isEmpty {
                var buffer = [CChar](repeating: 0, count: 256)
                ERR_error_string_n(code, &buffer, buffer.count)
                text = buffer.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
            }
        }
        return text.isEmpty ? "unknown error" : text
    }
}

/// One TCP connection to a Redis server, plaintext or TLS, with hiredis's RESP reader as the
/// protocol codec (hiredis 0.14 has no TLS of its own; its reader needs no socket).
///
/// Blocking calls bounded by the socket's timeouts; used only on `RedisConnection`'s queue.
final class RedisSocket {
    private let fd: Int32
    private var ssl: OpaquePointer?
    private let reader: UnsafeMutablePointer<redisReader>
    /// Where the reader builds replies (its `privdata`).
    private let arena: ReplyArena
    /// Raw memory, not an array: read on every reply, and an array property of a class is
    /// checked for exclusive access at each use.
    private let readBuffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 * 1024, alignment: 16)
    /// `readBuffer[fed..<filled]` was read from the socket but not yet given to the reader.
    private var fed = 0
    private var filled = 0
    private let peer: String
    /// The last `nextReply(until:)` ran out of time inside a reply: the reader holds its first
    /// part, built in `arena`, so the next call goes on with it instead of starting afresh.
    private var resuming = false

    /// How much of a read the reader gets at a time. hiredis 0.14's reader moves its unread
    /// bytes to the front of its buffer after every reply once it has consumed 1 KiB, so a
    /// whole read of small replies (a claim batch's) would be moved again for every few of
    /// them; fed a chunk at a time, the reader's buffer stays about one chunk long.
    private static let feedChunk = 2048

    private init(fd: Int32, ssl: OpaquePointer?, reader: UnsafeMutablePointer<redisReader>, arena: ReplyArena, peer: String) {
        self.fd = fd
        self.ssl = ssl
        self.reader = reader
        self.arena = arena
        self.peer = peer
        reader.pointee.privdata = UnsafeMutableRawPointer(arena.cursor)
    }

    deinit {
        if let ssl {
            SSL_shutdown(ssl)
            SSL_free(ssl)
        }
        Glibc.close(fd)
        redisReaderFree(reader)
        readBuffer.deallocate()
    }

    /// Connects within `connectTimeout` (and completes the TLS handshake when `tls` is given);
    /// reads and writes then time out after `commandTimeout`.
    static func connect(
        host: String, port: Int, connectTimeout: Duration, commandTimeout: Duration, tls: RedisTLSContext?
    ) throws -> RedisSocket {
        let peer = RedisURL.peer(host: host, port: port)
        let fd = try openTCP(host: host, port: port, timeout: connectTimeout, peer: peer)
        var ssl: OpaquePointer?
        do {
            if let tls {
                setTimeouts(fd, connectTimeout)
                ssl = try handshake(fd: fd, host: host, tls: tls, peer: peer)
            }
            setTimeouts(fd, commandTimeout)
        } catch {
            Glibc.close(fd)
            throw error
        }
        guard let reader = redisReaderCreateWithFunctions(ReplyArena.functions) else {
            if let ssl { SSL_free(ssl) }
            Glibc.close(fd)
            throw RedisError(.connection, "cannot allocate a RESP reader")
        }
        return RedisSocket(fd: fd, ssl: ssl, reader: reader, arena: ReplyArena(), peer: peer)
    }

    // MARK: TCP

    private static func openTCP(host: String, port: Int, timeout: Duration, peer: String) throws -> Int32 {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var list: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(host, String(port), &hints, &list)
        guard rc == 0, let first = list else {
            throw RedisError(.connection, "connecting to \(peer): cannot resolve \(host): \(String(cString: gai_strerror(rc)))")
        }
        defer { freeaddrinfo(list) }
        var lastError = "no address"
        var entry: UnsafeMutablePointer<addrinfo>? = first
        while let a = entry {
            entry = a.pointee.ai_next
            let fd = socket(a.pointee.ai_family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            if fd < 0 { lastError = String(cString: strerror(errno)); continue }
            let flags = fcntl(fd, F_GETFL, 0)
            _ = fcntl(fd, F_SETFL, flags | O_NONBLOCK)
            var connected = Glibc.connect(fd, a.pointee.ai_addr, a.pointee.ai_addrlen) == 0
            if !connected && errno == EINPROGRESS {
                var pfd = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
                let n = poll(&pfd, 1, Int32(clamping: max(1, timeout.milliseconds)))
                if n == 0 {
                    lastError = "connection timed out after \(timeout)"
                } else {
                    var soError: Int32 = 0
                    var length = socklen_t(MemoryLayout<Int32>.size)
                    getsockopt(fd, SOL_SOCKET, SO_ERROR, &soError, &length)
                    if soError == 0 { connected = true } else { lastError = String(cString: strerror(soError)) }
                }
            } else if !connected {
                lastError = String(cString: strerror(errno))
            }
            if connected {
                _ = fcntl(fd, F_SETFL, flags)
                var one: Int32 = 1
                setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
                return fd
            }
            Glibc.close(fd)
        }
        throw RedisError(.connection, "connecting to \(peer): \(lastError)")
    }

    private static func setTimeouts(_ fd: Int32, _ timeout: Duration) {
        let (seconds, atto) = timeout.components
        var tv = timeval(tv_sec: Int(seconds), tv_usec: Int(atto / 1_000_000_000_000))
        if tv.tv_sec == 0 && tv.tv_usec == 0 { tv.tv_usec = 1000 }
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    // MARK: TLS

    private static func handshake(fd: Int32, host: String, tls: RedisTLSContext, peer: String) throws -> OpaquePointer {
        guard let ssl = SSL_new(tls.context) else {
            throw RedisError(.tls, "TLS to \(peer): cannot create a session: \(RedisTLSContext.lastError())")
        }
        SSL_set_fd(ssl, fd)
        let name = tls.options.serverName ?? host
        var address = in6_addr()
        let isIP = inet_pton(AF_INET, name, &address) == 1 || inet_pton(AF_INET6, name, &address) == 1
        if isIP {
            X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), name)
        } else {
            _ = dedupd_ssl_set_server_name(ssl, name)
            SSL_set1_host(ssl, name)
        }
        ERR_clear_error()
        if SSL_connect(ssl) == 1 { return ssl }
        let verify = SSL_get_verify_result(ssl)
        let reason: String
        if verify != X509_V_OK {
            reason = "the server's certificate was not accepted: \(String(cString: X509_verify_cert_error_string(verify)))"
                + (tls.options.caFile.map { " (verified against redis.tls.ca_file = \($0))" } ?? " (verified against the system's trust store; set redis.tls.ca_file)")
        } else {
            let text = RedisTLSContext.lastError()
            let hint = text.contains("wrong version number") || text.contains("packet length too long") || text.contains("unknown error")
                ? "; is the server speaking TLS on this port? use redis:// for a plaintext port" : ""
            reason = "\(text)\(hint)"
        }
        SSL_free(ssl)
        throw RedisError(.tls, "TLS handshake with \(peer) failed: \(reason)")
    }

    // MARK: I/O

    /// Writes all of `buffer` or throws.
    func write(_ buffer: UnsafeRawBufferPointer) throws {
        var offset = 0
        while offset < buffer.count {
            let base = buffer.baseAddress! + offset
            let remaining = buffer.count - offset
            if let ssl {
                let n = SSL_write(ssl, base, Int32(clamping: remaining))
                if n <= 0 { throw ioError(ssl: ssl, result: n, action: "writing a command") }
                offset += Int(n)
            } else {
                let n = send(fd, base, remaining, Int32(MSG_NOSIGNAL))
                if n < 0 {
                    if errno == EINTR { continue }
                    throw ioError(ssl: nil, result: -1, action: "writing a command")
                }
                offset += n
            }
        }
    }

    /// Whether writes go through a TLS session, which `writeWithoutWaiting` cannot do.
    var isTLS: Bool { ssl != nil }

    /// Writes what a plaintext socket takes at once (`MSG_DONTWAIT`) and returns how many bytes
    /// that was; the rest, if any, is for `write` later. Throws on an I/O error.
    func writeWithoutWaiting(_ buffer: UnsafeRawBufferPointer) throws -> Int {
        precondition(ssl == nil, "a TLS session writes whole records")
        var offset = 0
        while offset < buffer.count {
            let n = send(fd, buffer.baseAddress! + offset, buffer.count - offset, Int32(MSG_NOSIGNAL) | Int32(MSG_DONTWAIT))
            if n < 0 {
                if errno == EINTR { continue }
                if errno == EAGAIN || errno == EWOULDBLOCK { break }
                throw ioError(ssl: nil, result: -1, action: "writing a command")
            }
            offset += n
        }
        return offset
    }

    /// The next reply, read from the socket as needed. It lives in the socket's `ReplyArena`
    /// and stays valid until the next call, which reuses its memory; nothing is freed by the
    /// caller. After a throw the socket must not be read again (a partly read reply would be
    /// overwritten under the reader): `RedisConnection` drops it.
    func nextReply() throws -> UnsafePointer<redisReply> {
        try nextReply(until: nil)!
    }

    /// `nextReply()`, or nil when no byte of it arrives before `deadline` (nil: wait as long as
    /// the socket's timeout allows). After nil, the next call goes on with the same reply.
    func nextReply(until deadline: ContinuousClock.Instant?) throws -> UnsafePointer<redisReply>? {
        if !resuming { arena.reset() }
        resuming = false
        while true {
            var reply: UnsafeMutableRawPointer?
            guard redisReaderGetReply(reader, &reply) == REDIS_OK else {
                throw RedisError(.protocolError, "reading a reply from \(peer): \(readerError())", retriable: true)
            }
            if let reply { return UnsafePointer(reply.assumingMemoryBound(to: redisReply.self)) }
            if fed == filled {
                if let deadline, !isReadable(before: deadline) {
                    resuming = true
                    return nil
                }
                filled = try readSome()
                fed = 0
            }
            let n = min(Self.feedChunk, filled - fed)
            let status = redisReaderFeed(reader, readBuffer.baseAddress!.assumingMemoryBound(to: CChar.self) + fed, n)
            fed += n
            guard status == REDIS_OK else {
                throw RedisError(.protocolError, "reading a reply from \(peer): \(readerError())", retriable: true)
            }
        }
    }

    /// One read from the socket into `readBuffer`; returns how many bytes came.
    private func readSome() throws -> Int {
        while true {
            if let ssl {
                let n = SSL_read(ssl, readBuffer.baseAddress!, Int32(clamping: readBuffer.count))
                if n <= 0 { throw ioError(ssl: ssl, result: n, action: "reading a reply") }
                return Int(n)
            }
            let n = recv(fd, readBuffer.baseAddress!, readBuffer.count, 0)
            if n > 0 { return n }
            if n == 0 { throw closedByServer() }
            if errno == EINTR { continue }
            throw ioError(ssl: nil, result: -1, action: "reading a reply")
        }
    }

    /// Whether a read would find bytes before `deadline`: bytes TLS has already decrypted, or the
    /// socket readable (or closed: the read then reports it) by then, the wait rounded up to a
    /// whole millisecond (`poll(2)`).
    private func isReadable(before deadline: ContinuousClock.Instant) -> Bool {
        if let ssl, SSL_pending(ssl) > 0 { return true }
        var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        while true {
            let left = max(.zero, deadline - .now)
            let n = poll(&pfd, 1, Int32(clamping: (left + .nanoseconds(999_999)).milliseconds))
            if n >= 0 { return n > 0 }
            if errno != EINTR { return true }
        }
    }

    /// True if the server closed the socket (or sent something unsolicited) while we were idle:
    /// RESP2 never sends without a request, so a readable socket between calls means EOF,
    /// a TLS close, or garbage. One `poll(2)` with a zero timeout.
    func peerHasClosed() -> Bool {
        var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        return poll(&pfd, 1, 0) != 0
    }

    private func closedByServer() -> RedisError {
        RedisError(.connection, "\(peer) closed the connection (if the server only accepts TLS on this port, use rediss://)")
    }

    private func ioError(ssl: OpaquePointer?, result: Int32, action: String) -> RedisError {
        let saved = errno
        if let ssl {
            switch SSL_get_error(ssl, result) {
            case SSL_ERROR_ZERO_RETURN: return closedByServer()
            case SSL_ERROR_SYSCALL where saved == 0: return closedByServer()
            case SSL_ERROR_SYSCALL where saved == EAGAIN || saved == EWOULDBLOCK:
                return RedisError(.timeout, "\(action) from \(peer): timed out")
            case SSL_ERROR_WANT_READ, SSL_ERROR_WANT_WRITE:
                return RedisError(.timeout, "\(action) from \(peer): timed out")
            case SSL_ERROR_SSL:
                return RedisError(.tls, "\(action) from \(peer): TLS error: \(RedisTLSContext.lastError())")
            default:
                return RedisError(.connection, "\(action) from \(peer): \(String(cString: strerror(saved)))")
            }
        }
        if saved == EAGAIN || saved == EWOULDBLOCK {
            return RedisError(.timeout, "\(action) from \(peer): timed out")
        }
        return RedisError(.connection, "\(action) from \(peer): \(String(cString: strerror(saved)))")
    }

    private func readerError() -> String {
        withUnsafePointer(to: reader.pointee.errstr) {
            $0.withMemoryRebound(to: CChar.self, capacity: MemoryLayout.size(ofValue: reader.pointee.errstr)) { String(cString: $0) }
        }
    }
}
