import Foundation
import LocalServers

// Certificates and a TLS-only redis-server for the tests of `rediss://`.

/// A CA, a server certificate for 127.0.0.1 (and an expired one), a client certificate, and
/// a second CA that signed none of them.
public final class TLSTestCertificates: Sendable {
    public let dir: TemporaryDirectory
    public func path(_ name: String) -> String { dir.file(name).path }

    public init() throws {
        dir = try TemporaryDirectory(prefix: "dedupd-redis-tls")
        try Self.sh("""
            cd '\(dir.path)' && \
            openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=dedupd-test-ca && \
            openssl req -x509 -newkey rsa:2048 -nodes -keyout other-ca.key -out other-ca.pem -days 2 -subj /CN=someone-else && \
            printf 'subjectAltName=IP:127.0.0.1\\n' > san.ext && \
            openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=127.0.0.1 && \
            openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile san.ext && \
            openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out expired.pem -days -1 -extfile san.ext && \
            openssl req -newkey rsa:2048 -nodes -keyout client.key -out client.csr -subj /CN=dedupd && \
            openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem -days 2
            """)
    }

    static func sh(_ script: String) throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/sh")
        p.arguments = ["-c", script]
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        p.waitUntilExit()
        guard p.terminationStatus == 0 else { throw TestSupportError("openssl failed making test certificates") }
    }
}

/// `redis-server` listening on TLS only, with `certificate` (a file of `TLSTestCertificates`); `clientCertificates`: `no`, `optional` or `yes`.
public final class TLSRedisServer: @unchecked Sendable {
    let process = Process()
    public let port: Int
    let dir: TemporaryDirectory

    public init(
        _ certs: TLSTestCertificates, certificate: String = "server.pem", clientCertificates: String = "no",
        port: Int? = nil, extraArguments: [String] = []
    ) throws {
        dir = try TemporaryDirectory(prefix: "dedupd-redis-tls-server")
        self.port = try port ?? freePort()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/redis-server")
        process.arguments = [
            "--port", "0", "--tls-port", "\(self.port)", "--bind", "127.0.0.1", "--dir", dir.path, "--save", "",
            "--tls-cert-file", certs.path(certificate), "--tls-key-file", certs.path("server.key"),
            "--tls-ca-cert-file", certs.path("ca.pem"), "--tls-auth-clients", clientCertificates,
            "--logfile", dir.file("redis.log").path,
        ] + extraArguments
        try Data().write(to: dir.file("stderr.log"))
        process.standardOutput = FileHandle.nullDevice
        process.standardError = try FileHandle(forWritingTo: dir.file("stderr.log"))
        try withDefaultSignalMask { try process.run() }
        let deadline = ContinuousClock.now + .seconds(10)
        while ContinuousClock.now < deadline {
            if let log = try? String(contentsOf: dir.file("redis.log"), encoding: .utf8), log.contains("Ready to accept connections") { return }
            usleep(20_000)
        }
        let log = (try? String(contentsOf: dir.file("redis.log"), encoding: .utf8)) ?? (try? String(contentsOf: dir.file("stderr.log"), encoding: .utf8)) ?? "(no log)"
        throw TestSupportError("TLS redis-server did not start: \(log.split(separator: "\n").suffix(5).joined(separator: "\n"))")
    }

    deinit {
        process.terminate()
        process.waitUntilExit()
    }
}


/// A Redis Cluster of three TLS-only primaries (no replicas), its cluster bus on TLS too, joined
/// with `redis-cli --tls --cluster create`.
public final class TLSRedisCluster: Sendable {
    public let nodes: [TLSRedisServer]

    /// The seed list for `redis.mode: cluster`.
    public var url: String { "rediss://" + nodes.map { "127.0.0.1:\($0.port)" }.joined(separator: ",") }

    public init(_ certs: TLSTestCertificates) throws {
        let ports = try RedisClusterProcess.clusterPorts(3)
        nodes = try ports.map { port in
            try TLSRedisServer(certs, port: port, extraArguments: [
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "1500",
                "--tls-cluster", "yes", "--tls-replication", "yes",
            ])
        }
        let tls = ["--tls", "--cacert", certs.path("ca.pem"), "--cert", certs.path("client.pem"), "--key", certs.path("client.key")]
        let create = try RedisClusterProcess.cli(tls + ["--cluster", "create"] + ports.map { "127.0.0.1:\($0)" } + ["--cluster-replicas", "0", "--cluster-yes"])
        guard create.status == 0 else { throw TestSupportError("redis-cli --tls --cluster create failed: \(create.output.suffix(800))") }
        let deadline = ContinuousClock.now + .seconds(30)
        while ContinuousClock.now < deadline {
            if try ports.allSatisfy({ try RedisClusterProcess.cli(tls + ["-p", "\($0)", "cluster", "info"]).output.contains("cluster_state:ok") }) { return }
            usleep(100_000)
        }
        throw TestSupportError("TLS redis cluster not ready within 30 s")
    }
}
