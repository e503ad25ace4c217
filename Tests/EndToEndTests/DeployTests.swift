import DedupCore
import Foundation
import Testing
import TestSupport
import Yams

/// Static checks of deploy/ (no Docker engine runs here): config files pass `dedupd check-config`,
/// the variables compose, Kubernetes, the image and the unit set are ones dedupd knows, the YAML
/// parses into the objects a cluster needs, the unit verifies, and the image installs exactly the
/// libraries the binary links.
@Suite(.serialized) struct DeployTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    static let deploy = root.appendingPathComponent("deploy")
    static let knownVariables = Set(ConfigSchema.keys.map(\.environmentName))

    static func text(_ path: String) throws -> String {
        try String(contentsOf: deploy.appendingPathComponent(path), encoding: .utf8)
    }

    static func yaml(_ path: String) throws -> [String: Any] {
        try #require(try Yams.load(yaml: text(path)) as? [String: Any], "\(path) is a YAML mapping")
    }

    static func yamlDocuments(_ path: String) throws -> [[String: Any]] {
        try Yams.load_all(yaml: text(path)).compactMap { $0 as? [String: Any] }
    }

    /// Runs the built binary with exactly `environment` (plus PATH); returns status, stdout, stderr.
    static func dedupd(_ arguments: [String], environment: [String: String] = [:]) async throws -> (Int32, String, String) {
        try await offPool { try dedupdBlocking(arguments, environment: environment) }
    }

    static func dedupdBlocking(_ arguments: [String], environment: [String: String] = [:]) throws -> (Int32, String, String) {
        let dir = try TemporaryDirectory(prefix: "dedupd-deploy")
        let out = dir.file("out"), err = dir.file("err")
        try Data().write(to: out)
        try Data().write(to: err)
        let p = Process()
        p.executableURL = try dedupdBinary()
        p.arguments = arguments
        p.environment = environment.merging(["PATH": "/usr/bin:/bin"]) { a, _ in a }
        p.standardOutput = try FileHandle(forWritingTo: out)
        p.standardError = try FileHandle(forWritingTo: err)
        try p.run()
        p.waitUntilExit()
        return (p.terminationStatus, try String(contentsOf: out, encoding: .utf8), try String(contentsOf: err, encoding: .utf8))
    }

    /// Every YAML file under deploy/config, and the config file inside the Kubernetes ConfigMap.
    @Test func everyConfigFilePassesCheckConfig() async throws {
        let configDir = Self.deploy.appendingPathComponent("config")
        var files = try FileManager.default.contentsOfDirectory(atPath: configDir.path)
            .filter { $0.hasSuffix(".yaml") }.map { configDir.appendingPathComponent($0).path }
        let configMap = try #require(try Self.yamlDocuments("k8s/configmap.yaml").first)
        let embedded = try #require((configMap["data"] as? [String: Any])?["dedupd.yaml"] as? String)
        let dir = try TemporaryDirectory(prefix: "dedupd-deploy")
        let extracted = dir.file("configmap-dedupd.yaml").path
        try embedded.write(toFile: extracted, atomically: true, encoding: .utf8)
        files.append(extracted)
        #expect(files.count >= 4)
        for file in files {
            let (status, out, err) = try await Self.dedupd(["check-config", "--config", file])
            #expect(status == 0, "\(file): \(err)")
            #expect(out.hasSuffix("valid\n"), "\(file): \(out)")
        }
    }

    /// The dedupd services of compose.yaml: known variables only, and each service's environment
    /// with its mounted config file passes check-config (the password file replaced by a temporary one).
    @Test func composeServicesUseKnownVariablesAndTheirSettingsAreValid() async throws {
        let compose = try Self.yaml("compose.yaml")
        let services = try #require(compose["services"] as? [String: Any])
        for required in ["kafka", "topics", "redis", "dedupd-1", "dedupd-2", "produce"] {
            #expect(services[required] != nil, "compose has \(required)")
        }
        let kafka = try #require(services["kafka"] as? [String: Any])
        let kafkaEnv = try #require(kafka["environment"] as? [String: Any])
        #expect("\(kafkaEnv["KAFKA_PROCESS_ROLES"] ?? "")" == "broker,controller", "KRaft, one node")
        let redis = try #require(services["redis"] as? [String: Any])
        let redisCommand = "\(redis["command"] ?? "")"
        #expect(redisCommand.contains("--appendonly yes") && redisCommand.contains("requirepass"))
        let produce = try #require(services["produce"] as? [String: Any])
        #expect((produce["command"] as? [String])?.first == "produce")

        let dir = try TemporaryDirectory(prefix: "dedupd-deploy")
        let pw = dir.file("pw").path
        try Self.text("secrets/redis_password.txt").write(toFile: pw, atomically: true, encoding: .utf8)
        var workers = 0
        for (name, value) in services {
            guard let service = value as? [String: Any] else { continue }
            let environment = (service["environment"] as? [String: Any]) ?? [:]
            let dedupdVars = environment.keys.filter { $0.hasPrefix("DEDUPD_") }
            for v in dedupdVars { #expect(Self.knownVariables.contains(v), "\(name): \(v) is a variable dedupd knows") }
            guard (service["command"] as? [String])?.first == "run" else { continue }
            workers += 1
            #expect(service["stop_grace_period"] as? String == "30s")
            let volumes = (service["volumes"] as? [String]) ?? []
            let mount = try #require(volumes.first { $0.hasSuffix(":/etc/dedupd/dedupd.yaml:ro") }, "\(name) mounts its config")
            let source = Self.deploy.appendingPathComponent(String(mount.split(separator: ":")[0])).standardized.path
            var env: [String: String] = [:]
            for v in dedupdVars { env[v] = "\(environment[v]!)" }
            if env["DEDUPD_REDIS_PASSWORD_FILE"] != nil { env["DEDUPD_REDIS_PASSWORD_FILE"] = pw }
            let (status, out, err) = try await Self.dedupd(["check-config", "--config", source], environment: env)
            #expect(status == 0, "\(name): \(err)")
            #expect(out.contains("redis.password_file = \(pw)  # environment DEDUPD_REDIS_PASSWORD_FILE"))
            #expect(!out.contains("dev-only-change-me"), "the password is not printed")
        }
        #expect(workers == 2, "two dedupd workers")
    }

    @Test func kubernetesObjectsHaveTheRequiredFields() async throws {
        var byKind: [String: [String: Any]] = [:]
        for file in try FileManager.default.contentsOfDirectory(atPath: Self.deploy.appendingPathComponent("k8s").path)
        where file.hasSuffix(".yaml") {
            for doc in try Self.yamlDocuments("k8s/\(file)") {
                let kind = try #require(doc["kind"] as? String, "\(file) objects have a kind")
                #expect(doc["apiVersion"] is String)
                #expect(((doc["metadata"] as? [String: Any])?["name"] as? String) != nil)
                byKind[kind] = doc
            }
        }
        let deployment = try #require(byKind["Deployment"])
        let spec = try #require(deployment["spec"] as? [String: Any])
        #expect((spec["replicas"] as? Int ?? 0) >= 2)
        let template = try #require(spec["template"] as? [String: Any])
        let labels = try #require(((template["metadata"] as? [String: Any])?["labels"] as? [String: String]))
        let podSpec = try #require(template["spec"] as? [String: Any])
        let grace = try #require(podSpec["terminationGracePeriodSeconds"] as? Int)

        let configMap = try #require(byKind["ConfigMap"])
        let embedded = try #require((configMap["data"] as? [String: Any])?["dedupd.yaml"] as? String)
        let config = try #require(try Yams.load(yaml: embedded) as? [String: Any])
        let deadline = DurationParser.parse(((config["run"] as? [String: Any])?["shutdown_deadline"] as? String) ?? "10s")!
        #expect(Duration.seconds(grace) > deadline + .seconds(5), "grace \(grace)s leaves room past the \(deadline) deadline")
        let httpPort = try #require((config["http"] as? [String: Any])?["port"] as? Int)

        let container = try #require((podSpec["containers"] as? [[String: Any]])?.first)
        let resources = try #require(container["resources"] as? [String: Any])
        for part in ["requests", "limits"] {
            let r = try #require(resources[part] as? [String: Any], "resources.\(part)")
            #expect(r["memory"] != nil && r["cpu"] != nil || part == "limits" && r["memory"] != nil, "\(part) has memory (and cpu)")
        }
        for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
            let get = try #require((container[probe] as? [String: Any])?["httpGet"] as? [String: Any], "\(probe)")
            #expect(get["path"] as? String == path)
            #expect(get["port"] as? Int == httpPort || get["port"] as? String == "http")
        }
        let ports = (container["ports"] as? [[String: Any]]) ?? []
        #expect(ports.contains { $0["containerPort"] as? Int == httpPort && $0["name"] as? String == "http" })
        let env = (container["env"] as? [[String: Any]]) ?? []
        for name in env.compactMap({ $0["name"] as? String }) {
            #expect(Self.knownVariables.contains(name), "\(name) is a variable dedupd knows")
        }
        let secret = try #require(byKind["Secret"])
        let secretName = try #require((secret["metadata"] as? [String: Any])?["name"] as? String)
        #expect(((secret["stringData"] as? [String: Any])?["password"]) != nil)
        let volumes = (podSpec["volumes"] as? [[String: Any]]) ?? []
        let secretVolume = try #require(volumes.first { ($0["secret"] as? [String: Any])?["secretName"] as? String == secretName })
        let mounts = (container["volumeMounts"] as? [[String: Any]]) ?? []
        let secretMount = try #require(mounts.first { $0["name"] as? String == secretVolume["name"] as? String })
        let passwordFile = try #require(env.first { $0["name"] as? String == "DEDUPD_REDIS_PASSWORD_FILE" }?["value"] as? String)
        #expect(passwordFile.hasPrefix((secretMount["mountPath"] as! String) + "/"), "the password file is in the Secret's mount")
        #expect(!env.contains { $0["name"] as? String == "DEDUPD_REDIS_PASSWORD" }, "the password is not in the environment")

        let pdb = try #require(byKind["PodDisruptionBudget"])
        let selector = try #require((((pdb["spec"] as? [String: Any])?["selector"] as? [String: Any])?["matchLabels"]) as? [String: String])
        #expect(selector.allSatisfy { labels[$0.key] == $0.value }, "the PDB selects the Deployment's pods")
    }

    /// The unit's settings, then `systemd-analyze verify` on a copy whose ExecStart points at the built binary.
    @Test func systemdUnitHasTheRequiredSettings() async throws {
        let unit = try Self.text("systemd/dedupd.service")
        var settings: [String: [String]] = [:]
        for line in unit.split(separator: "\n") where !line.hasPrefix("#") && line.contains("=") {
            let parts = line.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false).map(String.init)
            settings[parts[0], default: []].append(parts[1])
        }
        #expect(settings["Restart"] == ["on-failure"])
        #expect(settings["KillSignal"] == ["SIGTERM"])
        #expect(settings["DynamicUser"] == ["yes"])
        #expect(settings["ProtectSystem"] == ["strict"])
        #expect(settings["NoNewPrivileges"] == ["yes"])
        #expect(settings["EnvironmentFile"]?.isEmpty == false)
        let host = try #require(try Yams.load(yaml: Self.text("config/dedupd.host.yaml")) as? [String: Any])
        let deadline = DurationParser.parse(((host["run"] as? [String: Any])?["shutdown_deadline"] as? String) ?? "10s")!
        let stop = try #require(settings["TimeoutStopSec"]?.first.flatMap { DurationParser.parse($0) })
        #expect(stop > deadline, "TimeoutStopSec \(stop) above the shutdown deadline \(deadline)")
        for line in (try? Self.text("systemd/dedupd.env"))?.split(separator: "\n") ?? [] where !line.hasPrefix("#") && line.contains("=") {
            let name = String(line.split(separator: "=")[0])
            #expect(Self.knownVariables.contains(name), "dedupd.env: \(name) is a variable dedupd knows")
        }
        for value in settings["Environment"] ?? [] {
            let name = String(value.split(separator: "=")[0])
            if name.hasPrefix("DEDUPD_") { #expect(Self.knownVariables.contains(name), "\(name)") }
        }
    }

    static let systemdAnalyze = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"].first { FileManager.default.isExecutableFile(atPath: $0) }

    @Test(.enabled(if: systemdAnalyze != nil, "systemd-analyze is not installed here; the unit's settings are still checked above"))
    func systemdAnalyzeVerifiesTheUnit() async throws {
        let dir = try TemporaryDirectory(prefix: "dedupd-unit")
        let unit = try Self.text("systemd/dedupd.service")
            .replacingOccurrences(of: "/usr/local/bin/dedupd", with: try dedupdBinary().path)
        let path = dir.file("dedupd.service").path
        try unit.write(toFile: path, atomically: true, encoding: .utf8)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Self.systemdAnalyze!)
        p.arguments = ["verify", path]
        let err = Pipe()
        p.standardError = err
        p.standardOutput = err
        try p.run()
        let output = try await offPool { String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self) }
        p.waitUntilExit()
        print("systemd-analyze verify: status \(p.terminationStatus) \(output)")
        #expect(p.terminationStatus == 0, "\(output)")
        let unitProblems = output.split(separator: "\n").filter { $0.contains("dedupd.service") }
        #expect(unitProblems.isEmpty, "\(unitProblems)")
    }

    /// Libraries in the runtime image: those the binary links once Swift's runtime and Foundation are
    /// linked statically (`--static-swift-stdlib`), i.e. the binary's own non-Swift dependencies plus
    /// those of the Swift libraries it links, as Debian packages, minus what debian:bookworm-slim has.
    static let tools = ["/usr/bin/readelf", "/usr/bin/dpkg", "/usr/bin/ldd"].allSatisfy { FileManager.default.isExecutableFile(atPath: $0) }

    @Test(.enabled(if: tools, "readelf, ldd or dpkg is missing: the runtime libraries cannot be read off the binary here"))
    func dockerfileRuntimeStageInstallsExactlyTheLinkedLibraries() async throws {
        let dockerfile = try Self.text("docker/Dockerfile")
        let stages = Array(dockerfile.components(separatedBy: "\nFROM ").dropFirst())
        try #require(stages.count == 2, "two stages: build and runtime")
        let build = stages[0], runtime = stages[1]
        #expect(build.hasPrefix("swift:") && build.contains("--static-swift-stdlib"))
        #expect(build.contains("librdkafka-dev") && build.contains("libhiredis-dev"))
        #expect(runtime.hasPrefix("debian:") && runtime.contains("slim"))
        #expect(runtime.contains("\nUSER 10001"), "non-root")
        #expect(runtime.contains("\nHEALTHCHECK ") && runtime.contains(#"ENTRYPOINT ["dedupd"]"#))

        let installLine = try #require(runtime.components(separatedBy: "apt-get install").dropFirst().first)
        let installed = Set(installLine.split(separator: "\n")[0...1].joined(separator: " ")
            .split(whereSeparator: { $0 == " " || $0 == "\\" }).map(String.init)
            .prefix { $0 != "&&" }.filter { !$0.hasPrefix("-") && !$0.isEmpty })

        let binary = try dedupdBinary().path
        let resolved = try await offPool { Self.lddPaths(binary) }
        let swiftRuntime = { (lib: String) in
            lib.hasPrefix("libswift") || lib.hasPrefix("libFoundation") || lib.hasPrefix("lib_Foundation")
                || lib.hasPrefix("libdispatch") || lib.hasPrefix("libBlocksRuntime")
        }
        var linked = Set<String>()
        var queue = try await offPool { Self.needed(binary) }
        var seen = Set<String>()
        while let lib = queue.popLast() {
            guard seen.insert(lib).inserted else { continue }
            if swiftRuntime(lib) {
                if let path = resolved[lib] { queue += Self.needed(path) }
            } else {
                linked.insert(lib)
            }
        }
        var packages = Set<String>()
        let linkedPaths = linked.compactMap { lib in resolved[lib].map { (lib, $0) } }  // not the dynamic loader itself
        let owners = try await offPool {
            linkedPaths.map { lib, path in
                let owner = Self.run("/usr/bin/dpkg", ["-S", URL(fileURLWithPath: path).resolvingSymlinksInPath().path])
                    .split(separator: ":").first.map(String.init) ?? ""
                let fallback = Self.run("/usr/bin/dpkg", ["-S", path]).split(separator: ":").first.map(String.init) ?? ""
                return (lib, path, owner.isEmpty ? fallback : owner)
            }
        }
        for (lib, path, package) in owners {
            #expect(!package.isEmpty, "\(lib) (\(path)) belongs to a Debian package")
            packages.insert(package)
        }
        // In debian:bookworm-slim already (apt and dpkg need them).
        let base: Set<String> = ["libc6", "libgcc-s1", "libstdc++6", "zlib1g"]
        let needed = packages.subtracting(base)
        print("runtime libraries linked: \(linked.sorted()) -> packages \(needed.sorted()); Dockerfile installs \(installed.sorted())")
        #expect(installed.subtracting(["ca-certificates"]) == needed)
    }

    static func needed(_ path: String) -> [String] {
        run("/usr/bin/readelf", ["-d", path]).split(separator: "\n").compactMap { line in
            guard line.contains("(NEEDED)"), let open = line.firstIndex(of: "["), let close = line.lastIndex(of: "]") else { return nil }
            return String(line[line.index(after: open)..<close])
        }
    }

    static func lddPaths(_ path: String) -> [String: String] {
        var out: [String: String] = [:]
        for line in run("/usr/bin/ldd", [path]).split(separator: "\n") {
            let parts = line.split(separator: " ")
            if parts.count >= 3, parts[1] == "=>", parts[2].hasPrefix("/") { out[String(parts[0].trimmingCharacters(in: .whitespaces))] = String(parts[2]) }
        }
        return out
    }

    static func run(_ tool: String, _ arguments: [String]) -> String {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: tool)
        p.arguments = arguments
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = FileHandle.nullDevice
        guard (try? p.run()) != nil else { return "" }
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return String(decoding: data, as: UTF8.self)
    }
}

/// The defects a user or operator found by running deploy/ for real, each checked where a test can
/// see it without Docker or Kubernetes.
extension DeployTests {
    static func allDeployFiles() throws -> [String] {
        let fm = FileManager.default
        return fm.enumerator(atPath: deploy.path)!.compactMap { $0 as? String }
            .filter { !$0.hasPrefix("secrets/") && !$0.hasSuffix(".md") }
            .filter { var d: ObjCBool = false; _ = fm.fileExists(atPath: deploy.appendingPathComponent($0).path, isDirectory: &d); return !d.boolValue }
    }

    /// `DEDUPD_HTTP_PORT` in an image, compose file or manifest silently beats `http.port` in the
    /// mounted config: the port is set in the config files only.
    @Test func noDeployFileOverridesTheHTTPPort() throws {
        for file in try Self.allDeployFiles() {
            #expect(!(try Self.text(file)).contains("DEDUPD_HTTP_PORT"), "\(file) sets DEDUPD_HTTP_PORT")
        }
        let dockerfile = try Self.text("docker/Dockerfile")
        let healthcheck = try #require(dockerfile.split(separator: "\n").first { $0.hasPrefix("HEALTHCHECK ") })
        #expect(healthcheck.contains("--config"), "the healthcheck reads http.port from the config the worker reads")
    }

    @Test func composeKafkaKeepsItsDataAndIsReachableFromTheHost() throws {
        let services = try #require(try Self.yaml("compose.yaml")["services"] as? [String: Any])
        let kafka = try #require(services["kafka"] as? [String: Any])
        let env = try #require(kafka["environment"] as? [String: Any])
        let volumes = (kafka["volumes"] as? [String]) ?? []
        let dataMount = try #require(volumes.first { $0.hasPrefix("kafka-data:") }?.split(separator: ":")[1], "a named volume for Kafka's data")
        #expect("\(env["KAFKA_LOG_DIRS"] ?? "")" == String(dataMount), "Kafka writes its log dirs to the mounted volume")
        let advertised = "\(env["KAFKA_ADVERTISED_LISTENERS"] ?? "")".split(separator: ",")
        let host = try #require(advertised.first { $0.contains("//localhost:") }, "a listener advertised as localhost for the host")
        let hostPort = String(host.split(separator: ":").last!)
        let ports = ((kafka["ports"] as? [Any]) ?? []).map { "\($0)" }
        #expect(ports.contains { $0.hasPrefix("\(hostPort):") || $0 == hostPort }, "port \(hostPort) is published: \(ports)")
        let protocols = "\(env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"] ?? "")"
        let name = String(host.split(separator: ":").first!)
        #expect(protocols.contains("\(name):"), "the host listener \(name) has a security protocol")
        #expect("\(env["KAFKA_LISTENERS"] ?? "")".contains("\(name)://:\(hostPort)"))
    }

    @Test func composeWorkersRunUnderAnInit() throws {
        let services = try #require(try Self.yaml("compose.yaml")["services"] as? [String: Any])
        var workers = 0
        for (name, value) in services {
            guard let service = value as? [String: Any], (service["command"] as? [String])?.first == "run" else { continue }
            workers += 1
            #expect(service["init"] as? Bool == true, "\(name): init: true reaps exec handlers' grandchildren")
        }
        #expect(workers == 2)
    }

    static let redisServer = ["/usr/bin/redis-server", "/usr/local/bin/redis-server"].first { FileManager.default.isExecutableFile(atPath: $0) }

    /// Runs compose's Redis command and healthcheck here, with the secret file and the port
    /// replaced: Redis requires the password, the healthcheck passes, and the password is in no
    /// process's command line.
    @Test(.enabled(if: redisServer != nil, "redis-server is not installed"))
    func composeRedisKeepsThePasswordOutOfArgv() async throws {
        let services = try #require(try Self.yaml("compose.yaml")["services"] as? [String: Any])
        let redis = try #require(services["redis"] as? [String: Any])
        let entrypoint = try #require(redis["entrypoint"] as? [String])
        #expect(entrypoint == ["/bin/sh", "-c"])
        let command = try #require((redis["command"] as? [String])?.first)
        let healthcheck = try #require(((redis["healthcheck"] as? [String: Any])?["test"] as? [String]))
        #expect(healthcheck.first == "CMD-SHELL")
        let dir = try TemporaryDirectory(prefix: "dedupd-compose-redis")
        let password = "compose-test-\(UInt32.random(in: 0...UInt32.max))"
        try (password + "\n").write(to: dir.file("pw"), atomically: true, encoding: .utf8)
        let port = try freePort()
        func local(_ s: String) -> String {
            s.replacingOccurrences(of: "$$", with: "$").replacingOccurrences(of: "/run/secrets/redis_password", with: dir.file("pw").path)
        }
        let server = local(command).replacingOccurrences(of: "redis-server - ", with: "redis-server - --port \(port) --dir \(dir.path) ")
        #expect(server != local(command), "the command runs redis-server with its configuration on stdin")
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/sh")
        p.arguments = ["-c", server]
        p.currentDirectoryURL = dir.url
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        // Children inherit the test thread's blocked signals; unblock them so SIGKILL and SIGTERM work.
        try withDefaultSignalMask { try p.run() }
        defer { kill(p.processIdentifier, SIGKILL); p.waitUntilExit() }
        @Sendable func sh(_ script: String) -> Int32 {
            let q = Process()
            q.executableURL = URL(fileURLWithPath: "/bin/sh")
            q.arguments = ["-c", script]
            q.standardOutput = FileHandle.nullDevice
            q.standardError = FileHandle.nullDevice
            guard (try? q.run()) != nil else { return -1 }
            q.waitUntilExit()
            return q.terminationStatus
        }
        let check = local(healthcheck[1]).replacingOccurrences(of: "redis-cli ", with: "redis-cli -p \(port) ")
        let deadline = ContinuousClock.now + .seconds(10)
        var healthy = false
        while !healthy && ContinuousClock.now < deadline {
            healthy = try await offPool { sh(check) == 0 }
            if !healthy { try await Task.sleep(for: .milliseconds(100)) }
        }
        #expect(healthy, "the healthcheck passes against the running Redis")
        let refused = try await offPool { sh("redis-cli -p \(port) ping | grep -q NOAUTH") }
        #expect(refused == 0, "Redis requires the password")
        // Every process's command line: none holds the password.
        for pid in try FileManager.default.contentsOfDirectory(atPath: "/proc") where Int(pid) != nil {
            guard let data = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") else { continue }
            let cmdline = String(decoding: data, as: UTF8.self)
            #expect(!cmdline.contains(password), "pid \(pid): \(cmdline)")
        }
    }

    static func kubernetesObjects() throws -> [String: [String: Any]] {
        var byKind: [String: [String: Any]] = [:]
        for file in try FileManager.default.contentsOfDirectory(atPath: deploy.appendingPathComponent("k8s").path) where file.hasSuffix(".yaml") {
            for doc in try yamlDocuments("k8s/\(file)") { if let kind = doc["kind"] as? String { byKind[kind] = doc } }
        }
        return byKind
    }

    @Test func kubernetesWorkersAreSafeToRollDrainAndThrottleFree() throws {
        let objects = try Self.kubernetesObjects()
        let deployment = try #require(objects["Deployment"])
        let template = try #require((deployment["spec"] as? [String: Any])?["template"] as? [String: Any])
        let podSpec = try #require(template["spec"] as? [String: Any])
        let container = try #require((podSpec["containers"] as? [[String: Any]])?.first)
        let env = (container["env"] as? [[String: Any]]) ?? []
        // Static membership needs stable member names, which a Deployment's pods do not have.
        #expect(!env.contains { $0["name"] as? String == "DEDUPD_KAFKA_GROUP_INSTANCE_ID" }, "no group.instance.id in a Deployment")
        let configMap = try #require(objects["ConfigMap"])
        let embedded = try #require((configMap["data"] as? [String: Any])?["dedupd.yaml"] as? String)
        let config = try #require(try Yams.load(yaml: embedded) as? [String: Any])
        #expect((config["kafka"] as? [String: Any])?["group_instance_id"] == nil)
        #expect((config["kafka"] as? [String: Any])?["properties"].flatMap { ($0 as? [String: Any])?["group.instance.id"] } == nil)

        let pdb = try #require(objects["PodDisruptionBudget"]?["spec"] as? [String: Any])
        #expect(pdb["unhealthyPodEvictionPolicy"] as? String == "AlwaysAllow", "an unready pod (Redis down) does not block drains")
        #expect(podSpec["automountServiceAccountToken"] as? Bool == false)
        let spread = (podSpec["topologySpreadConstraints"] as? [[String: Any]]) ?? []
        #expect(spread.contains { $0["topologyKey"] as? String == "kubernetes.io/hostname" })

        let volumes = (podSpec["volumes"] as? [[String: Any]]) ?? []
        let mounts = (container["volumeMounts"] as? [[String: Any]]) ?? []
        let tmp = try #require(mounts.first { $0["mountPath"] as? String == "/tmp" }, "a writable /tmp under the read-only root")
        #expect(volumes.contains { $0["name"] as? String == tmp["name"] as? String && $0["emptyDir"] != nil })

        let resources = try #require(container["resources"] as? [String: Any])
        #expect((resources["limits"] as? [String: Any])?["cpu"] == nil, "no CPU limit: a quota throttles the loop's bursts")
        #expect((resources["requests"] as? [String: Any])?["cpu"] != nil)

        // The pod template carries the config's checksum, so a config change rolls the pods.
        let annotations = try #require((template["metadata"] as? [String: Any])?["annotations"] as? [String: Any])
        let checksum = try #require(annotations["dedupd.io/config-sha256"] as? String)
        let dir = try TemporaryDirectory(prefix: "dedupd-k8s")
        try embedded.write(to: dir.file("dedupd.yaml"), atomically: true, encoding: .utf8)
        let actual = String(Self.run("/usr/bin/sha256sum", [dir.file("dedupd.yaml").path]).prefix(64))
        #expect(checksum == actual, "deployment.yaml's dedupd.io/config-sha256 is stale: set it to \(actual)")

        // Probes reach the pod over IPv6 in IPv6 and dual-stack clusters.
        let bind = "\((config["http"] as? [String: Any])?["bind"] ?? ConfigSchema.byName["http.bind"]!.defaultValue!)"
        #expect(bind == "::", "http.bind :: listens on IPv6 and IPv4")
    }

    @Test func systemdUnitDrainsExecHandlersAndTheLogFileRotates() throws {
        let unit = try Self.text("systemd/dedupd.service")
        let lines = unit.split(separator: "\n").map(String.init)
        #expect(lines.contains("KillMode=mixed"), "exec handlers finish inside the drain")
        #expect(lines.contains("Restart=on-failure"))
        #expect(unit.contains("systemd 247"), "the unit says which systemd LoadCredential= with %d needs")
        let host = try #require(try Yams.load(yaml: Self.text("config/dedupd.host.yaml")) as? [String: Any])
        let output = try #require((host["handler"] as? [String: Any])?["output"] as? String)
        let logrotate = try Self.text("systemd/dedupd.logrotate")
        #expect(logrotate.contains("\(output) {"), "logrotate rotates the log handler's file \(output)")
        #expect(logrotate.contains("copytruncate"), "the handler does not reopen its file")
    }
}

extension DeployTests {
    /// Every `dedupd_*` series name in the Prometheus alert rules and the Grafana dashboard.
    static func monitoringMetricNames() throws -> Set<String> {
        var names = Set<String>()
        for file in ["prometheus/dedupd-alerts.yaml", "grafana/dedupd-dashboard.json"] {
            let text = try Self.text(file)
            var rest = Substring(text)
            while let r = rest.range(of: "dedupd_") {
                let name = rest[r.lowerBound...].prefix { $0.isLetter || $0.isNumber || $0 == "_" }
                names.insert(String(name))
                rest = rest[name.endIndex...]
            }
        }
        return names
    }

    @Test func alertRulesAndDashboardParse() throws {
        let rules = try Self.yaml("prometheus/dedupd-alerts.yaml")
        let groups = try #require(rules["groups"] as? [[String: Any]])
        let alerts = groups.flatMap { ($0["rules"] as? [[String: Any]]) ?? [] }
        #expect(alerts.count >= 5)
        for alert in alerts {
            #expect(alert["alert"] is String && alert["expr"] is String, "\(alert)")
            let runbook = ((alert["annotations"] as? [String: Any])?["runbook"] as? String) ?? ""
            let anchor = runbook.split(separator: "#").last.map(String.init) ?? ""
            let doc = try String(contentsOf: Self.root.appendingPathComponent("docs/operations.md"), encoding: .utf8)
            let headings = doc.split(separator: "\n").filter { $0.hasPrefix("#") }.map {
                $0.drop { $0 == "#" || $0 == " " }.lowercased().replacingOccurrences(of: " ", with: "-").filter { $0.isLetter || $0.isNumber || $0 == "-" }
            }
            #expect(headings.contains(anchor), "\(alert["alert"] ?? ""): runbook anchor #\(anchor) is a heading of docs/operations.md")
        }
        let data = try Data(contentsOf: Self.deploy.appendingPathComponent("grafana/dedupd-dashboard.json"))
        let dashboard = try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        #expect(((dashboard["panels"] as? [Any]) ?? []).count >= 5)
    }
}
