import DedupCore
import Foundation
import LocalServers
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A child process of the benchmark (`dedupd run`, or `dedupd bench-bare` for the bare consumer):
/// its own process, so its peak RSS and its CPU time are its own (the mock cluster, the producer
/// and the bench's bookkeeping live in the parent). Both write `stats` lines on stderr, read here
/// the same way, with the child's CPU time from /proc at each line.
///
/// Its stderr (the operational log, with a `stats` line every 50 ms) is read on a thread of its
/// own for the counters; its stdout, when `captureOutput` is set, is the `log` handler's output,
/// read on another thread that measures each dispatched line's latency from its `bench-ts` header.
///
/// `@unchecked Sendable`: the `Process` is only started in `init` and signalled afterwards;
/// every mutable field is behind a `Mutex`.
final class BenchChild: @unchecked Sendable {
    struct Sample: Sendable {
        var at: ContinuousClock.Instant
        var consumed: Int
        /// Dispatched + duplicates + invalid: messages whose fate is decided.
        var resolved: Int
        var dispatched: Int
        /// CPU time the child has used so far (user + system, in clock ticks), read with the line.
        var cpuTicks: Int
    }

    struct State: Sendable {
        var samples: [Sample] = []
        var assigned = false
        var pausedForBufferFull = false
        var tail: [String] = []
        var maxRSSKiB = 0
        var hwmKiB = 0
    }

    let process = Process()
    let state = Mutex(State())
    /// One dispatched line of the latency leg: its `bench-ts` (send time) and when the line was
    /// read here, both wall clock in µs.
    struct Arrival: Sendable {
        var sent: Int64
        var arrival: Int64
    }

    /// Latency leg only: one per dispatched line that carries a `bench-ts` header.
    let arrivals = Mutex<[Arrival]>([])
    private let done = DispatchSemaphore(value: 0)
    private let readers: Int

    /// `BENCH_CHILD_LOG=DIR` keeps each child's whole operational log (its `stats` lines every
    /// 50 ms included) as DIR/NAME.log, for looking into a leg after the run.
    init(name: String, executable: String, arguments: [String], captureOutput: Bool) throws {
        let err = Pipe()
        let out = captureOutput ? Pipe() : nil
        readers = out == nil ? 2 : 3
        let process = self.process
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        process.standardInput = FileHandle.nullDevice
        process.standardError = err
        process.standardOutput = out ?? FileHandle.nullDevice
        try withDefaultSignalMask { try process.run() }
        try? err.fileHandleForWriting.close()
        try? out?.fileHandleForWriting.close()
        let pid = process.processIdentifier

        let errFD = err.fileHandleForReading.fileDescriptor
        let copy = ProcessInfo.processInfo.environment["BENCH_CHILD_LOG"].flatMap { dir -> FileHandle? in
            let path = "\(dir)/\(name).log"
            guard FileManager.default.createFile(atPath: path, contents: nil) else { return nil }
            return FileHandle(forWritingAtPath: path)
        }
        Self.thread("bench.child.stderr") { [self] in
            Self.readLines(errFD) { line in
                self.parseLogLine(line)
                copy?.write(Data(line) + [10])
            }
            try? copy?.close()
            withExtendedLifetime(err) {}
            done.signal()
        }
        if let out {
            let outFD = out.fileHandleForReading.fileDescriptor
            Self.thread("bench.child.stdout") { [self] in
                var local: [Arrival] = []
                local.reserveCapacity(1 << 16)
                let marker = Array("\"\(BenchTraffic.timestampHeader)\":\"".utf8)
                Self.readLines(outFD) { line in
                    let now = wallMicros()
                    if let sent = Self.number(after: marker, in: line) { local.append(Arrival(sent: sent, arrival: now)) }
                }
                arrivals.withLock { $0 = local }
                withExtendedLifetime(out) {}
                done.signal()
            }
        }
        Self.thread("bench.child.rss") { [self] in
            while process.isRunning {
                if let (rss, hwm) = Self.memory(pid: pid) {
                    state.withLock {
                        $0.maxRSSKiB = max($0.maxRSSKiB, rss)
                        $0.hwmKiB = max($0.hwmKiB, hwm)
                    }
                }
                usleep(20_000)
            }
            done.signal()
        }
    }

    var pid: Int32 { process.processIdentifier }

    /// SIGTERM, then wait for the exit and for the readers to see EOF (SIGKILL after `timeout`).
    func stop(timeout: Duration = .seconds(60)) -> Int32 {
        if process.isRunning { kill(process.processIdentifier, SIGTERM) }
        let deadline = ContinuousClock.now + timeout
        while process.isRunning && ContinuousClock.now < deadline { usleep(20_000) }
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
        for _ in 0..<readers { done.wait() }
        return process.terminationStatus
    }

    /// Peak resident set of the child (VmHWM, the kernel's high-water mark) and the largest
    /// VmRSS seen by sampling, in KiB. Read while it runs: /proc/PID is gone after it exits.
    var peakRSSKiB: Int { state.withLock { max($0.hwmKiB, $0.maxRSSKiB) } }

    var latest: Sample? { state.withLock { $0.samples.last } }
    var logTail: String { state.withLock { $0.tail.joined(separator: "\n") } }

    // MARK: - Reading

    private func parseLogLine(_ bytes: ArraySlice<UInt8>) {
        let pid = process.processIdentifier
        let line = String(decoding: bytes, as: UTF8.self)
        let now = ContinuousClock.now
        state.withLock { s in
            if line.contains("msg=stats") {
                func field(_ name: String) -> Int {
                    Self.number(after: Array(" \(name)=".utf8), in: bytes).map(Int.init) ?? 0
                }
                let dispatched = field("dispatched")
                let resolved = dispatched + field("duplicates.local") + field("duplicates.redis") + field("invalid")
                s.samples.append(Sample(
                    at: now, consumed: field("consumed"), resolved: resolved, dispatched: dispatched,
                    cpuTicks: Self.cpuTicks(pid: pid) ?? 0))
                return
            }
            if line.contains("partitions assigned") { s.assigned = true }
            if line.contains("buffer full, pausing consumption") { s.pausedForBufferFull = true }
            s.tail.append(line)
            if s.tail.count > 40 { s.tail.removeFirst() }
        }
    }

    /// A header value that is a decimal number (the `bench-ts` header as the bare consumer sees it).
    static func number(_ bytes: UnsafeRawBufferPointer) -> Int64? {
        guard !bytes.isEmpty else { return nil }
        var v: Int64 = 0
        for b in bytes {
            guard b >= 48, b <= 57 else { return nil }
            v = v * 10 + Int64(b - 48)
        }
        return v
    }

    /// The decimal number right after `marker` in `line`.
    static func number(after marker: [UInt8], in line: ArraySlice<UInt8>) -> Int64? {
        guard marker.count <= line.count else { return nil }
        var i = line.startIndex
        let end = line.endIndex - marker.count
        while i <= end {
            if line[i] == marker[0] && line[i..<(i + marker.count)].elementsEqual(marker) {
                var j = i + marker.count
                var v: Int64 = 0
                var digits = 0
                while j < line.endIndex, line[j] >= 48, line[j] <= 57 {
                    v = v * 10 + Int64(line[j] - 48)
                    j += 1
                    digits += 1
                }
                return digits > 0 ? v : nil
            }
            i += 1
        }
        return nil
    }

    /// Reads `fd` to EOF, calling `body` for every complete line (without the newline).
    static func readLines(_ fd: Int32, _ body: (ArraySlice<UInt8>) -> Void) {
        var pending: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            pending.append(contentsOf: chunk[0..<n])
            var start = 0
            while let nl = pending[start...].firstIndex(of: 10) {
                body(pending[start..<nl])
                start = nl + 1
            }
            pending.removeFirst(start)
        }
        if !pending.isEmpty { body(pending[...]) }
    }

    /// utime + stime of a process in clock ticks, from /proc/PID/stat (fields 14 and 15, counted
    /// after the command name, which is in parentheses and may contain spaces).
    static func cpuTicks(pid: Int32) -> Int? {
        guard let text = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
            let close = text.lastIndex(of: ")")
        else { return nil }
        let fields = text[text.index(after: close)...].split(separator: " ")
        // fields[0] is the state (field 3), so field N is fields[N - 3].
        guard fields.count > 12, let user = Int(fields[11]), let system = Int(fields[12]) else { return nil }
        return user + system
    }

    /// (VmRSS, VmHWM) of a process in KiB, from /proc/PID/status.
    static func memory(pid: Int32) -> (Int, Int)? {
        guard let text = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return nil }
        var rss = 0
        var hwm = 0
        for line in text.split(separator: "\n") {
            if line.hasPrefix("VmRSS:") { rss = Int(line.split(separator: " ").dropFirst().first ?? "") ?? 0 }
            if line.hasPrefix("VmHWM:") { hwm = Int(line.split(separator: " ").dropFirst().first ?? "") ?? 0 }
        }
        return (rss, hwm)
    }

    static func thread(_ name: String, _ body: @escaping @Sendable () -> Void) {
        let t = Thread(block: body)
        t.name = name
        t.start()
    }
}
