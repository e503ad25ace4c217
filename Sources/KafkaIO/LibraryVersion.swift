import CRdKafka

/// The librdkafka this process runs with (the shared library's own answer, not the headers').
public enum LibrdkafkaVersion {
    public static var string: String { String(cString: rd_kafka_version_str()) }
}
