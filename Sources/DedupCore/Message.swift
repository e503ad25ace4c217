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
public struct InboundMessage: Sendable {
    public var topic: String
    public var partition: Int32
    public var offset: Int64
    /// The record key; `nil` when the producer sent none.
    public var key: [UInt8]? { didSet { approximateSize = Self.size(key: key, value: value, headers: headers) } }
    public var value: [UInt8] { didSet { approximateSize = Self.size(key: key, value: value, headers: headers) } }
    public var headers: [MessageHeader] { didSet { approximateSize = Self.size(key: key, value: value, headers: headers) } }
    /// Producer or log-append time in milliseconds since the epoch, when the broker gave one.
    public var timestampMillis: Int64?

    public init(
        topic: String,
        partition: Int32,
        offset: Int64,
        key: [UInt8]? = nil,
        value: [UInt8],
        headers: [MessageHeader] = [],
        timestampMillis: Int64? = nil
    ) {
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.key = key
        self.value = value
        self.headers = headers
        self.timestampMillis = timestampMillis
        approximateSize = Self.size(key: key, value: value, headers: headers)
    }

    public var topicPartition: TopicPartition { TopicPartition(topic: topic, partition: partition) }

    /// The last header with this name (Kafka's convention when a name repeats); names compare case-insensitively.
    public func header(_ name: String) -> MessageHeader? {
        headers.last { $0.name.equalsIgnoringASCIICase(name) }
    }

    /// Bytes this message costs the worker while it waits in the delay buffer, for the buffer's
    /// byte bound: its own heap objects (each array a 32-byte header plus malloc's rounding; header
    /// names over 15 bytes are heap strings) and the engine's bookkeeping per waiting key
    /// (dictionary slots in the buffer and the engine, the order and lease queues, the offset
    /// tracker, the Redis key string), about 640 bytes. Calibrated against the resident set of a
    /// worker holding a full buffer (MemoryBoundTests): counting payload bytes alone undercounted
    /// memory about 2.6 times, so `buffer.max_bytes` would not have bounded it.
    ///
    /// Computed when the message is made (on the consumer's thread) and whenever its key, value
    /// or headers change, not by the worker's loop at each use, where walking the headers shows
    /// in the worker's profile.
    public private(set) var approximateSize: Int

    private static func size(key: [UInt8]?, value: [UInt8], headers: [MessageHeader]) -> Int {
        var n = 640 + 48 + value.count + 48 + headers.count * 24
        if let key { n += 48 + key.count }
        for h in headers {
            if let v = h.value { n += 48 + v.count }
            let name = h.name.utf8.count
            if name > 15 { n += 48 + name }
        }
        return n
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
