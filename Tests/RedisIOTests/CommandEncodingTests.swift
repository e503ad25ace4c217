import RedisIO
import Testing

/// Every command goes out through one RESP encoder that writes its lengths by hand: arguments
/// whose lengths cross a decimal width (9 → 10, 99 → 100, …), binary bytes (CR, LF, NUL) and
/// commands whose argument count crosses one must reach redis-server intact.
@Suite("RESP encoding of commands, against redis-server")
struct CommandEncodingTests {
    static let lengths = [0, 1, 9, 10, 11, 99, 100, 101, 999, 1000, 9999, 10_000, 100_000]

    static func value(_ length: Int) -> [UInt8] {
        (0..<length).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }  // every byte value, CR, LF and NUL among them
    }

    @Test func argumentsOfEveryLengthWidthArriveIntact() async throws {
        let fixture = try await RedisFixture()
        var commands: [[RedisArgument]] = []
        for length in Self.lengths {
            commands.append(["SET", RedisArgument(bytes: Array("enc:\(length)".utf8)), RedisArgument(bytes: Self.value(length))])
            commands.append(["STRLEN", RedisArgument(bytes: Array("enc:\(length)".utf8))])
            commands.append(["GET", RedisArgument(bytes: Array("enc:\(length)".utf8))])
        }
        let replies = try await fixture.connection.pipeline(commands)
        for (i, length) in Self.lengths.enumerated() {
            #expect(replies[3 * i] == .status("OK"), "length \(length)")
            #expect(replies[3 * i + 1] == .integer(Int64(length)), "length \(length)")
            #expect(replies[3 * i + 2] == .string(Self.value(length)), "length \(length)")
        }
    }

    @Test func commandsWithManyArgumentsArriveIntact() async throws {
        let fixture = try await RedisFixture()
        for count in [1, 8, 9, 10, 98, 99, 100, 1000] {
            let items = (0..<count).map { RedisArgument("item-\($0)") }
            let replies = try await fixture.connection.pipeline([
                ["DEL", "enc:list"], ["RPUSH", "enc:list"] + items, ["LRANGE", "enc:list", 0, -1], ["INCRBY", "enc:n", -12_345],
            ])
            #expect(replies[1] == .integer(Int64(count)), "\(count) items")
            #expect(replies[2] == .array((0..<count).map { .string(Array("item-\($0)".utf8)) }), "\(count) items")
            guard case .integer = replies[3] else { Issue.record("INCRBY: \(replies[3])"); return }
        }
    }
}
