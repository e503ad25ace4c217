import DedupCore
import Logging

/// The built-in handler kinds (`handler.type`), made from the configuration. A library user who
/// wants another passes their own `Handler` to `Worker(config:handler:)` instead (see
/// `Examples/CustomHandler` and the `dedupd-example-handler` target).
public enum BuiltinHandlers {
    public static func make(config: WorkerConfiguration, logger: Logger) throws -> any Handler {
        switch config.handlerType {
        case "kafka":
            // Validation guarantees the topic for this kind.
            return try KafkaForwardHandler.make(
                bootstrapServers: config.bootstrapServers, topic: config.handlerTopic ?? "",
                timeout: config.handlerTimeout, properties: config.kafkaProperties, logger: logger)
        case "http":
            return try HTTPHandler(url: config.handlerURL ?? "", timeout: config.handlerTimeout)
        case "exec":
            return ExecHandler(command: config.handlerCommand ?? "", timeout: config.handlerTimeout)
        default:
            return try LogOutputHandler(path: config.handlerOutput)
        }
    }
}
