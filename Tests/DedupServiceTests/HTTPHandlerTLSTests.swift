import DedupCore
import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import Testing
import TestSupport

@testable import DedupService

/// The `http` handler over HTTPS against a server that presents a certificate of a test CA and
/// asks for a client certificate of the same CA (`TLSTestCertificates`, made with `openssl`).
@Suite(.serialized) struct HTTPHandlerTLSTests {
    /// Answers 200 to every request over TLS, requiring a client certificate signed by the CA.
    static func server(_ certs: TLSTestCertificates) async throws -> any Channel {
        var tls = TLSConfiguration.makeServerConfiguration(
            certificateChain: try NIOSSLCertificate.fromPEMFile(certs.path("server.pem")).map { .certificate($0) },
            privateKey: .privateKey(try NIOSSLPrivateKey(file: certs.path("server.key"), format: .pem)))
        tls.trustRoots = .certificates(try NIOSSLCertificate.fromPEMFile(certs.path("ca.pem")))
        tls.certificateVerification = .noHostnameVerification
        let context = try NIOSSLContext(configuration: tls)
        return try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: context))
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                    try channel.pipeline.syncOperations.addHandler(OK())
                }
            }
            .bind(host: "127.0.0.1", port: 0).get()
    }

    final class OK: ChannelInboundHandler {
        typealias InboundIn = HTTPServerRequestPart
        typealias OutboundOut = HTTPServerResponsePart
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            guard case .end = unwrapInboundIn(data) else { return }
            var headers = HTTPHeaders()
            headers.add(name: "Content-Length", value: "2")
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: .ok, headers: headers))), promise: nil)
            context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: "ok")))), promise: nil)
            context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
        }
    }

    @Test func httpsWithTheConfiguredCAAndClientCertificate() async throws {
        let certs = try TLSTestCertificates()
        let server = try await Self.server(certs)
        defer { server.close(promise: nil) }
        let url = "https://127.0.0.1:\(server.localAddress!.port!)/hook"

        let trusted = try HTTPHandler(
            url: url, timeout: .seconds(5), tls: .init(caFile: certs.path("ca.pem"), certificateFile: certs.path("client.pem"), keyFile: certs.path("client.key")))
        try await trusted.handle(dispatch("tls-ok-1"))
        await trusted.close()

        // The system's trust store does not know the test CA: verification fails.
        let untrusting = try HTTPHandler(url: url, timeout: .seconds(5), tls: .init(certificateFile: certs.path("client.pem"), keyFile: certs.path("client.key")))
        let unverified = await #expect(throws: (any Error).self) { try await untrusting.handle(dispatch("tls-ca-1")) }
        #expect("\(unverified!)".lowercased().contains("certificate"), "names the certificate problem: \(unverified!)")
        await untrusting.close()

        // Without a client certificate the server refuses the handshake.
        let anonymous = try HTTPHandler(url: url, timeout: .seconds(5), tls: .init(caFile: certs.path("ca.pem")))
        await #expect(throws: (any Error).self) { try await anonymous.handle(dispatch("tls-anon-1")) }
        await anonymous.close()
    }

    @Test func unreadableTLSFilesAreAClearErrorAtStart() throws {
        let error = #expect(throws: HandlerError.self) {
            _ = try HTTPHandler(url: "https://127.0.0.1:1/hook", timeout: .seconds(1), tls: .init(caFile: "/nonexistent/ca.pem"))
        }
        #expect("\(error!)".contains("handler.tls_ca_file"))
    }

    @Test func retryAfterIsReadAsSecondsOrAnHTTPDate() throws {
        let now = Date(timeIntervalSince1970: 1_800_000_000)
        #expect(HTTPHandler.parseRetryAfter("7", now: now) == .seconds(7))
        #expect(HTTPHandler.parseRetryAfter(" 0 ", now: now) == .zero)
        #expect(HTTPHandler.parseRetryAfter("Fri, 15 Jan 2027 08:00:10 GMT", now: Date(timeIntervalSince1970: 1_800_000_000)) != nil)
        #expect(HTTPHandler.parseRetryAfter("soon", now: now) == nil)
        let later = now.addingTimeInterval(30)
        let formatter = DateFormatter()
        formatter.locale = Locale(identifier: "en_US_POSIX")
        formatter.timeZone = TimeZone(identifier: "GMT")
        formatter.dateFormat = "EEE, dd MMM yyyy HH:mm:ss 'GMT'"
        #expect(HTTPHandler.parseRetryAfter(formatter.string(from: later), now: now) == .seconds(30))
        // Only 429 and 503 carry it; a 500's header is ignored.
        #expect(throws: HTTPHandler.Failure.self) { try HTTPHandler.check(status: 503, body: [], retryAfter: "2") }
        do { try HTTPHandler.check(status: 503, body: [], retryAfter: "2") } catch let f as HTTPHandler.Failure { #expect(f.retryAfter == .seconds(2)) }
        do { try HTTPHandler.check(status: 500, body: [], retryAfter: "2") } catch let f as HTTPHandler.Failure { #expect(f.retryAfter == nil) }
    }

    @Test func headersComeFromTheEnvironmentOrAFileAndNameWhatIsMissing() throws {
        let dir = try TemporaryDirectory(prefix: "dedupd-headers")
        try "s3cret\n".write(to: dir.file("key"), atomically: true, encoding: .utf8)
        let resolved = try BuiltinHandlers.resolveHeaders(
            ["Authorization=env:HOOK_TOKEN", "X-Api-Key=file:\(dir.file("key").path)", "X-Team=payments"],
            environment: ["HOOK_TOKEN": "Bearer abc"])
        #expect(resolved.map { "\($0.0)=\($0.1)" } == ["Authorization=Bearer abc", "X-Api-Key=s3cret", "X-Team=payments"])
        let missing = #expect(throws: HandlerError.self) { _ = try BuiltinHandlers.resolveHeaders(["Authorization=env:NOPE"], environment: [:]) }
        #expect("\(missing!)".contains("NOPE") && "\(missing!)".contains("Authorization"))
    }
}
