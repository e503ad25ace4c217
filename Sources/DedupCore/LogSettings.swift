/// `log.level`: the least severe operational log line written.
public enum LogLevel: String, Sendable, CaseIterable {
    case trace, debug, info, notice, warning, error, critical
}

/// `log.format`: how operational log lines are written.
public enum LogFormat: String, Sendable, CaseIterable {
    /// `key=value` pairs.
    case logfmt
    /// One JSON object per line.
    case json
}
