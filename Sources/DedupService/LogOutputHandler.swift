import DedupCore
import Foundation
import Synchronization

/// The `log` handler: one JSON line per dispatched message (dedup key, topic, partition, offset,
/// record key, headers, value) on stdout or appended to a file.
///
/// Lines are collected in memory by `handle` and written by `flush`, which the worker calls once
/// per dispatch round before confirming the keys: one write per round, not per message, and a
/// key is confirmed only after its line reached the file.
public final class LogOutputHandler: BatchHandler {
    private let handle: FileHandle
    private let ownsHandle: Bool
    private let pending = Mutex<[UInt8]>([])

    /// `path` is a file to append to, or `-` for stdout.
    public init(path: String) throws {
        if path == "-" {
            handle = .standardOutput
            ownsHandle = false
        } else {
            if !FileManager.default.fileExists(atPath: path) {
                guard FileManager.default.createFile(atPath: path, contents: nil) else {
                    throw HandlerError(message: "log handler: cannot create output file \(path)")
                }
            }
            guard let h = FileHandle(forWritingAtPath: path) else {
                throw HandlerError(message: "log handler: cannot open output file \(path) for writing")
            }
            h.seekToEndOfFile()
            handle = h
            ownsHandle = true
        }
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

    public func flush() async throws {
        let bytes = pending.withLock { buffer -> [UInt8] in
            defer { buffer.removeAll(keepingCapacity: true) }
            return buffer
        }
        guard !bytes.isEmpty else { return }
        do {
            try handle.write(contentsOf: bytes)
        } catch {
            throw HandlerError(message: "log handler: write failed: \(error)")
        }
    }

    public func close() async {
        try? await flush()
        if ownsHandle { try? handle.close() }
    }

    static func line(for d: Dispatch) -> String {
        var bytes: [UInt8] = []
        appendLine(for: d, to: &bytes)
        return String(decoding: bytes, as: UTF8.self)
    }

    /// Appends one JSON line, built byte by byte (no intermediate strings): the dispatch path
    /// of the `log` handler runs once per unique message.
    static func appendLine(for d: Dispatch, to out: inout [UInt8]) {
        let m = d.message
        out.reserveCapacity(out.count + 160 + m.value.count + (m.key?.count ?? 0))
        out.append(contentsOf: #"{"dedup_key":"#.utf8)
        appendQuoted(d.key.raw.utf8, to: &out)
        out.append(contentsOf: #","topic":"#.utf8)
        appendQuoted(m.topic.utf8, to: &out)
        out.append(contentsOf: #","partition":"#.utf8)
        appendDecimal(Int64(m.partition), to: &out)
        out.append(contentsOf: #","offset":"#.utf8)
        appendDecimal(m.offset, to: &out)
        if let ts = m.timestampMillis {
            out.append(contentsOf: #","timestamp_ms":"#.utf8)
            appendDecimal(ts, to: &out)
        }
        if let key = m.key {
            out.append(contentsOf: #","key":"#.utf8)
            appendText(key, to: &out)
        }
        out.append(contentsOf: #","headers":{"#.utf8)
        for (i, h) in m.headers.enumerated() {
            if i > 0 { out.append(UInt8(ascii: ",")) }
            appendQuoted(h.name.utf8, to: &out)
            out.append(UInt8(ascii: ":"))
            if let v = h.value { appendText(v, to: &out) } else { out.append(contentsOf: "null".utf8) }
        }
        out.append(contentsOf: #"},"value":"#.utf8)
        appendText(m.value, to: &out)
        out.append(contentsOf: "}\n".utf8)
    }

    /// UTF-8 bytes as a JSON string; anything else as {"base64": "..."} so no byte is lost.
    static func appendText(_ bytes: [UInt8], to out: inout [UInt8]) {
        if isValidUTF8(bytes) {
            appendQuoted(bytes, to: &out)
        } else {
            out.append(contentsOf: #"{"base64":""#.utf8)
            out.append(contentsOf: Data(bytes).base64EncodedString().utf8)
            out.append(contentsOf: #""}"#.utf8)
        }
    }

    static func text(_ bytes: [UInt8]) -> String {
        var out: [UInt8] = []
        appendText(bytes, to: &out)
        return String(decoding: out, as: UTF8.self)
    }

    /// ASCII is checked byte by byte; anything else by the standard library's validation.
    static func isValidUTF8(_ bytes: [UInt8]) -> Bool {
        if bytes.allSatisfy({ $0 < 0x80 }) { return true }
        return String(validating: bytes, as: UTF8.self) != nil
    }

    /// Valid UTF-8 as a JSON string literal: the same escapes as `CanonicalJSON.quote` (quote,
    /// backslash, \n \r \t, other control characters as \u00XX); every other byte, multi-byte
    /// sequences included, is copied as it is.
    static func appendQuoted<C: Collection<UInt8>>(_ bytes: C, to out: inout [UInt8]) {
        out.append(UInt8(ascii: "\""))
        for b in bytes {
            switch b {
            case UInt8(ascii: "\""): out.append(UInt8(ascii: "\\")); out.append(b)
            case UInt8(ascii: "\\"): out.append(UInt8(ascii: "\\")); out.append(b)
            case 0x0A: out.append(UInt8(ascii: "\\")); out.append(UInt8(ascii: "n"))
            case 0x0D: out.append(UInt8(ascii: "\\")); out.append(UInt8(ascii: "r"))
            case 0x09: out.append(UInt8(ascii: "\\")); out.append(UInt8(ascii: "t"))
            case 0..<0x20:
                let hex = Array("0123456789abcdef".utf8)
                out.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "u"), UInt8(ascii: "0"), UInt8(ascii: "0"), hex[Int(b >> 4)], hex[Int(b & 15)]])
            default: out.append(b)
            }
        }
        out.append(UInt8(ascii: "\""))
    }

    static func appendDecimal(_ v: Int64, to out: inout [UInt8]) {
        if v < 0 {
            out.append(UInt8(ascii: "-"))
            if v == .min { out.append(contentsOf: "9223372036854775808".utf8); return }
        }
        var n = v.magnitude
        var digits: (UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8,
                     UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8) =
            (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        var count = 0
        withUnsafeMutableBytes(of: &digits) { buf in
            repeat {
                buf[19 - count] = UInt8(ascii: "0") + UInt8(n % 10)
                n /= 10
                count += 1
            } while n > 0
            out.append(contentsOf: buf[(20 - count)...])
        }
    }
}

public struct HandlerError: Error, CustomStringConvertible {
    public var message: String
    public init(message: String) { self.message = message }
    public var description: String { message }
}
