/// Where and how to connect to Redis: `redis://[user:password@]host[:port][/db]`, or
/// `rediss://...` for TLS.
///
/// Also accepted: `redis://:password@host` (password only, the `default` user) and
/// `redis://user@host` (an ACL user whose password is given apart, e.g. `redis.password_file`).
/// User and password are percent-decoded, so a password may contain `@`, `:` or
/// `/` written as `%40`, `%3A`, `%2F`.
///
/// `description` (and so string interpolation, `String(reflecting:)` and `dump`)
/// never shows the password: use `redacted` in logs.
public struct RedisURL: Sendable, Hashable, CustomStringConvertible, CustomDebugStringConvertible, CustomReflectable {
    /// Host name or IP address (IPv6 without brackets).
    public var host: String
    /// TCP port. Default: 6379.
    public var port: Int
    /// ACL user; `nil` means the `default` user (`AUTH password`).
    public var user: String?
    /// Password; `nil` means no AUTH.
    public var password: String?
    /// Logical database selected after connecting. Default: 0.
    public var database: Int
    /// `rediss://`: the connection is TLS, the server's certificate verified.
    public var tls: Bool

    public init(host: String, port: Int = 6379, user: String? = nil, password: String? = nil, database: Int = 0, tls: Bool = false) {
        self.tls = tls
        self.host = host
        self.port = port
        self.user = user
        self.password = password
        self.database = database
    }

    /// Parses a `redis://` URL. Throws `RedisError` with code `.invalidURL` whose
    /// message names the part that was wrong (and never contains the password).
    public init(_ string: String) throws {
        func bad(_ what: String) -> RedisError {
            RedisError(.invalidURL, "invalid Redis URL: \(what)")
        }
        guard let schemeEnd = string.firstRange(of: "://") else {
            throw bad("missing scheme, expected redis://host[:port][/db] or rediss:// for TLS")
        }
        let givenScheme = string[..<schemeEnd.lowerBound].lowercased()
        guard givenScheme == "redis" || givenScheme == "rediss" else {
            throw bad("scheme '\(givenScheme)' is not supported, use redis:// or rediss:// (TLS)")
        }
        var rest = Substring(string[schemeEnd.upperBound...])
        if let q = rest.firstIndex(where: { $0 == "?" || $0 == "#" }) {
            throw bad("query or fragment '\(rest[q...].prefix(1))...' is not supported")
        }
        // Split off the path (database) first: the authority ends at the first '/'
        // after the last '@' (a raw '/' in a password must be percent-encoded anyway).
        var path: Substring = ""
        let authorityStart = rest.lastIndex(of: "@").map { rest.index(after: $0) } ?? rest.startIndex
        if let slash = rest[authorityStart...].firstIndex(of: "/") {
            path = rest[rest.index(after: slash)...]
            rest = rest[..<slash]
        }
        var hostPort = rest
        var user: String?
        var password: String?
        if let at = rest.lastIndex(of: "@") {
            let userInfo = rest[..<at]
            hostPort = rest[rest.index(after: at)...]
            if let colon = userInfo.firstIndex(of: ":") {
                let rawUser = userInfo[..<colon]
                let rawPassword = userInfo[userInfo.index(after: colon)...]
                guard let decodedUser = Self.percentDecode(rawUser) else {
                    throw bad("user name has an invalid percent-encoding")
                }
                guard let decodedPassword = Self.percentDecode(rawPassword) else {
                    throw bad("password has an invalid percent-encoding")
                }
                guard !decodedPassword.isEmpty else {
                    throw bad("password is empty")
                }
                user = decodedUser.isEmpty ? nil : decodedUser
                password = decodedPassword
            } else {
                // `user@` alone names an ACL user whose password is given apart
                // (`redis.password`, `redis.password_file`).
                guard let decodedUser = Self.percentDecode(userInfo), !decodedUser.isEmpty else {
                    throw bad("user name is empty or has an invalid percent-encoding")
                }
                user = decodedUser
            }
        }
        // Host and port; IPv6 literals in brackets.
        var host: Substring
        var portText: Substring?
        if hostPort.hasPrefix("[") {
            guard let close = hostPort.firstIndex(of: "]") else {
                throw bad("host '\(hostPort)' has '[' without ']'")
            }
            host = hostPort[hostPort.index(after: hostPort.startIndex)..<close]
            let after = hostPort[hostPort.index(after: close)...]
            if !after.isEmpty {
                guard after.hasPrefix(":") else { throw bad("unexpected '\(after)' after host '[\(host)]'") }
                portText = after.dropFirst()
            }
        } else if let colon = hostPort.lastIndex(of: ":") {
            host = hostPort[..<colon]
            portText = hostPort[hostPort.index(after: colon)...]
        } else {
            host = hostPort
        }
        guard !host.isEmpty else { throw bad("host is missing") }
        guard host.allSatisfy({ $0.isLetter || $0.isNumber || "-._:".contains($0) }) else {
            throw bad("host '\(host)' contains invalid characters")
        }
        var port = 6379
        if let portText {
            guard let p = Int(portText), (1...65535).contains(p), portText.allSatisfy(\.isASCII) else {
                throw bad("port '\(portText)' is not a number between 1 and 65535")
            }
            port = p
        }
        var database = 0
        if !path.isEmpty {
            guard let d = Int(path), d >= 0, path.allSatisfy({ $0.isASCII && $0.isNumber }) else {
                throw bad("database '\(path)' is not a non-negative number")
            }
            database = d
        }
        self.init(host: String(host), port: port, user: user, password: password, database: database, tls: givenScheme == "rediss")
    }

    /// The URL with the password replaced by `***` (user name kept).
    public var redacted: String {
        var s = tls ? "rediss://" : "redis://"
        if password != nil {
            s += "\(user.map(Self.percentEncode) ?? ""):***@"
        }
        s += host.contains(":") ? "[\(host)]" : host
        s += ":\(port)/\(database)"
        return s
    }

    public var description: String { redacted }
    public var debugDescription: String { "RedisURL(\(redacted))" }
    public var customMirror: Mirror {
        Mirror(self, children: ["host": host, "port": port, "user": user as Any,
                                "password": password == nil ? "nil" : "***", "database": database, "tls": tls])
    }

    private static func percentDecode(_ s: Substring) -> String? {
        var bytes: [UInt8] = []
        var utf8 = s.utf8[...]
        while let b = utf8.popFirst() {
            if b == UInt8(ascii: "%") {
                guard utf8.count >= 2,
                      let v = UInt8(String(decoding: utf8.prefix(2), as: UTF8.self), radix: 16)
                else { return nil }
                bytes.append(v)
                utf8 = utf8.dropFirst(2)
            } else {
                bytes.append(b)
            }
        }
        return String(validating: bytes, as: UTF8.self)
    }

    private static func percentEncode(_ s: String) -> String {
        var out = ""
        for b in s.utf8 {
            let c = Character(Unicode.Scalar(b))
            if b < 0x80, c.isLetter || c.isNumber || "-._~".contains(c) {
                out.append(c)
            } else {
                out += "%" + (b < 16 ? "0" : "") + String(b, radix: 16, uppercase: true)
            }
        }
        return out
    }
}

extension RedisURL {
    /// The seed nodes of a Redis Cluster: `redis://[user:password@]host:port[,host:port...]`
    /// (`rediss://` for TLS), all with the same user, password and scheme. A cluster has only
    /// database 0, so any other is an error.
    public static func clusterSeeds(_ string: String) throws -> [RedisURL] {
        let seeds = try nodeList(string, kind: "Redis Cluster URL")
        if let seed = seeds.first, seed.database != 0 {
            throw RedisError(.invalidURL, "invalid Redis Cluster URL: database \(seed.database): Redis Cluster has only database 0; remove '/\(seed.database)'")
        }
        return seeds
    }

    /// `redis://[user:password@]host:port[,host:port...][/db]`: one URL per node, each with the
    /// same user, password, database and scheme.
    static func nodeList(_ string: String, kind: String) throws -> [RedisURL] {
        func bad(_ what: String) -> RedisError { RedisError(.invalidURL, "invalid \(kind): \(what)") }
        guard let schemeEnd = string.firstRange(of: "://") else {
            throw bad("missing scheme, expected redis://host:port[,host:port...] or rediss:// for TLS")
        }
        let scheme = string[..<schemeEnd.upperBound]
        var rest = string[schemeEnd.upperBound...]
        var userInfo: Substring = ""
        if let at = rest.lastIndex(of: "@") {
            userInfo = rest[...at]
            rest = rest[rest.index(after: at)...]
        }
        var path: Substring = ""
        if let slash = rest.firstIndex(of: "/") {
            path = rest[slash...]
            rest = rest[..<slash]
        }
        let hosts = rest.split(separator: ",", omittingEmptySubsequences: false)
        guard !hosts.contains(where: \.isEmpty) else { throw bad("empty node in the list '\(rest)'") }
        return try hosts.map { try RedisURL(String(scheme) + userInfo + $0 + path) }
    }

    /// `host:port`, an IPv6 host in brackets.
    var peer: String { Self.peer(host: host, port: port) }

    static func peer(host: String, port: Int) -> String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
}
