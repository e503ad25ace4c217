import DedupCore
import Foundation
import Logging
import Synchronization

/// swift-log handler for dedupd's operational log: one line per event on stderr, logfmt by
/// default or JSON, so stdout stays data (the `log` handler writes dispatched messages there).
public struct OperationalLogHandler: LogHandler {
    public enum Format: String, Sendable { case logfmt, json }

    public var logLevel: Logger.Level
    public var metadata: Logger.Metadata = [:]
    let label: String
    let format: Format
    let sink: LineSink

    public init(label: String, level: Logger.Level, format: Format, sink: LineSink = .standardError) {
        self.label = label
        self.logLevel = level
        self.format = format
        self.sink = sink
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var fields: [(String, String)] = [
            ("ts", Self.timestamp()),
            ("level", event.level.rawValue),
            ("msg", event.message.description),
        ]
        var merged = metadata
        if let extra = event.metadata { merged.merge(extra) { _, new in new } }
        for key in merged.keys.sorted() { fields.append((key, "\(merged[key]!)")) }
        sink.write(line: format == .json ? Self.json(fields) : Self.logfmt(fields))
    }

    static func logfmt(_ fields: [(String, String)]) -> String {
        fields.map { key, value in
            let needsQuotes = value.isEmpty || value.contains { $0 == " " || $0 == "=" || $0 == "\"" || $0.isNewline }
            guard needsQuotes else { return "\(key)=\(value)" }
            let escaped = value.replacingOccurrences(of: "\\", with: "\\\\")
                .replacingOccurrences(of: "\"", with: "\\\"")
                .replacingOccurrences(of: "\n", with: "\\n")
            return "\(key)=\"\(escaped)\""
        }.joined(separator: " ")
    }

    static func json(_ fields: [(String, String)]) -> String {
        "{" + fields.map { "\(CanonicalJSON.quote($0.0)):\(CanonicalJSON.quote($0.1))" }.joined(separator: ",") + "}"
    }

    static func timestamp() -> String {
        var tv = timeval()
        gettimeofday(&tv, nil)
        var t = time_t(tv.tv_sec)
        var tmv = tm()
        gmtime_r(&t, &tmv)
        return String(
            format: "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ",
            tmv.tm_year + 1900, tmv.tm_mon + 1, tmv.tm_mday, tmv.tm_hour, tmv.tm_min, tmv.tm_sec,
            Int(tv.tv_usec / 1000))
    }
}

/// Where whole lines go. Lines are written in order by one serial queue, so lines from
/// different threads never interleave and a caller never waits for the write: a log line can be
/// emitted from a cooperative thread, and stderr may be a pipe whose reader is slow.
public final class LineSink: Sendable {
    private let handle: FileHandle
    private let queue = DispatchQueue(label: "dedupd.log")

    public init(handle: FileHandle) { self.handle = handle }

    public static let standardError = LineSink(handle: .standardError)

    public func write(line: String) {
        let data = Data((line + "\n").utf8)
        queue.async { [handle] in handle.write(data) }
    }

    /// Waits until every line written so far reached the file (before the process exits).
    public func flush() { queue.sync {} }
}

/// Sets up swift-log once for the process.
public enum OperationalLog {
    public static func bootstrap(level: LogLevel, format: LogFormat) {
        let lvl = Logger.Level(rawValue: level.rawValue) ?? .info
        let fmt = OperationalLogHandler.Format(rawValue: format.rawValue) ?? .logfmt
        LoggingSystem.bootstrap { label in OperationalLogHandler(label: label, level: lvl, format: fmt) }
        // Lines still queued when the process exits (main returns, exit(), the watchdog) are written first.
        atexit { OperationalLog.flush() }
    }

    /// Writes every queued line of the operational log.
    public static func flush() { LineSink.standardError.flush() }
}
