import DedupCore
import Foundation
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The `exec` handler: runs `handler.command` with `/bin/sh -c` for each unique message, the
/// message value on stdin and `DEDUPD_KEY`, `DEDUPD_TOPIC`, `DEDUPD_PARTITION`,
/// `DEDUPD_OFFSET` (and `DEDUPD_ATTEMPT`) in the environment.
///
/// Exit status 0 is success. Any other status is retried with backoff, except 65 (`EX_DATAERR`
/// from sysexits.h: "the input data was incorrect"), which is final and dead-letters the message
/// at once. A command still running after `handler.timeout` is killed with its whole process
/// group (SIGKILL), so a shell pipeline does not leave orphans behind; that attempt failed.
/// The command's stdout and stderr go to dedupd's stderr, next to the operational log.
///
/// Spawned with `posix_spawn` rather than Foundation's `Process` to get a process group of its
/// own (to kill it whole) and a clean signal mask: Swift concurrency threads block SIGTERM and
/// friends, and a child inherits the mask of the thread that spawns it.
public final class ExecHandler: Handler {
    public let command: String
    public let timeout: Duration

    /// Exit status that marks the input as wrong: no retry (sysexits.h `EX_DATAERR`).
    public static let finalExitStatus: Int32 = 65

    public struct Failure: Error, CustomStringConvertible {
        public var description: String
    }

    public init(command: String, timeout: Duration) {
        self.command = command
        self.timeout = timeout
        // A command that exits without reading all of stdin must not kill dedupd with SIGPIPE
        // when the value is written to it; the write then fails with EPIPE, which is ignored.
        signal(SIGPIPE, SIG_IGN)
    }

    public func handle(_ dispatch: Dispatch) async throws {
        let m = dispatch.message
        var environment = ProcessInfo.processInfo.environment
        environment["DEDUPD_KEY"] = dispatch.key.raw
        environment["DEDUPD_TOPIC"] = m.topic
        environment["DEDUPD_PARTITION"] = String(m.partition)
        environment["DEDUPD_OFFSET"] = String(m.offset)
        environment["DEDUPD_ATTEMPT"] = String(dispatch.attempt)
        let outcome = try await Self.run(
            ["/bin/sh", "-c", command], environment: environment, stdin: m.value, timeout: timeout)
        switch outcome {
        case .exited(0):
            return
        case .exited(Self.finalExitStatus):
            throw PermanentFailure("command exited with status \(Self.finalExitStatus) (input rejected, not retried)")
        case .exited(let status):
            throw Failure(description: "command exited with status \(status)")
        case .signalled(let signal):
            throw Failure(description: "command killed by signal \(signal)")
        case .timedOut:
            throw Failure(description: "command still running after \(WorkerConfiguration.format(timeout)); killed")
        }
    }

    public enum Outcome: Sendable, Equatable {
        case exited(Int32)
        case signalled(Int32)
        case timedOut
    }

    /// Spawns `argv`, writes `stdin` to it, and waits for it on a thread of its own (a blocking
    /// `waitid` must stay off the cooperative pool), killing its process group after `timeout`.
    static func run(_ argv: [String], environment: [String: String], stdin: [UInt8], timeout: Duration) async throws -> Outcome {
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else { throw Failure(description: "pipe failed: errno \(errno)") }
        let (readEnd, writeEnd) = (fds[0], fds[1])
        // The parent's write end must not leak into other children spawned meanwhile.
        _ = fcntl(writeEnd, F_SETFD, FD_CLOEXEC)

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, readEnd, 0)
        posix_spawn_file_actions_addclose(&actions, readEnd)
        posix_spawn_file_actions_adddup2(&actions, 2, 1)
        // Nothing but stdin/stdout/stderr reaches the command: an inherited socket, pipe or
        // Redis connection would outlive dedupd in a command that keeps running (and a parent
        // that waits for EOF on a pipe dedupd holds would wait for the command instead).
        Self.closeFrom(3, in: &actions)

        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        posix_spawnattr_setpgroup(&attributes, 0)
        var mask = sigset_t()
        sigemptyset(&mask)
        posix_spawnattr_setsigmask(&attributes, &mask)
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for s in [SIGPIPE, SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGCHLD] { sigaddset(&defaults, s) }
        posix_spawnattr_setsigdefault(&attributes, &defaults)

        let cArgs = argv.map { strdup($0) } + [nil]
        let cEnv = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer {
            for p in cArgs { free(p) }
            for p in cEnv { free(p) }
        }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, argv[0], &actions, &attributes, cArgs, cEnv)
        Glibc.close(readEnd)
        guard rc == 0 else {
            Glibc.close(writeEnd)
            throw Failure(description: "cannot run \(argv[0]): \(String(cString: strerror(rc)))")
        }

        let child = ChildProcess(pid: pid)
        return await withCheckedContinuation { (c: CheckedContinuation<Outcome, Never>) in
            let thread = Thread {
                // Stdin first (a full pipe blocks until the command reads; EPIPE if it never does),
                // then wait. The timeout below kills the group, which unblocks either.
                stdin.withUnsafeBytes { buf in
                    var offset = 0
                    while offset < buf.count {
                        let n = write(writeEnd, buf.baseAddress! + offset, buf.count - offset)
                        if n < 0 { if errno == EINTR { continue }; break }
                        offset += n
                    }
                }
                Glibc.close(writeEnd)
                c.resume(returning: child.waitForExit())
            }
            thread.name = "dedupd.exec"
            thread.start()
            DispatchQueue.global().asyncAfter(deadline: .now() + .milliseconds(Int(timeout.milliseconds))) {
                child.killIfRunning()
            }
        }
    }
}

/// A spawned child and whether it has exited, so the timeout never signals a process group id
/// that was reaped and possibly reused: the exit is observed with `WNOWAIT` and recorded under
/// the lock before the child is reaped.
final class ChildProcess: Sendable {
    let pid: pid_t
    private let state = Mutex<(exited: Bool, killed: Bool)>((false, false))

    init(pid: pid_t) { self.pid = pid }

    func killIfRunning() {
        state.withLock { s in
            guard !s.exited else { return }
            s.killed = true
            kill(-pid, SIGKILL)
        }
    }

    func waitForExit() -> ExecHandler.Outcome {
        var info = siginfo_t()
        while waitid(P_PID, id_t(pid), &info, WEXITED | WNOWAIT) != 0 && errno == EINTR {}
        let killed = state.withLock { s -> Bool in
            s.exited = true
            return s.killed
        }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        // The group may still hold the command's children after the shell exited: a timeout
        // kills them too; otherwise they are the command's business.
        if killed { return .timedOut }
        if status & 0x7f == 0 { return .exited((status >> 8) & 0xff) }
        return .signalled(status & 0x7f)
    }
}

extension ExecHandler {
    /// glibc 2.34+ has posix_spawn_file_actions_addclosefrom_np, but Swift's Glibc module does
    /// not export it, so it is looked up by name.
    static func closeFrom(_ fd: Int32, in actions: inout posix_spawn_file_actions_t) {
        typealias CloseFrom = @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, Int32) -> Int32
        guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "posix_spawn_file_actions_addclosefrom_np") else {
            // Older glibc: close what is open now.
            let open = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd"))?.compactMap { Int32($0) } ?? []
            for other in open where other >= fd { posix_spawn_file_actions_addclose(&actions, other) }
            return
        }
        _ = unsafeBitCast(symbol, to: CloseFrom.self)(&actions, fd)
    }
}
