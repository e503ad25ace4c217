import ArgumentParser
import DedupCore

/// `dedupd config-reference`: the generated block of docs/configuration.md.
struct ConfigReference: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "config-reference",
        abstract: "Print the configuration reference (Markdown): every key, its default, variable, flag and meaning.")

    /// The `dedupd run` flag of each key (WorkerOptions), for the reference's flag column.
    static let flags: [String: String] = [
        "kafka.bootstrap_servers": "--bootstrap-servers", "kafka.topics": "--topic", "kafka.group": "--group",
        "redis.url": "--redis-url", "dedup.key": "--key", "dedup.window": "--window", "dedup.retention": "--retention",
        "handler.output": "--output", "run.stop_when_idle": "--stop-when-idle", "log.format": "--log-format",
        "log.level": "--log-level", "log.stats_interval": "--stats-interval", "http.port": "--http-port",
    ]

    func run() throws { print(ConfigSchema.referenceMarkdown(flags: Self.flags), terminator: "") }
}
