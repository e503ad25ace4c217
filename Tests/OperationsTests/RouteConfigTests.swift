import DedupCore
import DedupService
import Foundation
import TestSupport
import Testing

/// Routes as an operator writes them: a YAML list, tried in order, each route inheriting the
/// top-level dedup and handler keys it does not set; mistakes named by their full key.
@Suite struct RouteConfigTests {
    let required = ["DEDUPD_KAFKA_BOOTSTRAP_SERVERS": "env:9092", "DEDUPD_KAFKA_TOPICS": "orders,payments"]

    func load(_ yaml: String) throws -> WorkerConfiguration {
        let dir = try TemporaryDirectory(prefix: "dedupd-routes")
        let path = dir.file("dedupd.yaml").path
        try yaml.write(toFile: path, atomically: true, encoding: .utf8)
        return try withExtendedLifetime(dir) { try ConfigLoader.load(file: path, environment: required) }
    }

    func error(_ yaml: String) -> ConfigError? {
        #expect(throws: ConfigError.self) { try load(yaml) }
    }

    @Test func routesAreReadInOrderAndInheritTheTopLevelKeys() throws {
        let c = try load("""
            dedup: {key: "header:message-id", window: 3s, retention: 1h}
            handler: {type: log, concurrency: 2, max_attempts: 3}
            routing: {unmatched: dead_letter}
            routes:
              - name: payments
                match: {topic: payments}
                dedup: {key: "json:/paymentId", window: 10s, retention: 7d, keep: last}
                handler: {type: http, url: "http://127.0.0.1:9/pay", concurrency: 8}
              - name: refunds
                match: {header: "type=refund", json: "/kind=refund"}
                dedup: {namespace: money}
            """)
        #expect(c.routes.map(\.name) == ["payments", "refunds"])
        #expect(c.unmatched == .deadLetter)
        let pay = c.routes[0], refund = c.routes[1]
        #expect(pay.dedup.template.description == "json:/paymentId")
        #expect(pay.dedup.window == .seconds(10) && pay.dedup.retention == .seconds(7 * 86_400))
        #expect(pay.dedup.lease == .seconds(40), "window + 30 s, from the route's own window")
        #expect(pay.dedup.keep == .last && pay.dedup.namespace == "payments", "namespace defaults to the route name")
        #expect(pay.handler.type == "http" && pay.handler.concurrency == 8 && pay.handler.maxAttempts == 3)
        #expect(refund.dedup.template.description == "header:message-id" && refund.dedup.window == .seconds(3))
        #expect(refund.dedup.namespace == "money")
        #expect(refund.handler.type == "log" && refund.handler.concurrency == 2)
        #expect(refund.match.header?.name == "type" && refund.match.json?.value == "refund")
        #expect(c.routing.routes.count == 2)
        #expect(c.handlersByRoute.map(\.type) == ["log", "http", "log"])
        #expect(c.dedup.namespace == "default" && c.routes.allSatisfy { $0.dedup.bufferMaxBytes == c.dedup.bufferMaxBytes })
    }

    @Test func withoutRoutesThereIsOnlyTheDefaultRoute() throws {
        let c = try load("dedup: {window: 1s}\n")
        #expect(c.routes.isEmpty && c.unmatched == .default && c.handlersByRoute.count == 1)
    }

    @Test func mistakesNameTheRoutesKey() {
        let typo = error("""
            routes:
              - name: pay
                match: {topic: payments}
                dedup: {windw: 2s}
            """)
        #expect(typo?.key == "routes.pay.dedup.windw")
        #expect(typo?.problem.contains("did you mean routes.pay.dedup.window?") == true)

        let noMatch = error("""
            routes:
              - name: pay
                dedup: {window: 2s}
            """)
        #expect(noMatch?.key == "routes.pay.match")

        let badHeader = error("""
            routes:
              - {name: pay, match: {header: payment}}
            """)
        #expect(badHeader?.key == "routes.pay.match.header")
        #expect(badHeader?.problem.contains("NAME=VALUE") == true)

        let noURL = error("""
            routes:
              - {name: pay, match: {topic: payments}, handler: {type: http}}
            """)
        #expect(noURL?.key == "routes.pay.handler.url")

        let badWindow = error("""
            routes:
              - {name: pay, match: {topic: payments}, dedup: {window: soon}}
            """)
        #expect(badWindow?.key == "routes.pay.dedup.window")

        let twice = error("""
            routes:
              - {name: pay, match: {topic: a}}
              - {name: pay, match: {topic: b}}
            """)
        #expect(twice?.key == "routes" && twice?.problem.contains("named twice") == true)

        let noName = error("""
            routes:
              - {match: {topic: a}}
            """)
        #expect(noName?.problem.contains("with a name") == true)

        let stray = #expect(throws: ConfigError.self) {
            try ConfigLoader.load(file: nil, environment: required, flags: ["routes.ghost.dedup.window": "2s"])
        }
        #expect(stray?.problem.contains("not in routes") == true)
    }

    @Test func checkConfigShowsWhatEachRouteSets() throws {
        let dir = try TemporaryDirectory(prefix: "dedupd-routes")
        let path = dir.file("dedupd.yaml").path
        try """
            routes:
              - {name: pay, match: {topic: payments}, dedup: {window: 9s}}
            """.write(toFile: path, atomically: true, encoding: .utf8)
        let lines = ConfigLoader.describe(try ConfigLoader.layers(file: path, environment: required))
        #expect(lines.contains("routes = pay  # \(path)"))
        #expect(lines.contains("routes.pay.dedup.window = 9s  # \(path)"))
        #expect(lines.contains("routes.pay.match.topic = payments  # \(path)"))
    }
}
