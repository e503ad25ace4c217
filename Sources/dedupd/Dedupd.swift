import ArgumentParser
import Bench
import DedupCore
import DedupService
import Foundation
import KafkaIO
import LocalServers
import Logging
import RedisIO
import ServiceLifecycle

@main
struct Dedupd: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dedupd",
        abstract: "Makes a Kafka stream of submissions safe to act on: each unique message is handed to its handler once.",
        version: BuildInfo.text,
        subcommands: [Demo.self, Run.self, CheckConfig.self, ExampleConfig.self, Healthcheck.self, Inspect.self, Forget.self, DLQ.self, Produce.self, MockKafka.self, Token.self, Bench.self, BenchBare.self, Explain.self, ConfigReference.self],
        defaultSubcommand: nil
    )
}

/// Flags for the common settings; each maps onto a config key and wins over file and environment.
struct WorkerOptions: ParsableArguments {
    @Option(name: .long, help: "YAML configuration file.")
    var config: String?
    @Option(name: .long, help: "Kafka bootstrap servers (kafka.bootstrap_servers).")
    var bootstrapServers: String?
    @Option(name: .long, help: "Topic to consume; repeat for several (kafka.topics).")
    var topic: [String] = []
    @Option(name: .long, help: "Consumer group (kafka.group).")
    var group: String?
    @Option(name: .long, help: "redis://[user:password@]host:port/db (redis.url).")
    var redisUrl: String?
    @Option(name: .long, help: "standalone, cluster or sentinel (redis.mode).")
    var redisMode: String?
    @Option(name: .long, help: "Key template, e.g. header:message-id, key, json:/orderNo (dedup.key).")
    var key: String?
    @Option(name: .long, help: "Dedup window, e.g. 5s (dedup.window).")
    var window: String?
    @Option(name: .long, help: "How long dispatched keys are remembered, e.g. 24h (dedup.retention).")
    var retention: String?
    @Option(name: .long, help: "log handler output file; - is stdout (handler.output).")
    var output: String?
    @Option(name: .long, help: "Exit 0 once idle this long with nothing waiting (run.stop_when_idle).")
    var stopWhenIdle: String?
    @Option(name: .long, help: "Operational log format: logfmt or json (log.format).")
    var logFormat: String?
    @Option(name: .long, help: "Operational log level (log.level).")
    var logLevel: String?
    @Option(name: .long, help: "Stats line interval; 0 turns it off (log.stats_interval).")
    var statsInterval: String?
    @Option(name: .long, help: "Serve /metrics, /healthz and /readyz on this port (http.port).")
    var httpPort: String?
    @Option(name: .customShort("X"), help: ArgumentHelp("A librdkafka property, NAME=VALUE (kafka.properties.NAME); repeatable.", valueName: "name=value"))
    var kafkaProperties: [String] = []

    func validate() throws {
        for p in kafkaProperties where !p.contains("=") || p.hasPrefix("=") {
            throw ValidationError("-X takes a librdkafka property as NAME=VALUE, got \(p)")
        }
    }

    var flags: [String: String] {
        var f: [String: String] = [:]
        f["kafka.bootstrap_servers"] = bootstrapServers
        if !topic.isEmpty { f["kafka.topics"] = topic.joined(separator: ",") }
        f["kafka.group"] = group
        f["redis.url"] = redisUrl
        f["redis.mode"] = redisMode
        f["dedup.key"] = key
        f["dedup.window"] = window
        f["dedup.retention"] = retention
        f["handler.output"] = output
        f["run.stop_when_idle"] = stopWhenIdle
        f["log.format"] = logFormat
        f["log.level"] = logLevel
        f["log.stats_interval"] = statsInterval
        f["http.port"] = httpPort
        for p in kafkaProperties {
            let eq = p.firstIndex(of: "=")!
            f[ConfigSchema.kafkaPropertiesPrefix + p[..<eq]] = String(p[p.index(after: eq)...])
        }
        return f
    }

    func load() throws -> WorkerConfiguration {
        do {
            return try ConfigLoader.load(file: config, flags: flags)
        } catch let error as ConfigError {
            throw ValidationError("\(error)")
        }
    }
}

struct Run: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the worker until SIGTERM/SIGINT (or until idle with --stop-when-idle).")

    @OptionGroup var options: WorkerOptions

    func run() async throws {
        let config = try options.load()
        OperationalLog.bootstrap(level: config.logLevel, format: config.logFormat)
        try await Worker.runService(config: config)
    }
}

struct CheckConfig: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check-config",
        abstract: "Validate the configuration without connecting; print the effective values, secrets redacted.",
        discussion: """
            With --connect it then reaches every server the configuration names, as the worker does \
            at start: Redis (authentication, TLS, its eviction and persistence settings, judged as the \
            worker judges them) and Kafka (the metadata of every topic read or written). Nothing is \
            written, consumed or joined. Exit status: 2 invalid, 1 a server could not be used, 0 valid \
            (and, with --connect, every server usable).
            """)

    @OptionGroup var options: WorkerOptions
    @Flag(help: "Also reach Redis and Kafka and check what the worker needs of them.") var connect = false
    @Option(help: "With --connect: how long to wait for a Kafka broker's answer, e.g. 10s.") var timeout: String = "10s"

    func validate() throws {
        guard let wait = DurationParser.parse(timeout), wait > .zero else { throw ValidationError("--timeout must be a duration such as 10s") }
    }

    func run() async throws {
        let layers: [[String: ConfigValue]]
        let config: WorkerConfiguration
        do {
            layers = try ConfigLoader.layers(file: options.config, flags: options.flags)
            config = try ConfigLoader.resolve(layers)
        } catch {
            FileHandle.standardError.write(Data("invalid: \(error)\n".utf8))
            throw ExitCode(2)
        }
        for line in ConfigLoader.describe(layers) { print(line) }
        print("valid")
        guard connect else { return }
        let findings = await ConnectionCheck.run(config, timeout: DurationParser.parse(timeout)!)
        for finding in findings { print(finding) }
        let problems = findings.filter(\.problem).count
        guard problems == 0 else {
            print("not usable: \(problems) problem\(problems == 1 ? "" : "s")")
            throw ExitCode(1)
        }
        print("usable")
    }
}

struct ExampleConfig: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "example-config",
        abstract: "Print an example configuration file: every key, its meaning and its default.")

    func run() throws { print(ConfigSchema.exampleYAML(), terminator: "") }
}

/// For a container's HEALTHCHECK or a probe script: asks the worker's own HTTP endpoint, so the
/// runtime image needs no curl.
struct Healthcheck: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Ask a running worker's /healthz (or --path /readyz); exit 0 when it answers 200.")

    @Option(help: "The worker's http.port; default: http.port of --config and DEDUPD_HTTP_PORT, as the worker reads them.") var port: Int?
    @Option(help: "The worker's configuration file, for its http.port.") var config: String?
    @Option(help: "Path to ask.") var path: String = "/healthz"

    func run() throws {
        var configured: Int?
        if port == nil {
            // The same file and DEDUPD_* variables the worker reads, so the port is set in one place.
            let layers = (try? ConfigLoader.layers(file: config)) ?? []
            configured = layers.reversed().lazy.compactMap { $0["http.port"].flatMap { Int($0.text) } }.first
        }
        guard let port = port ?? configured else {
            throw ValidationError("give --port, or --config with http.port, or set DEDUPD_HTTP_PORT")
        }
        guard let (status, body) = HealthProbe.get(port: port, path: path) else {
            print("no answer on 127.0.0.1:\(port)")
            throw ExitCode(1)
        }
        print("\(status): \(body)")
        if !status.hasPrefix("HTTP/1.1 200") { throw ExitCode(1) }
    }
}

struct Produce: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Send submissions (JSON orders with a message-id header) where a fraction are repeats.")

    @Option(help: "Kafka bootstrap servers.") var bootstrapServers: String
    @Option(help: "Topic to send to.") var topic: String
    @Option(help: "How many messages to send.") var count: Int = 10_000
    @Option(help: "Fraction of messages that repeat an earlier id (0...1).") var duplicateRatio: Double = 0.3
    @Option(help: "Prefix of the ids: <prefix>-0, <prefix>-1, ...") var idPrefix: String = "ord"
    @Option(help: "Random seed; the same seed sends the same stream.") var seed: UInt64 = 42
    @Option(help: "Messages per second (default: as fast as possible); spreads the stream so later repeats arrive after the window.")
    var rate: Int?

    func validate() throws {
        guard count > 0 else { throw ValidationError("--count must be greater than 0, got \(count)") }
        guard (0...1).contains(duplicateRatio) else {
            throw ValidationError("--duplicate-ratio must be between 0 and 1, got \(duplicateRatio)")
        }
    }

    func run() async throws {
        OperationalLog.bootstrap(level: .warning, format: .logfmt)
        let report = try await SubmissionProducer.run(
            bootstrapServers: bootstrapServers, topic: topic, count: count, duplicateRatio: duplicateRatio,
            idPrefix: idPrefix, seed: seed, rate: rate, logger: Logger(label: "dedupd.produce"))
        print("sent=\(report.sent) unique=\(report.unique) repeats=\(report.repeats) failed=\(report.failed) elapsed=\(WorkerConfiguration.format(report.elapsed))")
        if report.failed > 0 { throw ExitCode(1) }
    }
}

struct MockKafka: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mock-kafka",
        abstract: "Host a librdkafka mock cluster in this process; prints its bootstrap servers first, serves until SIGTERM/SIGINT.",
        discussion: """
            Faults can be injected from outside by writing commands to its standard input, one per line; \
            each is answered with a line "ok <command>" or "error <reason>" on stdout:
              broker-down ID            take a broker down (its connections close, requests fail)
              broker-up ID              bring it back
              leader TOPIC PARTITION ID move a partition's leadership to broker ID
              coordinator GROUP ID      move a consumer group's coordinator to broker ID
              rtt ID MS                 delay every answer of broker ID by MS milliseconds (0: none)
              topic-error TOPIC NAME    answer metadata requests for TOPIC with librdkafka's error NAME, e.g. \
            UNKNOWN_TOPIC_OR_PART as a cluster without it (the mock creates every topic asked about); NO_ERROR clears it
            Broker ids are 1...N.
            """)

    @Option(help: "Number of mock brokers.") var brokers: Int = 3
    @Option(help: "Topic to create, NAME or NAME:PARTITIONS; repeatable.") var topic: [String] = []

    func run() async throws {
        OperationalLog.bootstrap(level: .warning, format: .logfmt)
        let logger = Logger(label: "dedupd.mock-kafka")
        let cluster = try MockKafkaCluster.make(brokers: brokers, logger: logger)
        for spec in topic {
            let parts = spec.split(separator: ":")
            guard let name = parts.first, parts.count <= 2, let partitions = Int32(parts.count == 2 ? parts[1] : "1") else {
                throw ValidationError("--topic must be NAME or NAME:PARTITIONS, got \(spec)")
            }
            try cluster.createTopic(String(name), partitions: partitions)
        }
        // Written unbuffered: whoever started this process reads the first line to find the cluster.
        FileHandle.standardOutput.write(Data((cluster.bootstrapServers + "\n").utf8))
        MockKafkaControl.start(cluster: cluster)
        try await ServiceGroup(
            configuration: .init(
                services: [.init(service: Holder(cluster: cluster))],
                gracefulShutdownSignals: [.sigterm, .sigint], logger: logger)
        ).run()
    }

    /// Keeps the cluster alive until shutdown.
    struct Holder: Service {
        let cluster: MockKafkaCluster
        func run() async throws {
            try? await gracefulShutdown()
            withExtendedLifetime(cluster) {}
        }
    }
}

struct Demo: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the whole flow locally: mock Kafka in process, a local redis-server, 10,000 submissions with 30% repeats.")

    @Option(help: "Submissions to send.") var count: Int = 10_000
    @Option(help: "Fraction of repeats (0...1).") var duplicateRatio: Double = 0.3
    @Option(help: "Use this Redis instead of starting a local redis-server.") var redisUrl: String?
    @Option(help: "Operational log level.") var logLevel: LogLevel = .notice

    func run() async throws {
        OperationalLog.bootstrap(level: logLevel, format: .logfmt)
        var options = LocalDemo.Options()
        options.count = count
        options.duplicateRatio = duplicateRatio
        options.redisURL = redisUrl
        let summary = try await LocalDemo.run(options, logger: Logger(label: "dedupd.demo"))
        print(LocalDemo.render(summary))
        if !summary.isExact { throw ExitCode(1) }
    }
}

/// Reads fault-injection commands for `mock-kafka` from stdin on a thread of its own (a blocking
/// read must not occupy Swift's cooperative pool). End of input just ends the reading.
enum MockKafkaControl {
    static func start(cluster: MockKafkaCluster) {
        let thread = Thread {
            while let line = readLine() {
                let reply = apply(line.split(separator: " ").map(String.init), cluster: cluster)
                FileHandle.standardOutput.write(Data((reply + "\n").utf8))
            }
        }
        thread.name = "mock-kafka-control"
        thread.start()
    }

    static func apply(_ words: [String], cluster: MockKafkaCluster) -> String {
        let command = words.joined(separator: " ")
        func broker(_ s: String) -> Int32? {
            guard let id = Int32(s), id >= 1, id <= Int32(cluster.brokerCount) else { return nil }
            return id
        }
        switch words.first {
        case "broker-down" where words.count == 2:
            guard let id = broker(words[1]) else { return "error no broker \(words[1])" }
            cluster.setBrokerDown(id)
        case "broker-up" where words.count == 2:
            guard let id = broker(words[1]) else { return "error no broker \(words[1])" }
            cluster.setBrokerUp(id)
        case "leader" where words.count == 4:
            guard let partition = Int32(words[2]), let id = broker(words[3]) else { return "error usage: leader TOPIC PARTITION ID" }
            cluster.setPartitionLeader(topic: words[1], partition: partition, broker: id)
        case "coordinator" where words.count == 3:
            guard let id = broker(words[2]) else { return "error no broker \(words[2])" }
            cluster.setCoordinator(group: words[1], broker: id)
        case "rtt" where words.count == 3:
            guard let id = broker(words[1]), let ms = Int(words[2]), ms >= 0 else { return "error usage: rtt ID MS" }
            cluster.setBrokerRoundTrip(id, .milliseconds(ms))
        case "topic-error" where words.count == 3:
            guard cluster.setTopicError(words[1], words[2]) else { return "error no librdkafka error named \(words[2])" }
        case nil:
            return "error empty command"
        default:
            return "error unknown command: \(command)"
        }
        return "ok \(command)"
    }
}

struct Token: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Token mode: issue one-time tokens that a route with dedup.token accepts once.",
        subcommands: [Issue.self])

    struct Issue: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Issue tokens into Redis and print them, one per line.")

        @OptionGroup var options: AdminOptions
        @Option(help: "How long a token may be used, e.g. 15m.") var ttl: String = "15m"
        @Option(help: "How many tokens.") var count: Int = 1

        func run() async throws {
            guard let ttl = DurationParser.parse(ttl), ttl > .zero else {
                throw ValidationError("--ttl must be a duration such as 30s, 15m, 24h, got \(self.ttl)")
            }
            guard count > 0 else { throw ValidationError("--count must be greater than 0, got \(count)") }
            OperationalLog.bootstrap(level: .warning, format: .logfmt)
            let config = try options.load()
            let store = try await options.connectStore(config)
            let issuer = TokenIssuer(store: store, namespace: config.namespace)
            for token in try await issuer.issue(count: count, ttl: ttl) { print(token) }
            await store.redis.close()
        }
    }
}

struct Bench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Measure dedupd against the physical limits here: a bare consumer (K), pipelined Redis (R), the pipeline, its RSS and latency.",
        discussion: """
            Hosts a mock cluster in this process and starts a local redis-server; runs the worker legs as \
            `dedupd run` child processes of this same binary. Build with -c release first.
            """)

    @Option(help: "Messages per leg.") var count: Int = 1_000_000
    @Option(help: "Partitions of each leg's topic.") var partitions: Int32 = 6
    @Option(help: "Dedup window of the worker legs.") var window: String = "100ms"
    @Option(help: "Fraction of repeats (0...1).") var duplicateRatio: Double = 0.3
    @Option(help: "Seconds of the paced latency leg.") var latencySeconds: Int = 10
    @Option(help: "Messages per second of the latency leg (default: half of dedupd's measured rate).") var latencyRate: Int?
    @Option(help: "Mock brokers.") var brokers: Int = 1
    @Option(help: "appendfsync of the local redis-server: everysec or always.") var redisFsync: String = "everysec"
    @Flag(help: "Only the seen-set leg: Redis memory per remembered id and Redis CPU per unique message of the compact layout, the keys layout and SET NX PX, with AOF and without (no Kafka).")
    var seenSetOnly = false

    func validate() throws {
        guard count >= 1000 else { throw ValidationError("--count must be at least 1000, got \(count)") }
        guard partitions >= 1 else { throw ValidationError("--partitions must be at least 1") }
        if let latencyRate, latencyRate < 100 { throw ValidationError("--latency-rate must be at least 100 messages per second") }
        guard DurationParser.parse(window) != nil else { throw ValidationError("--window must be a duration such as 100ms") }
    }

    func run() async throws {
        OperationalLog.bootstrap(level: .notice, format: .logfmt)
        let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        var options = Benchmark.Options(executable: exe)
        options.count = count
        options.partitions = partitions
        options.window = DurationParser.parse(window)!
        options.duplicateRatio = duplicateRatio
        options.latencySeconds = latencySeconds
        options.latencyRate = latencyRate
        options.brokers = brokers
        options.redisFsync = redisFsync
        let logger = Logger(label: "dedupd.bench")
        logger.notice("bench: seen-set leg (compact layout, keys layout, SET NX PX; with and without AOF)")
        var seenSet: [SeenSetBench.Figures] = []
        for appendOnly in [true, false] {
            seenSet.append(try await SeenSetBench.run(
                count: count, duplicateRatio: duplicateRatio, appendOnly: appendOnly, fsync: redisFsync,
                logger: Logger(label: "bench", factory: { _ in SwiftLogNoOpLogHandler() })))
        }
        // Printed first: the full bench's output ends with its one summary line for scripts.
        print(SeenSetBench.render(seenSet))
        if !seenSetOnly {
            let figures = try await Benchmark.run(options, logger: logger)
            print(Benchmark.render(figures))
        }
    }
}

/// The bench's bare consumer (K), run as a child process of `dedupd bench`.
struct BenchBare: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench-bare", abstract: "The bench's bare consumer (a child of dedupd bench).", shouldDisplay: false)

    @Option var bootstrapServers: String
    @Option var group: String
    @Option var topic: String
    @Option var count: Int
    @Option(help: "A librdkafka property, NAME=VALUE; repeatable.") var property: [String] = []
    @Option(help: "Look this header up in every message (as a worker keyed by a header must); default: headers untouched.")
    var readHeader: String?

    func run() throws {
        var properties: [String: String] = [:]
        for p in property {
            guard let eq = p.firstIndex(of: "=") else { throw ValidationError("--property takes NAME=VALUE, got \(p)") }
            properties[String(p[..<eq])] = String(p[p.index(after: eq)...])
        }
        let n = try Benchmark.bareChild(
            bootstrapServers: bootstrapServers, group: group, topic: topic, count: count, properties: properties,
            header: readHeader)
        if n < count { throw ExitCode(1) }
    }
}

// MARK: - Admin commands: inspect, forget, dlq replay


/// Where the admin commands find Redis and Kafka: the same file, `DEDUPD_*` variables and flags as `run`.
struct AdminOptions: ParsableArguments {
    @Option(name: .long, help: "YAML configuration file (the worker's).")
    var config: String?
    @Option(name: .long, help: "redis://[user:password@]host:port/db (redis.url).")
    var redisUrl: String?
    @Option(name: .long, help: "standalone, cluster or sentinel (redis.mode).")
    var redisMode: String?
    @Option(name: .long, help: "Namespace of the keys (dedup.namespace); default: the configuration's, else 'default'.")
    var namespace: String?
    @Option(name: .long, help: "A route of the configuration: its keys' namespace (routes.<name>.dedup.namespace, else the name).")
    var route: String?
    @Option(name: .long, help: "Kafka bootstrap servers (kafka.bootstrap_servers).")
    var bootstrapServers: String?
    @Option(name: .customShort("X"), help: ArgumentHelp("A librdkafka property, NAME=VALUE (kafka.properties.NAME); repeatable.", valueName: "name=value"))
    var kafkaProperties: [String] = []

    func validate() throws {
        if namespace != nil && route != nil { throw ValidationError("give --namespace or --route, not both") }
        for p in kafkaProperties where !p.contains("=") || p.hasPrefix("=") {
            throw ValidationError("-X takes a librdkafka property as NAME=VALUE, got \(p)")
        }
    }

    func load() throws -> AdminConfiguration {
        var flags: [String: String] = [:]
        flags["redis.url"] = redisUrl
        flags["redis.mode"] = redisMode
        flags["dedup.namespace"] = namespace
        flags["kafka.bootstrap_servers"] = bootstrapServers
        for p in kafkaProperties {
            let eq = p.firstIndex(of: "=")!
            flags[ConfigSchema.kafkaPropertiesPrefix + p[..<eq]] = String(p[p.index(after: eq)...])
        }
        var config: AdminConfiguration
        do {
            config = try ConfigLoader.resolveAdmin(ConfigLoader.layers(file: self.config, flags: flags))
        } catch {
            throw ValidationError("\(error)")
        }
        if let route {
            guard let ns = config.routeNamespaces[route] else {
                let known = config.routeNamespaces.keys.sorted().joined(separator: ", ")
                throw ValidationError("no route \(route) in the configuration (routes: \(known.isEmpty ? "none" : known))")
            }
            config.namespace = ns
            config.doneLayout = config.routeLayouts[route] ?? config.doneLayout
            config.entityRecords = config.routeEntityRecords[route] ?? config.entityRecords
        }
        return config
    }

    /// Loads the configuration, connects to Redis and namespaces `keys`: the set-up `inspect` and `forget` share.
    func open(_ keys: [String]) async throws -> (RedisClaimStore, [DedupKey], DoneLayout) {
        let config = try load()
        let store = try await connectStore(config)
        return (store, keys.map { DedupKey(raw: $0, namespace: config.namespace) }, config.doneLayout)
    }

    /// `open` for guard entities: their store names and where their states are kept.
    func openEntities(_ entities: [String]) async throws -> (RedisClaimStore, [DedupKey], CompactRecords) {
        let config = try load()
        let store = try await connectStore(config)
        return (store, entities.map { EntityGuard.storeName($0, namespace: config.namespace) }, config.entityRecords)
    }

    func connectStore(_ c: AdminConfiguration) async throws -> RedisClaimStore {
        let logger = Logger(label: "dedupd.admin")
        let redis = try await RedisTarget.connect(c.redis, logger: logger)
        return RedisClaimStore(redis: redis, logger: logger)
    }
}

func describe(_ state: KeyState) -> String {
    func left(_ ms: Int64) -> String { ms < 0 ? "no expiry" : WorkerConfiguration.format(.milliseconds(ms)) }
    switch state {
    case .absent: return "absent"
    case .pending(let owner, let ttl): return "pending owner=\(owner) lease_left=\(left(ttl))"
    case .done(let ttl): return "done ttl_left=\(left(ttl))"
    }
}

func describe(_ entity: EntityState) -> String {
    func left(_ ms: Int64) -> String { ms < 0 ? "no expiry" : WorkerConfiguration.format(.milliseconds(ms)) }
    guard entity.state != nil || entity.pending != nil else { return "absent (no recorded state: guard.initial applies)" }
    var out = "state=\(entity.state ?? "(none)")"
    if entity.state != nil { out += entity.ttlMillis == -1 ? " ttl_left=(set at the next slot edge)" : " ttl_left=\(left(entity.ttlMillis))" }
    if let p = entity.pending {
        out += " pending to=\(p.target) hold=\(p.holdID) owner=\(p.owner) lease_left=\(left(p.ttlMillis))"
    }
    return out
}

struct Inspect: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show dedup keys' state in Redis: absent, pending (owner, lease left) or done (TTL left); with --entity, guard entities' state.")

    @OptionGroup var options: AdminOptions
    @Flag(help: "The arguments are guard entities (e.g. an order number): show each one's recorded state and a transition in flight.")
    var entity = false
    @Argument(help: "Dedup keys as handlers see them (e.g. a message id), without the dedupd:<namespace>: prefix; with --entity, entity ids.")
    var keys: [String]

    func validate() throws { if keys.isEmpty { throw ValidationError("give at least one key") } }

    func run() async throws {
        OperationalLog.bootstrap(level: .warning, format: .logfmt)
        if entity {
            let (store, entityKeys, records) = try await options.openEntities(keys)
            for (key, state) in zip(entityKeys, try await store.inspectEntities(entityKeys.map(\.storeKey), records: records)) {
                print("\(key.raw) \(describe(state)) redis.key=\(key.storeKey)")
            }
            await store.redis.close()
            return
        }
        let (store, dedupKeys, layout) = try await options.open(keys)
        let states = try await store.inspect(dedupKeys.map(\.storeKey), layout: layout)
        for (key, state) in zip(dedupKeys, states) {
            print("\(key.raw) \(describe(state)) redis.key=\(key.storeKey)")
        }
        await store.redis.close()
    }
}

struct Forget: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Remove done keys so that a resend of their message is dispatched again; says what it removed.",
        discussion: """
            A key pending under a worker is a copy in flight and is kept unless --force is given (that \
            worker can then no longer confirm it, and the message may be dispatched twice). Exit status 1 \
            when a pending key was kept.
            """)

    @OptionGroup var options: AdminOptions
    @Flag(help: "Remove pending keys too (with --entity: entities held by a message in flight).") var force = false
    @Flag(help: "The arguments are guard entities: reset each one's recorded state, so it starts again from guard.initial.")
    var entity = false
    @Argument(help: "Dedup keys as handlers see them, without the dedupd:<namespace>: prefix; with --entity, entity ids.")
    var keys: [String]

    func validate() throws { if keys.isEmpty { throw ValidationError("give at least one key") } }

    func run() async throws {
        OperationalLog.bootstrap(level: .warning, format: .logfmt)
        if entity {
            let (store, entityKeys, records) = try await options.openEntities(keys)
            var kept = 0
            for (key, r) in zip(entityKeys, try await store.forgetEntities(entityKeys.map(\.storeKey), records: records, force: force)) {
                if r.state.state == nil && r.state.pending == nil {
                    print("\(key.raw) absent, nothing removed redis.key=\(key.storeKey)")
                } else if r.removed {
                    print("\(key.raw) removed (was \(describe(r.state))) redis.key=\(key.storeKey)")
                } else {
                    kept += 1
                    print("\(key.raw) kept: \(describe(r.state)); a transition is in flight, --force removes it redis.key=\(key.storeKey)")
                }
            }
            await store.redis.close()
            if kept > 0 { throw ExitCode(1) }
            return
        }
        let (store, dedupKeys, layout) = try await options.open(keys)
        let results = try await store.forget(dedupKeys.map(\.storeKey), force: force, layout: layout)
        var kept = 0
        for (key, r) in zip(dedupKeys, results) {
            switch (r.state, r.removed) {
            case (.absent, _):
                print("\(key.raw) absent, nothing removed redis.key=\(key.storeKey)")
            case (_, true):
                print("\(key.raw) removed (was \(describe(r.state))) redis.key=\(key.storeKey)")
            case (_, false):
                kept += 1
                print("\(key.raw) kept: \(describe(r.state)); a copy is in flight, --force removes it redis.key=\(key.storeKey)")
            }
        }
        await store.redis.close()
        if kept > 0 { throw ExitCode(1) }
    }
}

struct DLQ: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dlq", abstract: "Dead-letter topic tools.", subcommands: [Replay.self])

    struct Replay: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Resend dead-lettered records without their dedupd-* headers, to --to or the topic they came from.",
            discussion: """
                Reads --from in its own consumer group (default dedupd-dlq-replay.<from>[.<reason>]) up to the end \
                of each partition, and commits only after every resent record was delivered: a second run \
                resends only what arrived since.
                """)

        @OptionGroup var options: AdminOptions
        @Option(help: "The dead-letter topic to read.") var from: String
        @Option(help: "Topic to send to; default: each record's dedupd-original-topic header.") var to: String?
        @Option(help: "Only records with this dedupd-reason code (e.g. handler_failed, missing_header).") var reason: String?
        @Option(help: "Resend at most this many records.") var limit: Int?
        @Option(help: "Consumer group of the replay.") var group: String?
        @Option(help: "Stop when nothing arrives for this long.") var timeout: String = "30s"

        func validate() throws {
            if let limit, limit <= 0 { throw ValidationError("--limit must be greater than 0, got \(limit)") }
            if DurationParser.parse(timeout) == nil { throw ValidationError("--timeout must be a duration such as 30s") }
        }

        func run() async throws {
            OperationalLog.bootstrap(level: .warning, format: .logfmt)
            let config = try options.load()
            guard let bootstrap = config.bootstrapServers else {
                throw ValidationError("kafka.bootstrap_servers is required (--bootstrap-servers, DEDUPD_KAFKA_BOOTSTRAP_SERVERS or the file)")
            }
            var o = DeadLetterReplay.Options(
                bootstrapServers: bootstrap, from: from, to: to, reason: reason, limit: limit, group: group)
            o.kafkaProperties = config.kafkaProperties
            o.timeout = DurationParser.parse(timeout)!
            let r = try await DeadLetterReplay.run(o, logger: Logger(label: "dedupd.dlq"))
            let targets = r.byTarget.sorted { $0.key < $1.key }.map { "\($0.key):\($0.value)" }.joined(separator: ",")
            print("read=\(r.read) replayed=\(r.replayed) skipped.reason=\(r.skippedReason) skipped.no_target=\(r.skippedNoTarget) failed=\(r.failed) to=\(targets.isEmpty ? "-" : targets)")
            if r.failed > 0 { throw ExitCode(1) }
        }
    }
}

extension LogLevel: ExpressibleByArgument {}

// MARK: - explain, config-reference


/// `dedupd explain`: one message through the configuration's routing and key templates, offline.
struct Explain: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show which route a message (on stdin) takes and its dedup key, or the bad-input reason it would get; offline.",
        discussion: """
            Reads the message value from standard input (or --value). Nothing connects to Kafka or Redis. \
            Exit status 0 when the message would be keyed, 1 when it is bad input.
              echo '{"orderNo":"ord-13"}' | dedupd explain --config dedupd.yaml --header message-id=ord-13
            """)

    @Option(help: "The worker's configuration file; DEDUPD_* variables apply as for run.") var config: String?
    @Option(name: .customLong("header"), help: "A header of the message, NAME=VALUE; repeatable.") var headers: [String] = []
    @Option(name: .customLong("key"), help: "The message's Kafka record key.") var recordKey: String?
    @Option(help: "The topic it arrives on; default: the first of kafka.topics.") var topic: String?
    @Option(help: "The message value; default: standard input.") var value: String?

    func run() throws {
        let config: WorkerConfiguration
        do {
            // Not ConfigLoader.load: explain needs neither the password file nor librdkafka's checks.
            config = try WorkerConfiguration(layers: ConfigLoader.layers(file: self.config))
        } catch {
            throw ValidationError("\(error)")
        }
        var parsed: [MessageHeader] = []
        for h in headers {
            guard let eq = h.firstIndex(of: "="), eq != h.startIndex else {
                throw ValidationError("--header must be NAME=VALUE, got \(h)")
            }
            parsed.append(MessageHeader(name: String(h[..<eq]), value: Array(h[h.index(after: eq)...].utf8)))
        }
        let body = value.map { Array($0.utf8) } ?? [UInt8](FileHandle.standardInput.readDataToEndOfFile())
        let message = InboundMessage(
            topic: topic ?? config.topics[0], partition: 0, offset: 0,
            key: recordKey.map { Array($0.utf8) }, value: body, headers: parsed)
        let explanation = Explanation.explain(message, config: config)
        for line in explanation.lines { print(line) }
        if case .bad = explanation.outcome { throw ExitCode(1) }
    }
}


/// `dedupd config-reference`: the generated block of docs/configuration.md.
struct ConfigReference: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "config-reference",
        abstract: "Print the configuration reference (Markdown): every key, its default, variable, flag and meaning.")

    /// The `dedupd run` flag of each key (WorkerOptions), for the reference's flag column.
    static let flags: [String: String] = [
        "kafka.bootstrap_servers": "--bootstrap-servers", "kafka.topics": "--topic", "kafka.group": "--group",
        "redis.url": "--redis-url", "redis.mode": "--redis-mode", "dedup.key": "--key", "dedup.window": "--window", "dedup.retention": "--retention",
        "handler.output": "--output", "run.stop_when_idle": "--stop-when-idle", "log.format": "--log-format",
        "log.level": "--log-level", "log.stats_interval": "--stats-interval", "http.port": "--http-port",
    ]

    func run() throws { print(ConfigSchema.referenceMarkdown(flags: Self.flags), terminator: "") }
}
