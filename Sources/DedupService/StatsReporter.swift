import DedupCore
import Logging

/// The periodic `stats` line: totals since start and rates since the previous line.
struct StatsReporter {
    let interval: Duration
    let logger: Logger
    var last: ContinuousClock.Instant
    var lastCounters = DedupCounters()

    init(interval: Duration, logger: Logger, now: ContinuousClock.Instant) {
        self.interval = interval
        self.logger = logger
        self.last = now
    }

    mutating func tick(now: ContinuousClock.Instant, counters c: DedupCounters, engine: DedupEngine) {
        guard interval > .zero, now - last >= interval else { return }
        let seconds = Double((now - last).milliseconds) / 1000
        func rate(_ a: Int, _ b: Int) -> String { String(Int((Double(a - b) / max(seconds, 0.001)).rounded())) }
        logger.info(
            "stats",
            metadata: [
                "consumed": "\(c.consumed)", "dispatched": "\(c.dispatched)",
                "duplicates.local": "\(c.duplicatesLocal)", "duplicates.redis": "\(c.duplicatesStore)",
                "invalid": "\(c.invalid)", "failed": "\(c.failed)", "released": "\(c.released)",
                "parked": "\(engine.parkedCount)", "buffer.messages": "\(engine.buffer.count)",
                "buffer.bytes": "\(engine.buffer.bytes)",
                "rate.consumed": "\(rate(c.consumed, lastCounters.consumed))",
                "rate.dispatched": "\(rate(c.dispatched, lastCounters.dispatched))",
            ])
        last = now
        lastCounters = c
    }
}
