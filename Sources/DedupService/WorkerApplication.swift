import DedupCore
import Logging
import ServiceLifecycle

extension Worker {
    /// Runs a worker as `dedupd run` does, until SIGTERM/SIGINT (or idle with
    /// `run.stop_when_idle`): metrics and the health endpoint on `http.port` when set, the
    /// graceful shutdown bounded by `run.shutdown_deadline` (past it, handlers still running are
    /// cancelled and their messages stay uncommitted), and a second signal exiting at once.
    /// `dedupd run` and library users with their own handlers (`handler` for the default route,
    /// `routeHandlers` by route name) share this wiring. Bootstrap logging first
    /// (`OperationalLog.bootstrap`).
    public static func runService(
        config: WorkerConfiguration, handler: (any Handler)? = nil, routeHandlers: [String: any Handler] = [:],
        logger: Logger = Logger(label: "dedupd")
    ) async throws {
        let (registry, factory) = PrometheusSetup.make()
        BuildInfo.record(factory: factory)
        let telemetry = WorkerTelemetry(
            factory: factory, statsInterval: config.statsInterval, stallTimeout: config.loopStallTimeout, logger: logger,
            routeNames: ["default"] + config.routes.map(\.name))
        let worker = try Worker(
            config: config, handler: handler, routeHandlers: routeHandlers, logger: logger, telemetry: telemetry)
        var services: [ServiceGroupConfiguration.ServiceConfiguration] = []
        // Listed first so it stops last: /readyz says "shutting down" while the worker drains.
        if let port = config.httpPort {
            services.append(.init(service: HTTPEndpoint(port: port, bind: config.httpBind, registry: registry, telemetry: telemetry, logger: logger)))
        }
        services.append(.init(service: worker, successTerminationBehavior: .gracefullyShutdownGroup))
        var groupConfig = ServiceGroupConfiguration(
            services: services,
            gracefulShutdownSignals: [.sigterm, .sigint],
            logger: logger)
        groupConfig.maximumGracefulShutdownDuration = config.shutdownDeadline
        let escalation = SignalEscalation(logger: logger)
        try await ServiceGroup(configuration: groupConfig).run()
        withExtendedLifetime(escalation) {}
    }
}
