import DedupCore
import Foundation
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The `log` handler: one JSON line per dispatched message (dedup key, topic, partition, offset,
/// record key, headers, value) on stdout or appended to a file.
///
/// Lines are collected in memory by `handle` and written by `flush`, which the worker calls once
/// per dispatch round before confirming the keys: one write per round, not per message, and a
/// key is confirmed only after its line reached the file.
///
/// The lines are built straight into one buffer that lives as long as the handler (`LineBuffer`)
/// and written from it with write(2): no array per line or per round, no `Data` copy. It runs
/// once per unique message, where an append per byte (with its uniqueness and capacity checks)
/// is a large share of the worker's CPU.
public final class LogOutputHandler: BatchHandler, InlineRoundHandler {
    private let fd: Int32
    private let ownsFD: Bool
    /// Lines not yet written; a lock because `handle` (retries) may be called from several tasks.
    private let pending = Mutex(LineBuffer())
    private let writer = DispatchQueue(label: "dedupd.handler.log")
    /// Whether the output refused `RWF_NOWAIT` (`NowaitWrite`): a pipe (as stdout), a socket and
    /// /dev/null take it; a terminal, a named pipe, and a regular file on most filesystems answer
    /// EOPNOTSUPP, and from then on every flush goes through `writer`.
    let refusesNowait = Atomic<Bool>(NowaitWrite.available == nil)
    /// Flushes that went through `writer` (tests read it).
    let writerFlushes = Atomic<Int>(0)
    /// Whether another thread holds the lines (the writer, across its write); tests read it.
    var linesAreBusy: Bool { pending.withLockIfAvailable { _ in false } ?? true }

    /// `path` is a file to append to, or `-` for stdout.
    public init(path: String) throws {
        if path == "-" {
            fd = STDOUT_FILENO
            ownsFD = false
        } else {
            // O_APPEND: every write lands at the end even if something else appends too.
            let opened = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o644)
            guard opened >= 0 else {
                throw HandlerError(message: "log handler: cannot open output file \(path) for writing: \(String(cString: strerror(errno)))")
            }
            fd = opened
            ownsFD = true
        }
    }

    /// Writes to `fd`, which the caller keeps open for the handler's life: stdout's path for tests.
    init(descriptor: Int32) {
        fd = descriptor
        ownsFD = false
    }

    deinit {
        if ownsFD { _ = Glibc.close(fd) }
    }

    public func handle(_ dispatch: Dispatch) async throws {
        pending.withLock { Self.appendLine(for: dispatch, to: &$0) }
    }

    /// A whole round: every line built straight into the pending bytes under one lock.
    public func handleBatch(_ round: [Dispatch]) async throws {
        pending.withLock { buffer in
            for d in round { Self.appendLine(for: d, to: &buffer) }
        }
    }

    var takesRoundsInline: Bool { !refusesNowait.load(ordering: .relaxed) }

    /// A small round on the loop's thread: its lines, and what the output takes of them without
    /// waiting. The lock is only tried: the writer queue holds it across a write that may wait.
    func takeRoundWithoutWaiting(_ round: [Dispatch]) -> InlineRound {
        pending.withLockIfAvailable { buffer in
            for d in round { Self.appendLine(for: d, to: &buffer) }
            return writeWithoutWaiting(&buffer) ? InlineRound.written : .needsFlush
        } ?? .notTaken
    }

    /// Writes what is pending. The caller is a cooperative thread, which must not wait for a
    /// full pipe or a slow disk: it writes what the output takes without waiting (`NowaitWrite`),
    /// and the rest goes to the handler's own writer queue, whose write(2) may wait. The round's
    /// thread is awake already, where the writer's would be woken to write and then wake the
    /// round again. The lock is held during the write: the worker calls `flush` once a round's
    /// calls have returned, so nothing else waits for it, and a line appended meanwhile could
    /// not be told apart from the written ones when the buffer is emptied.
    public func flush() async throws {
        if pending.withLock({ writeWithoutWaiting(&$0) }) { return }
        writerFlushes.add(1, ordering: .relaxed)
        let failure: Int32? = await withCheckedContinuation { c in
            writer.async { [self] in
                c.resume(returning: pending.withLock { buffer in
                    defer { buffer.removeAll() }
                    return buffer.withBytes { Self.writeAll(fd, $0) }
                })
            }
        }
        if let failure {
            throw HandlerError(message: "log handler: write failed: \(String(cString: strerror(failure)))")
        }
    }

    public func close() async {
        try? await flush()
    }

    /// Writes what the output takes without waiting and drops it from `buffer`; true when nothing
    /// is left. Anything else (the output is full, refuses `RWF_NOWAIT`, or fails) is left for
    /// `writer`, whose blocking write reports a failure.
    private func writeWithoutWaiting(_ buffer: inout LineBuffer) -> Bool {
        while buffer.count > 0 {
            guard !refusesNowait.load(ordering: .relaxed), let write = NowaitWrite.available else { return false }
            let n = buffer.withBytes { write(fd, $0) }
            if n > 0 {
                buffer.removeFirst(n)
                continue
            }
            let failure = errno
            if n < 0 && failure == EINTR { continue }
            if n < 0 && (failure == EOPNOTSUPP || failure == EINVAL || failure == ENOSYS) {
                refusesNowait.store(true, ordering: .relaxed)
            }
            return false
        }
        return true
    }

    /// Writes every byte, through short writes, EINTR and (for a non-blocking stdout) EAGAIN.
    /// Returns the errno of a failure, or nil.
    private static func writeAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer) -> Int32? {
        var offset = 0
        while offset < bytes.count {
            let n = write(fd, bytes.baseAddress! + offset, bytes.count - offset)
            if n >= 0 {
                offset += n
                continue
            }
            switch errno {
            case EINTR: continue
            case EAGAIN:
                var pfd = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
                _ = poll(&pfd, 1, -1)
            case let e: return e
            }
        }
        return nil
    }

    static func line(for d: Dispatch) -> String {
        var buffer = LineBuffer()
        appendLine(for: d, to: &buffer)
        return buffer.withBytes { String(decoding: $0, as: UTF8.self) }
    }

    /// Appends one JSON line. Capacity is reserved once for the worst case (every byte of every
    /// field escaped as \u00XX), so the field writers below store through a pointer without a
    /// check per byte.
    static func appendLine(for d: Dispatch, to out: inout LineBuffer) {
        let m = d.message
        // Value, key, header names and values are all in the message's one array, so its
        // length bounds them together (with 8 bytes per header to spare).
        d.key.withRawUTF8 { key in
            let worst = 200 + 20 * 3 + 6 * (key.count + m.topic.utf8.count + m.bytes.storage.count) + 8 * m.headerCount
            out.reserve(worst)
            out.append(#"{"dedup_key":"#)
            out.appendQuoted(key)
        }
        out.append(#","topic":"#)
        out.appendQuoted(m.topic)
        out.append(#","partition":"#)
        out.appendDecimal(Int64(m.partition))
        out.append(#","offset":"#)
        out.appendDecimal(m.offset)
        if let ts = m.timestampMillis {
            out.append(#","timestamp_ms":"#)
            out.appendDecimal(ts)
        }
        m.withParts { value, key, headers in
            if let key {
                out.append(#","key":"#)
                out.appendText(key)
            }
            out.append(#","headers":{"#)
            var first = true
            for (name, value) in headers {
                if !first { out.append(byte: UInt8(ascii: ",")) }
                first = false
                out.appendName(name)
                out.append(byte: UInt8(ascii: ":"))
                if let value { out.appendText(value) } else { out.append("null") }
            }
            out.append(#"},"value":"#)
            out.appendText(value)
        }
        out.append("}\n")
    }

}

/// A growable byte buffer for the `log` handler's lines, reused for the handler's lifetime.
///
/// Noncopyable so its one allocation has one owner (freed in `deinit`); `reserve` is called
/// before a line is written, and the writers then store through the pointer directly. The
/// JSON string writers use the same escapes as `CanonicalJSON.quote` (quote, backslash,
/// \n \r \t, other control characters as \u00XX) and copy every other byte, multi-byte UTF-8
/// sequences included.
struct LineBuffer: ~Copyable {
    private var base: UnsafeMutablePointer<UInt8>
    private var capacity: Int
    private(set) var count = 0

    init(capacity: Int = 1 << 16) {
        self.capacity = max(64, capacity)
        base = .allocate(capacity: self.capacity)
    }

    deinit { base.deallocate() }

    /// Makes room for `extra` more bytes (doubling, so a long round costs few moves). Inlined:
    /// every writer calls it, and the room is almost always there already.
    @inline(__always)
    mutating func reserve(_ extra: Int) {
        let needed = count + extra
        if needed > capacity { grow(to: needed) }
    }

    @inline(never)
    private mutating func grow(to needed: Int) {
        var grown = capacity * 2
        while grown < needed { grown *= 2 }
        let moved = UnsafeMutablePointer<UInt8>.allocate(capacity: grown)
        moved.update(from: base, count: count)
        base.deallocate()
        base = moved
        capacity = grown
    }

    /// Forgets the contents, keeps the allocation.
    mutating func removeAll() { count = 0 }

    /// Forgets the first `n` bytes (written already), keeps the rest in order.
    mutating func removeFirst(_ n: Int) {
        precondition(n >= 0 && n <= count)
        base.update(from: base + n, count: count - n)
        count -= n
    }

    func withBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        try body(UnsafeRawBufferPointer(start: base, count: count))
    }

    @inline(__always)
    mutating func append(byte: UInt8) {
        reserve(1)
        base[count] = byte
        count += 1
    }

    /// Literal text (the JSON punctuation between fields), through a `ByteCursor`: the names
    /// are 2 to 16 bytes, which it copies as words, without a call to memcpy.
    @inline(__always)
    mutating func append(_ literal: StaticString) {
        let n = literal.utf8CodeUnitCount
        reserve(n)
        var cursor = ByteCursor(base + count, end: base + count + n)
        cursor.write(literal)
        count += n
    }

    /// Digits two at a time from a table: half the divisions of one digit at a time (a
    /// timestamp has 13), and none to count them.
    mutating func appendDecimal(_ v: Int64) {
        reserve(20)
        if v < 0 {
            base[count] = UInt8(ascii: "-")
            count += 1
        }
        var n = v.magnitude
        // The count from the bit length: ⌊bits × log10 2⌋ (1233 / 4096) is the count or one less,
        // and one comparison says which.
        let guess = ((64 &- n.leadingZeroBitCount) &* 1233) &>> 12
        let digits = Swift.max(1, n >= Self.powersOfTen[guess] ? guess &+ 1 : guess)
        var i = count + digits
        count = i
        let pairs = Self.digitPairs.utf8Start
        while n >= 100 {
            let (rest, pair) = n.quotientAndRemainder(dividingBy: 100)
            i -= 2
            base[i] = pairs[Int(pair) * 2]
            base[i + 1] = pairs[Int(pair) * 2 + 1]
            n = rest
        }
        if n >= 10 {
            base[i - 2] = pairs[Int(n) * 2]
            base[i - 1] = pairs[Int(n) * 2 + 1]
        } else {
            base[i - 1] = UInt8(ascii: "0") &+ UInt8(truncatingIfNeeded: n)
        }
    }

    /// 10^0 ... 10^19 (the largest a UInt64 holds).
    private static let powersOfTen: [UInt64] = (0...19).map { (0..<$0).reduce(1) { p, _ in p * 10 } }

    private static let digitPairs: StaticString =
        "00010203040506070809101112131415161718192021222324252627282930313233343536373839404142434445464748495051525354555657585960616263646566676869707172737475767778798081828384858687888990919293949596979899"

    mutating func appendQuoted(_ string: String) {
        string.withUTF8InPlace { _ = appendQuoted(UnsafeRawBufferPointer($0)) }
    }

    /// A header name as a JSON string: its bytes when they are UTF-8, else the string a
    /// `MessageHeader` would hold (invalid sequences replaced), as before names were bytes.
    mutating func appendName(_ raw: UnsafeRawBufferPointer) {
        if !appendQuotedIfUTF8(raw) { appendQuoted(String(decoding: raw, as: UTF8.self)) }
    }

    /// Writes `raw` as a JSON string and returns true when it is UTF-8; otherwise writes nothing
    /// and returns false. ASCII (the usual case) is seen while quoting, without a scan of its own.
    private mutating func appendQuotedIfUTF8(_ raw: UnsafeRawBufferPointer) -> Bool {
        let start = count
        guard appendQuoted(raw) else { return true }
        if String(validating: raw, as: UTF8.self) != nil { return true }
        count = start
        return false
    }

    /// UTF-8 bytes as a JSON string; anything else as {"base64": "..."} so no byte is lost.
    mutating func appendText(_ raw: UnsafeRawBufferPointer) {
        if !appendQuotedIfUTF8(raw) {
            append(#"{"base64":""#)
            var encoded = Data(raw).base64EncodedString()
            encoded.withUTF8 { utf8 in
                reserve(utf8.count)
                (base + count).update(from: utf8.baseAddress!, count: utf8.count)
                count += utf8.count
            }
            append(#""}"#)
        }
    }

    /// Valid UTF-8 as a JSON string literal. Returns whether a byte was not ASCII (words are
    /// or-ed together as they pass, so the caller needs no scan of its own to know).
    @discardableResult
    mutating func appendQuoted(_ bytes: UnsafeRawBufferPointer) -> Bool {
        // Each byte takes at most six (`\u00XX`); eight more for the last word's store, below.
        reserve(2 + 6 * bytes.count + 8)
        var o = count
        base[o] = UInt8(ascii: "\"")
        o += 1
        let n = bytes.count
        var i = 0
        var seen: UInt64 = 0
        // Eight bytes at a time: the word is stored whole, then each byte in it that needs an
        // escape (a JSON value has a quote every few bytes) is written escaped where it was, and
        // the rest of the word stored again after it.
        while i &+ 8 <= n {
            let word = UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: i, as: UInt64.self))
            seen |= word
            var mask = Self.escapeMask(word)
            UnsafeMutableRawPointer(base + o).storeBytes(of: word.littleEndian, as: UInt64.self)
            var done = 0
            while mask != 0 {
                let k = mask.trailingZeroBitCount &>> 3
                o &+= k &- done
                o = Self.appendEscape(UInt8(truncatingIfNeeded: word &>> UInt64(truncatingIfNeeded: k &<< 3)), at: o, in: base)
                done = k &+ 1
                mask &= mask &- 1
                // `&>>` takes the shift modulo 64: after the last byte (done == 8) this stores the
                // word again, and nothing of it is counted.
                UnsafeMutableRawPointer(base + o).storeBytes(
                    of: (word &>> UInt64(truncatingIfNeeded: done &<< 3)).littleEndian, as: UInt64.self)
            }
            o &+= 8 &- done
            i &+= 8
        }
        while i < n {
            let b = bytes[i]
            seen |= UInt64(b)
            o = Self.appendEscaped(b, at: o, in: base)
            i &+= 1
        }
        base[o] = UInt8(ascii: "\"")
        count = o + 1
        return seen & Self.highs != 0
    }

    private static let lows: UInt64 = 0x7f7f_7f7f_7f7f_7f7f
    private static let highs: UInt64 = 0x8080_8080_8080_8080

    /// The high bit of each byte of `word` (byte 0 in its lowest bits) that JSON escapes: a
    /// control character, a quote or a backslash. Exact for every byte: no carry crosses a byte,
    /// since each sum adds to seven bits only.
    @inline(__always)
    static func escapeMask(_ word: UInt64) -> UInt64 {
        // A byte is below 0x20 when its high bit is clear and its low seven bits plus 0x60 stay
        // under 0x80; it equals `c` when `byte ^ c` is zero, i.e. its low seven bits plus 0x7f
        // stay under 0x80 and its high bit is clear.
        func zeroBytes(_ v: UInt64) -> UInt64 { ~(((v & lows) &+ lows) | v) }
        let control = ~(((word & lows) &+ 0x6060_6060_6060_6060) | word)
        return (control | zeroBytes(word ^ 0x2222_2222_2222_2222) | zeroBytes(word ^ 0x5c5c_5c5c_5c5c_5c5c)) & highs
    }

    /// Stores the escape of `b`, a byte that needs one; returns the next position. Quotes come
    /// first: they are the escapes a JSON value has.
    @inline(__always)
    private static func appendEscape(_ b: UInt8, at o: Int, in base: UnsafeMutablePointer<UInt8>) -> Int {
        guard b == UInt8(ascii: "\"") || b == UInt8(ascii: "\\") else { return appendEscaped(b, at: o, in: base) }
        base[o] = UInt8(ascii: "\\")
        base[o &+ 1] = b
        return o &+ 2
    }

    /// Stores `b` at `o`, escaped if JSON needs it; returns the next position.
    @inline(__always)
    private static func appendEscaped(_ b: UInt8, at o: Int, in base: UnsafeMutablePointer<UInt8>) -> Int {
        if b >= 0x20 && b != UInt8(ascii: "\"") && b != UInt8(ascii: "\\") {
            base[o] = b
            return o + 1
        }
        base[o] = UInt8(ascii: "\\")
        switch b {
        case UInt8(ascii: "\""), UInt8(ascii: "\\"):
            base[o + 1] = b
            return o + 2
        case 0x0A: base[o + 1] = UInt8(ascii: "n"); return o + 2
        case 0x0D: base[o + 1] = UInt8(ascii: "r"); return o + 2
        case 0x09: base[o + 1] = UInt8(ascii: "t"); return o + 2
        default:
            let hex: StaticString = "0123456789abcdef"
            base[o + 1] = UInt8(ascii: "u")
            base[o + 2] = UInt8(ascii: "0")
            base[o + 3] = UInt8(ascii: "0")
            base[o + 4] = hex.utf8Start[Int(b >> 4)]
            base[o + 5] = hex.utf8Start[Int(b & 15)]
            return o + 6
        }
    }
}

public struct HandlerError: Error, CustomStringConvertible {
    public var message: String
    public init(message: String) { self.message = message }
    public var description: String { message }
}

/// `pwritev2(fd, bytes, -1, RWF_NOWAIT)`: a write at the output's current position that returns
/// EAGAIN (or a short count) instead of waiting for room. Looked up at run time: Swift's Glibc
/// module leaves out the GNU declarations, and a C library older than glibc 2.26 lacks it.
struct NowaitWrite: Sendable {
    private typealias PWritev2 = @convention(c) (Int32, UnsafePointer<iovec>?, Int32, off_t, Int32) -> Int
    /// Linux's `RWF_NOWAIT` (include/uapi/linux/fs.h).
    private static let noWait: Int32 = 0x8
    private let call: PWritev2

    static let available: NowaitWrite? = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "pwritev2")
        .map { NowaitWrite(call: unsafeBitCast($0, to: PWritev2.self)) }

    func callAsFunction(_ fd: Int32, _ bytes: UnsafeRawBufferPointer) -> Int {
        var iov = iovec(iov_base: UnsafeMutableRawPointer(mutating: bytes.baseAddress), iov_len: bytes.count)
        return call(fd, &iov, 1, -1, Self.noWait)
    }
}
