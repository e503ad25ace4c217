/// Deterministic test traffic: submissions (order posts) of which a fraction are repeats of
/// earlier ones, as double clicks (soon after the original) and client retries (later).
/// Used by `dedupd produce`, the demo, tests and the benchmark.
public struct SubmissionGenerator: Sendable {
    public struct Submission: Sendable {
        /// The submission's id, also its `message-id` header: `<prefix>-<n>` with n from 0.
        public var id: String
        public var isRepeat: Bool
        public var message: (key: [UInt8], value: [UInt8], headers: [MessageHeader])
    }

    public let prefix: String
    public let duplicateRatio: Double
    /// Of the repeats, the share that repeat an id sent long before (a retry) rather than one of
    /// the last few (a double click).
    public let lateShare: Double
    private var rng: SplitMix64
    public private(set) var uniqueCount = 0
    public private(set) var repeatCount = 0

    public init(prefix: String = "ord", duplicateRatio: Double, lateShare: Double = 0.3, seed: UInt64 = 42) {
        self.prefix = prefix
        self.duplicateRatio = duplicateRatio
        self.lateShare = lateShare
        self.rng = SplitMix64(seed: seed)
    }

    public mutating func next() -> Submission {
        let isRepeat = uniqueCount > 0 && Double.random(in: 0..<1, using: &rng) < duplicateRatio
        let n: Int
        if isRepeat {
            repeatCount += 1
            if Double.random(in: 0..<1, using: &rng) < lateShare {
                n = Int.random(in: 0..<uniqueCount, using: &rng)
            } else {
                n = max(0, uniqueCount - 1 - Int.random(in: 0..<min(uniqueCount, 8), using: &rng))
            }
        } else {
            n = uniqueCount
            uniqueCount += 1
        }
        let id = "\(prefix)-\(n)"
        return Submission(id: id, isRepeat: isRepeat, message: Self.message(id: id, n: n))
    }

    /// The same id always gives the same bytes, so content signatures (`sha256:value`) match too.
    static func message(id: String, n: Int) -> (key: [UInt8], value: [UInt8], headers: [MessageHeader]) {
        var h = SplitMix64(seed: UInt64(truncatingIfNeeded: n) &* 0x9E37_79B9_7F4A_7C15)
        let user = "u-\(h.next() % 5000)"
        let sku = "SKU-\(h.next() % 900 + 100)"
        let qty = h.next() % 5 + 1
        let cents = h.next() % 50_000 + 100
        let amount = "\(cents / 100).\(cents % 100 < 10 ? "0" : "")\(cents % 100)"
        let body = """
            {"orderNo":"\(id)","userId":"\(user)","items":[{"sku":"\(sku)","qty":\(qty)}],"amount":\(amount),"currency":"EUR","channel":"web"}
            """
        return (
            Array(user.utf8), Array(body.utf8),
            [
                MessageHeader(name: "message-id", value: Array(id.utf8)),
                MessageHeader(name: "content-type", value: Array("application/json".utf8)),
            ]
        )
    }
}

/// A small, fast, seedable generator, so test traffic is the same on every run.
public struct SplitMix64: RandomNumberGenerator, Sendable {
    var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
