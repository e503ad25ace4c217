import CRdKafka

/// The one error type of KafkaIO: what failed (`code`), librdkafka's own error when there is one, and whether
/// trying again can help.
public struct KafkaError: Error, Sendable, CustomStringConvertible {
    /// What kind of operation failed. A struct over a private enum so new codes are not a breaking change.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        private enum Kind: String, Sendable {
            case config, client, consume, produce, commit, timeout, queueFull, closed, metadata, offsets, partitions
        }

        private let kind: Kind
        private init(_ kind: Kind) { self.kind = kind }

        /// A configuration property was rejected, or a handle could not be created from the configuration.
        public static let config = Code(.config)
        /// A client-wide error reported by librdkafka's error callback.
        public static let client = Code(.client)
        /// A consumed message carried an error instead of data.
        public static let consume = Code(.consume)
        /// A message could not be enqueued or was not delivered.
        public static let produce = Code(.produce)
        /// Offsets could not be committed.
        public static let commit = Code(.commit)
        /// A bounded wait ended before the operation finished.
        public static let timeout = Code(.timeout)
        /// The producer's local queue stayed full.
        public static let queueFull = Code(.queueFull)
        /// The handle was already closed.
        public static let closed = Code(.closed)
        /// Cluster metadata (topics, partitions) could not be read.
        public static let metadata = Code(.metadata)
        /// Offsets could not be stored, read, or queried.
        public static let offsets = Code(.offsets)
        /// Pause, resume or assignment of partitions failed.
        public static let partitions = Code(.partitions)

        public var description: String { kind.rawValue }
    }

    public var code: Code
    public var message: String
    /// librdkafka's `rd_kafka_resp_err_t` value, when the failure came from librdkafka.
    public var errorNumber: Int32?
    /// librdkafka's symbolic name for `errorNumber` (`rd_kafka_err2name`), e.g. `_TIMED_OUT`.
    public var errorName: String?
    /// Whether the same call may succeed if tried again (broker moved, coordinator loading, timeout, queue full).
    public var isRetriable: Bool

    public init(code: Code, message: String, errorNumber: Int32? = nil, errorName: String? = nil, isRetriable: Bool = false) {
        self.code = code
        self.message = message
        self.errorNumber = errorNumber
        self.errorName = errorName
        self.isRetriable = isRetriable
    }

    /// An error from a librdkafka `rd_kafka_resp_err_t`; the text is librdkafka's own (`rd_kafka_err2str`)
    /// unless `message` is given.
    init(code: Code, err: rd_kafka_resp_err_t, message: String? = nil) {
        let name = String(cString: rd_kafka_err2name(err))
        let text = String(cString: rd_kafka_err2str(err))
        var code = code
        if err == RD_KAFKA_RESP_ERR__TIMED_OUT { code = .timeout }
        self.init(
            code: code,
            message: message.map { "\($0): \(text)" } ?? text,
            errorNumber: err.rawValue,
            errorName: name,
            isRetriable: KafkaError.retriable(err)
        )
    }

    public var description: String {
        if let errorName { return "KafkaError.\(code)(\(errorName)): \(message)" }
        return "KafkaError.\(code): \(message)"
    }

    /// librdkafka marks retriability only on `rd_kafka_error_t`; for plain response codes this is the list of
    /// transient conditions (leadership moves, coordinator changes, timeouts, transport).
    static func retriable(_ err: rd_kafka_resp_err_t) -> Bool {
        let transient: [rd_kafka_resp_err_t] = [
            RD_KAFKA_RESP_ERR__TIMED_OUT, RD_KAFKA_RESP_ERR__TRANSPORT, RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN,
            RD_KAFKA_RESP_ERR__QUEUE_FULL, RD_KAFKA_RESP_ERR__WAIT_COORD, RD_KAFKA_RESP_ERR__TIMED_OUT_QUEUE,
            RD_KAFKA_RESP_ERR__RETRY, RD_KAFKA_RESP_ERR__MSG_TIMED_OUT,
            RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT, RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE,
            RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION, RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS,
            RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE, RD_KAFKA_RESP_ERR_NOT_COORDINATOR,
            RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS, RD_KAFKA_RESP_ERR_NETWORK_EXCEPTION,
            RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS, RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS_AFTER_APPEND,
            RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART, RD_KAFKA_RESP_ERR_BROKER_NOT_AVAILABLE,
        ]
        return transient.contains(err)
    }
}
