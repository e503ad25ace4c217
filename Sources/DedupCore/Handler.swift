/// One unique message handed to its handler, with the dedup key so the downstream system can use
/// it as an idempotency key (the one crash window in docs/architecture.md's promises makes that worthwhile).
public struct Dispatch: Sendable {
    public var key: DedupKey
    public var message: InboundMessage
    /// 1 for the first try; retries count up.
    public var attempt: Int
    /// The route that took the message: 0 is the default route, i is the i-th named route.
    public var route: Int
    /// The ledger's entry for the message (set by `DedupLedger.takeDue`): the handler's answer
    /// finds it without a look-up.
    var entry: EntryRef?

    public init(key: DedupKey, message: InboundMessage, attempt: Int = 1, route: Int = 0) {
        self.key = key
        self.message = message
        self.attempt = attempt
        self.route = route
    }
}

/// The owner of unique messages (docs/architecture.md step 5). Built-in handlers live in DedupService;
/// a Swift user implements this protocol to plug in their own.
///
/// `handle` returning normally means the message was taken: its key is then confirmed `done` in
/// Redis and its offset committed. Throwing means it was not; dedupd retries with backoff.
public protocol Handler: Sendable {
    func handle(_ dispatch: Dispatch) async throws
    /// Called after a round of `handle` calls and before their keys are confirmed, so a handler
    /// that batches its writes makes them durable here. Default: nothing.
    func flush() async throws
    /// Called once at shutdown. Default: nothing.
    func close() async
}

extension Handler {
    public func flush() async throws {}
    public func close() async {}
}

/// A handler that can take a whole dispatch round in one call, with no task, lock or call per
/// message (the `log` handler appends a round's lines to one buffer). The worker uses it when
/// the handler offers it; `handle` remains the path for retries.
public protocol BatchHandler: Handler {
    /// Takes every message of `round`, in order. Throwing means none of them was taken: the round
    /// then goes through `handle` one message at a time, with the usual retries.
    func handleBatch(_ round: [Dispatch]) async throws
    /// Whether rounds go to `handleBatch` (a wrapper may take batches only when what it wraps
    /// does). Default: true.
    var takesBatches: Bool { get }
}

extension BatchHandler {
    public var takesBatches: Bool { true }
}

/// Thrown by a handler when trying again cannot help (an HTTP 400, a command that says the input
/// is wrong): the message is given up at once, without further attempts, and dead-lettered.
/// Any other error is retried with backoff.
public struct PermanentFailure: Error, Sendable, CustomStringConvertible {
    public var message: String
    public var underlying: (any Error)?

    public init(_ message: String, underlying: (any Error)? = nil) {
        self.message = message
        self.underlying = underlying
    }

    public var description: String {
        underlying.map { "\(message): \($0)" } ?? message
    }
}

/// A retriable handler error that knows how long the other side asked it to wait (an HTTP
/// `Retry-After`): the next attempt starts no sooner than that, even when backoff is shorter.
public protocol RetryDelaying: Error {
    var retryAfter: Duration? { get }
}

extension Duration {
    /// Whole milliseconds, rounded down.
    public var milliseconds: Int64 {
        let (s, atto) = components
        return s * 1000 + atto / 1_000_000_000_000_000
    }
}
