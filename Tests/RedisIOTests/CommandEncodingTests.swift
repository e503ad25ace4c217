@testable import RedisIO
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

/// The batch writes RESP as arguments arrive and widens a header in place when its number needs
/// another digit: every way of appending, at every width, must give what a plain encoder gives.
@Suite("RESP written in place")
struct CommandBatchBytesTests {
    static func reference(_ commands: [[[UInt8]]]) -> [UInt8] {
        var out: [UInt8] = []
        for command in commands {
            out += Array("*\(command.count)\r\n".utf8)
            for argument in command { out += Array("$\(argument.count)\r\n".utf8) + argument + [13, 10] }
        }
        return out
    }

    /// With the count declared at `begin(arguments:)` or counted as arguments come; arguments
    /// appended as bytes, written in place (length known or not) or encoded beforehand.
    @Test func everyAppendAtEveryWidthMatchesAPlainEncoder() {
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<200 {
            var batch = RedisCommandBatch()
            var commands: [[[UInt8]]] = []
            for _ in 0..<Int.random(in: 1...4, using: &rng) {
                let count = [1, 3, 9, 10, 11, 99, 100, 101].randomElement(using: &rng)!
                if Bool.random(using: &rng) { batch.begin(arguments: count) } else { batch.begin() }
                var command: [[UInt8]] = []
                for _ in 0..<count {
                    let length = [0, 1, 9, 10, 11, 99, 100, 101, 1000].randomElement(using: &rng)!
                    let argument = (0..<length).map { _ in UInt8.random(in: 0...255, using: &rng) }
                    switch Int.random(in: 0..<5, using: &rng) {
                    case 0: batch.append(argument)
                    case 1: batch.appendArgument(atMost: argument.count + Int.random(in: 0...3, using: &rng)) { $0.write(argument) }
                    case 2: batch.appendArgument(length: argument.count) { $0.write(argument) }
                    case 3: batch.append(EncodedArguments([RedisArgument(bytes: argument)]))
                    default:
                        let n = Int64.random(in: -1_000_000...1_000_000, using: &rng)
                        batch.append(n)
                        command.append(Array(String(n).utf8))
                        continue
                    }
                    command.append(argument)
                }
                commands.append(command)
            }
            #expect(batch.bytes == Self.reference(commands))
            #expect(batch.commandCount == commands.count)
            let picked = batch.commands([commands.count - 1, 0], askingFirst: true)
            #expect(picked.bytes == Self.reference([[Array("ASKING".utf8)], commands[commands.count - 1], [Array("ASKING".utf8)], commands[0]]))
            #expect(picked.commandCount == 4)
        }
    }

    /// Writes inside `withOwnStorage` skip the per-argument check for shared storage, so the
    /// scope must take its own copy first: a copy made before it keeps its bytes.
    @Test func writesInsideOwnStorageLeaveEarlierCopiesAlone() {
        let ping = [Array("PING".utf8)]
        var batch = RedisCommandBatch()
        batch.begin(arguments: 1)
        batch.append("PING")
        let copy = batch
        batch.withOwnStorage { batch in
            for _ in 0..<100 {
                batch.begin(arguments: 1)
                batch.append("PING")
            }
        }
        #expect(copy.bytes == Self.reference([ping]))
        #expect(batch.bytes == Self.reference(Array(repeating: ping, count: 101)))
    }

    /// A run of arguments appended again to the next command (a confirm's `MGET` and `DEL` of the
    /// same pending keys) is encoded as if each were appended anew, whatever their widths.
    @Test func repeatedArgumentsMatchAPlainEncoder() {
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<100 {
            let arguments = (0..<[1, 9, 10, 11, 99, 100, 101].randomElement(using: &rng)!).map { _ in
                (0..<[0, 1, 9, 10, 11, 99, 100, 101].randomElement(using: &rng)!).map { _ in UInt8.random(in: 0...255, using: &rng) }
            }
            var batch = RedisCommandBatch()
            batch.begin(arguments: 1 + arguments.count)
            batch.append("MGET")
            let start = batch.byteCount
            for argument in arguments {
                if Bool.random(using: &rng) {
                    batch.append(argument)
                } else {
                    batch.appendArgument(atMost: argument.count + 2) { $0.write(argument) }
                }
            }
            let end = batch.byteCount
            batch.begin(arguments: 1 + arguments.count)
            batch.append("DEL")
            batch.repeatArguments(from: start, to: end, count: arguments.count)
            #expect(batch.bytes == Self.reference([[Array("MGET".utf8)] + arguments, [Array("DEL".utf8)] + arguments]))
            #expect(batch.commandCount == 2)
        }
    }
}
