import DedupCore
import Logging

/// The periodic `stats` line: totals since start, the pipeline's current state, and rates per
/// second since the previous line.
struct StatsReporter: Sendable {
    let interval: Duration
    let logger: Logger
    var last: ContinuousClock.Instant
    var lastCounters = DedupCounters()

    init(interval: Duration, logger: Logger, now: ContinuousClock.Instant) {
        self.interval = interval
        self.logger = logger
        self.last = now
    }

    func isDue(now: ContinuousClock.Instant) -> Bool { interval > .zero && now - last >= interval }

    mutating func tick(_ s: WorkerTelemetry.Snapshot, lag: Int64?, inFlightPeak: Int, roundTrip: RoundTripPercentiles?) {
        guard isDue(now: s.now) else { return }
        logger.info("stats", metadata: Self.fields(s, previous: lastCounters, seconds: Self.seconds(s.now - last),
                                                 lag: lag, inFlightPeak: inFlightPeak, roundTrip: roundTrip))
        last = s.now
        lastCounters = s.counters
    }

    static func seconds(_ d: Duration) -> Double { Double(d.milliseconds) / 1000 }

    /// The line's fields; a pure function so a test can check the figures of a known run.
    static func fields(
        _ s: WorkerTelemetry.Snapshot, previous p: DedupCounters, seconds: Double, lag: Int64?, inFlightPeak: Int,
        roundTrip: RoundTripPercentiles?
    ) -> Logger.Metadata {
        let c = s.counters
        func rate(_ a: Int, _ b: Int) -> Logger.MetadataValue {
            "\(Int((Double(a - b) / max(seconds, 0.001)).rounded()))"
        }
        var m: Logger.Metadata = [
            "consumed": "\(c.consumed)", "dispatched": "\(c.dispatched)",
            "duplicates.local": "\(c.duplicatesLocal)", "duplicates.redis": "\(c.duplicatesStore)",
            "invalid": "\(c.invalid)", "failed": "\(c.failed)", "released": "\(c.released)",
            "dead_lettered": "\(c.deadLettered)", "rejected_transitions": "\(c.rejectedTransitions)",
            "parked": "\(s.parked)", "buffer.messages": "\(s.bufferMessages)", "buffer.bytes": "\(s.bufferBytes)",
            "handlers.in_flight.peak": "\(inFlightPeak)",
            "kafka.partitions": "\(s.assignment.count)",
            "kafka.rebalances": "\(c.rebalances)",
            "kafka.partitions.assigned": "\(c.partitionsAssigned)",
            "kafka.partitions.revoked": "\(c.partitionsRevoked)",
            "kafka.partitions.lost": "\(c.partitionsLost)",
            "reread": "\(c.rereadAfterRebalance)",
            "kafka.lag": lag.map { "\($0)" } ?? "unknown",
            "rate.consumed": rate(c.consumed, p.consumed),
            "rate.dispatched": rate(c.dispatched, p.dispatched),
            "rate.duplicates": rate(c.duplicates, p.duplicates),
        ]
        if let rt = roundTrip {
            m["redis.round_trips"] = "\(rt.count)"
            m["redis.rtt.p50"] = "\(formatMillis(rt.p50))"
            m["redis.rtt.p99"] = "\(formatMillis(rt.p99))"
        } else {
            m["redis.round_trips"] = "0"
        }
        return m
    }

    /// `0.42ms`, `3.1ms`, `250ms`: round trips are usually well under a millisecond on a LAN.
    static func formatMillis(_ d: Duration) -> String {
        let ms = Double(d.nanoseconds) / 1_000_000
        if ms < 10 { return String(format2: ms) + "ms" }
        return "\(Int(ms.rounded()))ms"
    }
}

extension String {
    /// Two decimals without Foundation's formatter.
    init(format2 value: Double) {
        let hundredths = Int((value * 100).rounded())
        let frac = hundredths % 100
        self = "\(hundredths / 100)." + (frac < 10 ? "0\(frac)" : "\(frac)")
    }
}
