import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// `dedupd healthcheck`: one HTTP/1.1 GET to the worker's own endpoint on 127.0.0.1, read to the
/// end of the connection, with plain sockets so the container image needs no curl.
public enum HealthProbe {
    /// The status line and body, or `nil` when nothing answers within `timeout`.
    public static func get(port: Int, path: String, timeout: Duration = .seconds(3)) -> (status: String, body: String)? {
        guard let fd = Self.connectLoopback(port: port, timeout: timeout) else { return nil }
        defer { close(fd) }
        let request = Array("GET \(path) HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".utf8)
        guard send(fd, request, request.count, Int32(MSG_NOSIGNAL)) == request.count else { return nil }
        var reply: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline, reply.count < 1 << 20 {
            let n = recv(fd, &buffer, buffer.count, 0)
            if n <= 0 { break }
            reply += buffer[..<n]
            if let text = String(validating: reply, as: UTF8.self), complete(text) { break }
        }
        let text = String(decoding: reply, as: UTF8.self)
        guard let headerEnd = text.range(of: "\r\n\r\n") else { return text.isEmpty ? nil : (text, "") }
        let status = text[..<headerEnd.lowerBound].split(separator: "\r\n").first.map(String.init) ?? ""
        return (status, String(text[headerEnd.upperBound...]).trimmingCharacters(in: .whitespacesAndNewlines))
    }

    /// Whether the whole response arrived (headers plus `Content-Length` bytes), for servers that
    /// keep the connection open despite `Connection: close`.
    static func complete(_ text: String) -> Bool {
        guard let headerEnd = text.range(of: "\r\n\r\n") else { return false }
        let headers = text[..<headerEnd.lowerBound].lowercased()
        guard let line = headers.split(separator: "\r\n").first(where: { $0.hasPrefix("content-length:") }),
            let length = Int(line.dropFirst("content-length:".count).trimmingCharacters(in: .whitespaces))
        else { return false }
        return text[headerEnd.upperBound...].utf8.count >= length
    }

    /// A TCP socket connected to 127.0.0.1:`port` with send and receive timeouts, or nil when
    /// nothing accepts. The caller closes it.
    static func connectLoopback(port: Int, timeout: Duration) -> Int32? {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return nil }
        let (s, atto) = timeout.components
        var tv = timeval(tv_sec: Int(s), tv_usec: Int(atto / 1_000_000_000_000))
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = in_port_t(UInt16(clamping: port).bigEndian)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        let connected = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        guard connected == 0 else {
            close(fd)
            return nil
        }
        return fd
    }
}
