import DedupCore
import Logging

/// The worker's event log lines: its start, the engine's reports, the shutdown summary.
extension Worker {
    func logStart() {
        logger.info(
            "worker started",
            metadata: [
                "dedup.owner": "\(owner)", "kafka.group": "\(config.group)",
                "kafka.topics": "\(config.topics.joined(separator: ","))",
                "dedup.key": "\(config.dedup.template)", "dedup.window": "\(WorkerConfiguration.format(config.dedup.window))",
                "dedup.retention": "\(WorkerConfiguration.format(config.dedup.retention))",
                "handler.type": "\(config.handler.type)", "kafka.rebalance": "\(config.rebalance.rawValue)",
            ])
        for route in config.routes {
            logger.info(
                "route",
                metadata: [
                    "route.name": "\(route.name)", "route.match": "\(route.match)", "dedup.key": "\(route.dedup.template)",
                    "dedup.namespace": "\(route.dedup.namespace)", "dedup.window": "\(WorkerConfiguration.format(route.dedup.window))",
                    "dedup.keep": "\(route.dedup.keep.rawValue)", "handler.type": "\(route.handler.type)",
                    "handler.concurrency": "\(route.handler.concurrency)",
                ])
        }
        if !config.routes.isEmpty {
            logger.info("unmatched messages", metadata: ["routing.unmatched": "\(config.unmatched.rawValue)"])
        }
    }

    func log(_ report: DedupEngine.Report) {
        switch report {
        case .badInput(let bad, let message):
            logger.warning(
                "bad input, not dispatched",
                metadata: [
                    "dedup.reason": "\(bad.reason.code)", "error": "\(bad.detail)",
                    "kafka.topic": "\(message.topic)", "kafka.partition": "\(message.partition)",
                    "kafka.offset": "\(message.offset)",
                ])
        case .handlerGaveUp(let dispatch, let error, let attempts):
            logger.error(
                deadLetters == nil
                    ? "handler gave up; message not dispatched, claim released"
                    : "handler gave up; message dead-lettered, claim released",
                metadata: [
                    "dedup.key": "\(dispatch.key.raw)", "kafka.topic": "\(dispatch.message.topic)",
                    "kafka.partition": "\(dispatch.message.partition)", "kafka.offset": "\(dispatch.message.offset)",
                    "handler.attempts": "\(attempts)", "error": "\(error)",
                ])
        case .confirmConflict(let key, let other):
            logger.warning(
                "confirm found another owner: the lease ran out while this copy was in the handler, so another worker may have dispatched the key too; raise dedup.lease",
                metadata: ["dedup.key": "\(key.raw)", "dedup.other_owner": "\(other)"])
        case .storeDown(let error, let cause):
            let message: Logger.Message = switch (cause, config.failOpen) {
            case (.unavailable, false):
                "redis unavailable, pausing consumption until it answers (fail-closed: nothing unclaimed is dispatched)"
            case (.unavailable, true):
                "redis unavailable; on_store_error=fail_open: dispatching without claims until it answers (repeats outside the window will pass)"
            case (.refused, false):
                "redis refused dedupd's commands (authentication or permissions), pausing consumption until it accepts them (fail-closed: nothing unclaimed is dispatched)"
            case (.refused, true):
                "redis refused dedupd's commands (authentication or permissions); on_store_error=fail_open: dispatching without claims until it accepts them (repeats outside the window will pass)"
            case (.full, false):
                "redis is full (maxmemory with noeviction refuses writes), pausing consumption until it has room (fail-closed: nothing unclaimed is dispatched)"
            case (.full, true):
                "redis is full (maxmemory with noeviction refuses writes); on_store_error=fail_open: dispatching without claims until it has room (repeats outside the window will pass)"
            }
            logger.error(message, metadata: ["error": "\(error)"])
        case .storeUp(let downFor):
            logger.notice("redis reachable again, resuming", metadata: ["redis.down_for": "\(WorkerConfiguration.format(downFor))"])
        case .deadLettersFailing(let pending, let error):
            logger.error(
                "dead-letter topic did not acknowledge; keeping those messages unresolved and retrying",
                metadata: ["dead_letter.topic": "\(deadLetters?.topic ?? "")", "dead_letter.pending": "\(pending)", "error": "\(error)"])
        case .deadLettersAcknowledged(let downFor):
            logger.notice("dead-letter topic acknowledging again", metadata: [
                "dead_letter.topic": "\(deadLetters?.topic ?? "")", "dead_letter.down_for": "\(WorkerConfiguration.format(downFor))"])
        case .revokedWithWindow(let released):
            logger.info(
                "partitions revoked with messages in the window; releasing their claims",
                metadata: ["dedup.released": "\(released)"])
        case .revokedWithHandler(let inFlight):
            logger.info(
                "partitions revoked with messages in a handler; their claims stay until it finishes",
                metadata: ["dispatch.in_flight": "\(inFlight)"])
        case .bufferFull(let messages, let bytes):
            logger.info("buffer full, pausing consumption", metadata: ["held.messages": "\(messages)", "held.bytes": "\(bytes)"])
        case .bufferDrained:
            logger.info("buffer drained, resuming consumption")
        case .idle(let idle):
            logger.info("idle, stopping", metadata: ["run.stop_when_idle": "\(WorkerConfiguration.format(idle))"])
        case .drainingWindow(let messages, let within):
            logger.info(
                "finishing the window before leaving the group",
                metadata: ["buffer.messages": "\(messages)", "run.drain": "\(WorkerConfiguration.format(within))"])
        case .rejectedTransition(let r):
            logger.info(
                r.deadLetter ? "transition not allowed; message dead-lettered, not dispatched" : "transition not allowed; message not dispatched",
                metadata: [
                    "guard.entity": "\(r.entity)", "guard.from": "\(r.from ?? "")", "guard.to": "\(r.to)",
                    "dedup.key": "\(r.key.raw)", "route": "\(routeName(r.route))", "kafka.topic": "\(r.message.topic)",
                    "kafka.partition": "\(r.message.partition)", "kafka.offset": "\(r.message.offset)",
                ])
        case .waitingForRound(let count):
            logger.info("waiting for the dispatch round in flight", metadata: ["dispatch.round": "\(count)"])
        }
    }

    /// A route's name as configured; the default route is `default`.
    func routeName(_ index: Int) -> String { index == 0 ? "default" : config.routes[index - 1].name }

    func logSummary(_ engine: DedupEngine, commitError: (any Error)?, elapsed: Duration) {
        let c = engine.counters
        let committed = engine.storedPositions.sorted { ($0.key.topic, $0.key.partition) < ($1.key.topic, $1.key.partition) }
        var metadata: Logger.Metadata = [
            "consumed": "\(c.consumed)", "dispatched": "\(c.dispatched)", "duplicates": "\(c.duplicates)",
            "duplicates.local": "\(c.duplicatesLocal)", "duplicates.redis": "\(c.duplicatesStore)",
            "invalid": "\(c.invalid)", "failed": "\(c.failed)", "released": "\(c.released)",
            "released.unconfirmed": "\(engine.unreleasedCount)",
            "renewed": "\(c.renewed)", "dead_lettered": "\(c.deadLettered)", "leases_lost": "\(c.leasesLost)", "unclaimed": "\(c.unclaimed)",
            "kafka.rebalances": "\(c.rebalances)", "kafka.partitions.assigned": "\(c.partitionsAssigned)",
            "kafka.partitions.revoked": "\(c.partitionsRevoked)", "kafka.partitions.lost": "\(c.partitionsLost)",
            "reread": "\(c.rereadAfterRebalance)", "rejected_transitions": "\(c.rejectedTransitions)",
            "kafka.committed": "\(committed.map { "\($0.key)=\($0.value)" }.joined(separator: ","))",
            "elapsed": "\(WorkerConfiguration.format(elapsed))",
        ]
        if let commitError { metadata["error"] = "\(commitError)" }
        if c.unconfirmedAtStop > 0 {
            logger.warning(
                "dispatched messages could not be confirmed before stopping (redis was down or refused the confirms until the shutdown deadline): the partition's next owner will dispatch them again",
                metadata: ["unconfirmed": "\(c.unconfirmedAtStop)"])
        }
        logger.notice(commitError == nil ? "shutdown complete, offsets committed" : "shutdown complete, final commit failed",
                      metadata: metadata)
    }
}
