// A worker whose handler blocks the thread it runs on, for the watchdog test: every handler call
// sleeps in the kernel, so with handler.concurrency at least the cooperative pool's width every
// Swift task of the process stops, the loop included. Only the watchdog's own thread still runs.
// Not a pattern to copy: a handler must never block its thread.

import DedupCore
import DedupService
import Foundation
import Logging
import ServiceLifecycle

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
        let logger = Logger(label: "dedupd-stalling-worker")
        let (registry, factory) = PrometheusSetup.make()
        let telemetry = WorkerTelemetry(
            factory: factory, statsInterval: config.statsInterval, stallTimeout: config.loopStallTimeout, logger: logger)
        let worker = try Worker(config: config, handler: ThreadBlockingHandler(), logger: logger, telemetry: telemetry)
        var services: [ServiceGroupConfiguration.ServiceConfiguration] = []
        if let port = config.httpPort {
            services.append(.init(service: HTTPEndpoint(port: port, registry: registry, telemetry: telemetry, logger: logger)))
        }
        services.append(.init(service: worker, successTerminationBehavior: .gracefullyShutdownGroup))
        let group = ServiceGroup(configuration: .init(services: services, gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        try await group.run()
    }
}
