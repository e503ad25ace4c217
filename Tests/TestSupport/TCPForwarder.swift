import Foundation
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// A loopback endpoint that forwards each new connection to the port it names at that moment, as
/// a managed service's primary endpoint (a DNS name) follows a failover: connections made before
/// `retarget` stay with the server they reached. One thread accepts, two pump each connection.
public final class TCPForwarder: Sendable {
    public let port: Int
    private let target: Target
    private let listener: Int32

    public init(to targetPort: Int) throws {
        target = Target(targetPort)
        let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        self.listener = listener
        var one: Int32 = 1
        setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var address = Self.loopback(port: 0)
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard bound == 0, listen(listener, 64) == 0 else {
            close(listener)
            throw LocalServerError("forwarder: bind/listen failed (errno \(errno))")
        }
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(listener, $0, &length) }
        }
        port = Int(UInt16(bigEndian: address.sin_port))
        let target = target
        Thread.detachNewThread {
            while true {
                let client = accept(listener, nil, nil)
                guard client >= 0 else { return }  // closed by deinit
                let server = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
                var to = Self.loopback(port: target.port.withLock { $0 })
                let connected = withUnsafePointer(to: &to) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(server, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
                }
                guard connected == 0 else {
                    close(client)
                    close(server)
                    continue
                }
                Self.pump(client, server)
            }
        }
    }

    /// New connections go to `port` from now on.
    public func retarget(_ port: Int) { target.port.withLock { $0 = port } }

    deinit {
        shutdown(listener, Int32(SHUT_RDWR))
        close(listener)
    }

    private final class Target: Sendable {
        let port: Mutex<Int>
        init(_ port: Int) { self.port = Mutex(port) }
    }

    private final class PumpsDone: Sendable {
        let count = Mutex(0)
    }

    private static func loopback(port: Int) -> sockaddr_in {
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = UInt16(port).bigEndian
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        return address
    }

    /// Copies bytes both ways until either side closes; then closes both.
    private static func pump(_ a: Int32, _ b: Int32) {
        let done = PumpsDone()
        for (from, to) in [(a, b), (b, a)] {
            Thread.detachNewThread {
                var buffer = [UInt8](repeating: 0, count: 16 * 1024)
                while true {
                    let n = buffer.withUnsafeMutableBytes { read(from, $0.baseAddress, $0.count) }
                    guard n > 0 else { break }
                    var sent = 0
                    while sent < n {
                        let m = buffer.withUnsafeBytes { write(to, $0.baseAddress! + sent, n - sent) }
                        guard m > 0 else { break }
                        sent += m
                    }
                    if sent < n { break }
                }
                shutdown(from, Int32(SHUT_RDWR))
                shutdown(to, Int32(SHUT_RDWR))
                if done.count.withLock({ $0 += 1; return $0 }) == 2 {
                    close(a)
                    close(b)
                }
            }
        }
    }
}
