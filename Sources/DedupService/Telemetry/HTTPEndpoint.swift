import Foundation
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import Prometheus
import ServiceLifecycle
import Synchronization

/// The optional HTTP port (`http.port`): `/metrics` in Prometheus text format, `/healthz` (the loop
/// is alive) and `/readyz` (partitions assigned and Redis reachable). A ServiceLifecycle `Service`
/// that stops on graceful shutdown.
///
/// Served by SwiftNIO on its own event-loop thread, never on Swift's cooperative pool: a worker
/// whose cooperative threads are all blocked must still answer `/healthz` (with 503), or a
/// liveness probe could not tell a stalled worker from a busy one. Every answer is computed from
/// locked state in `WorkerTelemetry`, so nothing here awaits anything.
public final class HTTPEndpoint: Service, Sendable {
    public let port: Int
    /// `http.bind`: an IPv4 or IPv6 address; `::` is dual stack.
    let bind: String
    let logger: Logger
    let registry: PrometheusCollectorRegistry
    let telemetry: WorkerTelemetry
    private let listening = Mutex<(channel: (any Channel)?, waiters: [CheckedContinuation<Void, Never>])>((nil, []))

    public init(port: Int, bind: String = "::", registry: PrometheusCollectorRegistry, telemetry: WorkerTelemetry, logger: Logger) {
        self.port = port
        self.bind = bind
        self.logger = logger
        self.registry = registry
        self.telemetry = telemetry
    }

    /// The answer to one GET, computed on the event loop.
    static func answer(path: String, registry: PrometheusCollectorRegistry, telemetry: WorkerTelemetry)
        -> (status: HTTPResponseStatus, contentType: String, body: [UInt8])
    {
        func text(_ result: (ok: Bool, detail: String)) -> (HTTPResponseStatus, String, [UInt8]) {
            (result.ok ? .ok : .serviceUnavailable, "text/plain; charset=utf-8", Array((result.detail + "\n").utf8))
        }
        switch path.split(separator: "?", maxSplits: 1).first.map(String.init) ?? path {
        case "/metrics": return (.ok, "text/plain; version=0.0.4; charset=utf-8", registry.emitToBuffer())
        case "/healthz": return text(telemetry.liveness())
        case "/readyz": return text(telemetry.readiness())
        default: return (.notFound, "text/plain; charset=utf-8", Array("not found: /metrics, /healthz, /readyz\n".utf8))
        }
    }

    public func run() async throws {
        let (registry, telemetry) = (self.registry, self.telemetry)
        let bootstrap = ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.backlog, value: 64)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                    try channel.pipeline.syncOperations.addHandler(Responder(registry: registry, telemetry: telemetry))
                }
            }
        // "::" takes IPv6 and, on a dual-stack host, IPv4 too; a host without IPv6 gets 0.0.0.0.
        // Any other http.bind address is bound as given.
        let channel: any Channel
        if bind != "::" {
            channel = try await bootstrap.bind(host: bind, port: port).get()
        } else {
            do {
                channel = try await bootstrap.bind(host: "::", port: port).get()
            } catch {
                channel = try await bootstrap.bind(host: "0.0.0.0", port: port).get()
            }
        }
        let waiters = listening.withLock { state in
            state.channel = channel
            defer { state.waiters = [] }
            return state.waiters
        }
        for w in waiters { w.resume() }
        logger.info("http endpoint listening", metadata: ["http.port": "\(port)", "http.bind": "\(bind)", "http.paths": "/metrics,/healthz,/readyz"])
        await withGracefulShutdownHandler {
            try? await channel.closeFuture.get()
        } onGracefulShutdown: {
            channel.close(promise: nil)
        }
    }

    /// Whether `bind` is an address `http.bind` accepts: IPv4 or IPv6, as `inet_pton` reads them.
    public static func isValidBindAddress(_ bind: String) -> Bool {
        var v4 = in_addr(), v6 = in6_addr()
        return inet_pton(AF_INET, bind, &v4) == 1 || inet_pton(AF_INET6, bind, &v6) == 1
    }

    /// Waits until the socket accepts connections (tests).
    public func waitUntilListening() async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let ready = listening.withLock { state -> Bool in
                if state.channel != nil { return true }
                state.waiters.append(c)
                return false
            }
            if ready { c.resume() }
        }
    }

    /// Answers each request as its end arrives; the connection stays open for the next one.
    final class Responder: ChannelInboundHandler {
        typealias InboundIn = HTTPServerRequestPart
        typealias OutboundOut = HTTPServerResponsePart
        let registry: PrometheusCollectorRegistry
        let telemetry: WorkerTelemetry
        private var head: HTTPRequestHead?

        init(registry: PrometheusCollectorRegistry, telemetry: WorkerTelemetry) {
            self.registry = registry
            self.telemetry = telemetry
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            switch unwrapInboundIn(data) {
            case .head(let h): head = h
            case .body: break
            case .end:
                guard let h = head else { return }
                let (status, contentType, body) = h.method == .GET || h.method == .HEAD
                    ? HTTPEndpoint.answer(path: h.uri, registry: registry, telemetry: telemetry)
                    : (.methodNotAllowed, "text/plain; charset=utf-8", Array("GET only\n".utf8))
                var headers = HTTPHeaders()
                headers.add(name: "Content-Type", value: contentType)
                headers.add(name: "Content-Length", value: String(body.count))
                if !h.isKeepAlive { headers.add(name: "Connection", value: "close") }
                let keepAlive = h.isKeepAlive
                context.write(wrapOutboundOut(.head(HTTPResponseHead(version: h.version, status: status, headers: headers))), promise: nil)
                if h.method != .HEAD {
                    context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(bytes: body)))), promise: nil)
                }
                let done = context.writeAndFlush(wrapOutboundOut(.end(nil)))
                if !keepAlive {
                    let channel = context.channel
                    done.whenComplete { _ in channel.close(promise: nil) }
                }
            }
        }
    }
}

/// The Prometheus registry and the factory that writes into it, set up once per process; durations
/// get buckets from 100µs (a Redis round trip on a LAN) to 10s (a slow handler).
public enum PrometheusSetup {
    public static func make() -> (PrometheusCollectorRegistry, PrometheusMetricsFactory) {
        let registry = PrometheusCollectorRegistry()
        var factory = PrometheusMetricsFactory(registry: registry)
        let buckets: [Duration] = [
            .microseconds(100), .microseconds(250), .microseconds(500), .milliseconds(1), .milliseconds(2),
            .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(50), .milliseconds(100),
            .milliseconds(250), .milliseconds(500), .seconds(1), .milliseconds(2500), .seconds(5), .seconds(10),
        ]
        factory.defaultDurationHistogramBuckets = buckets
        // The handler's duration is recorded in seconds (a value histogram, see
        // `WorkerTelemetry.Instruments.handlerDuration`), with the same bounds.
        factory.valueHistogramBuckets[WorkerTelemetry.Name.handlerDuration] = buckets.map(\.seconds)
        return (registry, factory)
    }
}
