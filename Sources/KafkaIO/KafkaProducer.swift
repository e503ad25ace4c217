import CRdKafka
import DedupCore
import Dispatch
import Foundation
import Logging
import Synchronization

/// A librdkafka producer (`rd_kafka_t` of type producer).
///
/// `send` only enqueues (non-blocking); a dedicated poller thread serves delivery reports; `flush` runs on the
/// producer's own serial queue.
///
/// `@unchecked Sendable`: librdkafka's producer handle is thread-safe, `rk` is immutable and destroyed only in
/// `deinit` after the poller thread has stopped; counters and waiters live in the `Mutex` of `ClientContext`.
public final class KafkaProducer: @unchecked Sendable {
    /// Delivery counts since the producer was made.
    public struct DeliveryCounts: Sendable, Hashable {
        public var delivered: Int
        public var failed: Int
    }

    private let rk: OpaquePointer
    private let context: ClientContext
    private let executor: BlockingExecutor
    private let poller: DeliveryPoller

    /// Properties set before the caller's overrides. Default: `linger.ms=5` (batches form quickly, low latency).
    public static let defaultProperties: [String: String] = [
        "linger.ms": "5",
    ]

    private init(rk: OpaquePointer, context: ClientContext, executor: BlockingExecutor, poller: DeliveryPoller) {
        self.rk = rk
        self.context = context
        self.executor = executor
        self.poller = poller
    }

    /// Creates a producer. - Throws: `KafkaError.Code.config` naming a rejected property.
    public static func make(bootstrapServers: String, properties: [String: String] = [:], logger: Logger) throws(KafkaError) -> KafkaProducer {
        var defaults = defaultProperties
        defaults["bootstrap.servers"] = bootstrapServers
        let conf = try KafkaConfig.makeConf(defaults: defaults, overrides: properties)
        rd_kafka_conf_set_dr_msg_cb(conf, kafkaDeliveryCallback)
        let context = ClientContext(logger: logger)
        let rk = try KafkaConfig.makeHandle(type: RD_KAFKA_PRODUCER, conf: conf, context: context)
        let poller = DeliveryPoller(rk: rk)
        return KafkaProducer(rk: rk, context: context, executor: BlockingExecutor(label: "kafka.producer"), poller: poller)
    }

    deinit {
        // The teardown blocks (the poller's last poll; rd_kafka_destroy joins librdkafka's
        // threads), and the last reference may be dropped on a cooperative thread, so it runs on
        // the poller's own thread once its loop has ended.
        let context = self.context
        poller.stop { rk in
            let pending = rd_kafka_outq_len(rk)
            if pending > 0 {
                context.logger.info("producer destroyed with undelivered messages", metadata: ["kafka.pending": .stringConvertible(pending)])
            }
            rd_kafka_destroy(rk)
            // Anyone still waiting in `sendAndWait` learns that the message's fate is unknown.
            let waiters = context.delivery.withLock { d in
                defer { d.waiters.removeAll() }
                return d.waiters
            }
            for (_, w) in waiters { w.resume(throwing: KafkaError(code: .closed, message: "producer destroyed before delivery")) }
        }
    }

    /// Delivered and failed messages so far (from delivery reports).
    public var deliveryCounts: DeliveryCounts {
        context.delivery.withLock { DeliveryCounts(delivered: $0.delivered, failed: $0.failed) }
    }

    /// Messages enqueued or in flight, plus delivery reports not yet served (`rd_kafka_outq_len`); may briefly
    /// include a report whose callback is running.
    public var pendingCount: Int { Int(rd_kafka_outq_len(rk)) }

    /// Enqueues a message (librdkafka copies the bytes). Partition by key (librdkafka's partitioner).
    /// When the local queue is full, polls briefly for delivery reports and retries for up to about one second.
    public func send(topic: String, key: [UInt8]?, value: [UInt8], headers: [MessageHeader] = []) throws(KafkaError) {
        try enqueue(topic: topic, key: key, value: value, headers: headers, opaque: nil)
    }

    /// Sends a message and returns once the broker acknowledged it (or throws its delivery error).
    public func sendAndWait(topic: String, key: [UInt8]?, value: [UInt8], headers: [MessageHeader] = []) async throws(KafkaError) {
        do {
            try await withCheckedThrowingContinuation { (c: CheckedContinuation<Void, any Error>) in
                let id = context.delivery.withLock { d in
                    let id = d.nextID
                    d.nextID += 1
                    d.waiters[id] = c
                    return id
                }
                do {
                    try enqueue(topic: topic, key: key, value: value, headers: headers, opaque: UnsafeMutableRawPointer(bitPattern: id))
                } catch {
                    let w = context.delivery.withLock { $0.waiters.removeValue(forKey: id) }
                    w?.resume(throwing: error)
                }
            }
        } catch let error as KafkaError {
            throw error
        } catch {
            throw KafkaError(code: .produce, message: "\(error)")
        }
    }

    private func enqueue(topic: String, key: [UInt8]?, value: [UInt8], headers: [MessageHeader], opaque: UnsafeMutableRawPointer?) throws(KafkaError) {
        var attempts = 0
        while true {
            let err = produce(topic: topic, key: key, value: value, headers: headers, opaque: opaque)
            if err == RD_KAFKA_RESP_ERR_NO_ERROR { return }
            if err == RD_KAFKA_RESP_ERR__QUEUE_FULL && attempts < 100 {
                attempts += 1
                rd_kafka_poll(rk, 10)
                continue
            }
            throw KafkaError(code: err == RD_KAFKA_RESP_ERR__QUEUE_FULL ? .queueFull : .produce, err: err, message: "produce to \(topic)")
        }
    }

    /// One `rd_kafka_produceva` call; all pointers stay valid for its duration (librdkafka copies with F_COPY).
    private func produce(topic: String, key: [UInt8]?, value: [UInt8], headers: [MessageHeader], opaque: UnsafeMutableRawPointer?) -> rd_kafka_resp_err_t {
        // Header names must be C strings that outlive the call: keep them in one buffer.
        var nameBuffer: [CChar] = []
        var nameOffsets: [Int] = []
        for h in headers {
            nameOffsets.append(nameBuffer.count)
            nameBuffer.append(contentsOf: h.name.utf8CString)
        }
        return topic.withCString { topicPtr in
            value.withUnsafeBytes { valueBuf in
                withOptionalBytes(key) { keyBuf in
                    nameBuffer.withUnsafeBufferPointer { names in
                        withHeaderValues(headers) { headerValues in
                            var vus: [rd_kafka_vu_t] = []
                            vus.reserveCapacity(5 + headers.count)
                            var vu = rd_kafka_vu_t()
                            vu.vtype = RD_KAFKA_VTYPE_TOPIC
                            vu.u.cstr = topicPtr
                            vus.append(vu)
                            vu = rd_kafka_vu_t()
                            vu.vtype = RD_KAFKA_VTYPE_VALUE
                            vu.u.mem.ptr = UnsafeMutableRawPointer(mutating: valueBuf.baseAddress)
                            vu.u.mem.size = valueBuf.count
                            vus.append(vu)
                            if let keyBuf {
                                vu = rd_kafka_vu_t()
                                vu.vtype = RD_KAFKA_VTYPE_KEY
                                vu.u.mem.ptr = UnsafeMutableRawPointer(mutating: keyBuf.baseAddress ?? UnsafeRawPointer(emptyKeyByte))
                                vu.u.mem.size = keyBuf.count
                                vus.append(vu)
                            }
                            for (i, hv) in headerValues.enumerated() {
                                vu = rd_kafka_vu_t()
                                vu.vtype = RD_KAFKA_VTYPE_HEADER
                                vu.u.header.name = names.baseAddress! + nameOffsets[i]
                                vu.u.header.val = hv?.baseAddress
                                vu.u.header.size = hv.map { $0.count } ?? -1
                                vus.append(vu)
                            }
                            vu = rd_kafka_vu_t()
                            vu.vtype = RD_KAFKA_VTYPE_MSGFLAGS
                            vu.u.i = RD_KAFKA_MSG_F_COPY
                            vus.append(vu)
                            if let opaque {
                                vu = rd_kafka_vu_t()
                                vu.vtype = RD_KAFKA_VTYPE_OPAQUE
                                vu.u.ptr = opaque
                                vus.append(vu)
                            }
                            return vus.withUnsafeBufferPointer { buf in
                                guard let error = rd_kafka_produceva(rk, buf.baseAddress, buf.count) else {
                                    return RD_KAFKA_RESP_ERR_NO_ERROR
                                }
                                defer { rd_kafka_error_destroy(error) }
                                return rd_kafka_error_code(error)
                            }
                        }
                    }
                }
            }
        }
    }

    /// Waits until every enqueued message is delivered or failed, on the producer's queue.
    /// - Throws: `KafkaError.Code.timeout` when messages remain after `timeout`.
    public func flush(timeout: Duration) async throws(KafkaError) {
        let ms = timeout.kafkaMilliseconds
        try await executor.run { [self] () throws(KafkaError) in
            let err = rd_kafka_flush(rk, ms)
            if err != RD_KAFKA_RESP_ERR_NO_ERROR {
                let remaining = rd_kafka_outq_len(rk)
                throw KafkaError(code: .timeout, err: err, message: "flush left \(remaining) messages undelivered")
            }
        }
    }
}

/// An empty key must still have an address, or librdkafka sends a null key.
nonisolated(unsafe) private let emptyKeyByte = UnsafeMutableRawPointer.allocate(byteCount: 1, alignment: 1)

/// `bytes` as a raw buffer, or `nil`, for the duration of `body`.
private func withOptionalBytes<R>(_ bytes: [UInt8]?, _ body: (UnsafeRawBufferPointer?) -> R) -> R {
    guard let bytes else { return body(nil) }
    return bytes.withUnsafeBytes { body($0) }
}

/// Header values as raw buffers (`nil` for a null value), valid for the duration of `body`.
private func withHeaderValues<R>(_ headers: [MessageHeader], _ body: ([UnsafeRawBufferPointer?]) -> R) -> R {
    // Concatenate into one buffer so a single closure scope covers all of them.
    var all: [UInt8] = []
    var ranges: [Range<Int>?] = []
    for h in headers {
        if let v = h.value {
            ranges.append(all.count..<(all.count + v.count))
            all.append(contentsOf: v)
        } else {
            ranges.append(nil)
        }
    }
    if all.isEmpty { all.append(0) }  // a valid base address for empty (non-null) values
    return all.withUnsafeBytes { buf in
        body(ranges.map { r in r.map { UnsafeRawBufferPointer(rebasing: buf[$0]) } })
    }
}

/// Serves delivery reports: a dedicated thread calling `rd_kafka_poll` until stopped, which then
/// runs the producer's teardown.
///
/// `@unchecked Sendable`: `rk` is thread-safe for `rd_kafka_poll` and is destroyed only by the
/// teardown, on this thread, after its last poll; `state` is a `Mutex`.
private final class DeliveryPoller: @unchecked Sendable {
    typealias Teardown = @Sendable (OpaquePointer) -> Void
    private let rk: OpaquePointer
    private let state = Mutex<(stopped: Bool, teardown: Teardown?)>((false, nil))

    init(rk: OpaquePointer) {
        self.rk = rk
        let thread = Thread { [self] in
            while true {
                let (stopped, teardown) = state.withLock { ($0.stopped, $0.teardown) }
                if stopped {
                    teardown?(self.rk)
                    return
                }
                rd_kafka_poll(self.rk, 100)
            }
        }
        thread.name = "kafka.producer.poller"
        thread.start()
    }

    /// Ends the thread after its current poll (at most 100 ms) and runs `teardown` there; returns at once.
    func stop(then teardown: @escaping Teardown) {
        state.withLock { s in
            guard !s.stopped else { return }
            s.stopped = true
            s.teardown = teardown
        }
    }
}

/// Delivery report callback: counts, logs the first failures, resumes `sendAndWait` callers.
/// Runs on the poller thread or inside `rd_kafka_flush`.
private let kafkaDeliveryCallback: @convention(c) (OpaquePointer?, UnsafePointer<rd_kafka_message_t>?, UnsafeMutableRawPointer?) -> Void = {
    rk, rkm, _ in
    guard let rkm, let context = ClientContext.of(rk) else { return }
    let err = rkm.pointee.err
    let id = UInt(bitPattern: rkm.pointee._private)
    let (waiter, failedSoFar) = context.delivery.withLock { d -> (CheckedContinuation<Void, any Error>?, Int) in
        if err == RD_KAFKA_RESP_ERR_NO_ERROR { d.delivered += 1 } else { d.failed += 1 }
        return (id != 0 ? d.waiters.removeValue(forKey: id) : nil, d.failed)
    }
    if err == RD_KAFKA_RESP_ERR_NO_ERROR {
        waiter?.resume()
        return
    }
    let topic = rkm.pointee.rkt.map { String(cString: rd_kafka_topic_name($0)) } ?? ""
    let error = KafkaError(code: .produce, err: err, message: "delivery to \(topic) failed")
    if failedSoFar <= 10 {
        context.logger.warning(
            "message delivery failed",
            metadata: [
                "kafka.topic": .string(topic), "kafka.error": .string(error.errorName ?? ""),
                "kafka.failed": .stringConvertible(failedSoFar),
            ]
        )
    }
    waiter?.resume(throwing: error)
}
