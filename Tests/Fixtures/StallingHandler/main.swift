// A worker whose handler blocks the thread it runs on, for the watchdog test: every handler call
// sleeps in the kernel, so with handler.concurrency at least the cooperative pool's width every
// Swift task of the process stops, the loop included. Only the watchdog's own thread still runs.
// Not a pattern to copy: a handler must never block its thread.

import DedupCore
import DedupService
import Foundation
import Logging

struct ThreadBlockingHandler: Handler {
    func handle(_ dispatch: Dispatch) async throws {
        sleep(3600)
    }
}

@main
struct StallingWorker {
    static func main() async throws {
        let args = CommandLine.arguments
        let file = args.firstIndex(of: "--config").flatMap { $0 + 1 < args.count ? args[$0 + 1] : nil }
        let config = try ConfigLoader.load(file: file)
        OperationalLog.bootstrap(level: config.logLevel, format: config.logFormat)
        // The same wiring as `dedupd run`: the health endpoint and the watchdog included.
        try await Worker.runService(config: config, handler: ThreadBlockingHandler(), logger: Logger(label: "dedupd-stalling-worker"))
    }
}
