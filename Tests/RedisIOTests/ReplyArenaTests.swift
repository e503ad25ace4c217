import RedisIO
import Testing

/// hiredis's reader builds replies in `ReplyArena` (reused from one reply to the next), not in
/// its own allocations: every reply type, nested, larger than a chunk and larger than the
/// chunks kept, must read back exactly, and a reply read after a large one must not see its
/// memory.
@Suite("Replies read into the reply arena, against redis-server")
struct ReplyArenaTests {
    static let manyElements = 20_000

    func pipeline(_ fixture: RedisFixture) async throws -> [RedisReply] {
        try await fixture.connection.pipeline([
            ["SET", "arena:big", RedisArgument(String(repeating: "x", count: 200_000))],
            ["GET", "arena:big"],
            ["EVAL", "return {1, {'a', false, {2, 'b'}}, redis.status_reply('FINE'), redis.error_reply('ERR boom')}", 0],
            ["EVAL", RedisArgument("local t = {} for i = 1, \(Self.manyElements) do t[i] = tostring(i) end return t"), 0],
            ["GET", "arena:missing"],
            ["INCRBY", "arena:n", 41],
            ["NOSUCHCOMMAND"],
            ["EVAL", "return ''", 0],
            ["EVAL", "return {}", 0],
        ])
    }

    @Test func everyReplyTypeReadsBackExactlyAndAgainAfterReuse() async throws {
        let fixture = try await RedisFixture()
        let first = try await pipeline(fixture)
        #expect(first[0] == .status("OK"))
        #expect(first[1] == .string(Array(repeating: UInt8(ascii: "x"), count: 200_000)))
        #expect(first[2] == .array([
            .integer(1), .array([.string(Array("a".utf8)), .null, .array([.integer(2), .string(Array("b".utf8))])]),
            .status("FINE"), .error("ERR boom"),
        ]))
        #expect(first[3] == .array((1...Self.manyElements).map { .string(Array(String($0).utf8)) }))
        #expect(first[4] == .null)
        #expect(first[5] == .integer(41))
        guard case .error(let text) = first[6] else { Issue.record("not an error: \(first[6])"); return }
        #expect(text.hasPrefix("ERR unknown command"), "\(text)")
        #expect(first[7] == .string([]))
        #expect(first[8] == .array([]))

        // The same replies again on the same socket, its arena now reused (and trimmed after
        // the large array); only the counter moved.
        let second = try await pipeline(fixture)
        #expect(second[5] == .integer(82))
        #expect(Array(second[0..<5]) == Array(first[0..<5]) && Array(second[6...]) == Array(first[6...]))
        #expect(try await fixture.connection.command(["PING"]) == .status("PONG"))
    }
}
