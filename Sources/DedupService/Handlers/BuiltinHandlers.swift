import DedupCore
import Foundation
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
        switch h.kind {
        case .kafka(let topic):
            return try KafkaForwardHandler.make(
                bootstrapServers: bootstrapServers, topic: topic,
                timeout: h.timeout, properties: kafkaProperties, logger: logger)
        case .http(let url):
            return try HTTPHandler(
                url: url, timeout: h.timeout, concurrency: h.concurrency,
                tls: .init(caFile: h.tlsCAFile, certificateFile: h.tlsCertFile, keyFile: h.tlsKeyFile),
                headers: try resolveHeaders(h.headers))
        case .exec(let command):
            return ExecHandler(command: command, timeout: h.timeout)
        case .log(let output):
            return try LogOutputHandler(path: output)
        }
    }

    /// The default route's handler.
    public static func make(config: WorkerConfiguration, logger: Logger) throws -> any Handler {
        try make(config.handler, bootstrapServers: config.bootstrapServers, kafkaProperties: config.kafkaProperties, logger: logger)
    }

    /// `NAME=VALUE`, `NAME=env:VAR` or `NAME=file:PATH` (one trailing newline of the file dropped).
    /// An error names the header and where its value should have come from, never the value.
    static func resolveHeaders(
        _ specs: [String], environment: [String: String] = ProcessInfo.processInfo.environment
    ) throws -> [(String, String)] {
        try specs.map { spec in
            let parts = spec.split(separator: "=", maxSplits: 1).map { $0.trimmingCharacters(in: .whitespaces) }
            guard parts.count == 2 else { throw HandlerError(message: "handler.headers: an entry is not NAME=VALUE") }
            let (name, value) = (parts[0], parts[1])
            if value.hasPrefix("env:") {
                let variable = String(value.dropFirst(4))
                guard let v = environment[variable], !v.isEmpty else {
                    throw HandlerError(message: "handler.headers: \(name) comes from environment variable \(variable), which is not set")
                }
                return (name, v)
            }
            if value.hasPrefix("file:") {
                let path = String(value.dropFirst(5))
                guard let data = FileManager.default.contents(atPath: path) else {
                    throw HandlerError(message: "handler.headers: \(name) comes from file \(path), which cannot be read")
                }
                var text = String(decoding: data, as: UTF8.self)
                if text.hasSuffix("\n") { text.removeLast() }
                return (name, text)
            }
            return (name, value)
        }
    }
}
