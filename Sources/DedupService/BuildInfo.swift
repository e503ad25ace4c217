import KafkaIO
import Metrics
import RedisIO

/// What `dedupd --version` prints and the `dedupd_build_info` metric carries.
public enum BuildInfo {
    /// Bumped with each release; CHANGELOG.md lists what each one changed.
    public static let version = "0.1.0"
    /// The source commit. The container image's build sets it (`--build-arg DEDUPD_COMMIT=$(git
    /// rev-parse --short HEAD)`, see deploy/docker/Dockerfile); a plain `swift build` leaves it unknown.
    public static let commit = "unknown"

    public static var librdkafka: String { LibrdkafkaVersion.string }
    public static var hiredis: String { HiredisVersion.string }

    /// `dedupd --version`.
    public static var text: String {
        "dedupd \(version)\ncommit \(commit)\nlibrdkafka \(librdkafka)\nhiredis \(hiredis)"
    }

    /// `dedupd_build_info{version,commit,librdkafka,hiredis} 1`, the usual Prometheus info metric:
    /// join it on `instance` to see which build a worker runs.
    public static func record(factory: any MetricsFactory) {
        Gauge(label: "dedupd.build.info", dimensions: [
            ("version", version), ("commit", commit), ("librdkafka", librdkafka), ("hiredis", hiredis),
        ], factory: factory).record(1)
    }
}
