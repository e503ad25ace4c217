public enum DurationParser {
    /// `250ms`, `2s`, `1.5s`, `5m`, `24h`, `7d`, `1h30m`, and `0`.
    public static func parse(_ text: String) -> Duration? {
        let s = text.trimmingSpaces()
        if s == "0" { return .zero }
        var total = 0.0
        var number = ""
        var unit = ""
        var sawAny = false
        func flush() -> Bool {
            guard let n = Double(number) else { return false }
            let scale: Double
            switch unit {
            case "ms": scale = 0.001
            case "s": scale = 1
            case "m": scale = 60
            case "h": scale = 3600
            case "d": scale = 86400
            default: return false
            }
            total += n * scale
            number = ""
            unit = ""
            sawAny = true
            return true
        }
        for c in s {
            if c.isNumber || c == "." {
                if !unit.isEmpty { guard flush() else { return nil } }
                number.append(c)
            } else if c.isLetter {
                guard !number.isEmpty else { return nil }
                unit.append(c)
            } else {
                return nil
            }
        }
        guard !number.isEmpty, flush(), sawAny else { return nil }
        return .milliseconds(Int64((total * 1000).rounded()))
    }
}

public enum SizeParser {
    /// `65536`, `512KiB`, `64MiB`, `1GiB`, also `KB`/`MB`/`GB` (decimal).
    public static func parse(_ text: String) -> Int? {
        let s = text.trimmingSpaces().replacingUnderscores()
        let digits = s.prefix { $0.isNumber }
        guard let n = Int(digits) else { return nil }
        let unit = s.dropFirst(digits.count).lowercased()
        let scale: Int
        switch unit {
        case "", "b": scale = 1
        case "kib", "k": scale = 1 << 10
        case "mib", "m": scale = 1 << 20
        case "gib", "g": scale = 1 << 30
        case "kb": scale = 1000
        case "mb": scale = 1_000_000
        case "gb": scale = 1_000_000_000
        default: return nil
        }
        return n * scale
    }
}

extension StringProtocol {
    func trimmingSpaces() -> String {
        String(self.drop { $0.isWhitespace }.reversed().drop { $0.isWhitespace }.reversed())
    }
    func replacingUnderscores() -> String { String(self.filter { $0 != "_" }) }
}
