import DedupCore
import Foundation
import Synchronization

/// The `log` handler: one JSON line per dispatched message (dedup key, topic, partition, offset,
/// record key, headers, value) on stdout or appended to a file.
///
/// Lines are collected in memory by `handle` and written by `flush`, which the worker calls once
/// per dispatch round before confirming the keys: one write per round, not per message, and a
/// key is confirmed only after its line reached the file.
public final class LogOutputHandler: Handler {
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
        let line = Self.line(for: dispatch)
        pending.withLock { $0.append(contentsOf: line.utf8) }
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
        let m = d.message
        var s = "{\"dedup_key\":\(CanonicalJSON.quote(d.key.raw))"
        s += ",\"topic\":\(CanonicalJSON.quote(m.topic)),\"partition\":\(m.partition),\"offset\":\(m.offset)"
        if let ts = m.timestampMillis { s += ",\"timestamp_ms\":\(ts)" }
        if let key = m.key { s += ",\"key\":\(text(key))" }
        s += ",\"headers\":{"
        s += m.headers.map { h in
            "\(CanonicalJSON.quote(h.name)):\(h.value.map(text) ?? "null")"
        }.joined(separator: ",")
        s += "},\"value\":\(text(m.value))}\n"
        return s
    }

    /// UTF-8 bytes as a JSON string; anything else as {"base64": "..."} so no byte is lost.
    static func text(_ bytes: [UInt8]) -> String {
        if let s = String(validating: bytes, as: UTF8.self) { return CanonicalJSON.quote(s) }
        return "{\"base64\":\"\(Data(bytes).base64EncodedString())\"}"
    }
}

public struct HandlerError: Error, CustomStringConvertible {
    public var message: String
    public init(message: String) { self.message = message }
    public var description: String { message }
}
