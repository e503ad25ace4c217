import DedupCore
import DedupService
import Foundation
import TestSupport
import Testing
import Yams

/// Configuration as an operator meets it: three sources, every validation message, secrets.
@Suite struct ConfigPrecedenceTests {
    let required = ["DEDUPD_KAFKA_BOOTSTRAP_SERVERS": "env:9092", "DEDUPD_KAFKA_TOPICS": "t"]

    func file(_ text: String) throws -> (TemporaryDirectory, String) {
        let dir = try TemporaryDirectory(prefix: "dedupd-config")
        let path = dir.file("dedupd.yaml").path
        try text.write(toFile: path, atomically: true, encoding: .utf8)
        return (dir, path)
    }

    @Test func flagsWinOverEnvironmentWhichWinsOverFileWhichWinsOverDefaults() throws {
        let (dir, path) = try file("""
            kafka: {bootstrap_servers: "file:9092", topics: [a, b], group: file-group}
            dedup: {window: 2s, retention: 1h, namespace: file-ns}
            """)
        defer { _ = dir }
        let env = ["DEDUPD_DEDUP_WINDOW": "3s", "DEDUPD_DEDUP_RETENTION": "2h", "DEDUPD_KAFKA_GROUP": "env-group"]
        let flags = ["dedup.window": "4s"]
        let c = try ConfigLoader.load(file: path, environment: env, flags: flags)
        #expect(c.dedup.window == .seconds(4), "flag beats env and file")
        #expect(c.dedup.retention == .seconds(7200), "env beats file")
        #expect(c.group == "env-group", "env beats file")
        #expect(c.dedup.namespace == "file-ns", "file beats default")
        #expect(c.topics == ["a", "b"])
        #expect(c.handler.concurrency == 4, "default")
        let described = ConfigLoader.describe(try ConfigLoader.layers(file: path, environment: env, flags: flags))
        #expect(described.contains("dedup.window = 4s  # flag"))
        #expect(described.contains("dedup.retention = 2h  # environment DEDUPD_DEDUP_RETENTION"))
        #expect(described.contains("dedup.namespace = file-ns  # \(path)"))
        #expect(described.contains("handler.concurrency = 4  # default"))
    }

    @Test func passwordFromFileOrEnvironmentReachesTheConfigurationAndIsRedacted() throws {
        let dir = try TemporaryDirectory(prefix: "dedupd-config")
        let pwFile = dir.file("pw").path
        try "from-file-pw-81\n".write(toFile: pwFile, atomically: true, encoding: .utf8)
        let fromFile = try ConfigLoader.load(file: nil, environment: required.merging(["DEDUPD_REDIS_PASSWORD_FILE": pwFile]) { $1 })
        #expect(fromFile.redis.password == "from-file-pw-81", "one trailing newline dropped")
        let fromEnv = try ConfigLoader.load(file: nil, environment: required.merging(["DEDUPD_REDIS_PASSWORD": "env-pw-82"]) { $1 })
        #expect(fromEnv.redis.password == "env-pw-82")
        let layers = try ConfigLoader.layers(
            file: nil,
            environment: required.merging(["DEDUPD_REDIS_PASSWORD": "env-pw-82"]) { $1 },
            flags: ["redis.url": "redis://app:url-pw-83@r:6379/0", "kafka.properties.sasl.password": "sasl-pw-84"])
        let text = ConfigLoader.describe(layers).joined(separator: "\n")
        for secret in ["env-pw-82", "url-pw-83", "sasl-pw-84"] { #expect(!text.contains(secret)) }
        #expect(text.contains("redis.password = ***  # environment DEDUPD_REDIS_PASSWORD"))
        #expect(text.contains("redis.url = redis://app:***@r:6379/0  # flag"))
        #expect(text.contains("kafka.properties.sasl.password = ***  # flag"))
    }

    /// Sentinel mode: the Sentinels' own password from a file or the environment, with its user,
    /// for the worker and the admin commands alike; never shown.
    @Test func sentinelCredentialsReachBothConfigurationsAndAreRedacted() throws {
        let dir = try TemporaryDirectory(prefix: "dedupd-config")
        let pwFile = dir.file("sentinel-pw").path
        try "sentinel-file-pw-85\n".write(toFile: pwFile, atomically: true, encoding: .utf8)
        let sentinel = required.merging([
            "DEDUPD_REDIS_MODE": "sentinel", "DEDUPD_REDIS_URL": "redis://:primary-pw-86@s1:26379,s2:26379/0",
            "DEDUPD_REDIS_SENTINEL_MASTER": "orders", "DEDUPD_REDIS_SENTINEL_USERNAME": "watcher",
        ]) { $1 }
        let fromFile = try ConfigLoader.load(file: nil, environment: sentinel.merging(["DEDUPD_REDIS_SENTINEL_PASSWORD_FILE": pwFile]) { $1 })
        #expect(fromFile.redis.sentinelPassword == "sentinel-file-pw-85" && fromFile.redis.sentinelUsername == "watcher")
        #expect(fromFile.redis.sentinelMaster == "orders" && fromFile.redis.password == nil, "the primary's password stays in the URL")
        let withEnv = sentinel.merging(["DEDUPD_REDIS_SENTINEL_PASSWORD": "sentinel-env-pw-87"]) { $1 }
        let admin = try ConfigLoader.resolveAdmin(ConfigLoader.layers(file: nil, environment: withEnv))
        #expect(admin.redis.sentinelPassword == "sentinel-env-pw-87" && admin.redis.sentinelUsername == "watcher")
        let text = ConfigLoader.describe(try ConfigLoader.layers(file: nil, environment: withEnv)).joined(separator: "\n")
        for secret in ["primary-pw-86", "sentinel-env-pw-87"] { #expect(!text.contains(secret)) }
        #expect(text.contains("redis.sentinel_password = ***  # environment DEDUPD_REDIS_SENTINEL_PASSWORD"))
        #expect(text.contains("redis.sentinel_username = watcher  # environment DEDUPD_REDIS_SENTINEL_USERNAME"))
    }
}

@Suite struct ValidationMessageTests {
    let required = ["kafka.bootstrap_servers": "k:9092", "kafka.topics": "t"]

    /// The message an operator reads for each kind of mistake, exactly.
    static let cases: [([String: String], String)] = [
        (["dedup.windwo": "5s"], #"config key dedup.windwo (from flag): unknown key; did you mean dedup.window?"#),
        (["kafka.bootstrap_servers": ""], #"config key kafka.bootstrap_servers: is required (set it in the file, as DEDUPD_KAFKA_BOOTSTRAP_SERVERS, or by flag)"#),
        (["kafka.topics": " , "], #"config key kafka.topics: at least one topic is required"#),
        (["dedup.window": "5 parsecs"], #"config key dedup.window = "5 parsecs" (from flag): must be a duration such as 500ms, 2s, 5m, 24h"#),
        (["dedup.window": "0"], #"config key dedup.window = "0" (from flag): must be greater than 0"#),
        (["handler.concurrency": "-1"], #"config key handler.concurrency = "-1" (from flag): must be a whole number greater than 0"#),
        (["buffer.max_bytes": "lots"], #"config key buffer.max_bytes = "lots" (from flag): must be a size such as 65536, 512KiB, 64MiB"#),
        (["dedup.keep": "middle"], #"config key dedup.keep = "middle" (from flag): must be one of: first, last"#),
        (["log.format": "xml"], #"config key log.format = "xml" (from flag): must be one of: logfmt, json"#),
        (["dedup.window": "10s", "dedup.retention": "5s"], #"config key dedup.retention = "5s" (from flag): must be at least dedup.window (10s)"#),
        (["dedup.lease": "1s"], #"config key dedup.lease = "1s" (from flag): must be longer than dedup.window (5s) plus handler time"#),
        (["dedup.namespace": "a:b"], #"config key dedup.namespace = "a:b" (from flag): must be non-empty and contain no ':'"#),
        (["redis.url": "http://app:pw-1@r"], #"config key redis.url = "http://app:***@r" (from flag): must look like redis://[user:password@]host:port/db, or rediss://... for TLS"#),
        (["redis.password": "pw-2", "redis.password_file": "/run/pw"], #"config key redis.password_file = "/run/pw" (from flag): set either redis.password or redis.password_file, not both"#),
        (["redis.password": "pw-3", "redis.url": "redis://:pw-4@r:6379/0"], #"config key redis.url = "redis://:***@r:6379/0" (from flag): holds a password and redis.password or redis.password_file is set too; give the password once"#),
        (["redis.url": "redis://:pw-6@a:7000,b:7001/0"], #"config key redis.url = "redis://:***@a:7000,b:7001/0" (from flag): lists several nodes, which only redis.mode: cluster or sentinel accepts (set redis.mode: cluster for a Redis Cluster, sentinel for Sentinels)"#),
        (["redis.mode": "sentinel", "redis.url": "redis://a:26379,b:26379/1"], #"config key redis.sentinel_master: is required with redis.mode: sentinel (the name of the Sentinels' `sentinel monitor` line)"#),
        (["redis.sentinel_master": "mymaster"], #"config key redis.sentinel_master = "mymaster" (from flag): has no effect without redis.mode: sentinel"#),
        (["redis.sentinel_password": "pw-8"], #"config key redis.sentinel_password = "***" (from flag): has no effect without redis.mode: sentinel"#),
        (["redis.mode": "sentinel", "redis.url": "redis://a:26379/0", "redis.sentinel_master": "m", "redis.sentinel_username": "watcher"], #"config key redis.sentinel_username = "watcher" (from flag): needs redis.sentinel_password or redis.sentinel_password_file (AUTH takes a user with its password)"#),
        (["redis.mode": "sentinel", "redis.url": "redis://a:26379/0", "redis.sentinel_master": "m", "redis.sentinel_password": "pw-9", "redis.sentinel_password_file": "/run/spw"], #"config key redis.sentinel_password_file = "/run/spw" (from flag): set either redis.sentinel_password or redis.sentinel_password_file, not both"#),
        (["redis.mode": "sentinel", "redis.url": "redis://a:26379/0", "redis.sentinel_master": "m", "redis.sentinel_password_file": "/nonexistent/spw"], #"config key redis.sentinel_password_file = "/nonexistent/spw" (from flag): cannot read the file"#),
        (["redis.mode": "cluster", "redis.url": "redis://:pw-7@a:7000,b:7001/2"], #"config key redis.url = "redis://:***@a:7000,b:7001/2" (from flag): must look like redis://[user:password@]host:port[,host:port...] (seed nodes of the cluster, no db), or rediss://... for TLS (invalid Redis Cluster URL: database 2: Redis Cluster has only database 0; remove '/2')"#),
        (["redis.mode": "sharded"], #"config key redis.mode = "sharded" (from flag): must be one of: standalone, cluster, sentinel"#),
        (["redis.wait_replicas": "two"], #"config key redis.wait_replicas = "two" (from flag): must be a whole number from 0 to 64"#),
        (["redis.password_file": "/nonexistent/pw"], #"config key redis.password_file = "/nonexistent/pw" (from flag): cannot read the file"#),
        (["http.port": "70000"], #"config key http.port = "70000" (from flag): must be a port number from 1 to 65535"#),
        (["http.port": "0"], #"config key http.port = "0" (from flag): must be a whole number greater than 0"#),
        (["kafka.properties.session.timeout.ms": "banana"], #"config key kafka.properties.session.timeout.ms = "banana" (from flag): librdkafka rejects it: Invalid value for configuration property "session.timeout.ms""#),
        (["kafka.properties.no.such.property": "1"], #"config key kafka.properties.no.such.property = "1" (from flag): librdkafka rejects it: No such configuration property: "no.such.property""#),
        (["kafka.properties.sasl.password": "pw-5", "kafka.properties.security.protocol": "carrier-pigeon"], #"config key kafka.properties.security.protocol = "carrier-pigeon" (from flag): librdkafka rejects it: Invalid value "carrier-pigeon" for configuration property "security.protocol""#),
    ]

    @Test(arguments: cases.indices)
    func eachMistakeHasItsMessage(_ i: Int) throws {
        let (flags, expected) = Self.cases[i]
        let error = #expect(throws: ConfigError.self) {
            try ConfigLoader.load(file: nil, environment: [:], flags: required.merging(flags) { $1 })
        }
        #expect(error?.description == expected)
        // Every password in these cases is spelt pw-<digit>; none may reach the message.
        #expect(error?.description.contains(/pw-\d/) == false, "no password in the message")
    }

    @Test func emptyPasswordFileAndBadYAML() throws {
        let dir = try TemporaryDirectory(prefix: "dedupd-config")
        let empty = dir.file("empty").path
        try "\n".write(toFile: empty, atomically: true, encoding: .utf8)
        let e1 = #expect(throws: ConfigError.self) {
            try ConfigLoader.load(file: nil, environment: [:], flags: required.merging(["redis.password_file": empty]) { $1 })
        }
        #expect(e1?.description == #"config key redis.password_file = "\#(empty)" (from flag): the file is empty"#)
        let yaml = dir.file("list.yaml").path
        try "- a\n- b\n".write(toFile: yaml, atomically: true, encoding: .utf8)
        let e2 = #expect(throws: ConfigError.self) { try ConfigLoader.load(file: yaml, environment: [:]) }
        #expect(e2?.description == #"config key --config = "\#(yaml)": the top level must be a mapping of sections (kafka:, redis:, dedup:, ...)"#)
        let e3 = #expect(throws: ConfigError.self) { try ConfigLoader.load(file: dir.file("missing.yaml").path, environment: [:]) }
        #expect(e3?.description.hasPrefix(#"config key --config = "\#(dir.file("missing.yaml").path)": cannot read the file"#) == true)
    }

    @Test func unknownEnvironmentVariableIsRejectedLikeAnUnknownKey() {
        let error = #expect(throws: ConfigError.self) {
            try ConfigLoader.load(file: nil, environment: ["DEDUPD_DEDUP_WINDWO": "1s"], flags: required)
        }
        #expect(error?.description == "config key DEDUPD_DEDUP_WINDWO (from environment DEDUPD_DEDUP_WINDWO): unknown key")
    }
}

@Suite struct ExampleConfigTests {
    static var repoRoot: URL {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    }

    @Test func committedExampleIsTheGeneratedOne() throws {
        let path = Self.repoRoot.appendingPathComponent("deploy/config/dedupd.example.yaml")
        let committed = try String(contentsOf: path, encoding: .utf8)
        #expect(committed == ConfigSchema.exampleYAML(), "regenerate: swift run dedupd example-config > deploy/config/dedupd.example.yaml")
    }

    @Test func exampleListsEveryKeyWithItsDefaultAndIsValid() throws {
        let yaml = ConfigSchema.exampleYAML()
        let dir = try TemporaryDirectory(prefix: "dedupd-config")
        let path = dir.file("example.yaml").path
        try yaml.write(toFile: path, atomically: true, encoding: .utf8)
        let layer = try ConfigLoader.fileLayer(path: path)
        for key in ConfigSchema.keys {
            if let value = layer[key.name] {
                if let d = key.defaultValue { #expect(value.text == d, "\(key.name) shows its default") }
            } else {
                #expect(key.defaultValue == nil, "\(key.name) has a default, so it is set in the example")
                #expect(yaml.contains("# \(key.name.split(separator: ".", maxSplits: 1).last!):"), "\(key.name) listed, commented out")
            }
        }
        _ = try ConfigLoader.load(file: path, environment: [:])
    }

    @Test func theCommentedRoutesExampleIsValidOnceUncommented() throws {
        let yaml = ConfigSchema.exampleYAML()
        let start = try #require(yaml.range(of: "# routes:"))
        let uncommented = yaml[..<start.lowerBound] + yaml[start.lowerBound...].split(separator: "\n").map {
            $0.hasPrefix("# ") ? String($0.dropFirst(2)) : String($0)
        }.joined(separator: "\n")
        let dir = try TemporaryDirectory(prefix: "dedupd-config")
        let path = dir.file("routes.yaml").path
        try uncommented.write(toFile: path, atomically: true, encoding: .utf8)
        let c = try ConfigLoader.load(file: path, environment: [:])
        #expect(c.routes.map(\.name) == ["payments", "profile-edits", "orders"])
        #expect(c.routes[1].dedup.keep == .last && c.routes[1].dedup.namespace == "profile-edits")
        #expect(c.routes[2].dedup.entityGuard?.transitions["paid"] == ["shipped", "refunded"])
        #expect(c.routes[2].dedup.entityGuard?.onReject == .deadLetter)
        #expect(c.dedup.entityGuard == nil && c.routes[0].dedup.entityGuard == nil, "a guard is the route's own")
    }
}

/// `guard.*`: the shape of the issue's YAML, and the tables `check-config` refuses, each naming
/// the key and where it came from.
@Suite struct GuardConfigTests {
    func load(_ yaml: String, env: [String: String] = [:]) throws -> WorkerConfiguration {
        let dir = try TemporaryDirectory(prefix: "dedupd-guard-config")
        let path = dir.file("g.yaml").path
        try ("kafka: {bootstrap_servers: \"k:9092\", topics: [orders]}\n" + yaml).write(toFile: path, atomically: true, encoding: .utf8)
        return try ConfigLoader.load(file: path, environment: env)
    }

    func refusal(_ yaml: String, env: [String: String] = [:]) -> String {
        do { _ = try load(yaml, env: env); return "accepted" } catch { return "\(error)" }
    }

    let good = """
        guard:
          entity: json:/orderNo
          state: json:/status
          initial: [created]
          transitions:
            created: [paid, cancelled]
            paid: [shipped, refunded]
            shipped: [delivered]
          on_reject: drop
        """

    @Test func theIssuesShapeLoads() throws {
        let g = try #require(try load(good).dedup.entityGuard)
        #expect(g.initial == ["created"] && g.transitions.count == 3 && g.onReject == .drop)
        #expect(g.retention == .seconds(86_400), "default: dedup.retention")
        let env = try #require(try load("", env: [
            "DEDUPD_GUARD_ENTITY": "json:/orderNo", "DEDUPD_GUARD_STATE": "json:/status", "DEDUPD_GUARD_INITIAL": "created",
            "DEDUPD_GUARD_TRANSITIONS": "created=paid|cancelled;paid=shipped",
        ]).dedup.entityGuard)
        #expect(env.transitions == ["created": ["paid", "cancelled"], "paid": ["shipped"]])
    }

    @Test func tablesThatCannotWorkAreRefusedNamingTheKey() {
        var e = refusal(good.replacingOccurrences(of: "    created: [paid, cancelled]\n    paid: [shipped, refunded]\n    shipped: [delivered]\n", with: "    {}\n"))
        #expect(e.contains("guard.transitions") && e.contains("empty") && e.contains("g.yaml"), "\(e)")
        e = refusal(good.replacingOccurrences(of: "shipped: [delivered]", with: "shiped: [delivered]"))
        #expect(e.contains("guard.transitions") && e.contains("\"shiped\"") && e.contains("g.yaml"), "\(e)")
        e = refusal(good.replacingOccurrences(of: "json:/status", with: "json:status"))
        #expect(e.contains("guard.state") && e.contains("g.yaml"), "\(e)")
        e = refusal(good.replacingOccurrences(of: "  entity: json:/orderNo\n", with: ""))
        #expect(e.contains("guard.state") && e.contains("no effect without guard.entity"), "\(e)")
        e = refusal(good + "\ndedup: {keep: last}")
        #expect(e.contains("guard.entity") && e.contains("keep: first"), "\(e)")
        e = refusal(good + "\ndedup: {on_store_error: fail_open}")
        #expect(e.contains("dedup.on_store_error"), "\(e)")
        e = refusal(good.replacingOccurrences(of: "initial: [created]", with: "initial: []"))
        #expect(e.contains("guard.initial"), "\(e)")
    }
}

/// The `http` handler's TLS and header settings: validated at start, secrets never printed.
@Suite struct HTTPHandlerConfigTests {
    let base = ["DEDUPD_KAFKA_BOOTSTRAP_SERVERS": "env:9092", "DEDUPD_KAFKA_TOPICS": "t",
                "DEDUPD_HANDLER_TYPE": "http", "DEDUPD_HANDLER_URL": "https://hooks.example/in"]

    @Test func headersAndTLSFilesReachTheSettingsAndHeaderValuesAreRedacted() throws {
        let certs = try TLSTestCertificates()
        var env = base
        env["DEDUPD_HANDLER_HEADERS"] = "Authorization=env:HOOK_TOKEN, X-Team=payments-Zq81"
        env["DEDUPD_HANDLER_TLS_CA_FILE"] = certs.path("ca.pem")
        let c = try ConfigLoader.load(file: nil, environment: env, flags: [:])
        #expect(c.handler.headers == ["Authorization=env:HOOK_TOKEN", "X-Team=payments-Zq81"])
        #expect(c.handler.tlsCAFile == certs.path("ca.pem"))
        let described = ConfigLoader.describe(try ConfigLoader.layers(file: nil, environment: env, flags: [:])).joined(separator: "\n")
        #expect(described.contains("handler.headers = ***"))
        #expect(!described.contains("payments-Zq81"))
    }

    @Test func aClientCertificateNeedsItsKeyAndHeadersNeedANameAndAValue() throws {
        var env = base
        env["DEDUPD_HANDLER_TLS_CERT_FILE"] = "/etc/dedupd/client.pem"
        let noKey = #expect(throws: ConfigError.self) { _ = try ConfigLoader.load(file: nil, environment: env, flags: [:]) }
        #expect("\(noKey!)".contains("handler.tls_key_file"))
        env = base
        env["DEDUPD_HANDLER_HEADERS"] = "Authorization"
        let bad = #expect(throws: ConfigError.self) { _ = try ConfigLoader.load(file: nil, environment: env, flags: [:]) }
        #expect("\(bad!)".contains("handler.headers") && "\(bad!)".contains("NAME=VALUE"))
    }

    /// The TLS files are loaded at start as the handler loads them; a bad one is named by its key,
    /// a route's own when the route sets it.
    @Test func tlsFilesAreLoadedAtStartUnderTheirRoutesKey() throws {
        let certs = try TLSTestCertificates()
        let garbage = certs.dir.file("garbage.pem").path
        try "not a certificate\n".write(toFile: garbage, atomically: true, encoding: .utf8)
        var env = base
        env["DEDUPD_HANDLER_TLS_CA_FILE"] = certs.path("ca.pem")
        env["DEDUPD_HANDLER_TLS_CERT_FILE"] = certs.path("client.pem")
        env["DEDUPD_HANDLER_TLS_KEY_FILE"] = certs.path("client.key")
        _ = try ConfigLoader.load(file: nil, environment: env, flags: [:])

        env["DEDUPD_HANDLER_TLS_CA_FILE"] = garbage
        let bad = #expect(throws: ConfigError.self) { _ = try ConfigLoader.load(file: nil, environment: env, flags: [:]) }
        #expect(bad?.description.hasPrefix(#"config key handler.tls_ca_file = "\#(garbage)" (from environment DEDUPD_HANDLER_TLS_CA_FILE): cannot load a PEM certificate from it"#) == true, "\(bad.map { "\($0)" } ?? "accepted")")
        env["DEDUPD_HANDLER_TLS_CA_FILE"] = certs.path("ca.pem")
        env["DEDUPD_HANDLER_TLS_KEY_FILE"] = certs.path("client.pem")
        let key = #expect(throws: ConfigError.self) { _ = try ConfigLoader.load(file: nil, environment: env, flags: [:]) }
        #expect(key?.key == "handler.tls_key_file" && key?.problem.hasPrefix("cannot load a PEM private key from it") == true, "\(key.map { "\($0)" } ?? "accepted")")
        env["DEDUPD_HANDLER_TLS_KEY_FILE"] = certs.path("server.key")
        let mismatch = #expect(throws: ConfigError.self) { _ = try ConfigLoader.load(file: nil, environment: env, flags: [:]) }
        #expect(mismatch?.key == "handler.tls_key_file" && mismatch?.problem.hasPrefix("is not the private key of handler.tls_cert_file") == true,
                "\(mismatch.map { "\($0)" } ?? "accepted")")
        env["DEDUPD_HANDLER_TLS_KEY_FILE"] = certs.path("client.key")

        let dir = try TemporaryDirectory(prefix: "dedupd-route-tls")
        let yaml = dir.file("dedupd.yaml").path
        try """
            routes:
              - name: pay
                match: {topic: payments}
                handler: {type: http, url: "https://pay.example/in", tls_ca_file: "/nonexistent/pay-ca.pem"}
            """.write(toFile: yaml, atomically: true, encoding: .utf8)
        let routed = #expect(throws: ConfigError.self) {
            _ = try ConfigLoader.load(file: yaml, environment: ["DEDUPD_KAFKA_BOOTSTRAP_SERVERS": "env:9092", "DEDUPD_KAFKA_TOPICS": "t"], flags: [:])
        }
        #expect(routed?.description == #"config key routes.pay.handler.tls_ca_file = "/nonexistent/pay-ca.pem" (from \#(yaml)): cannot read the file"#)
    }
}

/// `redis.tls.*` with `redis.url`, and the certificates `kafka.properties` names, checked without
/// connecting (check-config sees the same).
@Suite struct RedisTLSConfigTests {
    let base = ["DEDUPD_KAFKA_BOOTSTRAP_SERVERS": "env:9092", "DEDUPD_KAFKA_TOPICS": "t"]

    @Test func tlsKeysNeedARedissURLAndReadableFiles() throws {
        let certs = try TLSTestCertificates()
        var env = base
        env["DEDUPD_REDIS_URL"] = "rediss://cache.example:6380/0"
        env["DEDUPD_REDIS_TLS_CA_FILE"] = certs.path("ca.pem")
        let c = try ConfigLoader.load(file: nil, environment: env, flags: [:])
        #expect(c.redis.tls.caFile == certs.path("ca.pem"))

        env["DEDUPD_REDIS_URL"] = "redis://cache.example:6379/0"
        let plain = #expect(throws: ConfigError.self) { _ = try ConfigLoader.load(file: nil, environment: env, flags: [:]) }
        #expect("\(plain!)".contains("redis.tls.ca_file") && "\(plain!)".contains("rediss://"))

        env["DEDUPD_REDIS_URL"] = "rediss://cache.example:6380/0"
        env["DEDUPD_REDIS_TLS_CA_FILE"] = "/nonexistent/ca.pem"
        let missing = #expect(throws: ConfigError.self) { _ = try ConfigLoader.load(file: nil, environment: env, flags: [:]) }
        #expect("\(missing!)".contains("redis.tls.ca_file") && "\(missing!)".contains("cannot read the file"))

        env["DEDUPD_REDIS_TLS_CA_FILE"] = nil
        env["DEDUPD_REDIS_TLS_CERT_FILE"] = certs.path("client.pem")
        let noKey = #expect(throws: ConfigError.self) { _ = try ConfigLoader.load(file: nil, environment: env, flags: [:]) }
        #expect("\(noKey!)".contains("redis.tls.key_file"))
    }

    /// Certificates and keys are loaded at start as a connection loads them: a file that is no
    /// certificate, or a key of another certificate, is a config error naming its key, for
    /// `redis.tls.*` and for the files `kafka.properties` names alike.
    @Test func certificatesAndKeysAreLoadedAtStart() throws {
        let certs = try TLSTestCertificates()
        let garbage = certs.dir.file("garbage.pem").path
        try "not a certificate\n".write(toFile: garbage, atomically: true, encoding: .utf8)
        func problem(_ flags: [String: String]) -> String? {
            do {
                _ = try ConfigLoader.load(file: nil, environment: base, flags: flags)
                return nil
            } catch { return "\(error)" }
        }
        let redis = ["redis.url": "rediss://cache.example:6380/0"]
        #expect(problem(redis.merging(["redis.tls.ca_file": certs.path("ca.pem"), "redis.tls.cert_file": certs.path("client.pem"), "redis.tls.key_file": certs.path("client.key")]) { $1 }) == nil)
        #expect(problem(redis.merging(["redis.tls.ca_file": garbage]) { $1 })?
            .hasPrefix(#"config key redis.tls.ca_file = "\#(garbage)" (from flag): cannot load certificate authorities: "#) == true)
        #expect(problem(redis.merging(["redis.tls.cert_file": certs.path("client.pem"), "redis.tls.key_file": certs.path("server.key")]) { $1 })?
            .hasPrefix(#"config key redis.tls.key_file = "\#(certs.path("server.key"))" (from flag): cannot load the client key or it does not match redis.tls.cert_file: "#) == true)

        let kafka = "kafka.properties."
        let ssl = [kafka + "security.protocol": "ssl"]
        #expect(problem(ssl.merging([kafka + "ssl.ca.location": certs.path("ca.pem"), kafka + "ssl.certificate.location": certs.path("client.pem"), kafka + "ssl.key.location": certs.path("client.key")]) { $1 }) == nil)
        #expect(problem(ssl.merging([kafka + "ssl.ca.location": "/nonexistent/ca.pem"]) { $1 })
            == #"config key kafka.properties.ssl.ca.location = "/nonexistent/ca.pem" (from flag): cannot read the file"#)
        #expect(problem(ssl.merging([kafka + "ssl.ca.location": garbage]) { $1 })?
            .hasPrefix(#"config key kafka.properties.ssl.ca.location = "\#(garbage)" (from flag): librdkafka cannot start a client with it: ssl.ca.location failed: "#) == true)
        let mismatch = problem(ssl.merging([kafka + "ssl.certificate.location": certs.path("client.pem"), kafka + "ssl.key.location": certs.path("server.key")]) { $1 })
        #expect(mismatch?.hasPrefix(#"config key kafka.properties.ssl.key.location = "\#(certs.path("server.key"))" (from flag): librdkafka cannot start a client with it: "#) == true, "\(mismatch ?? "accepted")")
    }
}
