import ArgumentParser
import DedupCore
import DedupService
import Foundation

/// `dedupd explain`: one message through the configuration's routing and key templates, offline.
struct Explain: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show which route a message (on stdin) takes and its dedup key, or the bad-input reason it would get; offline.",
        discussion: """
            Reads the message value from standard input (or --value). Nothing connects to Kafka or Redis. \
            Exit status 0 when the message would be keyed, 1 when it is bad input.
              echo '{"orderNo":"ord-13"}' | dedupd explain --config dedupd.yaml --header message-id=ord-13
            """)

    @Option(help: "The worker's configuration file; DEDUPD_* variables apply as for run.") var config: String?
    @Option(name: .customLong("header"), help: "A header of the message, NAME=VALUE; repeatable.") var headers: [String] = []
    @Option(name: .customLong("key"), help: "The message's Kafka record key.") var recordKey: String?
    @Option(help: "The topic it arrives on; default: the first of kafka.topics.") var topic: String?
    @Option(help: "The message value; default: standard input.") var value: String?

    func run() throws {
        let config: WorkerConfiguration
        do {
            // Not ConfigLoader.load: explain needs neither the password file nor librdkafka's checks.
            config = try WorkerConfiguration(layers: ConfigLoader.layers(file: self.config))
        } catch {
            throw ValidationError("\(error)")
        }
        var parsed: [MessageHeader] = []
        for h in headers {
            guard let eq = h.firstIndex(of: "="), eq != h.startIndex else {
                throw ValidationError("--header must be NAME=VALUE, got \(h)")
            }
            parsed.append(MessageHeader(name: String(h[..<eq]), value: Array(h[h.index(after: eq)...].utf8)))
        }
        let body = value.map { Array($0.utf8) } ?? [UInt8](FileHandle.standardInput.readDataToEndOfFile())
        let message = InboundMessage(
            topic: topic ?? config.topics[0], partition: 0, offset: 0,
            key: recordKey.map { Array($0.utf8) }, value: body, headers: parsed)
        let explanation = Explanation.explain(message, config: config)
        for line in explanation.lines { print(line) }
        if case .bad = explanation.outcome { throw ExitCode(1) }
    }
}
