// A custom Swift handler for dedupd, as a library user writes one: implement `Handler`, hand it
// to `Worker.runService`, which runs the worker as `dedupd run` does. Everything else (consumer group,
// Redis claims, window, retries, dead letters, commits) is dedupd's.
//
//   swift run dedupd-example-handler --config dedupd.yaml      # or DEDUPD_* variables
//
// This one keeps a running total of order amounts per customer and prints a line per order.
// A handler that throws is retried with backoff; one that throws `PermanentFailure` is given up
// at once (dead-lettered when `dead_letter.topic` is set).

import DedupCore
import DedupService
import Foundation
import Logging
import Synchronization

/// Sums `amount` per `customer` of JSON orders; rejects orders without them for good.
final class OrderTotals: Handler {
    private let totals = Mutex<[String: Double]>([:])

    func handle(_ dispatch: Dispatch) async throws {
        guard let order = try? JSONSerialization.jsonObject(with: Data(dispatch.message.value)) as? [String: Any],
            let customer = order["customer"] as? String, let amount = (order["amount"] as? NSNumber)?.doubleValue
        else {
            // Retrying cannot fix a malformed order: give it up now.
            throw PermanentFailure("order without customer or amount")
        }
        let total = totals.withLock { t -> Double in
            t[customer, default: 0] += amount
            return t[customer]!
        }
        // The dedup key is the idempotency key: a downstream system that stores it can drop the
        // one repeat a crash between handling and confirming can cause.
        // Unbuffered: the line is out before `handle` returns, i.e. before the key is confirmed.
        FileHandle.standardOutput.write(Data("order \(dispatch.key.raw): customer=\(customer) amount=\(amount) total=\(total)\n".utf8))
    }
}

@main
struct ExampleHandler {
    static func main() async throws {
        let args = CommandLine.arguments
        let file = args.firstIndex(of: "--config").flatMap { $0 + 1 < args.count ? args[$0 + 1] : nil }
        let config = try ConfigLoader.load(file: file)
        OperationalLog.bootstrap(level: config.logLevel, format: config.logFormat)
        // The same wiring as `dedupd run`: health endpoint, shutdown deadline, signal escalation.
        try await Worker.runService(
            config: config, handler: OrderTotals(), logger: Logger(label: "dedupd-example-handler"))
    }
}
