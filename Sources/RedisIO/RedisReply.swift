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
/// The bytes are written through a `ByteCursor` into room reserved per argument, not appended to
/// an array: an array append checks uniqueness and capacity per call, and a key's claim and
/// confirm write ~40 small parts (`$`, digits, CRLF, name pieces).
///
/// A header is written before its count or length is known and widened in place when the number
/// needs more digits than it was given (RESP allows no leading zeros): a command's `*<argc>`
/// starts with one digit, an argument written by a closure with two, so most need no move.
struct RedisCommandBatch: Sendable {
    private var storage = Storage(capacity: 256)
    /// Where each command starts in the bytes.
    private(set) var commandStarts: [Int] = []
    /// The open command's argument count so far, and the digits its header has: `declared`
    /// when `begin(arguments:)` wrote the final count, else the count's width, widened as it grows.
    private var arguments = 0
    private var argumentsWidth = 1
    private var declared: Int?
    /// Set inside `withOwnStorage`, where the storage is known to be this batch's alone.
    private var ownsStorage = false

    /// The bytes, copied on write as an array's are: a batch is built by one task, then read.
    private final class Storage: @unchecked Sendable {
        // Written only while uniquely referenced (`room`), so a shared storage is only read.
        let base: UnsafeMutablePointer<UInt8>
        let capacity: Int
        var count = 0

        init(capacity: Int) {
            self.capacity = capacity
            base = .allocate(capacity: capacity)
        }

        deinit { base.deallocate() }
    }

    init() {}

    /// A batch of whole commands given as arguments (admin and test paths; the hot paths encode
    /// in place).
    init(_ commands: [[RedisArgument]]) {
        for command in commands {
            begin(arguments: command.count)
            for argument in command { append(argument.bytes) }
        }
    }

    /// The pipeline in RESP (a copy).
    var bytes: [UInt8] { Array(UnsafeBufferPointer(start: storage.base, count: storage.count)) }

    /// Room for `bytes` more argument bytes and `arguments` more arguments.
    mutating func reserve(bytes extra: Int, arguments: Int) {
        room(extra + arguments * 8)
    }

    var commandCount: Int { commandStarts.count }

    /// Every command has the arguments its header says (`begin(arguments:)`): one short of them
    /// would leave Redis waiting for the rest.
    private func checkComplete() {
        precondition(declared.map { $0 == arguments } ?? true, "a command got fewer arguments than begin(arguments:) declared")
    }

    /// The pipeline to send.
    func withCompleteBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        checkComplete()
        return try body(UnsafeRawBufferPointer(start: storage.base, count: storage.count))
    }

    /// Room for `extra` more bytes in storage this batch alone holds.
    @inline(__always)
    private mutating func room(_ extra: Int) {
        assert(!ownsStorage || isKnownUniquelyReferenced(&storage), "a batch copied inside withOwnStorage")
        if storage.count + extra > storage.capacity || !(ownsStorage || isKnownUniquelyReferenced(&storage)) { grow(extra) }
    }

    /// Runs `body` with this batch's storage made its own once, so that its writes check the
    /// room left but not, per argument, whether the storage is shared (a runtime call each: a
    /// key's claim writes a dozen arguments). `body` must not copy the batch; debug builds
    /// check that it does not.
    @inline(__always)
    mutating func withOwnStorage<R>(_ body: (inout RedisCommandBatch) throws -> R) rethrows -> R {
        if !isKnownUniquelyReferenced(&storage) { grow(0) }
        ownsStorage = true
        defer { ownsStorage = false }
        return try body(&self)
    }

    /// New storage (doubling, so a large batch costs few moves) with this batch's bytes.
    @inline(never)
    private mutating func grow(_ extra: Int) {
        let needed = storage.count + extra
        var capacity = Swift.max(storage.capacity, 256)
        while capacity < needed { capacity *= 2 }
        let grown = Storage(capacity: capacity)
        grown.base.initialize(from: storage.base, count: storage.count)
        grown.count = storage.count
        storage = grown
    }

    /// Writes at most `maxCount` bytes at the end through a cursor.
    @inline(__always)
    private mutating func write(atMost maxCount: Int, _ body: (inout ByteCursor) -> Void) {
        room(maxCount)
        let start = storage.base + storage.count
        var cursor = ByteCursor(start, end: start + maxCount)
        body(&cursor)
        storage.count += cursor.position - start
    }

    /// Starts the next command; the arguments appended after it belong to it. With `count` (the
    /// hot paths know it) the header is written once; without, it is rewritten per argument.
    @inline(__always)
    mutating func begin(arguments count: Int? = nil) {
        checkComplete()
        commandStarts.append(storage.count)
        arguments = 0
        declared = count
        argumentsWidth = 1
        write(atMost: 24) {
            $0.write(UInt8(ascii: "*"))
            $0.writeSmallDigits(count ?? 0)
            $0.writeCRLF()
        }
    }

    mutating func append(_ string: String) {
        string.withUTF8InPlace { append(UnsafeRawBufferPointer($0)) }
    }

    mutating func append(_ raw: UnsafeRawBufferPointer) {
        appendArgument(length: raw.count) { $0.write(raw) }
    }

    mutating func append(_ raw: [UInt8]) {
        raw.withUnsafeBytes { append($0) }
    }

    mutating func append<I: BinaryInteger>(_ value: I) { appendArgument(atMost: 20) { $0.writeDigits(Int64(value)) } }

    /// Arguments encoded once, appended whole: a command's name, or what every key of a request
    /// repeats (`NX PX <lease>`), without writing their headers again per key.
    @inline(__always)
    mutating func append(_ encoded: EncodedArguments) {
        write(atMost: encoded.bytes.count) { $0.write(encoded.bytes) }
        counted(encoded.count)
    }

    /// Where the next argument's bytes start: with `repeatArguments(from:to:count:)`, a run of
    /// arguments written once and appended again.
    var byteCount: Int { storage.count }

    /// Appends again the `count` arguments written between bytes `start` and `end` (a confirm's
    /// `DEL` of the pending keys its `MGET` named): one copy of their bytes instead of spelling
    /// each name again. The run's command must have declared its count (`begin(arguments:)`):
    /// an undeclared count's header is widened as arguments come, which moves them.
    mutating func repeatArguments(from start: Int, to end: Int, count: Int) {
        precondition(0 <= start && start <= end && end <= storage.count, "a run of arguments outside the batch")
        let length = end - start
        room(length)
        (storage.base + storage.count).initialize(from: storage.base + start, count: length)
        storage.count += length
        counted(count)
    }

    /// An argument of `length` bytes, which `write` writes in place: its header goes first, so
    /// nothing is moved after (a digest's 12-byte field).
    @inline(__always)
    mutating func appendArgument(length: Int, _ write: (inout ByteCursor) -> Void) {
        self.write(atMost: length + 24) {
            $0.write(UInt8(ascii: "$"))
            $0.writeSmallDigits(length)
            $0.writeCRLF()
            let start = $0.position
            write(&$0)
            precondition($0.position - start == length, "an argument of another length than declared")
            $0.writeCRLF()
        }
        counted()
    }

    /// An argument of at most `maxLength` bytes whose bytes `write` writes in place (names spelled
    /// from numbers, without a string per argument). Inlined so that `write` is too, with nothing
    /// it captures retained.
    @inline(__always)
    mutating func appendArgument(atMost maxLength: Int, _ write: (inout ByteCursor) -> Void) {
        let at = storage.count
        self.write(atMost: maxLength + 5) {
            $0.write(UInt8(ascii: "$"))
            $0.write(UInt8(ascii: "0"))
            $0.write(UInt8(ascii: "0"))
            $0.writeCRLF()
            write(&$0)
        }
        closeArgument(at: at)
    }

    /// Writes the `$<len>` of the argument whose two-digit header starts at `at`, moving its
    /// bytes when the length has another width, and ends the argument.
    @inline(__always)
    private mutating func closeArgument(at: Int) {
        let length = storage.count - at - 5
        if length >= 10 && length < 100 {
            storage.base[at + 1] = UInt8(ascii: "0") &+ UInt8(truncatingIfNeeded: length / 10)
            storage.base[at + 2] = UInt8(ascii: "0") &+ UInt8(truncatingIfNeeded: length % 10)
        } else {
            let width = Self.decimalWidth(length)
            widen(from: at + 5, by: width - 2)
            Self.writeHeader(UInt8(ascii: "$"), length, width: width, to: storage.base, at: at)
        }
        write(atMost: 2) { $0.writeCRLF() }
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
        Self.writeHeader(UInt8(ascii: "*"), arguments, width: width, to: storage.base, at: start)
    }

    /// Moves everything from `offset` on by `delta` bytes (right when positive).
    private mutating func widen(from offset: Int, by delta: Int) {
        guard delta != 0 else { return }
        if delta > 0 { room(delta) }
        let moved = storage.count - offset
        (storage.base + offset + delta).update(from: storage.base + offset, count: moved)
        storage.count += delta
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
            let start = commandStarts[index]
            let end = index + 1 < commandStarts.count ? commandStarts[index + 1] : storage.count
            out.commandStarts.append(out.storage.count)
            let command = UnsafeBufferPointer(start: storage.base + start, count: end - start)
            out.write(atMost: command.count) { $0.write(command) }
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
    private static func writeHeader(_ marker: UInt8, _ n: Int, width: Int, to out: UnsafeMutablePointer<UInt8>, at: Int) {
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
