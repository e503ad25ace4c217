/// Headers a dead-letter record carries besides the original message's own headers, so the
/// record says why it is there and where it came from, and `dedupd dlq replay` can send it back.
public enum DeadLetterHeader {
    /// A reason code: a `BadInput.Reason` code such as `missing_header`, or `handler_failed`.
    public static let reason = "dedupd-reason"
    /// Human-readable error text (never the message body).
    public static let error = "dedupd-error"
    public static let originalTopic = "dedupd-original-topic"
    public static let originalPartition = "dedupd-original-partition"
    public static let originalOffset = "dedupd-original-offset"
    /// The dedup key, when one could be computed.
    public static let dedupKey = "dedupd-dedup-key"
    /// Handler attempts made before giving up (0 for bad input).
    public static let attempts = "dedupd-attempts"

    public static let all = [reason, error, originalTopic, originalPartition, originalOffset, dedupKey, attempts]
}

/// One message on its way to the dead-letter topic: the original record (key, value, headers)
/// plus why it is there and where it came from (docs/architecture.md, steps 2 and 5).
public struct DeadLetter: Sendable {
    /// Reason code of a handler that gave up (its last attempt failed, or it failed permanently).
    public static let handlerFailed = "handler_failed"
    /// Reason code of a message whose transition its entity's recorded state did not allow
    /// (guard, `on_reject: dead_letter`).
    public static let rejectedTransition = "rejected_transition"

    public var message: InboundMessage
    /// `BadInput.Reason.code`, or `handlerFailed`.
    public var reason: String
    /// Human-readable error text; never the message body.
    public var error: String
    /// The dedup key, when one could be computed.
    public var dedupKey: String?
    /// Handler attempts made (0 for bad input).
    public var attempts: Int

    public init(message: InboundMessage, reason: String, error: String, dedupKey: String? = nil, attempts: Int = 0) {
        self.message = message
        self.reason = reason
        self.error = error
        self.dedupKey = dedupKey
        self.attempts = attempts
    }

    public init(badInput: BadInput, message: InboundMessage) {
        self.init(message: message, reason: badInput.reason.code, error: badInput.detail)
    }

    /// The original headers, minus `dedupd-*` headers of an earlier dead-lettering (a replayed
    /// message that fails again must say why it failed this time), plus `DeadLetterHeader`s.
    public var headers: [MessageHeader] {
        var out = message.headers.filter { h in !DeadLetterHeader.all.contains { $0.equalsIgnoringASCIICase(h.name) } }
        func add(_ name: String, _ value: String) { out.append(MessageHeader(name: name, value: Array(value.utf8))) }
        add(DeadLetterHeader.reason, reason)
        add(DeadLetterHeader.error, error)
        add(DeadLetterHeader.originalTopic, message.topic)
        add(DeadLetterHeader.originalPartition, String(message.partition))
        add(DeadLetterHeader.originalOffset, String(message.offset))
        if let dedupKey { add(DeadLetterHeader.dedupKey, dedupKey) }
        add(DeadLetterHeader.attempts, String(attempts))
        return out
    }
}
