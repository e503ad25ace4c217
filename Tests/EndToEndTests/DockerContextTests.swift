import Foundation
import Testing
import TestSupport

#if canImport(Glibc)
import Glibc
#endif

/// The image's build, without a Docker engine: the build stage's context is rebuilt in a temporary
/// folder from exactly what the Dockerfile copies (after `.dockerignore`), step by step, and SwiftPM
/// loads the package there before each `swift build` the Dockerfile runs. A manifest that names a
/// folder the image does not copy (a target path, a test target) fails here as it fails in
/// `docker build`.
@Suite(.serialized) struct DockerContextTests {
    static let root = DeployTests.root

    /// One instruction of a Dockerfile stage, continuation lines joined.
    struct Instruction {
        var keyword: String
        var arguments: String
    }

    static func stages(_ dockerfile: String) -> [[Instruction]] {
        var joined: [String] = []
        var current = ""
        for raw in dockerfile.split(separator: "\n", omittingEmptySubsequences: false) {
            let line = String(raw)
            if current.isEmpty && (line.trimmingCharacters(in: .whitespaces).hasPrefix("#") || line.trimmingCharacters(in: .whitespaces).isEmpty) { continue }
            if line.hasSuffix("\\") {
                current += line.dropLast() + " "
            } else {
                current += line
                joined.append(current)
                current = ""
            }
        }
        var stages: [[Instruction]] = []
        for line in joined {
            let trimmed = line.trimmingCharacters(in: .whitespaces)
            let keyword = String(trimmed.prefix { !$0.isWhitespace }).uppercased()
            let arguments = trimmed.dropFirst(keyword.count).trimmingCharacters(in: .whitespaces)
            if keyword == "FROM" { stages.append([]) }
            if !stages.isEmpty { stages[stages.count - 1].append(Instruction(keyword: keyword, arguments: arguments)) }
        }
        return stages
    }

    /// `COPY [--chown=..] a b dest` or `COPY ["a", "dest"]`: the sources and the destination, or nil
    /// for a copy from another stage (`--from=`).
    static func copyOperands(_ arguments: String) -> (sources: [String], destination: String)? {
        var words: [String]
        if arguments.hasPrefix("[") {
            words = arguments.trimmingCharacters(in: CharacterSet(charactersIn: "[] ")).split(separator: ",")
                .map { $0.trimmingCharacters(in: CharacterSet(charactersIn: "\" ")) }
        } else {
            words = arguments.split(separator: " ").map(String.init)
        }
        if words.contains(where: { $0.hasPrefix("--from=") }) { return nil }
        words.removeAll { $0.hasPrefix("--") }
        guard words.count >= 2 else { return nil }
        return (Array(words.dropLast()), words.last!)
    }

    /// `.dockerignore` patterns: a path is excluded when it or a folder above it matches one.
    /// Exceptions (`!pattern`) are not modelled; the test refuses them rather than guess.
    static func ignorePatterns() throws -> [String] {
        let file = root.appendingPathComponent(".dockerignore")
        guard let text = try? String(contentsOf: file, encoding: .utf8) else { return [] }
        let patterns = text.split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }
            .filter { !$0.isEmpty && !$0.hasPrefix("#") }
        try #require(!patterns.contains { $0.hasPrefix("!") }, ".dockerignore exceptions are not modelled by this test")
        return patterns.map { $0.hasPrefix("/") ? String($0.dropFirst()) : $0 }
    }

    static func ignored(_ relative: String, _ patterns: [String]) -> Bool {
        let parts = relative.split(separator: "/").map(String.init)
        for end in 1...max(1, parts.count) {
            let prefix = parts.prefix(end).joined(separator: "/")
            for pattern in patterns {
                if fnmatch(pattern, prefix, FNM_PATHNAME) == 0 { return true }
                if pattern.hasPrefix("**/"), fnmatch(String(pattern.dropFirst(3)), parts[end - 1], 0) == 0 { return true }
            }
        }
        return false
    }

    /// Copies `source` (relative to the repository root) to `destination` the way COPY does: a
    /// folder's contents, files one by one, minus what `.dockerignore` excludes.
    static func copy(_ source: String, to destination: URL, patterns: [String]) throws {
        let fm = FileManager.default
        let from = root.appendingPathComponent(source)
        var isDir: ObjCBool = false
        try #require(fm.fileExists(atPath: from.path, isDirectory: &isDir), "COPY \(source): not in the repository")
        try #require(!ignored(source, patterns), "COPY \(source): excluded by .dockerignore")
        if !isDir.boolValue {
            try fm.createDirectory(at: destination.deletingLastPathComponent(), withIntermediateDirectories: true)
            try? fm.removeItem(at: destination)
            try fm.copyItem(at: from, to: destination)
            return
        }
        try fm.createDirectory(at: destination, withIntermediateDirectories: true)
        for case let relative as String in fm.enumerator(atPath: from.path)! {
            let full = source == "." ? relative : "\(source)/\(relative)"
            if ignored(full, patterns) { continue }
            var childIsDir: ObjCBool = false
            _ = fm.fileExists(atPath: from.appendingPathComponent(relative).path, isDirectory: &childIsDir)
            let target = destination.appendingPathComponent(relative)
            if childIsDir.boolValue {
                try fm.createDirectory(at: target, withIntermediateDirectories: true)
            } else {
                try? fm.removeItem(at: target)
                try fm.copyItem(at: from.appendingPathComponent(relative), to: target)
            }
        }
    }

    static func swiftExecutable() -> String? {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"
        return path.split(separator: ":").map { "\($0)/swift" }.first { FileManager.default.isExecutableFile(atPath: $0) }
    }

    /// Replays the build stage's WORKDIR and COPY instructions in a temporary folder; before every
    /// RUN that builds, `swift package describe` must load the package there.
    @Test(.enabled(if: swiftExecutable() != nil, "no swift on PATH"))
    func buildStageContextLoadsThePackage() async throws {
        let dockerfile = try DeployTests.text("docker/Dockerfile")
        let stages = Self.stages(dockerfile)
        let build = try #require(stages.first, "the Dockerfile has a build stage")
        let patterns = try Self.ignorePatterns()
        let dir = try TemporaryDirectory(prefix: "dedupd-docker-context")
        let fsRoot = dir.url
        var workdir = "/"
        var builds = 0
        for instruction in build {
            switch instruction.keyword {
            case "WORKDIR":
                workdir = instruction.arguments.hasPrefix("/") ? instruction.arguments : workdir + "/" + instruction.arguments
            case "COPY", "ADD":
                guard let (sources, destination) = Self.copyOperands(instruction.arguments) else { continue }
                let absolute = destination.hasPrefix("/") ? destination : workdir + "/" + destination
                let target = fsRoot.appendingPathComponent(absolute)
                for source in sources {
                    let into = destination.hasSuffix("/") || sources.count > 1
                        ? target.appendingPathComponent(URL(fileURLWithPath: source).lastPathComponent) : target
                    var isDir: ObjCBool = false
                    _ = FileManager.default.fileExists(atPath: Self.root.appendingPathComponent(source).path, isDirectory: &isDir)
                    try Self.copy(source, to: isDir.boolValue ? target : into, patterns: patterns)
                }
            case "RUN" where instruction.arguments.contains("swift build"):
                builds += 1
                let packageDir = fsRoot.appendingPathComponent(workdir)
                let (status, output) = try await offPool {
                    Self.runSwift(["package", "describe", "--type", "json"], in: packageDir)
                }
                #expect(status == 0, "swift package describe in the image's build context (\(workdir)) failed: \(output)")
            default:
                continue
            }
        }
        #expect(builds >= 1, "the build stage runs swift build")
    }

    /// Every file the runtime stage copies from the build context exists (and is not ignored).
    @Test func runtimeStageCopiesExistInTheContext() throws {
        let stages = Self.stages(try DeployTests.text("docker/Dockerfile"))
        let patterns = try Self.ignorePatterns()
        for stage in stages.dropFirst() {
            for instruction in stage where instruction.keyword == "COPY" {
                guard let (sources, _) = Self.copyOperands(instruction.arguments) else { continue }
                for source in sources {
                    #expect(FileManager.default.fileExists(atPath: Self.root.appendingPathComponent(source).path), "COPY \(source)")
                    #expect(!Self.ignored(source, patterns), "COPY \(source) is excluded by .dockerignore")
                }
            }
        }
    }

    /// The build stage installs every Debian package Package.swift's system libraries name.
    @Test func buildStageInstallsEverySystemLibrary() throws {
        let manifest = try String(contentsOf: Self.root.appendingPathComponent("Package.swift"), encoding: .utf8)
        var packages: [String] = []
        var rest = Substring(manifest)
        while let r = rest.range(of: ".apt([\"") {
            let name = rest[r.upperBound...].prefix { $0 != "\"" }
            packages.append(String(name))
            rest = rest[name.endIndex...]
        }
        #expect(packages.count >= 2, "\(packages)")
        let build = try #require(Self.stages(try DeployTests.text("docker/Dockerfile")).first)
        let runs = build.filter { $0.keyword == "RUN" }.map(\.arguments).joined(separator: " ")
        for package in packages { #expect(runs.contains(" \(package) "), "the build stage installs \(package)") }
    }

    /// The build stage writes the commit into BuildInfo.swift with sed: the line it replaces exists.
    @Test func commitBuildArgReachesTheBinary() throws {
        let dockerfile = try DeployTests.text("docker/Dockerfile")
        let line = #"public static let commit = "unknown""#
        #expect(dockerfile.contains(#"s/public static let commit = \"unknown\"/"#), "the Dockerfile's sed pattern")
        let source = try String(contentsOf: Self.root.appendingPathComponent("Sources/DedupService/BuildInfo.swift"), encoding: .utf8)
        #expect(source.contains(line), "BuildInfo.swift has the line the Dockerfile's sed replaces")
    }

    static func runSwift(_ arguments: [String], in directory: URL) -> (Int32, String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: swiftExecutable()!)
        p.arguments = arguments
        p.currentDirectoryURL = directory
        let out = Pipe()
        p.standardOutput = FileHandle.nullDevice
        p.standardError = out
        guard (try? p.run()) != nil else { return (-1, "could not start swift") }
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: data, as: UTF8.self))
    }
}
