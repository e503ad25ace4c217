import FlyingFox
import FlyingSocks
import Foundation
import Logging
import Prometheus
import ServiceLifecycle
import Synchronization

/// The optional HTTP port (`http.port`): `/metrics` in Prometheus text format, `/healthz` (the loop
/// is alive) and `/readyz` (partitions assigned and Redis reachable). A ServiceLifecycle `Service`
/// that stops on graceful shutdown.
///
/// FlyingFox rather than Hummingbird or Vapor: three GET routes do not need SwiftNIO, and FlyingFox
/// has no dependencies (its own socket layer on the system's poll), so it adds seconds to a build
/// where Hummingbird adds minutes to every CI run.
public final class HTTPEndpoint: Service, Sendable {
    public let port: UInt16
    let bind: String
    let server: HTTPServer
    let logger: Logger
    let registry: PrometheusCollectorRegistry
    let telemetry: WorkerTelemetry
    let stopping: Stopping

    /// `bind`: `http.bind`, an IPv4 or IPv6 address; `::` listens on IPv6 and IPv4 (dual stack), or
    /// on every IPv4 address when the host has no IPv6.
    public init(port: Int, bind: String = "::", registry: PrometheusCollectorRegistry, telemetry: WorkerTelemetry, logger: Logger) {
        self.port = UInt16(port)
        self.bind = bind
        self.logger = logger
        stopping = Stopping()
        let flyingFoxLogger = FlyingFoxToSwiftLog(logger: logger, stopping: stopping)
        if bind.contains(":") && (bind != "::" || Self.hostHasIPv6()) {
            let address = (try? sockaddr_in6.inet6(ip6: bind, port: UInt16(port))) ?? .inet6(port: UInt16(port))
            server = HTTPServer(address: address, timeout: 15, logger: flyingFoxLogger)
        } else {
            let address = (try? sockaddr_in.inet(ip4: bind, port: UInt16(port))) ?? .inet(port: UInt16(port))
            server = HTTPServer(address: address, timeout: 15, logger: flyingFoxLogger)
        }
        self.registry = registry
        self.telemetry = telemetry
    }

    static func text(_ result: (ok: Bool, detail: String)) -> HTTPResponse {
        HTTPResponse(
            statusCode: result.ok ? .ok : .serviceUnavailable, headers: [.contentType: "text/plain; charset=utf-8"],
            body: Data((result.detail + "\n").utf8))
    }

    public func run() async throws {
        let (registry, telemetry) = (self.registry, self.telemetry)
        await server.appendRoute("GET /metrics") { _ in
            HTTPResponse(
                statusCode: .ok, headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"],
                body: Data(registry.emitToBuffer()))
        }
        await server.appendRoute("GET /healthz") { _ in Self.text(telemetry.liveness()) }
        await server.appendRoute("GET /readyz") { _ in Self.text(telemetry.readiness()) }
        logger.info("http endpoint listening", metadata: ["http.port": "\(port)", "http.bind": "\(bind)", "http.paths": "/metrics,/healthz,/readyz"])
        try await withGracefulShutdownHandler {
            do {
                try await server.run()
            } catch {
                // Closing the listening socket at shutdown ends `run` with CancellationError or
                // SocketError.disconnected; that is the expected way out, not a failure.
                if !(error is CancellationError) && !stopping.value.load(ordering: .relaxed) { throw error }
            }
        } onGracefulShutdown: { [server, stopping] in
            stopping.value.store(true, ordering: .relaxed)
            Task { await server.stop(timeout: 1) }
        }
    }

    /// Whether this host can open IPv6 sockets (a kernel booted with ipv6.disable=1 cannot).
    static func hostHasIPv6() -> Bool {
        let fd = socket(AF_INET6, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return false }
        close(fd)
        return true
    }

    /// Whether `bind` is an address `http.bind` accepts: IPv4 or IPv6, as `inet_pton` reads them.
    public static func isValidBindAddress(_ bind: String) -> Bool {
        var v4 = in_addr(), v6 = in6_addr()
        return inet_pton(AF_INET, bind, &v4) == 1 || inet_pton(AF_INET6, bind, &v6) == 1
    }

    /// Waits until the socket accepts connections (tests).
    public func waitUntilListening() async throws { try await server.waitUntilListening(timeout: 10) }
}

/// Set once shutdown began: the listening socket's closing is then expected, not an error.
final class Stopping: Sendable {
    let value = Atomic(false)
}

/// FlyingFox's log lines go to the operational log at debug (connection chatter) or warning;
/// its "server error" when the socket closes at shutdown is debug too.
struct FlyingFoxToSwiftLog: FlyingSocks.Logging {
    let logger: Logger
    let stopping: Stopping
    var quiet: Bool { stopping.value.load(ordering: .relaxed) }
    func logDebug(_ debug: @autoclosure () -> String) { logger.debug("\(debug())", metadata: ["http": "flyingfox"]) }
    func logInfo(_ info: @autoclosure () -> String) { logger.debug("\(info())", metadata: ["http": "flyingfox"]) }
    func logWarning(_ warning: @autoclosure () -> String) { logger.warning("\(warning())", metadata: ["http": "flyingfox"]) }
    func logError(_ error: @autoclosure () -> String) {
        logger.log(level: quiet ? .debug : .error, "\(error())", metadata: ["http": "flyingfox"])
    }
    func logCritical(_ critical: @autoclosure () -> String) {
        logger.log(level: quiet ? .debug : .error, "\(critical())", metadata: ["http": "flyingfox"])
    }
}

/// The Prometheus registry and the factory that writes into it, set up once per process; durations
/// get buckets from 100µs (a Redis round trip on a LAN) to 10s (a slow handler).
public enum PrometheusSetup {
    public static func make() -> (PrometheusCollectorRegistry, PrometheusMetricsFactory) {
        let registry = PrometheusCollectorRegistry()
        var factory = PrometheusMetricsFactory(registry: registry)
        factory.defaultDurationHistogramBuckets = [
            .microseconds(100), .microseconds(250), .microseconds(500), .milliseconds(1), .milliseconds(2),
            .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(50), .milliseconds(100),
            .milliseconds(250), .milliseconds(500), .seconds(1), .milliseconds(2500), .seconds(5), .seconds(10),
        ]
        return (registry, factory)
    }
}
