import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// `dedupd healthcheck`: one HTTP/1.1 GET to the worker's own endpoint on 127.0.0.1, read to the
/// end of the connection, with plain sockets so the container image needs no curl.
public enum HealthProbe {
    /// The status line and body, or `nil` when nothing answers within `timeout`.
    public static func get(port: Int, path: String, timeout: Duration = .seconds(3)) -> (status: String, body: String)? {
        guard let fd = connectLoopback(port: port, timeout: timeout) else { return nil }
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
}
