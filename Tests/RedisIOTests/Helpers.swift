import Foundation
import Logging
import RedisIO
import TestSupport

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

