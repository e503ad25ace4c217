import DedupCore
import Foundation
import KafkaIO
import LocalServers
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The benchmark's stream: `SubmissionGenerator`'s orders (the same ids, repeats and record keys
/// as `dedupd produce`), values padded to about `valueBytes`, and a `bench-ts` header holding the
/// wall-clock time of the send in microseconds, from which the latency leg measures.
struct BenchTraffic {
    var generator: SubmissionGenerator
    let valueBytes: Int

    init(duplicateRatio: Double, valueBytes: Int, prefix: String, seed: UInt64 = 7) {
        generator = SubmissionGenerator(prefix: prefix, duplicateRatio: duplicateRatio, seed: seed)
        self.valueBytes = valueBytes
    }

    /// The header holding the send time (wall clock, µs, decimal).
    static let timestampHeader = "bench-ts"

    var uniqueCount: Int { generator.uniqueCount }

    mutating func next() -> (key: [UInt8], value: [UInt8], headers: [MessageHeader]) {
        var m = generator.next().message
        // `{...}` → `{...,"pad":"xxx"}`: the same id always gives the same bytes.
        let missing = valueBytes - m.value.count - 10
        if missing > 0, m.value.last == UInt8(ascii: "}") {
            m.value.removeLast()
            m.value.append(contentsOf: Array(#","pad":""#.utf8))
            m.value.append(contentsOf: repeatElement(UInt8(ascii: "x"), count: missing))
            m.value.append(contentsOf: Array(#""}"#.utf8))
        }
        m.headers.append(MessageHeader(name: Self.timestampHeader, value: Array(String(wallMicros()).utf8)))
        return m
    }
}

/// Wall-clock microseconds (CLOCK_REALTIME): comparable across the bench and its child worker.
func wallMicros() -> Int64 {
    var ts = timespec()
    clock_gettime(CLOCK_REALTIME, &ts)
    return Int64(ts.tv_sec) * 1_000_000 + Int64(ts.tv_nsec) / 1000
}

/// A count shared between a reader thread and the producer that paces itself by it.
final class SharedCount: Sendable {
    private let value = Mutex(0)
    func set(_ v: Int) { value.withLock { $0 = v } }
    var current: Int { value.withLock { $0 } }
}

enum BenchProducer {
    struct Report: Sendable {
        var sent: Int
        var unique: Int
        var failed: Int
    }

    /// Sends `count` messages of the bench stream to `topic`.
    ///
    /// The mock cluster keeps only about the newest 5 MB per partition, so the stream cannot be
    /// preloaded: it is produced while it is consumed, never more than `maxLead` messages ahead
    /// of what `consumed()` reports (sized so the unread part stays well under the trim point).
    /// `rate` paces it (messages per second) for the latency leg.
    static func run(
        producer: KafkaProducer, topic: String, count: Int, traffic: inout BenchTraffic,
        maxLead: Int, rate: Int? = nil, consumed: @Sendable () -> Int, alive: @Sendable () -> Bool = { true }
    ) async throws -> Report {
        let started = ContinuousClock.now
        for i in 0..<count {
            if i & 63 == 0 {
                var waited = 0
                // Hysteresis: once the lead is used up, wait until half of it was read, then send
                // in one burst. Trickling a few messages at a time makes tiny batches, and the
                // mock broker's fetch path scans a partition's batches one by one.
                if i - consumed() > maxLead {
                    while i - consumed() > maxLead / 2 {
                        guard alive(), waited < 60_000 else { throw LocalServerError("consumer stopped at \(consumed()) of \(count)") }
                        try await Task.sleep(for: .milliseconds(1))
                        waited += 1
                    }
                }
                while i - consumed() > maxLead {
                    // A consumer that stopped, or made no progress for a minute, ends the leg.
                    guard alive(), waited < 60_000 else { throw LocalServerError("consumer stopped at \(consumed()) of \(count)") }
                    try await Task.sleep(for: .milliseconds(1))
                    waited += 1
                }
            }
            if let rate, i & 7 == 0 {
                let due = started + .nanoseconds(Int64(Double(i) / Double(rate) * 1e9))
                if due > ContinuousClock.now { try await Task.sleep(until: due, clock: .continuous) }
            }
            let m = traffic.next()
            try producer.send(topic: topic, key: m.key, value: m.value, headers: m.headers)
        }
        try await producer.flush(timeout: .seconds(120))
        let counts = producer.deliveryCounts
        return Report(sent: counts.delivered, unique: traffic.uniqueCount, failed: counts.failed)
    }
}
