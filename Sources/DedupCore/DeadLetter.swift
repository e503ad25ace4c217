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
