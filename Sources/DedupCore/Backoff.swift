/// Exponential backoff with jitter for handler retries and store reconnects.
public struct Backoff: Sendable, Equatable {
    public var initial: Duration
    public var maximum: Duration
    public var multiplier: Double

    public init(initial: Duration = .milliseconds(100), maximum: Duration = .seconds(5), multiplier: Double = 2) {
        self.initial = initial
        self.maximum = maximum
        self.multiplier = multiplier
    }

    /// Delay before retry number `attempt` (1-based), without jitter.
    public func delay(attempt: Int) -> Duration {
        let factor = pow(multiplier, Double(max(0, attempt - 1)))
        let ms = min(Double(maximum.milliseconds), Double(initial.milliseconds) * factor)
        return .milliseconds(Int64(ms))
    }

    /// The same delay with "equal jitter": between half and all of it, so workers that failed
    /// together do not retry together.
    public func jittered<G: RandomNumberGenerator>(attempt: Int, using rng: inout G) -> Duration {
        let d = delay(attempt: attempt).milliseconds
        guard d > 1 else { return .milliseconds(d) }
        return .milliseconds(d / 2 + Int64.random(in: 0...(d / 2), using: &rng))
    }
}

private func pow(_ a: Double, _ b: Double) -> Double {
    var r = 1.0
    var i = 0.0
    while i < b { r *= a; i += 1 }
    return r
}
