import Crypto
import Foundation

/// Turns a message into its dedup key (docs/architecture.md step 2).
///
/// A template is either one source or a composite of sources in braces with literal text between:
/// - `header:NAME`         a header's value (message id, client token)
/// - `key`                 the Kafka record key
/// - `json:/pointer`       a field of the JSON value, by RFC 6901 pointer (business key)
/// - `sha256:value`        SHA-256 of the whole value (content signature)
/// - `sha256:json:/a,/b`   SHA-256 over a canonical form of chosen JSON fields, so field order
///                         and whitespace do not change the signature
/// - composite, e.g. `{header:type}:{json:/userId}:{sha256:json:/form}`
///
/// A message whose key cannot be computed is bad input (`BadInput`), never silently dropped.
public struct KeyTemplate: Sendable, Equatable, CustomStringConvertible {
    public enum Source: Sendable, Equatable {
        case header(String)
        case recordKey
        case json(JSONPointer)
        case sha256Value
        case sha256JSON([JSONPointer])
    }

    enum Part: Sendable, Equatable {
        case literal(String)
        case source(Source)
    }

    let parts: [Part]
    public let description: String
    /// What a template of one header or the record key (the usual `header:message-id`) reads,
    /// kept apart from `parts` so the hot path does not copy a part (and retain the header's
    /// name) per message to learn it.
    private let direct: Direct
    /// The header's name when `direct` is `.header`, else empty.
    private let directHeader: String

    private enum Direct { case none, header, recordKey }

    public init(_ text: String) throws {
        description = text
        guard !text.isEmpty else { throw SyntaxError(.keyTemplate, text, problem: "it is empty") }
        if text.first == "{" || text.contains("{") {
            var parts: [Part] = []
            var rest = Substring(text)
            while !rest.isEmpty {
                if rest.first == "{" {
                    guard let close = rest.firstIndex(of: "}") else {
                        throw SyntaxError(.keyTemplate, text, problem: "a \"{\" has no matching \"}\"")
                    }
                    let inner = rest[rest.index(after: rest.startIndex)..<close]
                    parts.append(.source(try Self.parseSource(String(inner), template: text)))
                    rest = rest[rest.index(after: close)...]
                } else {
                    let next = rest.firstIndex(of: "{") ?? rest.endIndex
                    let literal = rest[..<next]
                    if literal.contains("}") {
                        throw SyntaxError(.keyTemplate, text, problem: "a \"}\" has no matching \"{\"")
                    }
                    parts.append(.literal(String(literal)))
                    rest = rest[next...]
                }
            }
            guard parts.contains(where: { if case .source = $0 { true } else { false } }) else {
                throw SyntaxError(.keyTemplate, text, problem: "it has no source")
            }
            self.parts = parts
        } else {
            self.parts = [.source(try Self.parseSource(text, template: text))]
        }
        switch self.parts.count == 1 ? self.parts[0] : .literal("") {
        case .source(.header(let name)): (direct, directHeader) = (.header, name)
        case .source(.recordKey): (direct, directHeader) = (.recordKey, "")
        default: (direct, directHeader) = (.none, "")
        }
    }

    static func parseSource(_ s: String, template: String) throws -> Source {
        if s == "key" { return .recordKey }
        if s == "sha256:value" { return .sha256Value }
        if s.hasPrefix("header:") {
            let name = String(s.dropFirst("header:".count))
            guard !name.isEmpty else { throw SyntaxError(.keyTemplate, template, problem: "header name is empty") }
            return .header(name)
        }
        if s.hasPrefix("json:") {
            return .json(try pointer(String(s.dropFirst("json:".count)), template: template))
        }
        if s.hasPrefix("sha256:json:") {
            let list = s.dropFirst("sha256:json:".count).split(separator: ",", omittingEmptySubsequences: false)
            let ptrs = try list.map { try pointer(String($0), template: template) }
            guard !ptrs.isEmpty else { throw SyntaxError(.keyTemplate, template, problem: "no JSON fields listed") }
            return .sha256JSON(ptrs)
        }
        throw SyntaxError(.keyTemplate, template, problem: "unknown source \"\(s)\"")
    }

    static func pointer(_ s: String, template: String) throws -> JSONPointer {
        do { return try JSONPointer(s) } catch {
            throw SyntaxError(.keyTemplate, template, problem: "\(error)")
        }
    }

    /// Whether computing the key needs the value parsed as JSON (parsed once per message, not per source).
    var needsJSON: Bool {
        parts.contains {
            switch $0 {
            case .source(.json), .source(.sha256JSON): true
            default: false
            }
        }
    }

    /// The raw key of a message (before namespacing), or the reason it has none.
    public func key(for message: InboundMessage) throws(BadInput) -> String {
        var json: Any? = nil
        if needsJSON {
            guard message.valueCount > 0,
                let parsed = try? JSONSerialization.jsonObject(with: Data(message.valueBytes), options: [.fragmentsAllowed])
            else {
                throw BadInput(.invalidJSON, "value is not valid JSON")
            }
            json = parsed
        }
        // A template of one source (the usual `header:message-id`) is that source's text.
        if parts.count == 1, case .source(let source) = parts[0] {
            return try value(of: source, message: message, json: json)
        }
        var out = ""
        for part in parts {
            switch part {
            case .literal(let s): out += s
            case .source(let source): out += try value(of: source, message: message, json: json)
            }
        }
        guard !out.isEmpty else { throw BadInput(.emptyKey, "template \(description) gave an empty key") }
        return out
    }

    /// The message's `DedupKey` under a route's store-key head (`DedupKey.head`). A template of
    /// one header or the record key (the usual `header:message-id`) writes those bytes straight
    /// into the store key, without a string of the raw key first.
    public func dedupKey(for message: InboundMessage, head: String) throws(BadInput) -> DedupKey {
        try head.withUTF8InPlace { h in
            Result { () throws(BadInput) in try dedupKey(for: message, head: UnsafeRawBufferPointer(h)) }
        }.get()
    }

    /// `dedupKey(for:head:)` with the head's UTF-8 bytes, which the ledger keeps per route: a
    /// pointer handed to the closures that make the key is not retained, and the head's string
    /// was, twice per message.
    func dedupKey(for message: InboundMessage, head: UnsafeRawBufferPointer) throws(BadInput) -> DedupKey {
        switch direct {
        case .header: return try Self.withHeaderText(directHeader, in: message) { DedupKey(validUTF8: $0, head: head) }
        case .recordKey: return try Self.withRecordKeyText(in: message) { DedupKey(validUTF8: $0, head: head) }
        case .none: return DedupKey(raw: try key(for: message), head: head)
        }
    }

    /// A header's bytes, once they are known to be there, not empty and UTF-8 (each case its
    /// own `BadInput`), read in place. Missing and null are one case; told apart from empty
    /// without copying the value.
    private static func withHeaderText<R>(
        _ name: String, in message: InboundMessage, _ body: (UnsafeRawBufferPointer) -> R
    ) throws(BadInput) -> R {
        // The closure captures only `body`: the name, captured for an error's text, was a
        // retain and a release of its string per message.
        switch message.withHeaderValue(name, { $0.map { checked($0, body) } }) {
        case .some(.some(.success(let text))): return text
        case .some(.some(.failure(let problem))): throw problem.badInput("header \"\(name)\"")
        case .some(.none), .none: throw BadInput(.missingHeader, "header \"\(name)\" is missing")
        }
    }

    /// The record key's bytes, checked as `withHeaderText` checks a header's.
    private static func withRecordKeyText<R>(in message: InboundMessage, _ body: (UnsafeRawBufferPointer) -> R) throws(BadInput) -> R {
        guard let bytes = message.keyBytes else { throw BadInput(.missingKey, "message has no record key") }
        switch bytes.withUnsafeBytes({ checked($0, body) }) {
        case .success(let text): return text
        case .failure(let problem): throw problem.badInput("record key")
        }
    }

    /// Why a header's or record key's bytes cannot be a key.
    private enum TextProblem: Error {
        case empty, notUTF8

        func badInput(_ what: String) -> BadInput {
            switch self {
            case .empty: BadInput(.emptyKey, "\(what) is empty")
            case .notUTF8: BadInput(.invalidUTF8, "\(what) is not valid UTF-8")
            }
        }
    }

    /// `body` of a key's bytes that are not empty and are UTF-8.
    private static func checked<R>(_ bytes: UnsafeRawBufferPointer, _ body: (UnsafeRawBufferPointer) -> R) -> Result<R, TextProblem> {
        if bytes.isEmpty { return .failure(.empty) }
        // An ASCII key (the usual id) is checked eight bytes at a time: the generic validator
        // of `String(validating:as:)` cost more than the rest of reading the key.
        if !bytes.isASCII && String(validating: bytes, as: UTF8.self) == nil { return .failure(.notUTF8) }
        return .success(body(bytes))
    }

    private func value(of source: Source, message: InboundMessage, json: Any?) throws(BadInput) -> String {
        switch source {
        case .header(let name):
            return try Self.withHeaderText(name, in: message) { String(decoding: $0, as: UTF8.self) }
        case .recordKey:
            return try Self.withRecordKeyText(in: message) { String(decoding: $0, as: UTF8.self) }
        case .json(let ptr):
            guard let v = ptr.resolve(in: json!) else {
                throw BadInput(.missingField, "JSON field \(ptr) is missing")
            }
            let s = CanonicalJSON.scalarText(v)
            guard !s.isEmpty else { throw BadInput(.emptyKey, "JSON field \(ptr) is empty") }
            return s
        case .sha256Value:
            return Self.hex(SHA256.hash(data: message.valueBytes))
        case .sha256JSON(let ptrs):
            var canonical = "["
            for (i, ptr) in ptrs.enumerated() {
                guard let v = ptr.resolve(in: json!) else {
                    throw BadInput(.missingField, "JSON field \(ptr) is missing")
                }
                if i > 0 { canonical += "," }
                canonical += CanonicalJSON.encode(v)
            }
            canonical += "]"
            return Self.hex(SHA256.hash(data: Array(canonical.utf8)))
        }
    }

    static func hex<D: Sequence>(_ digest: D) -> String where D.Element == UInt8 {
        let chars = Array("0123456789abcdef".utf8)
        var out = [UInt8]()
        out.reserveCapacity(64)
        for b in digest {
            out.append(chars[Int(b >> 4)])
            out.append(chars[Int(b & 0x0f)])
        }
        return String(decoding: out, as: UTF8.self)
    }
}

/// An RFC 6901 JSON pointer such as `/order/items/0/sku` (`~1` is `/`, `~0` is `~`).
public struct JSONPointer: Sendable, Equatable, CustomStringConvertible {
    public let tokens: [String]
    public let description: String

    public init(_ text: String) throws(SyntaxError) {
        description = text
        guard text.hasPrefix("/") else { throw SyntaxError(.jsonPointer, text, problem: "must start with \"/\"") }
        tokens = text.dropFirst().split(separator: "/", omittingEmptySubsequences: false).map {
            $0.replacingOccurrences(of: "~1", with: "/").replacingOccurrences(of: "~0", with: "~")
        }
    }

    func resolve(in root: Any) -> Any? {
        var current: Any = root
        for token in tokens {
            if let object = current as? [String: Any] {
                guard let next = object[token] else { return nil }
                current = next
            } else if let array = current as? [Any], let index = Int(token), index >= 0, index < array.count {
                current = array[index]
            } else {
                return nil
            }
        }
        if current is NSNull { return nil }
        return current
    }
}

/// A canonical text form of JSON values: object keys sorted, no whitespace, so two encodings of
/// the same content give the same signature.
public enum CanonicalJSON {
    static func scalarText(_ v: Any) -> String {
        if let s = v as? String { return s }
        return encode(v)
    }

    static func encode(_ v: Any) -> String {
        switch v {
        case let s as String:
            return quote(s)
        case let n as NSNumber:
            if CFGetTypeIDIfBool(n) { return n.boolValue ? "true" : "false" }
            return n.stringValue
        case let a as [Any]:
            return "[" + a.map(encode).joined(separator: ",") + "]"
        case let o as [String: Any]:
            return "{" + o.keys.sorted().map { quote($0) + ":" + encode(o[$0]!) }.joined(separator: ",") + "}"
        default:
            return "null"
        }
    }

    private static func CFGetTypeIDIfBool(_ n: NSNumber) -> Bool {
        // JSONSerialization returns booleans as NSNumber; on Linux their objCType is "c" (char).
        String(cString: n.objCType) == "c"
    }

    /// A JSON string literal for `s`.
    public static func quote(_ s: String) -> String {
        var out = "\""
        for scalar in s.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case let c where c.value < 0x20: out += String(format: "\\u%04x", c.value)
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out + "\""
    }
}

/// The key as it is stored in Redis: namespaced, and hashed when long, so a key's size in Redis is
/// bounded whatever the message carries.
public struct DedupKey: Hashable, Sendable, CustomStringConvertible {
    /// The store key, and after it the raw key when that is too long to be part of it. One
    /// string per key: a key is copied into several queues and requests per message, and each
    /// copy retains each string it holds.
    @usableFromInline let text: String
    /// The raw key's hash (`KeyHash`), taken once: the engine looks a key up in several tables
    /// per message, and hashing the string each time showed in the worker's profile.
    /// Process-local (seeded per process), like every `hashValue`.
    let rawHash: Int
    /// Whether `raw` is too long to be part of the store key, which then holds its digest.
    private let isLong: Bool
    /// Where `raw` starts in `text`'s UTF-8 bytes; for a long key, also where the store key ends.
    /// A key is 32 bytes: it is held in several tables and requests per waiting message, and a
    /// larger one was copied through its type's value witnesses (a compact route's SHA-256
    /// digest of the key, which it once carried, is kept in the ledger's entry instead).
    @usableFromInline let rawStart: Int32

    public static let maxRawLength = 200

    public init(raw: String, namespace: String, prefix: String = "dedupd") {
        self.init(raw: raw, head: Self.head(namespace: namespace, prefix: prefix))
    }

    /// `head` is `head(namespace:prefix:)`, which the ledger keeps per route.
    public init(raw: String, head: String) {
        self = head.withUTF8InPlace { Self(raw: raw, head: UnsafeRawBufferPointer($0)) }
    }

    /// `init(raw:head:)` with the head's UTF-8 bytes.
    init(raw: String, head: UnsafeRawBufferPointer) {
        if raw.utf8.count > Self.maxRawLength {
            self.init(hashed: raw, head: String(decoding: head, as: UTF8.self))
        } else {
            self = raw.withUTF8InPlace { Self(validUTF8: UnsafeRawBufferPointer($0), head: head) }
        }
    }

    /// A key from bytes known to be UTF-8 (a header's or record key's, checked by the template):
    /// the store key is one copy of each part's bytes into a string of their summed size, and
    /// the raw key is never a string of its own. (`head + raw` goes through String's general
    /// append, which cost more than the copies and the new string's UTF-8 check together.)
    init(validUTF8 raw: UnsafeRawBufferPointer, head: UnsafeRawBufferPointer) {
        guard raw.count <= Self.maxRawLength else {
            self.init(hashed: String(decoding: raw, as: UTF8.self), head: String(decoding: head, as: UTF8.self))
            return
        }
        let storeKey = String(unsafeUninitializedCapacity: head.count + raw.count) { out in
            _ = out.initialize(fromContentsOf: head.assumingMemoryBound(to: UInt8.self))
            _ = out[head.count...].initialize(fromContentsOf: raw.assumingMemoryBound(to: UInt8.self))
            return head.count + raw.count
        }
        self.init(storeKey: storeKey, rawStart: Int32(head.count))
    }

    private init(hashed raw: String, head: String) {
        let storeKey = head + "h:" + KeyTemplate.hex(SHA256.hash(data: Array(raw.utf8)))
        self.init(text: storeKey + raw, rawStart: Int32(storeKey.utf8.count), isLong: true)
    }

    private init(storeKey: String, rawStart: Int32) {
        self.init(text: storeKey, rawStart: rawStart, isLong: false)
    }

    private init(text: String, rawStart: Int32, isLong: Bool) {
        // The raw key's bytes (a long key's digest): all that differs between keys of one route.
        // Hashed before `text` is stored, so that storing it is its last use (no copy).
        rawHash = text.withUTF8InPlace { t in
            let hashed = isLong ? t[..<Int(rawStart)] : t[Int(rawStart)...]
            return KeyHash.hash(UnsafeRawBufferPointer(UnsafeBufferPointer(rebasing: hashed)))
        }
        self.text = text
        self.rawStart = rawStart
        self.isLong = isLong
    }

    /// The Redis key: `<prefix>:<namespace>:<raw>` or `<prefix>:<namespace>:h:<sha256(raw)>` when `raw` is long.
    public var storeKey: String {
        isLong ? String(Substring(text.utf8.prefix(Int(rawStart)))) : text
    }

    /// `storeKey` lent to `body`: a short key's is its text, lent without the copy (a retain and
    /// a release) that the property returns.
    func withStoreKey<R>(_ body: (String) -> R) -> R {
        isLong ? body(storeKey) : body(text)
    }

    /// The key handlers see (and downstream systems use as an idempotency key). A new string
    /// each time: the hot path reads it in place (`withRawUTF8`).
    public var raw: String {
        String(Substring(text.utf8.dropFirst(Int(rawStart))))
    }

    /// `raw`'s UTF-8 bytes, read in place.
    @inlinable
    public func withRawUTF8<R>(_ body: (UnsafeRawBufferPointer) -> R) -> R {
        let start = Int(rawStart)
        return text.withUTF8InPlace { body(UnsafeRawBufferPointer(UnsafeBufferPointer(rebasing: $0[start...]))) }
    }

    /// The start of every store key of a namespace: `<prefix>:<namespace>:`.
    public static func head(namespace: String, prefix: String = "dedupd") -> String { "\(prefix):\(namespace):" }

    public var description: String { raw }

    public func hash(into hasher: inout Hasher) { hasher.combine(rawHash) }

    /// What `Dictionary` and `Set` call per lookup: the cached hash mixed with the table's seed
    /// by a 64-bit finalizer (splitmix64's), so each table still gets its own bucket order
    /// (the reason tables are seeded) without running a `Hasher` per lookup.
    public func _rawHashValue(seed: Int) -> Int {
        var z = UInt64(bitPattern: Int64(rawHash ^ seed))
        z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
        z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
        return Int(Int64(bitPattern: z ^ (z >> 31)))
    }

    // The text (the store key, and a long key's raw key after it) and where the raw key starts
    // in it decide the key.
    public static func == (a: DedupKey, b: DedupKey) -> Bool {
        a.rawHash == b.rawHash && a.rawStart == b.rawStart && a.isLong == b.isLong && a.text == b.text
    }
}
