/// What a route matches (docs/architecture.md step 5): a topic, a header value, a JSON field's value, or
/// several of these at once (all must hold). A message that cannot be read the way a condition
/// needs (no such header, not JSON) simply does not match that route.
public struct RouteMatch: Sendable, CustomStringConvertible {
    public var topic: String?
    public var header: (name: String, value: String)?
    public var json: (pointer: String, value: String)?

    /// `header` is `NAME=VALUE`, `json` is `/pointer=VALUE` (the value compared as text: a JSON
    /// string's contents, or a number, boolean or null as written in canonical JSON).
    public init(topic: String? = nil, header: String? = nil, json: String? = nil) throws(SyntaxError) {
        self.topic = topic
        if let header {
            guard let eq = header.firstIndex(of: "="), eq != header.startIndex else {
                throw SyntaxError(.routeMatch, header, problem: "must look like NAME=VALUE, e.g. type=payment")
            }
            self.header = (String(header[..<eq]), String(header[header.index(after: eq)...]))
            headerTemplate = try? KeyTemplate("header:" + self.header!.name)
        }
        if let json {
            guard let eq = json.firstIndex(of: "="), json.first == "/" else {
                throw SyntaxError(.routeMatch, json, problem: "must look like /pointer=VALUE, e.g. /kind=refund")
            }
            self.json = (String(json[..<eq]), String(json[json.index(after: eq)...]))
            do { jsonTemplate = try KeyTemplate("json:" + self.json!.pointer) } catch {
                throw SyntaxError(.routeMatch, json, problem: "\(error)")
            }
        }
        guard topic != nil || header != nil || json != nil else {
            throw SyntaxError(.routeMatch, "", problem: "a route needs at least one of match.topic, match.header, match.json")
        }
    }

    private var headerTemplate: KeyTemplate?
    private var jsonTemplate: KeyTemplate?

    public func matches(_ m: InboundMessage) -> Bool {
        if let topic, m.topic != topic { return false }
        if let header {
            guard let value = try? headerTemplate?.key(for: m), value == header.value else { return false }
        }
        if let json {
            guard let value = try? jsonTemplate?.key(for: m), value == json.value else { return false }
        }
        return true
    }

    public var description: String {
        var parts: [String] = []
        if let topic { parts.append("topic=\(topic)") }
        if let header { parts.append("header:\(header.name)=\(header.value)") }
        if let json { parts.append("json:\(json.pointer)=\(json.value)") }
        return parts.joined(separator: " and ")
    }
}

/// One route: which messages it takes, and its own dedup settings (key, namespace, window,
/// retention, lease, keep, token). Its handler lives in the service layer, by the same index.
public struct Route: Sendable {
    public var name: String
    public var match: RouteMatch
    public var settings: DedupSettings

    public init(name: String, match: RouteMatch, settings: DedupSettings) {
        self.name = name
        self.match = match
        self.settings = settings
    }
}

/// The routes of a worker, tried in order; the first that matches takes the message. Route 0 is
/// always the default route (the top-level `dedup.*` and `handler.*` settings); routes given by
/// name are 1... in the order configured.
public struct Routing: Sendable {
    /// What happens to a message no named route matches.
    public enum Unmatched: String, Sendable, CaseIterable {
        /// The default route takes it (the only behaviour without named routes).
        case `default`
        /// It is bad input (`no_route`): dead-lettered when a topic is configured, else logged and counted.
        case deadLetter = "dead_letter"
    }

    public var routes: [Route]
    public var unmatched: Unmatched

    public init(routes: [Route] = [], unmatched: Unmatched = .default) {
        self.routes = routes
        self.unmatched = unmatched
    }

    /// The route index for a message: 0 for the default route, i + 1 for `routes[i]`, nil for none.
    public func route(for m: InboundMessage) -> Int? {
        for (i, r) in routes.enumerated() where r.match.matches(m) { return i + 1 }
        return unmatched == .default ? 0 : nil
    }
}
