import DedupCore
import Logging

/// The built-in handler kinds (`handler.type`), made from the configuration. A library user who
/// wants another passes their own `Handler` to `Worker(config:handler:)` instead (see
/// `Examples/CustomHandler` and the `dedupd-example-handler` target).
public enum BuiltinHandlers {
    /// The handler of one route's settings; `bootstrapServers` and `kafkaProperties` are the
    /// worker's (a `kafka` handler forwards to the same cluster).
    public static func make(
        _ h: HandlerSettings, bootstrapServers: String, kafkaProperties: [String: String], logger: Logger
    ) throws -> any Handler {
        switch h.type {
        case "kafka":
            // Validation guarantees the topic for this kind.
            return try KafkaForwardHandler.make(
                bootstrapServers: bootstrapServers, topic: h.topic ?? "",
                timeout: h.timeout, properties: kafkaProperties, logger: logger)
        case "http":
            return try HTTPHandler(url: h.url ?? "", timeout: h.timeout)
        case "exec":
            return ExecHandler(command: h.command ?? "", timeout: h.timeout)
        default:
            return try LogOutputHandler(path: h.output)
        }
    }

    /// The default route's handler.
    public static func make(config: WorkerConfiguration, logger: Logger) throws -> any Handler {
        try make(config.handler, bootstrapServers: config.bootstrapServers, kafkaProperties: config.kafkaProperties, logger: logger)
    }
}
