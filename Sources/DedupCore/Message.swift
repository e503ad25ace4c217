/// A Kafka partition of a topic: the unit of assignment, pausing and commits.
public struct TopicPartition: Hashable, Sendable, CustomStringConvertible {
    public var topic: String
    public var partition: Int32

    public init(topic: String, partition: Int32) {
        self.topic = topic
        self.partition = partition
    }

    public var description: String { "\(topic)[\(partition)]" }
}

/// One record header. Kafka allows repeated names and null values, so headers are a list, not a dictionary.
public struct MessageHeader: Hashable, Sendable {
    public var name: String
    public var value: [UInt8]?

    public init(name: String, value: [UInt8]?) {
        self.name = name
        self.value = value
    }
}

/// A consumed Kafka record, copied out of librdkafka's memory at once so it can cross tasks.
///
/// Value, record key and headers live in one byte array (`MessageBytes`), so a consumed message
/// costs one heap allocation rather than one per part and per header. `key`, `value`, `headers`
/// and `header(_:)` copy out of it (for handlers and tests); the worker's own path reads in
/// place through `valueBytes`, `keyBytes`, `headerView(_:)` and `forEachHeader(_:)`.
public struct InboundMessage: Sendable {
    public var topic: String
    public var partition: Int32
    public var offset: Int64
    /// Producer or log-append time in milliseconds since the epoch, when the broker gave one.
    public var timestampMillis: Int64?
    /// Value, key and headers.
    public private(set) var bytes: MessageBytes {
        didSet { approximateSize = Self.size(bytes) }
    }

    public init(
        topic: String,
        partition: Int32,
        offset: Int64,
        key: [UInt8]? = nil,
        value: [UInt8],
        headers: [MessageHeader] = [],
        timestampMillis: Int64? = nil
    ) {
        self.init(
            topic: topic, partition: partition, offset: offset,
            bytes: MessageBytes(key: key, value: value, headers: headers), timestampMillis: timestampMillis)
    }

    /// A message over bytes already laid out (the consumer builds them in one allocation).
    public init(topic: String, partition: Int32, offset: Int64, bytes: MessageBytes, timestampMillis: Int64? = nil) {
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.bytes = bytes
        self.timestampMillis = timestampMillis
        approximateSize = Self.size(bytes)
    }

    /// The record key; `nil` when the producer sent none. A copy: `keyBytes` reads in place.
    public var key: [UInt8]? {
        get { keyBytes.map { Array($0) } }
        set { bytes = MessageBytes(key: newValue, value: value, headers: headers) }
    }

    /// A copy unless the message has neither key nor headers: `valueBytes` reads in place.
    public var value: [UInt8] {
        get { bytes.keyCount < 0 && bytes.headerCount == 0 ? bytes.storage : Array(valueBytes) }
        set { bytes = MessageBytes(key: key, value: newValue, headers: headers) }
    }

    /// A copy: `forEachHeader` and `headerView` read in place.
    public var headers: [MessageHeader] {
        get {
            var out: [MessageHeader] = []
            out.reserveCapacity(bytes.headerCount)
            forEachHeader { h in
                out.append(MessageHeader(name: String(decoding: h.name, as: UTF8.self), value: h.value.map { Array($0) }))
            }
            return out
        }
        set { bytes = MessageBytes(key: key, value: value, headers: newValue) }
    }

    public var valueCount: Int { bytes.valueCount }
    /// The value, read in place.
    public var valueBytes: ArraySlice<UInt8> { bytes.storage[0..<bytes.valueCount] }
    /// The record key, read in place; `nil` when the producer sent none.
    public var keyBytes: ArraySlice<UInt8>? {
        bytes.keyCount < 0 ? nil : bytes.storage[bytes.valueCount..<bytes.valueCount + bytes.keyCount]
    }
    public var headerCount: Int { bytes.headerCount }

    public var topicPartition: TopicPartition { TopicPartition(topic: topic, partition: partition) }

    /// The last header with this name (Kafka's convention when a name repeats); names compare case-insensitively.
    public func header(_ name: String) -> MessageHeader? {
        headerView(name).map { MessageHeader(name: String(decoding: $0.name, as: UTF8.self), value: $0.value.map { Array($0) }) }
    }

    /// `header(_:)` read in place.
    public func headerView(_ name: String) -> HeaderView? {
        var found: HeaderView?
        forEachHeader { h in
            if h.nameEqualsIgnoringASCIICase(name) { found = h }
        }
        return found
    }

    /// The value of `header(_:)`, lent to `body` as raw bytes (`nil` for a null value); `nil`
    /// without calling `body` when no header has the name. Runs once per message for a header
    /// key template: it walks the one buffer through a pointer, without the slices (and their
    /// retains) that `headerView` makes per header.
    public func withHeaderValue<R>(_ name: String, _ body: (UnsafeRawBufferPointer?) -> R) -> R? {
        // The walk's bounds are read first: the closure's use of `bytes` copied it (a retain).
        let (start, count) = (bytes.headersStart, bytes.headerCount)
        return name.withUTF8InPlace { wanted in
            bytes.storage.withUnsafeBytes { s in
                var found: Range<Int>??
                MessageBytes.forEachHeaderRange(in: s, start: start, count: count) { name, value in
                    if HeaderView.namesEqualIgnoringASCIICase(UnsafeRawBufferPointer(rebasing: s[name]), UnsafeRawBufferPointer(wanted)) {
                        found = .some(value)
                    }
                }
                guard let found else { return nil }
                return body(found.map { UnsafeRawBufferPointer(rebasing: s[$0]) })
            }
        }
    }

    /// The headers in order, read in place.
    public func forEachHeader(_ body: (HeaderView) throws -> Void) rethrows {
        let s = bytes.storage
        try s.withUnsafeBytes { raw in
            try MessageBytes.forEachHeaderRange(in: raw, start: bytes.headersStart, count: bytes.headerCount) { name, value in
                try body(HeaderView(name: s[name], value: value.map { s[$0] }))
            }
        }
    }

    /// The value, the record key (`nil`: none) and the headers, lent to `body` in place: one
    /// access to the message's array for all of them, without the slice (and its retain) that
    /// `valueBytes`, `keyBytes` and `forEachHeader` make per part. The `log` handler writes
    /// every part of every message this way.
    public func withParts<R>(
        _ body: (_ value: UnsafeRawBufferPointer, _ key: UnsafeRawBufferPointer?, _ headers: RawHeaders) throws -> R
    ) rethrows -> R {
        // The parts' bounds are read first: a copy of `bytes` for the closure was a retain.
        let (valueCount, keyCount, headersStart, headerCount) = (bytes.valueCount, bytes.keyCount, bytes.headersStart, bytes.headerCount)
        return try bytes.storage.withUnsafeBytes { s in
            let value = UnsafeRawBufferPointer(rebasing: s[0..<valueCount])
            let key = keyCount < 0 ? nil : UnsafeRawBufferPointer(rebasing: s[valueCount..<valueCount + keyCount])
            return try body(value, key, RawHeaders(storage: s, start: headersStart, count: headerCount))
        }
    }

    /// Bytes this message costs the worker while it holds it, for the buffer's byte bound: its
    /// bytes plus `bookkeepingBytes`.
    ///
    /// Computed when the message is made (on the consumer's thread) and whenever its key, value
    /// or headers change, not by the worker's loop at each use.
    public private(set) var approximateSize: Int

    /// What a waiting message costs beyond its own bytes: its heap object's header and malloc's
    /// rounding (48), and the engine's bookkeeping per waiting key (dictionary slots in the buffer
    /// and the engine, the order and lease queues, the offset tracker, the Redis key string) with
    /// the room those tables grow into (each doubles when full, and holds old and new while it
    /// moves). Calibrated against the resident set of a worker holding a full buffer, a small one
    /// and one of the default size (MemoryBoundTests; docs/performance.md): payload bytes alone
    /// undercount that memory several times over, so `buffer.max_bytes` would not bound it.
    public static let bookkeepingBytes = 1100 + 48

    private static func size(_ bytes: MessageBytes) -> Int {
        bookkeepingBytes + bytes.storage.count
    }
}

/// The headers of an `InboundMessage` as raw bytes, valid only inside `withParts`: each
/// header's name and value (`nil`: a null value), in order.
public struct RawHeaders: Sequence, IteratorProtocol {
    @usableFromInline let storage: UnsafeRawBufferPointer
    @usableFromInline var at: Int
    @usableFromInline var left: Int

    fileprivate init(storage: UnsafeRawBufferPointer, start: Int, count: Int) {
        self.storage = storage
        at = start
        left = count
    }

    /// Inlinable: the `log` handler reads every header of every line through it.
    @inlinable
    public mutating func next() -> (name: UnsafeRawBufferPointer, value: UnsafeRawBufferPointer?)? {
        guard left > 0 else { return nil }
        left -= 1
        let (name, value) = MessageBytes.headerRanges(in: storage, at: at)
        at = value?.upperBound ?? name.upperBound
        return (UnsafeRawBufferPointer(rebasing: storage[name]), value.map { UnsafeRawBufferPointer(rebasing: storage[$0]) })
    }
}

/// A header of an `InboundMessage`, read in place.
public struct HeaderView: Sendable {
    /// The name's bytes (UTF-8 by convention).
    public let name: ArraySlice<UInt8>
    /// `nil` for a null value.
    public let value: ArraySlice<UInt8>?

    /// Header names are ASCII by convention: compared as bytes, without making a string; a
    /// non-ASCII name that differs in bytes is compared as strings (canonical equivalence), as
    /// `String.equalsIgnoringASCIICase` does.
    public func nameEqualsIgnoringASCIICase(_ other: String) -> Bool {
        other.withUTF8InPlace { o in
            name.withUnsafeBytes { Self.namesEqualIgnoringASCIICase($0, UnsafeRawBufferPointer(o)) }
        }
    }

    static func namesEqualIgnoringASCIICase(_ n: UnsafeRawBufferPointer, _ o: UnsafeRawBufferPointer) -> Bool {
        if o.count == n.count {
            // Names usually match exactly: compared word by word before the loop that folds case.
            if n.hasSameBytes(as: o) { return true }
            var i = 0
            while i < n.count {
                let a = n[i]
                let b = o[i]
                if a != b && !(a | 0x20 == b | 0x20 && (a | 0x20) >= 0x61 && (a | 0x20) <= 0x7a) { break }
                i += 1
            }
            if i == n.count { return true }
        }
        // Only names with non-ASCII bytes can be equal as strings and not as bytes.
        guard !n.isASCII || !o.isASCII else { return false }
        return String(decoding: n, as: UTF8.self).equalsIgnoringASCIICase(String(decoding: o, as: UTF8.self))
    }
}

/// A message's value, record key and headers in one array: the value's bytes, then the key's,
/// then per header its name's length and value's length (4 bytes each, little-endian; -1 for a
/// null value), its name and its value. One allocation per message, and a copy of the message
/// retains one buffer.
public struct MessageBytes: Sendable {
    public private(set) var storage: [UInt8]
    public private(set) var valueCount = 0
    /// -1 when the message has no key.
    public private(set) var keyCount = -1
    public private(set) var headerCount = 0

    /// What a header adds to `capacity`.
    public static func headerCost(nameCount: Int, valueCount: Int?) -> Int { 8 + nameCount + (valueCount ?? 0) }

    /// The value, key and headers written by `write` (a `Writer`: the value first, then the
    /// key if any, then the headers) into one array. `capacity` is the value's and key's counts
    /// plus each header's `headerCost`. The parts are written through a pointer into room on
    /// the stack and the array filled from it with one copy, instead of an append per part (four
    /// per header for its lengths): an array of a given size allocated any other way goes
    /// through the standard library's unspecialized path, which costs more than the copy.
    public init(capacity: Int, _ write: (inout Writer) -> Void) {
        storage = []
        storage.reserveCapacity(capacity)
        var counts = (value: 0, key: -1, headers: 0)
        storage.append(atMost: capacity) { cursor in
            var writer = Writer(cursor: cursor)
            write(&writer)
            cursor = writer.cursor
            counts = (writer.valueCount, writer.keyCount, writer.headerCount)
        }
        (valueCount, keyCount, headerCount) = counts
    }

    /// No value, key or headers (what a message moved out of its entry leaves behind), without
    /// the general initializer's checks and its release of the empty arrays passed to it.
    public static var empty: MessageBytes { MessageBytes(sharing: []) }

    /// A value alone: the value's own array, shared, no copy.
    private init(sharing value: [UInt8]) {
        storage = value
        valueCount = value.count
    }

    public init(key: [UInt8]?, value: [UInt8], headers: [MessageHeader]) {
        if key == nil && headers.isEmpty {
            self.init(sharing: value)
            return
        }
        var capacity = value.count + (key?.count ?? 0)
        for h in headers { capacity += Self.headerCost(nameCount: h.name.utf8.count, valueCount: h.value?.count) }
        self.init(capacity: capacity) { writer in
            value.withUnsafeBytes { writer.value($0) }
            if let key { key.withUnsafeBytes { writer.key($0) } }
            for h in headers {
                h.name.withUTF8InPlace { name in
                    if let v = h.value {
                        v.withUnsafeBytes { writer.header(name: UnsafeRawBufferPointer(name), value: $0) }
                    } else {
                        writer.header(name: UnsafeRawBufferPointer(name), value: nil)
                    }
                }
            }
        }
    }

    /// Writes a message's parts in their order: the value first, once; the key after it, at
    /// most once; then the headers.
    ///
    /// Inlinable: the consumer (KafkaIO) writes every part of every message through it.
    public struct Writer {
        @usableFromInline var cursor: ByteCursor
        @usableFromInline var valueCount = 0
        @usableFromInline var keyCount = -1
        @usableFromInline var headerCount = 0
        @usableFromInline var phase = 0  // 0: value next, 1: key next, 2: headers

        fileprivate init(cursor: ByteCursor) { self.cursor = cursor }

        @inlinable @inline(__always)
        public mutating func value(_ value: UnsafeRawBufferPointer) {
            precondition(phase == 0, "the value comes first")
            cursor.write(value)
            valueCount = value.count
            phase = 1
        }

        @inlinable @inline(__always)
        public mutating func key(_ key: UnsafeRawBufferPointer) {
            precondition(phase == 1, "the key comes after the value and before the headers")
            cursor.write(key)
            keyCount = key.count
            phase = 2
        }

        @inlinable @inline(__always)
        public mutating func header(name: UnsafeRawBufferPointer, value: UnsafeRawBufferPointer?) {
            precondition(phase >= 1, "headers come after the value")
            phase = 2
            Self.write(name.count, to: &cursor)
            Self.write(value.map { $0.count } ?? -1, to: &cursor)
            cursor.write(name)
            if let value { cursor.write(value) }
            headerCount += 1
        }

        @inlinable @inline(__always)
        static func write(_ v: Int, to cursor: inout ByteCursor) {
            precondition(v >= -1 && v <= Int(Int32.max), "a header part over 2 GiB")
            withUnsafeBytes(of: Int32(v).littleEndian) { cursor.write($0) }
        }
    }

    var headersStart: Int { valueCount + max(0, keyCount) }

    /// Each header's name and value (`nil`: a null value) as ranges of `storage`, whose bytes
    /// `s` are, in order.
    static func forEachHeaderRange(
        in s: UnsafeRawBufferPointer, start: Int, count: Int, _ body: (Range<Int>, Range<Int>?) throws -> Void
    ) rethrows {
        var i = start
        for _ in 0..<count {
            let (name, value) = Self.headerRanges(in: s, at: i)
            try body(name, value)
            i = value?.upperBound ?? name.upperBound
        }
    }

    /// The name and value (`nil`: null) of the header whose lengths start at `i`.
    @inlinable @inline(__always)
    static func headerRanges(in s: UnsafeRawBufferPointer, at i: Int) -> (name: Range<Int>, value: Range<Int>?) {
        let nameCount = readInt32(s, at: i)
        let valueCount = readInt32(s, at: i + 4)
        let valueStart = i + 8 + nameCount
        return (i + 8..<valueStart, valueCount < 0 ? nil : valueStart..<valueStart + valueCount)
    }

    @inlinable @inline(__always)
    static func readInt32(_ s: UnsafeRawBufferPointer, at i: Int) -> Int {
        Int(Int32(littleEndian: s.loadUnaligned(fromByteOffset: i, as: Int32.self)))
    }
}

extension String {
    /// Header names are ASCII by convention; compare them without allocating lowercased copies.
    func equalsIgnoringASCIICase(_ other: String) -> Bool {
        // Names usually match exactly (once per message for a header key template): that
        // comparison is a few word compares for short strings, the byte loop only the fallback.
        if self == other { return true }
        guard self.utf8.count == other.utf8.count else { return false }
        return zip(self.utf8, other.utf8).allSatisfy { a, b in
            a == b || (a | 0x20 == b | 0x20 && (a | 0x20) >= 0x61 && (a | 0x20) <= 0x7a)
        }
    }
}
