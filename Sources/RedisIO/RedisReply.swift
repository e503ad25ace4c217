import CHiredis
import DedupCore

/// One argument of a Redis command: raw bytes, so keys and values may be binary.
/// Write strings and integers as literals: `["SET", "k", "v", "PX", 100]`.
public struct RedisArgument: Sendable, Hashable, ExpressibleByStringLiteral, ExpressibleByIntegerLiteral {
    public var bytes: [UInt8]

    public init(bytes: [UInt8]) { self.bytes = bytes }
    public init(_ string: String) { self.bytes = Array(string.utf8) }
    public init<I: BinaryInteger>(_ value: I) { self.bytes = Array(String(value).utf8) }
    public init(stringLiteral value: String) { self.init(value) }
    public init(integerLiteral value: Int64) { self.init(value) }
}

/// Commands encoded for one pipeline: every argument's bytes back to back in one buffer, with
/// each argument's length and each command's argument count. Building a batch of `EVALSHA`s
/// this way copies each key's UTF-8 once, where `[[RedisArgument]]` costs an array per key and
/// a second copy into a contiguous buffer per command.
struct RedisCommandBatch: Sendable {
    /// The arguments' bytes; a trailing 0 keeps it non-empty (a valid base pointer).
    private(set) var bytes: [UInt8] = [0]
    private(set) var lengths: [Int] = []
    private(set) var argumentCounts: [Int] = []

    init() {}

    /// Room for `bytes` more argument bytes and `arguments` more arguments.
    mutating func reserve(bytes extra: Int, arguments: Int) {
        bytes.reserveCapacity(bytes.count + extra)
        lengths.reserveCapacity(lengths.count + arguments)
    }

    var commandCount: Int { argumentCounts.count }

    /// Starts the next command; the arguments appended after it belong to it.
    mutating func begin() { argumentCounts.append(0) }

    mutating func append(_ string: String) {
        var string = string
        string.withUTF8 { append(UnsafeRawBufferPointer($0)) }
    }

    mutating func append(_ raw: UnsafeRawBufferPointer) {
        bytes.removeLast()
        bytes.append(contentsOf: raw)
        close(raw.count)
    }

    mutating func append(_ raw: [UInt8]) {
        raw.withUnsafeBytes { append($0) }
    }

    mutating func append<I: BinaryInteger>(_ value: I) { appendArgument { $0.appendDigits(Int64(value)) } }

    /// An argument whose bytes `write` appends in place (names spelled from numbers, without a
    /// string per argument).
    mutating func appendArgument(_ write: (inout [UInt8]) -> Void) {
        bytes.removeLast()
        let start = bytes.count
        write(&bytes)
        close(bytes.count - start)
    }

    private mutating func close(_ length: Int) {
        bytes.append(0)
        lengths.append(length)
        argumentCounts[argumentCounts.count - 1] += 1
    }
}

/// A reply from Redis (RESP2), copied out of hiredis' `redisReply` at once.
/// Error replies are values here (`.error`), not thrown: in a pipeline one
/// command can fail while the others succeed.
public enum RedisReply: Sendable, Hashable {
    case string([UInt8])
    case status(String)
    case integer(Int64)
    case array([RedisReply])
    case null
    case error(String)

    /// Copies a hiredis reply tree into Swift values (the tree is reused after the next read).
    init(_ reply: UnsafePointer<redisReply>) {
        let r = reply.pointee
        switch r.type {
        case REDIS_REPLY_STRING:
            self = .string(Self.bytes(r.str, r.len))
        case REDIS_REPLY_STATUS:
            self = .status(String(decoding: Self.bytes(r.str, r.len), as: UTF8.self))
        case REDIS_REPLY_ERROR:
            self = .error(String(decoding: Self.bytes(r.str, r.len), as: UTF8.self))
        case REDIS_REPLY_INTEGER:
            self = .integer(Int64(r.integer))
        case REDIS_REPLY_NIL:
            self = .null
        case REDIS_REPLY_ARRAY:
            var items: [RedisReply] = []
            items.reserveCapacity(r.elements)
            for i in 0..<r.elements {
                if let element = r.element[i] {
                    items.append(RedisReply(element))
                } else {
                    items.append(.null)
                }
            }
            self = .array(items)
        default:
            self = .error("unknown hiredis reply type \(r.type)")
        }
    }

    private static func bytes(_ str: UnsafeMutablePointer<CChar>?, _ len: Int) -> [UInt8] {
        guard let str, len > 0 else { return [] }
        return Array(UnsafeRawBufferPointer(start: str, count: len))
    }

    /// The text of a bulk string or status reply.
    public var text: String? {
        switch self {
        case .string(let b): return String(decoding: b, as: UTF8.self)
        case .status(let s): return s
        default: return nil
        }
    }

    /// The value of an integer reply.
    public var int: Int64? {
        if case .integer(let v) = self { return v }
        return nil
    }

    /// Returns `self`, or throws the classified `RedisError` if this is an error reply.
    @discardableResult
    public func throwingOnError(_ context: String? = nil) throws -> RedisReply {
        if case .error(let text) = self { throw RedisError.fromServerReply(text, context: context) }
        return self
    }
}
