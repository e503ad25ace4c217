import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization

/// A webhook on 127.0.0.1 that misbehaves the way real ones do, for the `http` handler's soak.
///
/// Each request's fate is drawn from a hash of (seed, Idempotency-Key, how many requests that key
/// has had), so a run is reproducible and every key eventually gets a plain 200:
/// 500, 503, 429 with `Retry-After: 1`, a 200 sent only after `slowDelay` (past the worker's
/// timeout), a connection reset without an answer, a 200 that closes the keep-alive connection,
/// or a plain 200. It runs on SwiftNIO's event loop, so it answers whatever the worker's threads do.
final class FlakyWebhook: Sendable {
    enum Fate: String, Sendable, CaseIterable {
        case ok, serverError, unavailable, throttled, slow, reset, okThenClose
    }

    struct Record: Sendable {
        var key: String
        var partition: String
        var offset: String
        var attempt: Int
        var fate: Fate
        var at: ContinuousClock.Instant
    }

    let seed: UInt64
    let slowDelay: Duration
    private let records = Mutex<(all: [Record], perKey: [String: Int])>(([], [:]))
    private let channel: any Channel
    var port: Int { channel.localAddress?.port ?? 0 }
    var url: String { "http://127.0.0.1:\(port)/hook" }

    init(seed: UInt64, slowDelay: Duration) async throws {
        self.seed = seed
        self.slowDelay = slowDelay
        let box = Box()
        channel = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.backlog, value: 256)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                    try channel.pipeline.syncOperations.addHandler(Responder(webhook: box))
                }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        box.webhook.withLock { $0 = self }
    }

    /// The webhook, set once bound (the handlers are made before `self` exists).
    final class Box: Sendable {
        let webhook = Mutex<FlakyWebhook?>(nil)
    }

    func stop() async { try? await channel.close() }

    var all: [Record] { records.withLock { $0.all } }

    /// The fate of the `n`th request (from 1) for `key`.
    func fate(key: String, n: Int) -> Fate {
        var h: UInt64 = seed &+ 0x9E37_79B9_7F4A_7C15
        for b in key.utf8 { h = (h ^ UInt64(b)) &* 0x100_0000_01B3 }
        h = (h ^ UInt64(n)) &* 0xBF58_476D_1CE4_E5B9
        h ^= h >> 31
        switch h % 100 {
        case 0..<10: return .serverError
        case 10..<13: return .unavailable
        case 13..<14: return .throttled
        case 14..<17: return .slow
        case 17..<19: return .reset
        case 19..<24: return .okThenClose
        default: return .ok
        }
    }

    func record(key: String, head: HTTPRequestHead) -> Fate {
        records.withLock { r in
            r.perKey[key, default: 0] += 1
            let fate = fate(key: key, n: r.perKey[key]!)
            r.all.append(Record(
                key: key, partition: head.headers.first(name: "Dedupd-Partition") ?? "",
                offset: head.headers.first(name: "Dedupd-Offset") ?? "",
                attempt: Int(head.headers.first(name: "Dedupd-Attempt") ?? "") ?? 0, fate: fate, at: .now))
            return fate
        }
    }

    final class Responder: ChannelInboundHandler {
        typealias InboundIn = HTTPServerRequestPart
        typealias OutboundOut = HTTPServerResponsePart
        let webhook: Box
        var head: HTTPRequestHead?

        init(webhook: Box) { self.webhook = webhook }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            switch unwrapInboundIn(data) {
            case .head(let h): head = h
            case .body: break
            case .end:
                guard let head, let webhook = webhook.webhook.withLock({ $0 }) else { return }
                let key = head.headers.first(name: "Idempotency-Key") ?? ""
                let fate = webhook.record(key: key, head: head)
                let channel = context.channel
                switch fate {
                case .reset:
                    // SO_LINGER 0: the close sends RST, not FIN.
                    if let sockets = channel as? any SocketOptionProvider {
                        sockets.setSoLinger(linger(l_onoff: 1, l_linger: 0)).whenComplete { _ in channel.close(promise: nil) }
                    } else {
                        channel.close(promise: nil)
                    }
                case .slow:
                    let ctx = NIOLoopBound(context, eventLoop: context.eventLoop)
                    let responder = NIOLoopBound(self, eventLoop: context.eventLoop)
                    context.eventLoop.scheduleTask(in: .nanoseconds(Int64(webhook.slowDelay.nanosecondsForTest))) {
                        guard channel.isActive else { return }
                        responder.value.answer(ctx.value, status: .ok, close: false)
                    }
                case .serverError: answer(context, status: .internalServerError, close: false)
                case .unavailable: answer(context, status: .serviceUnavailable, close: false)
                case .throttled: answer(context, status: .tooManyRequests, close: false, retryAfter: "1")
                case .okThenClose: answer(context, status: .ok, close: true)
                case .ok: answer(context, status: .ok, close: false)
                }
            }
        }

        func answer(_ context: ChannelHandlerContext, status: HTTPResponseStatus, close: Bool, retryAfter: String? = nil) {
            var headers = HTTPHeaders()
            let body = status == .ok ? "ok" : "try again"
            headers.add(name: "Content-Length", value: String(body.utf8.count))
            if let retryAfter { headers.add(name: "Retry-After", value: retryAfter) }
            if close { headers.add(name: "Connection", value: "close") }
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: status, headers: headers))), promise: nil)
            context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: body)))), promise: nil)
            let done = context.writeAndFlush(wrapOutboundOut(.end(nil)))
            if close {
                let channel = context.channel
                done.whenComplete { _ in channel.close(promise: nil) }
            }
        }
    }
}

extension Duration {
    var nanosecondsForTest: Int64 {
        let (s, atto) = components
        return s * 1_000_000_000 + atto / 1_000_000_000
    }
}
