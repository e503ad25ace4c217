import CRdKafka
import DedupCore
import Logging

/// Reaches a cluster once, as `dedupd check-config --connect` does: a client made with the
/// worker's properties (TLS, SASL) asks for each topic's metadata. Nothing is consumed, produced
/// or joined, and no topic is created (a consumer's metadata requests do not ask for that).
public enum KafkaProbe {
    /// What the cluster says of one topic.
    public enum Topic: Sendable, Equatable {
        case partitions(Int)
        /// Missing, not authorized, or another error the cluster gave for it.
        case refused(String)
    }

    /// Each of `topics` as the cluster at `bootstrapServers` sees it. Throws `KafkaError` with
    /// code `.metadata` when no broker answers within `timeout`, with the client errors that say
    /// why (connection refused, TLS, authentication).
    public static func topics(
        _ topics: [String], bootstrapServers: String, properties: [String: String], timeout: Duration
    ) throws(KafkaError) -> [Topic] {
        var defaults = KafkaConsumer.defaultProperties
        defaults["bootstrap.servers"] = bootstrapServers
        defaults["group.id"] = "dedupd-check"
        var overrides = properties
        overrides["allow.auto.create.topics"] = "false"
        let conf = try KafkaConfig.makeConf(defaults: defaults, overrides: overrides)
        // librdkafka's own lines repeat what the thrown error says; the errors are kept for it.
        var quiet = Logger(label: "dedupd.kafka-probe")
        quiet.logLevel = .critical
        let context = ClientContext(logger: quiet, recordErrors: true)
        let rk = try KafkaConfig.makeHandle(type: RD_KAFKA_CONSUMER, conf: conf, context: context)
        defer { rd_kafka_destroy_flags(rk, RD_KAFKA_DESTROY_F_NO_CONSUMER_CLOSE) }
        var result: [Topic] = []
        for topic in topics {
            do {
                result.append(.partitions(try KafkaConsumer.partitionIDs(rk, topic: topic, timeoutMs: timeout.kafkaMilliseconds).count))
            } catch {
                let err = error.errorNumber.map { rd_kafka_resp_err_t(rawValue: $0) }
                guard err == RD_KAFKA_RESP_ERR__TRANSPORT || err == RD_KAFKA_RESP_ERR__TIMED_OUT else {
                    let text = err.map { String(cString: rd_kafka_err2str($0)) } ?? error.message
                    result.append(.refused(error.errorName.map { "\($0): \(text)" } ?? text))
                    continue
                }
                // Serve the error callback, which records why no broker answered.
                rd_kafka_poll(rk, 0)
                var reasons: [String] = []
                for case .error(let e) in context.takeEvents() {
                    // "... failed: Connection refused (after 0ms in state CONNECT, 1 identical error(s) suppressed)"
                    let reason = e.message.range(of: " (after ").map { String(e.message[..<$0.lowerBound]) } ?? e.message
                    if !reasons.contains(reason) { reasons.append(reason) }
                }
                let why = reasons.isEmpty ? "" : ": " + reasons.suffix(3).joined(separator: "; ")
                throw KafkaError(code: .metadata, message: "no broker answered within \(WorkerConfiguration.format(timeout))\(why)", errorNumber: error.errorNumber, errorName: error.errorName)
            }
        }
        return result
    }
}
