/// The settings the dedup decisions depend on.
public struct DedupSettings: Sendable {
    /// How a message becomes its key. Default: `header:message-id`.
    public var template: KeyTemplate
    /// Separates this route's keys from others' in Redis. Default: `default`.
    public var namespace: String
    /// The dedup window `W`: how long a new message waits for repeats before dispatch. Default: 5 s.
    public var window: Duration
    /// How long a dispatched key is remembered as `done`. Default: 24 h.
    public var retention: Duration
    /// Lease of a `pending` claim; must outlive the window plus handler time. Default: window + 30 s.
    public var lease: Duration
    /// Which copy within the window is dispatched. Default: `first`.
    public var keep: KeepPolicy
    /// Larger values are bad input. Default: 1 MiB.
    public var maxMessageBytes: Int
    /// Delay buffer bounds. Default: 100,000 messages, 64 MiB.
    public var bufferMaxMessages: Int
    public var bufferMaxBytes: Int
    /// How soon a message whose key is pending under another worker is looked at again. Default: 500 ms.
    public var parkRetry: Duration
    /// A dead-letter topic is configured: bad input and given-up messages stay unresolved (their
    /// offsets uncommitted) until the caller reports them dead-lettered with `deadLettered(_:)`,
    /// so a message is never committed before the dead-letter topic acknowledged it.
    /// Default: false (they are resolved at once: logged and counted only).
    public var holdsDeadLetters: Bool
    /// Token mode: where each message's one-time token is (e.g. `header:form-token`). A new key
    /// is claimed only after its message's token was accepted. Default: off.
    public var token: KeyTemplate?
    /// Where done records are kept (`dedup.layout`). Default: compact.
    public var layout: LayoutKind
    /// Compact layout: slots per retention (`dedup.compact.slots`). Default: 1.
    public var compactSlots: Int
    /// Compact layout: buckets per slot (`dedup.compact.buckets`). Default: 8192.
    public var compactBuckets: Int
    /// Compact layout: also recognise done records of the keys layout
    /// (`dedup.compact.read_keys_layout`). Default: true.
    public var readsKeysLayout: Bool
    /// The route's guard (`guard.*`): a unique message is dispatched only if it moves its entity
    /// forward. Default: none.
    public var entityGuard: EntityGuard?

    public enum LayoutKind: String, Sendable, CaseIterable {
        case keys, compact
    }

    /// Guard: where entity states are kept: the compact layout's buckets with `guard.retention`.
    public var entityRecords: CompactRecords {
        CompactRecords(
            retention: entityGuard?.retention ?? retention, slotsPerRetention: compactSlots, buckets: compactBuckets,
            readsKeysLayout: false, lease: lease)
    }

    /// The store's view of `layout` and its settings.
    public var doneLayout: DoneLayout {
        switch layout {
        case .keys: .keys
        case .compact:
            .compact(CompactRecords(
                retention: retention, slotsPerRetention: compactSlots, buckets: compactBuckets, readsKeysLayout: readsKeysLayout,
                lease: lease))
        }
    }

    public init(
        template: KeyTemplate,
        namespace: String = ConfigSchema.defaultText("dedup.namespace"),
        window: Duration = ConfigSchema.defaultDuration("dedup.window"),
        retention: Duration = ConfigSchema.defaultDuration("dedup.retention"),
        lease: Duration? = nil,
        keep: KeepPolicy = KeepPolicy(rawValue: ConfigSchema.defaultText("dedup.keep"))!,
        maxMessageBytes: Int = ConfigSchema.defaultSize("dedup.max_message_bytes"),
        bufferMaxMessages: Int = ConfigSchema.defaultCount("buffer.max_messages"),
        bufferMaxBytes: Int = ConfigSchema.defaultSize("buffer.max_bytes"),
        parkRetry: Duration = .milliseconds(500),
        holdsDeadLetters: Bool = false,
        token: KeyTemplate? = nil,
        layout: LayoutKind = LayoutKind(rawValue: ConfigSchema.defaultText("dedup.layout"))!,
        compactSlots: Int = ConfigSchema.defaultCount("dedup.compact.slots"),
        compactBuckets: Int = ConfigSchema.defaultCount("dedup.compact.buckets"),
        readsKeysLayout: Bool = ConfigSchema.defaultText("dedup.compact.read_keys_layout") == "true"
    ) {
        self.template = template
        self.namespace = namespace
        self.window = window
        self.retention = retention
        self.lease = lease ?? window + .seconds(30)
        self.keep = keep
        self.maxMessageBytes = maxMessageBytes
        self.bufferMaxMessages = bufferMaxMessages
        self.bufferMaxBytes = bufferMaxBytes
        self.parkRetry = parkRetry
        self.holdsDeadLetters = holdsDeadLetters
        self.token = token
        self.layout = layout
        self.compactSlots = compactSlots
        self.compactBuckets = compactBuckets
        self.readsKeysLayout = readsKeysLayout
    }

    /// The most messages the buffer's bounds let the worker hold: every held message counts at
    /// least `InboundMessage.bookkeepingBytes`. Also the most librdkafka should prefetch for it
    /// (`Worker.kafkaProperties`): a prefetched message costs memory the bounds do not count, so
    /// a small buffer with a prefetch queue sized for the default one would spend its memory
    /// bound on messages not yet read.
    public var heldMessagesAtMost: Int {
        min(bufferMaxMessages, bufferMaxBytes / InboundMessage.bookkeepingBytes)
    }
}
