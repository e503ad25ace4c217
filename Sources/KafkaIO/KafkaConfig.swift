import CRdKafka
import DedupCore
import Dispatch
import Logging
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Building `rd_kafka_conf_t` from librdkafka properties, and routing librdkafka's log and error callbacks
/// into a swift-log `Logger`.
public enum KafkaConfig {
    /// Property names whose values must never reach a log line or an error message.
    static func isSecret(_ name: String) -> Bool {
        let n = name.lowercased()
        return n.contains("password") || n.contains("secret") || n.hasSuffix(".pem")
            || n == "sasl.oauthbearer.config"
    }

    /// The value as it may be shown to an operator: secrets are masked.
    public static func displayValue(_ name: String, _ value: String) -> String {
        isSecret(name) ? "*****" : value
    }

    /// Creates a configuration with `defaults` overridden by `overrides`, each property applied with
    /// `rd_kafka_conf_set`. The caller owns the result (pass it to `rd_kafka_new`, or destroy it).
    /// - Throws: `KafkaError.Code.config` naming the first property librdkafka rejected and its value.
    static func makeConf(defaults: [String: String] = [:], overrides: [String: String]) throws(KafkaError) -> OpaquePointer {
        guard let conf = rd_kafka_conf_new() else {
            throw KafkaError(code: .config, message: "rd_kafka_conf_new failed")
        }
        var merged = defaults
        for (k, v) in overrides { merged[k] = v }
        for (name, value) in merged.sorted(by: { $0.key < $1.key }) {
            var errstr = [CChar](repeating: 0, count: 512)
            let res = rd_kafka_conf_set(conf, name, value, &errstr, errstr.count)
            if res != RD_KAFKA_CONF_OK {
                rd_kafka_conf_destroy(conf)
                let reason = String(decoding: errstr.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
                throw KafkaError(
                    code: .config,
                    message: "kafka property \"\(name)\"=\"\(displayValue(name, value))\" rejected: \(reason)"
                )
            }
        }
        return conf
    }

    /// Creates a librdkafka handle. `conf` is consumed either way; the callbacks find `context` through
    /// `rd_kafka_opaque`, so the caller must keep `context` alive until `rd_kafka_destroy` returned.
    static func makeHandle(
        type: rd_kafka_type_t,
        conf: OpaquePointer,
        context: ClientContext
    ) throws(KafkaError) -> OpaquePointer {
        rd_kafka_conf_set_opaque(conf, Unmanaged.passUnretained(context).toOpaque())
        rd_kafka_conf_set_log_cb(conf, kafkaLogCallback)
        rd_kafka_conf_set_error_cb(conf, kafkaErrorCallback)
        var errstr = [CChar](repeating: 0, count: 512)
        guard let rk = rd_kafka_new(type, conf, &errstr, errstr.count) else {
            rd_kafka_conf_destroy(conf)
            let reason = String(decoding: errstr.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            throw KafkaError(code: .config, message: "cannot create kafka client: \(reason)")
        }
        return rk
    }

    /// librdkafka's syslog levels mapped to swift-log: 0-3 error, 4 warning, 5-6 info, 7 debug.
    public static func logLevel(syslogLevel: Int32) -> Logger.Level {
        switch syslogLevel {
        case ...3: return .error
        case 4: return .warning
        case 5, 6: return .info
        default: return .debug
        }
    }
}

/// Per-handle state the C callbacks reach through `rd_kafka_opaque`: the logger, recorded rebalance and error
/// events (consumer), delivery counters and waiters (producer).
///
/// Callbacks run on librdkafka's threads and on the handle's own queue; every mutable field is behind a `Mutex`.
final class ClientContext: Sendable {
    let logger: Logger
    let events = Mutex<[KafkaConsumer.ConsumerEvent]>([])
    let delivery = Mutex<DeliveryState>(DeliveryState())
    /// Whether client errors from the error callback become consumer `.error` events.
    let recordErrors: Bool
    /// A consumer's paused partitions; reached from the rebalance callback through the handle's opaque.
    let pauses = PartitionPauses()
    /// Set once librdkafka raised a fatal error (`RD_KAFKA_RESP_ERR__FATAL`): the underlying
    /// error's name and text. The client can do nothing more and must be replaced.
    let fatalReason = Mutex<String?>(nil)
    /// Whether `fatalReason` is set: the loop asks every pass, so without taking the lock.
    let isFatal = Atomic<Bool>(false)

    /// Keeps the error that made the client fatal (librdkafka keeps it, `rd_kafka_fatal_error`:
    /// what it reports is only `_FATAL`), and returns it.
    @discardableResult
    func recordFatal(_ rk: OpaquePointer) -> String {
        var buffer = [CChar](repeating: 0, count: 512)
        let underlying = rd_kafka_fatal_error(rk, &buffer, buffer.count)
        let reason = "\(String(cString: rd_kafka_err2name(underlying))): \(String(cString: buffer))"
        defer { isFatal.store(true, ordering: .releasing) }
        return fatalReason.withLock {
            if $0 == nil { $0 = reason }
            return $0!
        }
    }

    struct DeliveryState: Sendable {
        var delivered = 0
        var failed = 0
        var nextID: UInt = 1
        var waiters: [UInt: CheckedContinuation<Void, any Error>] = [:]
    }

    init(logger: Logger, recordErrors: Bool = false) {
        self.logger = logger
        self.recordErrors = recordErrors
    }

    /// Events recorded and not yet taken; lets the poll loop skip the lock when there are none.
    private let eventCount = Atomic<Int>(0)

    func record(_ event: KafkaConsumer.ConsumerEvent) {
        events.withLock {
            $0.append(event)
            eventCount.store($0.count, ordering: .releasing)
        }
    }

    var hasEvents: Bool { eventCount.load(ordering: .acquiring) > 0 }

    func takeEvents() -> [KafkaConsumer.ConsumerEvent] {
        events.withLock { ev in
            if ev.isEmpty { return [] }
            defer {
                ev.removeAll(keepingCapacity: true)
                eventCount.store(0, ordering: .releasing)
            }
            return ev
        }
    }

    /// Set when the consumer starts leaving its group.
    private let closing = Atomic<Bool>(false)
    /// The group's rebalance protocol as last asked while not closing.
    private let cooperative = Atomic<Bool>(false)

    var isClosing: Bool { closing.load(ordering: .acquiring) }

    func setClosing() {
        closing.store(true, ordering: .releasing)
        pauses.setClosing()
    }

    /// Whether the group rebalances cooperatively. `rd_kafka_rebalance_protocol` asks librdkafka's
    /// main thread and waits for the answer without a limit; called from the rebalance callback
    /// during `rd_kafka_consumer_close` that wait can last for good (librdkafka issue #4041). So it
    /// is asked only while the consumer runs, and the close's revocation uses the last answer (the
    /// protocol of the assignment being revoked). `nil` (no group yet) keeps the last answer too.
    func rebalanceIsCooperative(_ rk: OpaquePointer) -> Bool {
        if !closing.load(ordering: .acquiring), let name = rd_kafka_rebalance_protocol(rk) {
            cooperative.store(strcmp(name, "COOPERATIVE") == 0, ordering: .releasing)
        }
        return cooperative.load(ordering: .acquiring)
    }

    /// The context of a handle made by `KafkaConfig.makeHandle`.
    static func of(_ rk: OpaquePointer?) -> ClientContext? {
        guard let rk, let opaque = rd_kafka_opaque(rk) else { return nil }
        return Unmanaged<ClientContext>.fromOpaque(opaque).takeUnretainedValue()
    }
}

private let silentLogCallback: @convention(c) (OpaquePointer?, Int32, UnsafePointer<CChar>?, UnsafePointer<CChar>?) -> Void = { _, _, _, _ in }

/// librdkafka's log callback; runs on librdkafka's internal threads.
private let kafkaLogCallback: @convention(c) (OpaquePointer?, Int32, UnsafePointer<CChar>?, UnsafePointer<CChar>?) -> Void = {
    rk, level, fac, buf in
    guard let context = ClientContext.of(rk) else { return }
    let swiftLevel = KafkaConfig.logLevel(syslogLevel: level)
    guard context.logger.logLevel <= swiftLevel else { return }
    var metadata: Logger.Metadata = [:]
    if let fac { metadata["kafka.facility"] = .string(String(cString: fac)) }
    if let rk, let name = rd_kafka_name(rk) { metadata["kafka.client"] = .string(String(cString: name)) }
    context.logger.log(level: swiftLevel, "\(buf.map { String(cString: $0) } ?? "")", metadata: metadata)
}

/// librdkafka's error callback: client-wide errors (brokers down, fatal errors). Served from the handle's
/// poll; consumers also report them as `.error` events.
private let kafkaErrorCallback: @convention(c) (OpaquePointer?, Int32, UnsafePointer<CChar>?, UnsafeMutableRawPointer?) -> Void = {
    rk, err, reason, _ in
    guard let context = ClientContext.of(rk) else { return }
    let code = rd_kafka_resp_err_t(rawValue: err)
    let text = reason.map { String(cString: $0) } ?? ""
    var error = KafkaError(code: .client, err: code, message: text)
    error.message = text
    var fatal = false
    if code == RD_KAFKA_RESP_ERR__FATAL {
        fatal = true
        error.isRetriable = false
        // A producer learns of it here; a consumer through `KafkaConsumer.consumeErrorArrived`.
        if let rk { error.message = context.recordFatal(rk) }
    }
    context.logger.log(
        level: fatal ? .error : .warning,
        "kafka client error",
        metadata: [
            "kafka.error": .string(error.errorName ?? "\(err)"),
            "kafka.reason": .string(error.message),
        ]
    )
    if context.recordErrors { context.record(.error(error)) }
}

// MARK: - Small helpers shared by the handles

extension Duration {
    /// Milliseconds for librdkafka timeouts, clamped to `Int32`, never negative.
    var kafkaMilliseconds: Int32 {
        let (s, atto) = components
        let ms = s * 1000 + atto / 1_000_000_000_000_000
        return Int32(clamping: max(0, ms))
    }
}

/// Owns an `rd_kafka_topic_partition_list_t` for one call.
struct PartitionList: ~Copyable {
    let list: UnsafeMutablePointer<rd_kafka_topic_partition_list_t>

    init(_ partitions: [TopicPartition], offsets: [TopicPartition: Int64] = [:]) {
        list = rd_kafka_topic_partition_list_new(Int32(clamping: max(1, partitions.count)))
        for tp in partitions {
            let elem = rd_kafka_topic_partition_list_add(list, tp.topic, tp.partition)
            if let offset = offsets[tp] { elem?.pointee.offset = offset }
        }
    }

    deinit { rd_kafka_topic_partition_list_destroy(list) }

    static func read(_ list: UnsafePointer<rd_kafka_topic_partition_list_t>?) -> [(TopicPartition, Int64, rd_kafka_resp_err_t)] {
        guard let list, let elems = list.pointee.elems else { return [] }
        return (0..<Int(list.pointee.cnt)).map { i in
            let e = elems[i]
            return (TopicPartition(topic: String(cString: e.topic), partition: e.partition), e.offset, e.err)
        }
    }

    var entries: [(TopicPartition, Int64, rd_kafka_resp_err_t)] { PartitionList.read(list) }
}

/// A serial queue where a handle's blocking librdkafka calls run, away from the cooperative pool; one hop per call.
struct BlockingExecutor: Sendable {
    let queue: DispatchQueue
    /// Jobs queued or running, so a caller can tell whether `queue.sync` would wait.
    private let jobs = Jobs()

    private final class Jobs: Sendable {
        let count = Atomic<Int>(0)
    }

    init(label: String) { queue = DispatchQueue(label: label) }

    func run<T: Sendable>(_ body: @escaping @Sendable () -> T) async -> T {
        jobs.count.add(1, ordering: .acquiring)
        return await withCheckedContinuation { c in
            queue.async { [jobs] in
                let value = body()
                jobs.count.subtract(1, ordering: .releasing)
                c.resume(returning: value)
            }
        }
    }

    func run<T: Sendable>(_ body: @escaping @Sendable () throws(KafkaError) -> T) async throws(KafkaError) -> T {
        let result: Result<T, KafkaError> = await run { () -> Result<T, KafkaError> in
            do throws(KafkaError) { return .success(try body()) } catch { return .failure(error) }
        }
        return try result.get()
    }

    /// Like `run`, but waits no longer than `deadline`: `nil` then, and `body` goes on on the queue
    /// (as does every job queued after it). For a call into librdkafka that can wait for good.
    func run<T: Sendable>(until deadline: ContinuousClock.Instant, _ body: @escaping @Sendable () -> T) async -> T? {
        let waiter = Waiter<T>()
        jobs.count.add(1, ordering: .acquiring)
        return await withCheckedContinuation { c in
            waiter.set(c)
            queue.async { [jobs] in
                let value = body()
                jobs.count.subtract(1, ordering: .releasing)
                waiter.resume(value)
            }
            let left = max(.zero, deadline - .now)
            let nanoseconds = left.components.seconds * 1_000_000_000 + left.components.attoseconds / 1_000_000_000
            DispatchQueue.global().asyncAfter(deadline: .now() + .nanoseconds(Int(clamping: nanoseconds))) { waiter.resume(nil) }
        }
    }

    /// The continuation of `run(until:)`, resumed by whichever comes first: the job or the deadline.
    private final class Waiter<T: Sendable>: Sendable {
        let continuation = Mutex<CheckedContinuation<T?, Never>?>(nil)
        func set(_ c: CheckedContinuation<T?, Never>) { continuation.withLock { $0 = c } }
        func resume(_ value: T?) { continuation.withLock { $0.take() }?.resume(returning: value) }
    }

    /// Runs `body` on the caller's own thread, after whatever is queued: for a caller whose
    /// thread may block (not a cooperative one).
    func runHere<T: Sendable>(_ body: @Sendable () -> T) -> T {
        queue.sync(execute: body)
    }

    /// Runs a `body` that does not block on the caller's own thread when the queue has nothing
    /// queued or running (no thread hop), else on the queue like `run`. It never waits for
    /// another job, so it may be called from a cooperative thread.
    func runNonBlocking<T: Sendable>(_ body: @escaping @Sendable () -> T) async -> T {
        if jobs.count.load(ordering: .acquiring) == 0 {
            // Only the consumer's own loop submits jobs, so none can arrive between the check
            // and the `sync`; if one did, `sync` would wait for at most that job.
            return queue.sync(execute: body)
        }
        return await run(body)
    }
}

extension KafkaConfig {
    /// The first librdkafka property that `rd_kafka_conf_set` rejects, with librdkafka's reason, checked
    /// the way a consumer would be configured (`KafkaConsumer.defaultProperties` overridden by
    /// `properties`) but without creating a client or connecting. `nil` when librdkafka accepts them all.
    /// Secret values never appear in the result.
    public static func firstRejectedProperty(_ properties: [String: String]) -> (name: String, value: String, reason: String)? {
        var merged = KafkaConsumer.defaultProperties
        merged["bootstrap.servers"] = "localhost:9092"
        merged["group.id"] = "check"
        for (k, v) in properties { merged[k] = v }
        guard let conf = rd_kafka_conf_new() else { return ("", "", "rd_kafka_conf_new failed") }
        defer { rd_kafka_conf_destroy(conf) }
        for (name, value) in merged.sorted(by: { $0.key < $1.key }) {
            var errstr = [CChar](repeating: 0, count: 512)
            if rd_kafka_conf_set(conf, name, value, &errstr, errstr.count) != RD_KAFKA_CONF_OK {
                let reason = String(decoding: errstr.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
                return (name, displayValue(name, value), reason)
            }
        }
        return nil
    }

    /// Properties that name a file librdkafka reads when a client starts (certificates, keys, the
    /// Kerberos keytab). `ssl.ca.location` may also name a directory, or be `probe`.
    public static let fileProperties = [
        "ssl.ca.location", "ssl.certificate.location", "ssl.key.location", "ssl.keystore.location",
        "ssl.crl.location", "sasl.kerberos.keytab",
    ]

    /// Why librdkafka would not start a client with `properties` although it accepts each of them
    /// (`firstRejectedProperty`): a certificate, key or keystore it cannot load, a key that does not
    /// match its certificate, a wrong key password. Found by creating a consumer without bootstrap
    /// servers, so nothing is contacted, and destroying it at once. `name` is the property the
    /// reason names, when it names one of `properties`; `nil` when the client starts.
    public static func startRefusal(_ properties: [String: String]) -> (name: String?, reason: String)? {
        guard let conf = rd_kafka_conf_new() else { return (nil, "rd_kafka_conf_new failed") }
        var merged = KafkaConsumer.defaultProperties
        merged["group.id"] = "check"
        for (k, v) in properties where k != "bootstrap.servers" && k != "metadata.broker.list" { merged[k] = v }
        var errstr = [CChar](repeating: 0, count: 512)
        for (name, value) in merged { _ = rd_kafka_conf_set(conf, name, value, &errstr, errstr.count) }
        // Its log lines repeat the reason returned below, and a check prints nothing else.
        rd_kafka_conf_set_log_cb(conf, silentLogCallback)
        guard let rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, &errstr, errstr.count) else {
            rd_kafka_conf_destroy(conf)
            let reason = String(decoding: errstr.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            return (properties.keys.filter { reason.contains($0) }.max { $0.count < $1.count }, reason)
        }
        rd_kafka_destroy_flags(rk, RD_KAFKA_DESTROY_F_NO_CONSUMER_CLOSE)
        return nil
    }

    /// Whether a librdkafka property's value must be hidden from operators (passwords, keys, JAAS).
    public static func isSecretProperty(_ name: String) -> Bool { isSecret(name) || name.lowercased().contains("jaas") }
}
