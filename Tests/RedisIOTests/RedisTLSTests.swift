import Foundation
import Logging
import RedisIO
import Testing
import TestSupport

/// `rediss://` against a real TLS-only redis-server, with certificates made here by `openssl`:
/// the right CA connects (with and without a client certificate required), and a wrong CA, an
/// expired certificate, a plaintext URL on the TLS port, a TLS URL on a plaintext port and a
/// missing CA file each fail with an error that names the problem.
@Suite(.serialized) struct RedisTLSTests {
    let logger = Logger(label: "test") { _ in SwiftLogNoOpLogHandler() }

    func connect(_ url: String, _ tls: RedisTLSOptions) async throws -> RedisConnection {
        try await RedisConnection.connect(try RedisURL(url), connectTimeout: .seconds(2), commandTimeout: .seconds(2), tls: tls, logger: logger)
    }

    @Test func theRightCAConnectsWithAndWithoutAClientCertificate() async throws {
        let certs = try TLSTestCertificates()
        let server = try TLSRedisServer(certs)
        let connection = try await connect("rediss://127.0.0.1:\(server.port)", .init(caFile: certs.path("ca.pem")))
        _ = try await connection.command("SET", "tls-key", "v").throwingOnError("SET")
        #expect(try await connection.command("GET", "tls-key").text == "v")
        // A pipeline larger than one TLS record and one read buffer.
        let replies = try await connection.pipeline((0..<5000).map { [RedisArgument("SET"), RedisArgument("k\($0)"), RedisArgument(String(repeating: "x", count: 100))] })
        #expect(replies.count == 5000 && replies.allSatisfy { $0.text == "OK" })
        await connection.close()

        let strict = try TLSRedisServer(certs, clientCertificates: "yes")
        let withClient = try await connect(
            "rediss://127.0.0.1:\(strict.port)",
            .init(caFile: certs.path("ca.pem"), certificateFile: certs.path("client.pem"), keyFile: certs.path("client.key")))
        try await withClient.ping()
        let anonymous = await #expect(throws: RedisError.self) {
            try await connect("rediss://127.0.0.1:\(strict.port)", .init(caFile: certs.path("ca.pem")))
        }
        #expect(anonymous?.isRetriable == true, "fails closed: retried like an unreachable server")
    }

    @Test func aWrongCAOrAnExpiredCertificateIsRefusedNamingTheProblem() async throws {
        let certs = try TLSTestCertificates()
        let server = try TLSRedisServer(certs)
        let wrongCA = await #expect(throws: RedisError.self) {
            try await connect("rediss://127.0.0.1:\(server.port)", .init(caFile: certs.path("other-ca.pem")))
        }
        #expect(wrongCA?.code == .tls)
        #expect(wrongCA?.message.contains("certificate was not accepted") == true, "\(String(describing: wrongCA))")
        #expect(wrongCA?.message.contains("redis.tls.ca_file") == true)

        let expired = try TLSRedisServer(certs, certificate: "expired.pem")
        let error = await #expect(throws: RedisError.self) {
            try await connect("rediss://127.0.0.1:\(expired.port)", .init(caFile: certs.path("ca.pem")))
        }
        #expect(error?.message.contains("expired") == true, "\(String(describing: error))")
    }

    @Test func theWrongSchemeForThePortSaysSo() async throws {
        let certs = try TLSTestCertificates()
        let tlsOnly = try TLSRedisServer(certs)
        let plain = await #expect(throws: RedisError.self) { try await connect("redis://127.0.0.1:\(tlsOnly.port)", .init()) }
        #expect(plain?.message.contains("rediss://") == true, "\(String(describing: plain))")

        let plainServer = try RedisServerProcess()
        let tlsToPlain = await #expect(throws: RedisError.self) {
            try await connect("rediss://127.0.0.1:\(plainServer.port)", .init(caFile: certs.path("ca.pem")))
        }
        #expect(tlsToPlain?.code == .tls)
        #expect(tlsToPlain?.message.contains("redis://") == true, "\(String(describing: tlsToPlain))")
    }

    @Test func anUnreadableTLSFileIsAStartUpErrorNamingTheSetting() async throws {
        let error = await #expect(throws: RedisError.self) {
            try await connect("rediss://127.0.0.1:1", .init(caFile: "/nonexistent/ca.pem"))
        }
        #expect(error?.message.contains("redis.tls.ca_file = /nonexistent/ca.pem") == true)
        #expect(error?.isRetriable == false)
    }
}
