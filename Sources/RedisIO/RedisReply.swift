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

/// Commands for one pipeline, written in RESP as they are appended: `*<argc>` per command, then
/// `$<len>` and the bytes of each argument. Building a batch of `EVALSHA`s this way copies each
/// key's bytes once, straight into what goes on the socket, where `[[RedisArgument]]` costs an
/// array per key and a second copy into a contiguous buffer per command.
///
/// A header is written before its count or length is known and widened in place when the number
/// needs more digits than it was given (RESP allows no leading zeros): a command's `*<argc>`
/// starts with one digit, an argument written by a closure with two, so most need no move.
struct RedisCommandBatch: Sendable {
    /// The pipeline in RESP.
    private(set) var bytes: [UInt8] = []
    /// Where each command starts in `bytes`.
    private(set) var commandStarts: [Int] = []
    /// The open command's argument count so far, and the digits its header has: `declared`
    /// when `begin(arguments:)` wrote the final count, else the count's width, widened as it grows.
    private var arguments = 0
    private var argumentsWidth = 1
    private var declared: Int?

    init() {}

    /// Room for `bytes` more argument bytes and `arguments` more arguments.
    mutating func reserve(bytes extra: Int, arguments: Int) {
        bytes.reserveCapacity(bytes.count + extra + arguments * 8)
    }

    var commandCount: Int { commandStarts.count }

    /// Every command has the arguments its header says (`begin(arguments:)`): one short of them
    /// would leave Redis waiting for the rest.
    private func checkComplete() {
        precondition(declared.map { $0 == arguments } ?? true, "a command got fewer arguments than begin(arguments:) declared")
    }

    /// The pipeline to send.
    var completeBytes: [UInt8] {
        checkComplete()
        return bytes
    }

    /// Starts the next command; the arguments appended after it belong to it. With `count` (the
    /// hot paths know it) the header is written once; without, it is rewritten per argument.
    mutating func begin(arguments count: Int? = nil) {
        checkComplete()
        commandStarts.append(bytes.count)
        arguments = 0
        declared = count
        if let count {
            bytes.append(UInt8(ascii: "*"))
            bytes.appendDigits(Int64(count))
        } else {
            bytes.append(UInt8(ascii: "*"))
            bytes.append(UInt8(ascii: "0"))
            argumentsWidth = 1
        }
        bytes.append(13)
        bytes.append(10)
    }

    mutating func append(_ string: String) {
        var string = string
        string.withUTF8 { append(UnsafeRawBufferPointer($0)) }
    }

    mutating func append(_ raw: UnsafeRawBufferPointer) {
        bytes.append(UInt8(ascii: "$"))
        bytes.appendDigits(Int64(raw.count))
        bytes.append(13)
        bytes.append(10)
        bytes.append(contentsOf: raw)
        bytes.append(13)
        bytes.append(10)
        counted()
    }

    mutating func append(_ raw: [UInt8]) {
        raw.withUnsafeBytes { append($0) }
    }

    mutating func append<I: BinaryInteger>(_ value: I) { appendArgument { $0.appendDigits(Int64(value)) } }

    /// Arguments encoded once, appended whole: a command's name, or what every key of a request
    /// repeats (`NX PX <lease>`), without writing their headers again per key.
    mutating func append(_ encoded: EncodedArguments) {
        bytes.append(contentsOf: encoded.bytes)
        counted(encoded.count)
    }

    /// An argument of `length` bytes, which `write` appends in place: its header goes first, so
    /// nothing is moved after (a digest's 12-byte field).
    @inline(__always)
    mutating func appendArgument(length: Int, _ write: (inout [UInt8]) -> Void) {
        bytes.append(UInt8(ascii: "$"))
        bytes.appendDigits(Int64(length))
        bytes.append(13)
        bytes.append(10)
        let start = bytes.count
        write(&bytes)
        precondition(bytes.count - start == length, "an argument of another length than declared")
        bytes.append(13)
        bytes.append(10)
        counted()
    }

    /// An argument whose bytes `write` appends in place (names spelled from numbers, without a
    /// string per argument). Inlined so that `write` is too, with nothing it captures retained.
    @inline(__always)
    mutating func appendArgument(_ write: (inout [UInt8]) -> Void) {
        let at = bytes.count
        bytes.append(UInt8(ascii: "$"))
        bytes.append(0)
        bytes.append(0)
        bytes.append(13)
        bytes.append(10)
        write(&bytes)
        closeArgument(at: at)
    }

    /// Writes the `$<len>` of the argument whose two-digit header starts at `at`, moving its
    /// bytes when the length has another width.
    private mutating func closeArgument(at: Int) {
        let length = bytes.count - at - 5
        if length >= 10 && length < 100 {
            bytes[at + 1] = UInt8(ascii: "0") &+ UInt8(truncatingIfNeeded: length / 10)
            bytes[at + 2] = UInt8(ascii: "0") &+ UInt8(truncatingIfNeeded: length % 10)
        } else {
            let width = Self.decimalWidth(length)
            widen(from: at + 5, by: width - 2)
            bytes.withUnsafeMutableBufferPointer { Self.writeHeader(UInt8(ascii: "$"), length, width: width, to: $0, at: at) }
        }
        bytes.append(13)
        bytes.append(10)
        counted()
    }

    /// One more argument in the open command; an undeclared count's `*<argc>` is rewritten
    /// (widened at 10, 100, …).
    @inline(__always)
    private mutating func counted(_ added: Int = 1) {
        arguments += added
        if let declared {
            precondition(arguments <= declared, "a command got more arguments than begin(arguments:) declared")
            return
        }
        recount()
    }

    private mutating func recount() {
        guard let start = commandStarts.last else { preconditionFailure("an argument before begin()") }
        let width = Self.decimalWidth(arguments)
        if width != argumentsWidth {
            widen(from: start + 1 + argumentsWidth, by: width - argumentsWidth)
            argumentsWidth = width
        }
        let count = arguments
        bytes.withUnsafeMutableBufferPointer { Self.writeHeader(UInt8(ascii: "*"), count, width: width, to: $0, at: start) }
    }

    /// Moves everything from `offset` on by `delta` bytes (right when positive).
    private mutating func widen(from offset: Int, by delta: Int) {
        let moved = bytes.count - offset
        if delta > 0 { bytes.append(contentsOf: repeatElement(0, count: delta)) }
        bytes.withUnsafeMutableBytes { raw in
            let base = raw.baseAddress!
            (base + offset + delta).copyMemory(from: base + offset, byteCount: moved)
        }
        if delta < 0 { bytes.removeLast(-delta) }
    }

    /// The commands at `indices`, in that order, each after an `ASKING` when `askingFirst` (a
    /// cluster's redirects).
    func commands(_ indices: [Int], askingFirst: Bool) -> RedisCommandBatch {
        var out = RedisCommandBatch()
        for index in indices {
            if askingFirst {
                out.begin()
                out.append("ASKING")
            }
            let end = index + 1 < commandStarts.count ? commandStarts[index + 1] : bytes.count
            out.commandStarts.append(out.bytes.count)
            out.bytes.append(contentsOf: bytes[commandStarts[index]..<end])
        }
        return out
    }

    private static func decimalWidth(_ n: Int) -> Int {
        var width = 1
        var rest = n
        while rest >= 10 { rest /= 10; width += 1 }
        return width
    }

    /// `<marker><n>\r\n` at `at`, with `n` in `width` digits.
    private static func writeHeader(_ marker: UInt8, _ n: Int, width: Int, to out: UnsafeMutableBufferPointer<UInt8>, at: Int) {
        out[at] = marker
        var rest = n
        for i in stride(from: at + width, to: at, by: -1) {
            out[i] = UInt8(ascii: "0") &+ UInt8(truncatingIfNeeded: rest % 10)
            rest /= 10
        }
        out[at + width + 1] = 13
        out[at + width + 2] = 10
    }
}

/// Arguments in RESP, for `RedisCommandBatch.append(_:)`.
struct EncodedArguments: Sendable {
    let bytes: [UInt8]
    let count: Int

    init(_ arguments: [RedisArgument]) {
        var batch = RedisCommandBatch()
        batch.begin(arguments: arguments.count)
        let head = batch.bytes.count
        for argument in arguments { batch.append(argument.bytes) }
        bytes = Array(batch.bytes[head...])
        count = arguments.count
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
