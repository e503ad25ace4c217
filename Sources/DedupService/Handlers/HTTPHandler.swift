import AsyncHTTPClient
import DedupCore
import Foundation
import Logging
import NIOCore
import NIOHTTP1
import NIOSSL
import Synchronization

/// The `http` handler: POSTs each unique message's value to `handler.url` with an
/// `Idempotency-Key: <dedup key>` header, so the receiving service can drop the one repeat the
/// crash window can produce.
///
/// - 2xx: success (the key is confirmed `done`, the offset committed).
/// - 408, 429, 5xx, timeouts and network errors: retried with backoff (`HTTPHandler.Failure`);
///   a `Retry-After` on 429 or 503 sets the least delay before the next attempt.
/// - any other status (400, 401, 404, 422, ...): final — thrown as `PermanentFailure`, so the
///   message is dead-lettered at once without further attempts.
///
/// Built on async-http-client: its requests run on SwiftNIO's event loops, a deadline cancels a
/// request on the event loop without waiting for anything, and the connection pool keeps
/// connections alive between messages, at most `handler.concurrency` per host. (Foundation's
/// URLSession on Linux deadlocked here: cancelling its task from the cooperative pool waited
/// for URLSession's queue while that queue waited to resume the cancelled task.)
public final class HTTPHandler: Handler {
    public let url: String
    public let timeout: Duration
    let client: HTTPClient
    let headers: HTTPHeaders
    private let closed = Atomic(false)

    /// A retriable HTTP outcome: a status worth trying again.
    public struct Failure: Error, CustomStringConvertible, RetryDelaying {
        public var status: Int
        public var body: String
        /// From `Retry-After` (seconds or an HTTP date) on a 429 or 503.
        public var retryAfter: Duration?
        public var description: String { "HTTP \(status)\(body.isEmpty ? "" : ": \(body)")" }
    }

    public struct Timeout: Error, CustomStringConvertible {
        public var after: Duration
        public var description: String { "HTTP request timed out after \(WorkerConfiguration.format(after))" }
    }

    /// TLS settings for `https://` URLs; the system's trust store verifies the server unless
    /// `caFile` names another bundle.
    public struct TLS: Sendable, Equatable {
        /// PEM file of the certificate authorities to trust instead of the system's.
        public var caFile: String?
        /// PEM client certificate (chain) and its key, for servers that ask for one.
        public var certificateFile: String?
        public var keyFile: String?

        public init(caFile: String? = nil, certificateFile: String? = nil, keyFile: String? = nil) {
            self.caFile = caFile
            self.certificateFile = certificateFile
            self.keyFile = keyFile
        }

        /// The client's TLS configuration with these files loaded; the configuration loader calls
        /// it too, so that a bad file stops `check-config` and not the first request.
        public func load() throws(TLSFileProblem) -> TLSConfiguration {
            func read<T>(_ setting: String, _ file: String, _ what: String, _ body: () throws -> T) throws(TLSFileProblem) -> T {
                guard FileManager.default.isReadableFile(atPath: file) else {
                    throw TLSFileProblem(setting: setting, file: file, reason: "cannot read the file")
                }
                do { return try body() } catch {
                    throw TLSFileProblem(setting: setting, file: file, reason: "cannot load a PEM \(what) from it (\(error))")
                }
            }
            var configuration = TLSConfiguration.makeClientConfiguration()
            if let ca = caFile {
                configuration.trustRoots = .certificates(try read("handler.tls_ca_file", ca, "certificate") { try NIOSSLCertificate.fromPEMFile(ca) })
            }
            if let cert = certificateFile {
                configuration.certificateChain = try read("handler.tls_cert_file", cert, "certificate") { try NIOSSLCertificate.fromPEMFile(cert) }
                    .map { .certificate($0) }
            }
            if let key = keyFile {
                configuration.privateKey = .privateKey(try read("handler.tls_key_file", key, "private key") { try NIOSSLPrivateKey(file: key, format: .pem) })
                // Whether the key belongs to the certificate is checked only when a context is
                // made of them: make one here, or a mismatch would first show in a handshake.
                do { _ = try NIOSSLContext(configuration: configuration) } catch {
                    throw TLSFileProblem(setting: "handler.tls_key_file", file: key, reason: "is not the private key of handler.tls_cert_file (\(error))")
                }
            }
            return configuration
        }
    }

    /// - Parameters:
    ///   - timeout: the most one attempt may take, from connecting to the last byte of the answer.
    ///   - concurrency: connections kept per host (the route's `handler.concurrency`).
    ///   - headers: sent with every request, e.g. `Authorization` (values already resolved).
    public init(url: String, timeout: Duration, concurrency: Int = 4, tls: TLS = TLS(), headers: [(String, String)] = []) throws {
        guard let parsed = URL(string: url), let scheme = parsed.scheme?.lowercased(), scheme == "http" || scheme == "https",
            parsed.host != nil
        else {
            throw HandlerError(message: "http handler: \(url) is not an http:// or https:// URL")
        }
        self.url = url
        self.timeout = timeout
        var h = HTTPHeaders()
        for (name, value) in headers { h.add(name: name, value: value) }
        self.headers = h

        let tlsConfiguration: TLSConfiguration
        do { tlsConfiguration = try tls.load() } catch {
            throw HandlerError(message: "http handler: \(error.setting) = \(error.file): \(error.reason)")
        }
        var configuration = HTTPClient.Configuration(
            tlsConfiguration: tlsConfiguration, redirectConfiguration: .disallow,
            timeout: .init(connect: .milliseconds(timeout.milliseconds), read: .milliseconds(timeout.milliseconds)))
        configuration.connectionPool = .init(idleTimeout: .seconds(60), concurrentHTTP1ConnectionsPerHostSoftLimit: max(1, concurrency))
        configuration.httpVersion = .automatic
        client = HTTPClient(eventLoopGroup: HTTPClient.defaultEventLoopGroup, configuration: configuration)
    }

    public func handle(_ dispatch: Dispatch) async throws {
        let m = dispatch.message
        var request = HTTPClientRequest(url: url)
        request.method = .POST
        request.headers = headers
        request.headers.replaceOrAdd(name: "Idempotency-Key", value: dispatch.key.raw)
        let contentType = m.headerView("content-type")?.value.flatMap { String(validating: $0, as: UTF8.self) }
        request.headers.replaceOrAdd(name: "Content-Type", value: contentType ?? "application/octet-stream")
        request.headers.replaceOrAdd(name: "Dedupd-Topic", value: m.topic)
        request.headers.replaceOrAdd(name: "Dedupd-Partition", value: String(m.partition))
        request.headers.replaceOrAdd(name: "Dedupd-Offset", value: String(m.offset))
        request.headers.replaceOrAdd(name: "Dedupd-Attempt", value: String(dispatch.attempt))
        request.body = .bytes(m.value)

        let deadline = NIODeadline.now() + .nanoseconds(timeout.nanoseconds)
        do {
            // The deadline covers the answer's head; the body is read under the client's read
            // timeout (no byte for `timeout`); its first 200 bytes are kept for error messages.
            let response = try await client.execute(request, deadline: deadline)
            var body: [UInt8] = []
            for try await chunk in response.body where body.count < 200 {
                body.append(contentsOf: chunk.readableBytesView.prefix(200 - body.count))
            }
            try Self.check(status: Int(response.status.code), body: body, retryAfter: response.headers.first(name: "Retry-After"))
        } catch let error as HTTPClientError where error == .deadlineExceeded || error == .readTimeout || error == .connectTimeout {
            throw Timeout(after: timeout)
        }
    }

    /// 2xx passes; 408, 429 and 5xx are retriable; everything else is final.
    static func check(status: Int, body: [UInt8], retryAfter: String? = nil, now: Date = Date()) throws {
        if (200..<300).contains(status) { return }
        let text = String(decoding: body.prefix(200), as: UTF8.self)
        if status == 408 || status == 429 || (500..<600).contains(status) {
            let delay = status == 429 || status == 503 ? retryAfter.flatMap { parseRetryAfter($0, now: now) } : nil
            throw Failure(status: status, body: text, retryAfter: delay)
        }
        throw PermanentFailure("HTTP \(status)\(text.isEmpty ? "" : ": \(text)") (final, not retried)")
    }

    /// `Retry-After: 120` or `Retry-After: Wed, 21 Oct 2026 07:28:00 GMT` (RFC 9110 10.2.3).
    static func parseRetryAfter(_ value: String, now: Date) -> Duration? {
        let trimmed = value.trimmingCharacters(in: .whitespaces)
        if let seconds = Int(trimmed) { return seconds >= 0 ? .seconds(seconds) : nil }
        let formatter = DateFormatter()
        formatter.locale = Locale(identifier: "en_US_POSIX")
        formatter.timeZone = TimeZone(identifier: "GMT")
        formatter.dateFormat = "EEE, dd MMM yyyy HH:mm:ss zzz"
        guard let date = formatter.date(from: trimmed) else { return nil }
        return .milliseconds(max(0, Int64(date.timeIntervalSince(now) * 1000)))
    }

    public func close() async {
        guard !closed.exchange(true, ordering: .relaxed) else { return }
        try? await client.shutdown()
    }

    /// A handler dropped without `close()` (a worker that failed to start, a test) still shuts
    /// its client down, without waiting: the callback keeps the client alive until it is done.
    deinit {
        guard !closed.exchange(true, ordering: .relaxed) else { return }
        let client = self.client
        client.shutdown(queue: .global()) { _ in withExtendedLifetime(client) {} }
    }
}
