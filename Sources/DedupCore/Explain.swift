/// `dedupd explain`: what the worker would do with one message, offline: the route it takes and
/// its dedup key, or the bad-input reason it would get. The same steps, in the same order, as
/// `DedupEngine.ingest`: the size bound, the route, the route's key template, its token.
public struct Explanation: Sendable {
    public enum Outcome: Sendable, Equatable {
        /// The message is keyed: it would be claimed under `storeKey` and wait `window`.
        case keyed(key: String, storeKey: String, token: String?)
        case bad(reason: String, detail: String)
    }

    /// `default` for the top-level keys, else the route's name; nil when no route took it.
    public var route: String?
    public var outcome: Outcome
    public var settings: DedupSettings?
    public var handler: HandlerSettings?

    public static func explain(_ message: InboundMessage, config: WorkerConfiguration) -> Explanation {
        if message.value.count > config.dedup.maxMessageBytes {
            return Explanation(route: nil, outcome: .bad(reason: BadInput.Reason.tooLarge.code,
                detail: "value is \(message.value.count) bytes, limit is \(config.dedup.maxMessageBytes)"))
        }
        guard let index = config.routing.route(for: message) else {
            return Explanation(route: nil, outcome: .bad(reason: BadInput.Reason.noRoute.code,
                detail: "no route matches (routes: \(config.routes.map(\.name).joined(separator: ", ")))"))
        }
        let name = index == 0 ? "default" : config.routes[index - 1].name
        let settings = index == 0 ? config.dedup : config.routes[index - 1].dedup
        let handler = config.handlersByRoute[index]
        do throws(BadInput) {
            let raw = try settings.template.key(for: message)
            let token = try settings.token?.key(for: message)
            let key = DedupKey(raw: raw, namespace: settings.namespace)
            return Explanation(route: name, outcome: .keyed(key: raw, storeKey: key.storeKey, token: token),
                               settings: settings, handler: handler)
        } catch {
            return Explanation(route: name, outcome: .bad(reason: error.reason.code, detail: error.detail),
                               settings: settings, handler: handler)
        }
    }

    /// The lines `dedupd explain` prints.
    public var lines: [String] {
        var out: [String] = []
        switch outcome {
        case .keyed(let key, let storeKey, let token):
            out.append("route \(route ?? "-")")
            out.append("dedup key \(key)")
            out.append("redis key \(storeKey)")
            if let token { out.append("token \(token)") }
            if let s = settings {
                out.append("window \(WorkerConfiguration.format(s.window)) keep \(s.keep.rawValue) retention \(WorkerConfiguration.format(s.retention))")
            }
            if let h = handler {
                let target: String
                switch h.kind {
                case .log(let output): target = output
                case .kafka(let topic): target = topic
                case .http(let url): target = url
                case .exec(let command): target = command
                }
                out.append("handler \(h.type) \(target)")
            }
        case .bad(let reason, let detail):
            if let route { out.append("route \(route)") }
            out.append("bad input \(reason): \(detail)")
        }
        return out
    }
}

extension Explanation {
    init(route: String?, outcome: Outcome) {
        self.init(route: route, outcome: outcome, settings: nil, handler: nil)
    }
}
