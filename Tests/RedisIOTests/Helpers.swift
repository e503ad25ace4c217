import Foundation
import Synchronization
import Logging
import RedisIO
import TestSupport

#if canImport(Glibc)
import Glibc
#endif

let quietLogger = Logger(label: "redisio-tests") { _ in SwiftLogNoOpLogHandler() }

/// A unique key prefix per test, so tests never see each other's keys.
func uniquePrefix(_ name: String = #function) -> String {
    "test:\(name.prefix { $0 != "(" }):\(UUID().uuidString.prefix(8)):"
}

/// A fresh redis-server, a connection to it, and a claim store on that connection.
struct RedisFixture {
    let server: RedisServerProcess
    let connection: RedisConnection
    let store: RedisClaimStore

    init(maxKeysPerScript: Int = 1000, commandTimeout: Duration = .seconds(5)) async throws {
        server = try RedisServerProcess()
        connection = try await RedisConnection.connect(
            try RedisURL(server.url), connectTimeout: .seconds(2), commandTimeout: commandTimeout, logger: quietLogger)
        store = RedisClaimStore(connection: connection, maxKeysPerScript: maxKeysPerScript, logger: quietLogger)
    }
}

/// The threads a round trip's replies were parsed on.
final class ThreadLog: Sendable {
    private let threads = Mutex<[pthread_t]>([])

    func note() { threads.withLock { $0.append(pthread_self()) } }

    func all(on thread: pthread_t, count: Int) -> Bool {
        threads.withLock { $0.count == count && $0.allSatisfy { pthread_equal($0, thread) != 0 } }
    }

    /// Only the most recent `count`: none of them on `thread`.
    func none(on thread: pthread_t, count: Int) -> Bool {
        threads.withLock { $0.count >= count && $0.suffix(count).allSatisfy { pthread_equal($0, thread) == 0 } }
    }
}
