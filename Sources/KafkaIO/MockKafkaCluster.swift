import CRdKafka
import Logging

/// librdkafka's in-process mock Kafka cluster (real wire protocol), hosted by a producer handle made only for it.
/// For tests and the demo; production talks to a real cluster.
///
/// `@unchecked Sendable`: the mock cluster's functions post requests to its own thread and are safe to call from
/// any thread; both pointers are immutable and freed only in `deinit`.
public final class MockKafkaCluster: @unchecked Sendable {
    private let host: OpaquePointer
    private let cluster: OpaquePointer
    private let context: ClientContext
    /// The cluster's `bootstrap.servers` list (loopback ports chosen by librdkafka).
    public let bootstrapServers: String
    public let brokerCount: Int

    private init(host: OpaquePointer, cluster: OpaquePointer, context: ClientContext, brokerCount: Int) {
        self.host = host
        self.cluster = cluster
        self.context = context
        self.brokerCount = brokerCount
        self.bootstrapServers = String(cString: rd_kafka_mock_cluster_bootstraps(cluster))
    }

    /// Starts a cluster of `brokers` brokers with ids 1...brokers.
    public static func make(brokers: Int, logger: Logger) throws(KafkaError) -> MockKafkaCluster {
        let conf = try KafkaConfig.makeConf(overrides: [:])
        let context = ClientContext(logger: logger)
        let host = try KafkaConfig.makeHandle(type: RD_KAFKA_PRODUCER, conf: conf, context: context)
        guard let cluster = rd_kafka_mock_cluster_new(host, Int32(clamping: brokers)) else {
            rd_kafka_destroy(host)
            throw KafkaError(code: .config, message: "cannot start a mock cluster of \(brokers) brokers")
        }
        logger.info("mock kafka cluster started", metadata: [
            "kafka.bootstrap": .string(String(cString: rd_kafka_mock_cluster_bootstraps(cluster))),
            "kafka.brokers": .stringConvertible(brokers),
        ])
        return MockKafkaCluster(host: host, cluster: cluster, context: context, brokerCount: brokers)
    }

    deinit {
        rd_kafka_mock_cluster_destroy(cluster)
        rd_kafka_destroy(host)
    }

    /// Creates a topic (the mock also auto-creates unknown topics on first use, with its default partition count).
    public func createTopic(_ name: String, partitions: Int32, replicationFactor: Int32 = 1) throws(KafkaError) {
        let err = rd_kafka_mock_topic_create(cluster, name, partitions, replicationFactor)
        if err != RD_KAFKA_RESP_ERR_NO_ERROR { throw KafkaError(code: .metadata, err: err, message: "create topic \(name)") }
    }

    /// Makes a broker unreachable (its connections are closed and new ones refused).
    public func setBrokerDown(_ id: Int32) {
        _ = rd_kafka_mock_broker_set_down(cluster, id)
    }

    public func setBrokerUp(_ id: Int32) {
        _ = rd_kafka_mock_broker_set_up(cluster, id)
    }

    /// Delays every answer of `broker` by `rtt` (zero: no delay).
    public func setBrokerRoundTrip(_ id: Int32, _ rtt: Duration) {
        _ = rd_kafka_mock_broker_set_rtt(cluster, id, Int32(rtt / .milliseconds(1)))
    }

    /// Moves a partition's leadership to `broker`.
    public func setPartitionLeader(topic: String, partition: Int32, broker: Int32) {
        _ = rd_kafka_mock_partition_set_leader(cluster, topic, partition, broker)
    }

    /// Makes `broker` the coordinator of consumer group `group`.
    public func setCoordinator(group: String, broker: Int32) {
        _ = rd_kafka_mock_coordinator_set(cluster, "group", group, broker)
    }

    /// Answers metadata requests for `topic` with the error librdkafka names `errorName` (without
    /// its `RD_KAFKA_RESP_ERR_` prefix: `UNKNOWN_TOPIC_OR_PART`, `TOPIC_AUTHORIZATION_FAILED`), as a
    /// cluster without the topic, or without the permission to describe it, does; `NO_ERROR`
    /// clears it. The mock otherwise creates every topic a client asks about. Returns false for a
    /// name librdkafka does not know.
    public func setTopicError(_ topic: String, _ errorName: String) -> Bool {
        var descs: UnsafePointer<rd_kafka_err_desc>?
        var count = 0
        rd_kafka_get_err_descs(&descs, &count)
        guard let descs else { return false }
        for i in 0..<count {
            guard let name = descs[i].name, String(cString: name) == errorName else { continue }
            rd_kafka_mock_topic_set_error(cluster, topic, descs[i].code)
            return true
        }
        return false
    }
}
