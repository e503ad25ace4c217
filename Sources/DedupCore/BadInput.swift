/// Why a message cannot be deduplicated or dispatched. Each reason has a stable code that
/// appears in logs and, once dead-letter topics exist, in the `dedupd-reason` header.
public struct BadInput: Error, Sendable, Equatable, CustomStringConvertible {
    public struct Reason: Hashable, Sendable, CustomStringConvertible {
        public let code: String
        private init(_ code: String) { self.code = code }

        public static let missingHeader = Reason("missing_header")
        public static let missingKey = Reason("missing_record_key")
        public static let invalidUTF8 = Reason("invalid_utf8")
        public static let invalidJSON = Reason("invalid_json")
        public static let missingField = Reason("missing_json_field")
        public static let emptyKey = Reason("empty_key")
        public static let tooLarge = Reason("message_too_large")
        /// Token mode: the token was never issued (or expired so long ago it was forgotten).
        public static let tokenUnknown = Reason("token_unknown")
        /// Token mode: the token was issued but its time ran out before it was used.
        public static let tokenExpired = Reason("token_expired")
        /// Token mode: the token was already used by another message.
        public static let tokenReused = Reason("token_reused")
        /// `routing.unmatched: dead_letter`: no route matched the message.
        public static let noRoute = Reason("no_route")

        public var description: String { code }
        public static let all: [Reason] = [
            .missingHeader, .missingKey, .invalidUTF8, .invalidJSON, .missingField, .emptyKey, .tooLarge,
            .tokenUnknown, .tokenExpired, .tokenReused, .noRoute,
        ]
    }

    public var reason: Reason
    /// Human-readable detail, e.g. which header or field was missing. Never contains the message body.
    public var detail: String

    public init(_ reason: Reason, _ detail: String) {
        self.reason = reason
        self.detail = detail
    }

    public var description: String { "\(reason.code): \(detail)" }
}
