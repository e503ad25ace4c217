import DedupCore
import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// The `http` handler: POSTs each unique message's value to `handler.url` with an
/// `Idempotency-Key: <dedup key>` header, so the receiving service can drop the one repeat the
/// crash window (DESIGN.md) can produce. TLS by URL scheme (`https://`).
///
/// - 2xx: success (the key is confirmed `done`, the offset committed).
/// - 408, 429, 5xx, timeouts and network errors: retried with backoff (`HTTPHandler.Failure`).
/// - any other status (400, 401, 404, 422, ...): final — thrown as `PermanentFailure`, so the
///   message is dead-lettered at once without further attempts.
///
/// Client choice: Foundation's `URLSession` (FoundationNetworking, libcurl underneath) rather
/// than async-http-client. It ships with the toolchain, so it adds nothing to the build
/// (async-http-client and its SwiftNIO tree add minutes to every clean CI build), it speaks
/// HTTP/1.1 and HTTP/2 with TLS through libcurl, and one POST per message with a timeout is all
/// this handler needs. What it costs: libcurl must be on the host (it is a dependency of
/// Foundation on Linux anyway) and there is no NIO event-loop integration — irrelevant at
/// `handler.concurrency` requests in flight.
public final class HTTPHandler: Handler {
    public let url: URL
    public let timeout: Duration
    let session: URLSession

    /// A retriable HTTP outcome: a status worth trying again.
    public struct Failure: Error, CustomStringConvertible {
        public var status: Int
        public var body: String
        public var description: String { "HTTP \(status)\(body.isEmpty ? "" : ": \(body)")" }
    }

    public init(url: String, timeout: Duration) throws {
        guard let parsed = URL(string: url), let scheme = parsed.scheme?.lowercased(), scheme == "http" || scheme == "https",
            parsed.host != nil
        else {
            throw HandlerError(message: "http handler: \(url) is not an http:// or https:// URL")
        }
        self.url = parsed
        self.timeout = timeout
        let configuration = URLSessionConfiguration.ephemeral
        // swift-corelibs-foundation hands libcurl whole seconds: 1.5 s times out after 1 s and
        // 0.5 s at once (measured). So libcurl gets the timeout rounded up, as a backstop, and
        // `handle` enforces the exact one itself.
        let seconds = (Double(timeout.milliseconds) / 1000).rounded(.up)
        configuration.timeoutIntervalForRequest = seconds
        configuration.timeoutIntervalForResource = seconds
        configuration.httpCookieStorage = nil
        configuration.urlCache = nil
        configuration.requestCachePolicy = .reloadIgnoringLocalCacheData
        session = URLSession(configuration: configuration)
    }

    public func handle(_ dispatch: Dispatch) async throws {
        let m = dispatch.message
        var request = URLRequest(url: url, cachePolicy: .reloadIgnoringLocalCacheData,
                                 timeoutInterval: (Double(timeout.milliseconds) / 1000).rounded(.up))
        request.httpMethod = "POST"
        request.httpBody = Data(m.value)
        request.setValue(dispatch.key.raw, forHTTPHeaderField: "Idempotency-Key")
        let contentType = m.header("content-type").flatMap { $0.value }.flatMap { String(validating: $0, as: UTF8.self) }
        request.setValue(contentType ?? "application/octet-stream", forHTTPHeaderField: "Content-Type")
        request.setValue(m.topic, forHTTPHeaderField: "Dedupd-Topic")
        request.setValue(String(m.partition), forHTTPHeaderField: "Dedupd-Partition")
        request.setValue(String(m.offset), forHTTPHeaderField: "Dedupd-Offset")
        request.setValue(String(dispatch.attempt), forHTTPHeaderField: "Dedupd-Attempt")

        let (data, response) = try await withTimeout { [session, request] in try await session.data(for: request) }
        guard let http = response as? HTTPURLResponse else {
            throw HandlerError(message: "http handler: not an HTTP response from \(url)")
        }
        try Self.check(status: http.statusCode, body: data)
    }

    public struct Timeout: Error, CustomStringConvertible {
        public var after: Duration
        public var description: String { "HTTP request timed out after \(WorkerConfiguration.format(after))" }
    }

    /// Runs `body`, throwing `Timeout` (retriable) once `timeout` passed; the request task is
    /// cancelled then.
    func withTimeout<T: Sendable>(_ body: @escaping @Sendable () async throws -> T) async throws -> T {
        try await withThrowingTaskGroup(of: T?.self) { group in
            group.addTask { try await body() }
            group.addTask { [timeout] in
                try await Task.sleep(for: timeout)
                return nil
            }
            defer { group.cancelAll() }
            // The first child to finish decides: the response, its error, or nil (time is up).
            if let first = try await group.next(), let value = first { return value }
            throw Timeout(after: timeout)
        }
    }

    /// 2xx passes; 408, 429 and 5xx are retriable; everything else is final.
    static func check(status: Int, body: Data) throws {
        if (200..<300).contains(status) { return }
        let text = String(decoding: body.prefix(200), as: UTF8.self)
        if status == 408 || status == 429 || (500..<600).contains(status) {
            throw Failure(status: status, body: text)
        }
        throw PermanentFailure("HTTP \(status)\(text.isEmpty ? "" : ": \(text)") (final, not retried)")
    }

    public func close() async {
        session.finishTasksAndInvalidate()
    }
}
