/// A piece of configuration text that does not parse: a key template, a JSON pointer, a route's
/// match. DedupCore's one error for text it is given; `ConfigError` wraps it with the key and
/// where the value came from.
public struct SyntaxError: Error, Sendable, Equatable, CustomStringConvertible {
    public enum Kind: Sendable, Equatable {
        case keyTemplate, jsonPointer, routeMatch
    }

    public var kind: Kind
    /// The text as given.
    public var text: String
    public var problem: String

    public init(_ kind: Kind, _ text: String, problem: String) {
        self.kind = kind
        self.text = text
        self.problem = problem
    }

    public var description: String {
        switch kind {
        case .keyTemplate:
            "invalid key template \"\(text)\": \(problem); expected header:NAME, key, json:/pointer, sha256:value, sha256:json:/a,/b or a composite like {header:tenant}:{json:/orderNo}"
        case .jsonPointer:
            "JSON pointer \"\(text)\" must start with \"/\" (RFC 6901)"
        case .routeMatch:
            problem
        }
    }
}
