import DedupCore
import Foundation
import Testing
import TestSupport

/// The documentation a user follows, checked against the binary they run: the generated
/// configuration reference, the README's demo and `explain` examples, the man page's commands,
/// links that lead somewhere, and the command-line features the docs promise (`--version`, `-X`,
/// `http.bind`).
@Suite(.serialized) struct DocsTests {
    static let root = DeployTests.root

    static func read(_ path: String) throws -> String {
        try String(contentsOf: root.appendingPathComponent(path), encoding: .utf8)
    }

    /// The fenced code blocks of a Markdown text, each from its info string (`yaml`, or empty) on.
    static func fencedBlocks(_ markdown: String) -> [String] {
        markdown.components(separatedBy: "```").enumerated().filter { $0.offset % 2 == 1 }.map(\.element)
    }

    @Test func configurationReferenceIsGeneratedFromTheSchema() async throws {
        let doc = try Self.read("docs/configuration.md")
        let begin = try #require(doc.range(of: ConfigSchema.referenceBegin), "docs/configuration.md has the generated block")
        let end = try #require(doc.range(of: ConfigSchema.referenceEnd))
        let committed = String(doc[begin.lowerBound..<end.upperBound]) + "\n"
        let (status, generated, err) = try await DeployTests.dedupd(["config-reference"])
        #expect(status == 0, "\(err)")
        #expect(committed == generated, "regenerate the block between the markers of docs/configuration.md from `dedupd config-reference`")
        for key in ConfigSchema.keys { #expect(generated.contains("| `\(key.name)` |"), "\(key.name)") }
    }

    /// The README's configuration file and its `$ ... | dedupd explain ...` lines, run as written.
    @Test func readmeExplainExamplesAreWhatExplainPrints() async throws {
        let readme = try Self.read("README.md")
        let blocks = Self.fencedBlocks(readme)
        let config = try #require(blocks.first { $0.hasPrefix("yaml\n") && $0.contains("bootstrap_servers") }).dropFirst("yaml\n".count)
        let examples = try #require(blocks.first { $0.contains("| dedupd explain") })
        let dir = try TemporaryDirectory(prefix: "dedupd-readme")
        try String(config).write(to: dir.file("dedupd.yaml"), atomically: true, encoding: .utf8)
        var commands: [(String, [String])] = []
        for line in examples.split(separator: "\n").dropFirst() {
            if line.hasPrefix("$ ") { commands.append((String(line.dropFirst(2)), [])) } else { commands[commands.count - 1].1.append(String(line)) }
        }
        #expect(commands.count >= 2)
        let binary = try dedupdBinary().path
        for (command, expected) in commands {
            let script = command.replacingOccurrences(of: "| dedupd ", with: "| \(binary) ")
            let output = try await offPool { () -> String in
                let p = Process()
                p.executableURL = URL(fileURLWithPath: "/bin/sh")
                p.arguments = ["-c", script]
                p.currentDirectoryURL = dir.url
                p.environment = ["PATH": "/usr/bin:/bin"]
                let pipe = Pipe()
                p.standardOutput = pipe
                p.standardError = pipe
                try p.run()
                let data = pipe.fileHandleForReading.readDataToEndOfFile()
                p.waitUntilExit()
                return String(decoding: data, as: UTF8.self)
            }
            #expect(output.split(separator: "\n").map(String.init) == expected, "$ \(command)\n\(output)")
        }
    }

    /// The README's first command, `dedupd demo`, run as a newcomer runs it: it exits 0 and prints
    /// the README's sample lines. The stream is seeded, so its counts are fixed; how the repeats
    /// split between the window and Redis depends on timing, so that line is checked up to it.
    @Test func readmeDemoPrintsWhatTheReadmeShows() async throws {
        let readme = try Self.read("README.md")
        let blocks = Self.fencedBlocks(readme)
        let sample = try #require(blocks.first { $0.hasPrefix("\ndedupd demo\n") }, "README.md shows the demo's output")
        let (status, out, err) = try await DeployTests.dedupd(["demo"])
        #expect(status == 0, "\(out)\n\(err)")
        let printed = out.split(separator: "\n").map(String.init)
        let lines = sample.split(separator: "\n").map(String.init).filter { $0.trimmingCharacters(in: .whitespaces) != "..." }
        #expect(lines.count >= 6)
        for line in lines {
            if line.hasPrefix("  duplicates"), let open = line.firstIndex(of: "(") {
                #expect(printed.contains { $0.hasPrefix(line[..<open]) }, "\(line)\n\(out)")
            } else {
                #expect(printed.contains(line), "\(line)\n\(out)")
            }
        }
    }

    /// Every message of docs/metrics.md's table of log events is one the sources log (the part
    /// before a "..." as written there), so a reworded line cannot leave the table behind.
    @Test func documentedLogEventsAreLogged() throws {
        let events = try #require(firstColumnCodeSpans(ofTableAfter: "| `msg` | level | when |", in: Self.read("docs/metrics.md")))
            .map { $0.hasSuffix(" ...") ? String($0.dropLast(4)) : $0 }
        #expect(events.count >= 15, "\(events)")
        let sources = Self.root.appendingPathComponent("Sources")
        var text = ""
        for case let path as String in FileManager.default.enumerator(atPath: sources.path) ?? NSEnumerator() where path.hasSuffix(".swift") {
            text += try String(contentsOf: sources.appendingPathComponent(path), encoding: .utf8)
        }
        let missing = events.filter { !text.contains("\"\($0)") }
        #expect(missing.isEmpty, "docs/metrics.md lists events no source file logs: \(missing)")
    }

    @Test func explainNamesTheRouteKeyOrReason() async throws {
        let dir = try TemporaryDirectory(prefix: "dedupd-explain")
        let config = dir.file("c.yaml").path
        try """
            kafka: {bootstrap_servers: "k:9092", topics: [orders, payments]}
            redis: {url: "redis://r:6379/0", password_file: /nonexistent}
            dedup: {key: "header:message-id", namespace: orders}
            dead_letter: {topic: dead}
            routes:
              - name: payments
                match: {topic: payments}
                dedup: {key: "json:/paymentId", window: 10s}
                handler: {type: kafka, topic: payments.unique}
            """.write(toFile: config, atomically: true, encoding: .utf8)
        var (status, out, err) = try await DeployTests.dedupd(["explain", "--config", config, "--topic", "payments", "--value", #"{"paymentId":"p-1"}"#])
        #expect(status == 0, "\(err)")
        #expect(out == "route payments\ndedup key p-1\nredis key dedupd:payments:p-1\nwindow 10s keep first retention 24h\nhandler kafka payments.unique\n")
        (status, out, err) = try await DeployTests.dedupd(["explain", "--config", config, "--value", "{}", "--header", "message-id=m-9"])
        #expect(status == 0, "\(err)")
        #expect(out.hasPrefix("route default\ndedup key m-9\nredis key dedupd:orders:m-9\n"))
        (status, out, _) = try await DeployTests.dedupd(["explain", "--config", config, "--value", "{}"])
        #expect(status == 1)
        #expect(out.hasPrefix("route default\nbad input missing_header: "), "\(out)")
        (status, out, _) = try await DeployTests.dedupd(["explain", "--config", config, "--topic", "payments", "--value", "nope"])
        #expect(status == 1)
        #expect(out.hasPrefix("route payments\nbad input invalid_json: "), "\(out)")
    }

    @Test func versionNamesTheBuildAndItsLibraries() async throws {
        let (status, out, _) = try await DeployTests.dedupd(["--version"])
        #expect(status == 0)
        let lines = out.split(separator: "\n")
        #expect(lines.count == 4, "\(out)")
        #expect(lines.first?.hasPrefix("dedupd ") == true && lines[1].hasPrefix("commit "))
        #expect(lines[2].hasPrefix("librdkafka 2.") && lines[3].hasPrefix("hiredis 0.14"), "\(out)")
        let changelog = try Self.read("CHANGELOG.md")
        #expect(changelog.contains("## \(lines[0].dropFirst("dedupd ".count))"), "CHANGELOG.md has a section for this version")
    }

    @Test func kafkaPropertiesOnTheCommandLine() async throws {
        let base = ["check-config", "--bootstrap-servers", "k:9092", "--topic", "t"]
        var (status, out, err) = try await DeployTests.dedupd(base + ["-X", "client.id=from-flag", "-X", "fetch.wait.max.ms=100"])
        #expect(status == 0, "\(err)")
        #expect(out.contains("kafka.properties.client.id = from-flag  # flag"), "\(out)")
        #expect(out.contains("kafka.properties.fetch.wait.max.ms = 100  # flag"))
        (status, _, err) = try await DeployTests.dedupd(base + ["-X", "session.timeout.ms=banana"])
        #expect(status == 2)
        #expect(err.contains("kafka.properties.session.timeout.ms") && err.contains("librdkafka rejects it"), "\(err)")
        (status, _, err) = try await DeployTests.dedupd(base + ["-X", "no-equals-sign"])
        #expect(status != 0)
        #expect(err.contains("NAME=VALUE"), "\(err)")
        (status, out, _) = try await DeployTests.dedupd(base + ["-X", "sasl.password=hunter2"])
        #expect(!out.contains("hunter2"), "a secret property given by flag is not printed")
    }

    @Test func httpBindTakesIPv4AndIPv6Addresses() async throws {
        let base = ["check-config", "--bootstrap-servers", "k:9092", "--topic", "t"]
        for good in ["::", "0.0.0.0", "127.0.0.1", "::1", "fd00::1"] {
            let (status, out, err) = try await DeployTests.dedupd(base, environment: ["DEDUPD_HTTP_BIND": good])
            #expect(status == 0, "\(good): \(err)")
            #expect(out.contains("http.bind = \(good)  # environment DEDUPD_HTTP_BIND"))
        }
        for bad in ["localhost", "1.2.3", "::g"] {
            let (status, _, err) = try await DeployTests.dedupd(base, environment: ["DEDUPD_HTTP_BIND": bad])
            #expect(status == 2, "\(bad)")
            #expect(err.contains("config key http.bind"), "\(bad): \(err)")
        }
    }

    /// Every subcommand `dedupd --help` lists is in the man page (regenerate it when one is added).
    @Test func manPageListsEverySubcommand() async throws {
        let man = try Self.read("docs/man/dedupd.1")
        let (_, help, _) = try await DeployTests.dedupd(["--help"])
        let section = try #require(help.components(separatedBy: "SUBCOMMANDS:").last)
        let names = section.split(separator: "\n").compactMap { line -> String? in
            let t = line.trimmingCharacters(in: .whitespaces)
            guard line.hasPrefix("  "), !line.hasPrefix("      "), let name = t.split(separator: " ").first else { return nil }
            return String(name)
        }.filter { !$0.isEmpty && $0 != "See" }
        #expect(names.count >= 10, "\(names)")
        for name in names {
            #expect(man.contains(".It Em \(name)"), "docs/man/dedupd.1 lacks \(name): regenerate it (docs/man/README.md)")
        }
    }

    /// Markdown links between the repository's files lead to files that exist, and nothing points
    /// outside the repository's own tree.
    @Test func linksLeadToFilesInTheRepository() throws {
        var docs = ["README.md", "deploy/README.md", "CHANGELOG.md"]
        docs += try FileManager.default.contentsOfDirectory(atPath: Self.root.appendingPathComponent("docs").path)
            .filter { $0.hasSuffix(".md") }.map { "docs/\($0)" }
        for doc in docs {
            let text = try Self.read(doc)
            let base = Self.root.appendingPathComponent(doc).deletingLastPathComponent()
            var rest = Substring(text)
            while let open = rest.range(of: "](") {
                let target = rest[open.upperBound...].prefix { $0 != ")" }
                rest = rest[target.endIndex...]
                let path = String(target.split(separator: "#", maxSplits: 1, omittingEmptySubsequences: false)[0])
                if path.isEmpty || path.contains("://") { continue }
                let resolved = base.appendingPathComponent(path).standardized
                #expect(resolved.path.hasPrefix(Self.root.standardized.path), "\(doc): \(path) is outside the repository")
                // docs/architecture.md is written with the engine's rework (its own branch).
                if path.hasSuffix("architecture.md") && !FileManager.default.fileExists(atPath: resolved.path) { continue }
                #expect(FileManager.default.fileExists(atPath: resolved.path), "\(doc): link to \(path), which does not exist")
            }
        }
    }

    /// Files a user has: no source, test, doc or deploy file points into a folder beside the repository.
    @Test func nothingPointsOutsideTheRepository() throws {
        let fm = FileManager.default
        var offenders: [String] = []
        for top in ["Sources", "Tests", "docs", "deploy", "scripts", "Examples", ".ci"] {
            let dir = Self.root.appendingPathComponent(top)
            for case let file as String in fm.enumerator(atPath: dir.path) ?? FileManager.DirectoryEnumerator() {
                guard let text = try? String(contentsOf: dir.appendingPathComponent(file), encoding: .utf8) else { continue }
                if text.contains("../" + "shared") { offenders.append("\(top)/\(file)") }
            }
        }
        for file in ["README.md", "CHANGELOG.md", "Package.swift"] where try Self.read(file).contains("../" + "shared") {
            offenders.append(file)
        }
        #expect(offenders.isEmpty, "\(offenders)")
    }

    @Test func readmeIsForUsers() throws {
        let readme = try Self.read("README.md")
        let lines = readme.split(separator: "\n", omittingEmptySubsequences: false)
        #expect(lines.count <= 300, "README.md has \(lines.count) lines")
        let first = lines.prefix(6).joined(separator: "\n")
        #expect(first.contains("./scripts/install-deps && swift run dedupd demo"))
        #expect(first.contains("./scripts/install-deps && swift test --no-parallel"), ".ci/run runs the README's test command")
        let ci = try Self.read(".ci/run")
        #expect(ci.contains("./scripts/install-deps && swift test --no-parallel"))
        for heading in ["## What it is", "## Quick start with Docker Compose", "## Running it against your own Kafka and Redis", "## Guarantees", "## Where next"] {
            #expect(readme.contains("\n\(heading)\n"), "\(heading)")
        }
    }
}
