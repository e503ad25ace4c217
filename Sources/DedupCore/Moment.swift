/// A point on `ContinuousClock`, as the engine's tables store it.
///
/// `ContinuousClock.Instant` is not frozen (`_Concurrency` is built with library evolution), so
/// its size is known only at run time. Every struct that stores one is laid out at run time, and
/// is copied, moved and destroyed through the runtime's value witnesses; an optional one is
/// tested through its enum-tag witnesses. The entry table, the window's slots and the lease
/// queue hold a `Moment` instead: the instant's offset from the clock's epoch, a `Duration`,
/// which is frozen. Instants are converted where they come in (a `now` per call, not per
/// message) and where they go out.
public struct Moment: Comparable, Sendable {
    public var sinceEpoch: Duration

    public init(sinceEpoch: Duration) { self.sinceEpoch = sinceEpoch }

    public init(_ instant: ContinuousClock.Instant) {
        sinceEpoch = ContinuousClock().systemEpoch.duration(to: instant)
    }

    public var instant: ContinuousClock.Instant { ContinuousClock().systemEpoch.advanced(by: sinceEpoch) }

    public static func < (a: Moment, b: Moment) -> Bool { a.sinceEpoch < b.sinceEpoch }
    public static func + (a: Moment, d: Duration) -> Moment { Moment(sinceEpoch: a.sinceEpoch + d) }
    public static func - (a: Moment, d: Duration) -> Moment { Moment(sinceEpoch: a.sinceEpoch - d) }
}
