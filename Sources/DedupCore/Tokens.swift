/// Token mode (the classic "form token"): a server issues a one-time token before it renders a
/// form; the submission carries it back; the first message that uses an issued, unexpired
/// token is accepted and uses it up, atomically. Every other use is refused with its own
/// reason: unknown, expired, reused.
public enum TokenOutcome: Sendable, Equatable {
    /// Issued, not expired, and now used by this message (or already used by this very message:
    /// a redelivery after a crash is not a reuse).
    case accepted
    case unknown
    case expired
    case reused

    public var refusal: BadInput.Reason? {
        switch self {
        case .accepted: nil
        case .unknown: .tokenUnknown
        case .expired: .tokenExpired
        case .reused: .tokenReused
        }
    }
}

/// Where tokens are issued and used. Like `ClaimStore`, a whole batch costs one round trip.
public protocol TokenStore: Sendable {
    /// Stores `tokens` as issued and usable for `ttl`. Expired tokens are still recognised as
    /// expired (not unknown) for `memory` afterwards.
    func issue(_ tokens: [String], ttl: Duration, memory: Duration) async throws
    /// Uses each token for the message identified by its `mark` (topic/partition/offset).
    func use(_ tokens: [String], marks: [String]) async throws -> [TokenOutcome]
}

public enum TokenKey {
    /// The Redis key of a token: beside the route's dedup keys, under `token:`.
    public static func storeKey(_ token: String, namespace: String, prefix: String = "dedupd") -> String {
        "\(prefix):\(namespace):token:\(token)"
    }

    /// Identifies a message, so that using a token twice for the same message is not a reuse.
    public static func mark(for m: InboundMessage) -> String { "\(m.topic)/\(m.partition)/\(m.offset)" }

    /// A new random token: 128 bits, hex.
    public static func random() -> String {
        var rng = SystemRandomNumberGenerator()
        return KeyTemplate.hex((0..<16).map { _ in UInt8.random(in: 0...255, using: &rng) })
    }
}
