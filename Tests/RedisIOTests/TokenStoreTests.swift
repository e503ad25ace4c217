import DedupCore
import Foundation
import RedisIO
import Testing
import TestSupport

@Suite("Token store against redis-server") struct TokenStoreTests {
    @Test func anIssuedTokenIsAcceptedOnceAndEachRefusalHasItsReason() async throws {
        let fx = try await RedisFixture()
        let p = uniquePrefix()
        let (a, b, never) = (p + "a", p + "b", p + "never")
        try await fx.store.issue([a, b], ttl: .seconds(60), memory: .seconds(60))

        #expect(try await fx.store.use([a, never], marks: ["t/0/1", "t/0/2"]) == [.accepted, .unknown])
        // The same message again (a redelivery after a crash) is not a reuse; another one is.
        #expect(try await fx.store.use([a, a], marks: ["t/0/1", "t/1/7"]) == [.accepted, .reused])
        #expect(try await fx.store.use([b], marks: ["t/2/3"]) == [.accepted])
    }

    @Test func anExpiredTokenIsRefusedAsExpiredThenForgotten() async throws {
        let fx = try await RedisFixture()
        let token = uniquePrefix() + "t"
        // Memory long enough that a loaded machine reaches the use call before it runs out.
        try await fx.store.issue([token], ttl: .milliseconds(100), memory: .seconds(3))
        try await Task.sleep(for: .milliseconds(150))
        #expect(try await fx.store.use([token], marks: ["t/0/1"]) == [.expired])
        let forgotten = try await waitUntil(timeout: .seconds(15)) {
            try await fx.store.use([token], marks: ["t/0/1"]) == [.unknown]
        }
        #expect(forgotten)
    }

    @Test func issuingIsOneRoundTripForManyTokens() async throws {
        let fx = try await RedisFixture(maxKeysPerScript: 100)
        let p = uniquePrefix()
        let tokens = (0..<1_000).map { "\(p)\($0)" }
        try await fx.store.issue(tokens, ttl: .seconds(60), memory: .seconds(60))
        let outcomes = try await fx.store.use(tokens, marks: tokens.indices.map { "t/0/\($0)" })
        #expect(outcomes.allSatisfy { $0 == .accepted })
    }
}
