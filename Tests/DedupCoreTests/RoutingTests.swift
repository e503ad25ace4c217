import DedupCore
import Testing

/// Routes in the engine: each route's own key, namespace, window and keep policy; one round trip
/// for all routes' claims and confirms; commits that never pass a message waiting in any route.
@Suite struct RoutingTests {
    let tp0 = TopicPartition(topic: "t", partition: 0)

    func header(_ name: String, _ value: String) -> MessageHeader { MessageHeader(name: name, value: Array(value.utf8)) }

    /// `type: payment` → payments (window 10 s, keep last, key json:/paymentId);
    /// JSON `kind: refund` → refunds (window 2 s); everything else → default (5 s, message-id).
    func engine(unmatched: Routing.Unmatched = .default) throws -> DedupLedger {
        let base = DedupSettings(template: try KeyTemplate("header:message-id"), namespace: "default")
        let routing = Routing(
            routes: [
                Route(
                    name: "payments", match: try RouteMatch(header: "type=payment"),
                    settings: DedupSettings(
                        template: try KeyTemplate("json:/paymentId"), namespace: "payments", window: .seconds(10),
                        retention: .seconds(7 * 86_400), keep: .last)),
                Route(
                    name: "refunds", match: try RouteMatch(json: "/kind=refund"),
                    settings: DedupSettings(template: try KeyTemplate("json:/refundId"), namespace: "refunds", window: .seconds(2))),
            ],
            unmatched: unmatched)
        return DedupLedger(settings: base, routing: routing)
    }

    func payment(_ id: String, offset: Int64, amount: Int) -> InboundMessage {
        var m = msg("m-\(offset)", offset: offset, value: #"{"paymentId":"\#(id)","amount":\#(amount)}"#)
        m.headers.append(header("type", "payment"))
        return m
    }

    func refund(_ id: String, offset: Int64) -> InboundMessage {
        msg("m-\(offset)", offset: offset, value: #"{"kind":"refund","refundId":"\#(id)"}"#)
    }

    @Test func eachRouteHasItsOwnKeyNamespaceWindowAndKeepPolicy() async throws {
        var e = try engine()
        let store = FakeClaimStore()
        var clock = TestClock()
        store.setNow(clock.now)
        let batch = [
            payment("p1", offset: 0, amount: 10),
            refund("r1", offset: 1),
            msg("plain-1", offset: 2),
            payment("p1", offset: 3, amount: 20),  // repeat, keep last: this copy wins
            refund("r1", offset: 4),  // repeat, keep first
        ]
        let ingested = batch.map { e.ingest($0) }
        #expect(ingested[0] == .new(DedupKey(raw: "p1", namespace: "payments")))
        #expect(ingested[1] == .new(DedupKey(raw: "r1", namespace: "refunds")))
        #expect(ingested[2] == .new(DedupKey(raw: "plain-1", namespace: "default")))
        #expect(ingested[3] == .localDuplicate(DedupKey(raw: "p1", namespace: "payments")))

        // One round trip for all three routes, each key with its route's lease.
        let keys = e.keysToClaim(now: clock.now)
        let groups = e.storeGroups(keys, ttl: \.lease)
        #expect(groups.map(\.ttl) == [.seconds(35), .seconds(40), .seconds(32)], "default, payments, refunds: window + 30 s")
        // Compact routes (the default layout): each key's digest, taken once at ingest, goes with it.
        for group in groups {
            #expect(group.digests == group.keys.map { KeyDigest(of: $0) }, "\(group.keys)")
        }
        e.applyClaims(keys, try store.claim(groups, owner: "w"), now: clock.now)
        #expect(store.roundTrips == 1)

        func dispatchDue() async throws -> [Dispatch] {
            let due = e.takeDue(now: clock.now)
            for d in due { e.dispatchSucceeded(d.key) }
            let keys = e.keysToConfirm()
            if !keys.isEmpty {
                e.applyConfirms(keys, try store.confirm(e.storeGroups(keys, ttl: \.retention), owner: "w"))
            }
            return due
        }
        clock.advance(.seconds(2))
        #expect(try await dispatchDue().map(\.message.offset) == [1], "refunds' 2 s window ends first")
        #expect(e.takeCommitPositions() == [tp0: 2], "offset 0 lost to its newer copy; offset 2 (default route) still waits")
        clock.advance(.seconds(3))
        let second = try await dispatchDue()
        #expect(second.map(\.message.offset) == [2] && second[0].route == 0)
        #expect(e.takeCommitPositions() == [tp0: 3], "offset 3 (payments, 10 s window) still waits")
        clock.advance(.seconds(5))
        let third = try await dispatchDue()
        #expect(third.map(\.message.offset) == [3], "keep: last dispatches the newest copy")
        #expect(third[0].route == 1)
        #expect(e.takeCommitPositions() == [tp0: 5])
        store.setNow(clock.now)
        #expect(store.value("dedupd:payments:p1") == "d:w")
        #expect(store.value("dedupd:refunds:r1") == "d:w")
        #expect(store.value("dedupd:default:plain-1") == "d:w")
        #expect(e.isIdle)
    }

    @Test func routesKeepTheirKeysApartUnlessTheyShareANamespace() throws {
        let a = try RouteMatch(topic: "a"), b = try RouteMatch(topic: "b")
        let s = DedupSettings(template: try KeyTemplate("header:message-id"), namespace: "shared")
        var shared = DedupLedger(settings: s, routing: Routing(routes: [
            Route(name: "a", match: a, settings: s), Route(name: "b", match: b, settings: s),
        ]))
        #expect(shared.ingest(msg("x", offset: 0, topic: "a")) == .new(DedupKey(raw: "x", namespace: "shared")))
        #expect(shared.ingest(msg("x", offset: 0, topic: "b")) == .localDuplicate(DedupKey(raw: "x", namespace: "shared")))

        var apart = s
        apart.namespace = "b"
        var separate = DedupLedger(settings: s, routing: Routing(routes: [
            Route(name: "a", match: a, settings: s), Route(name: "b", match: b, settings: apart),
        ]))
        _ = separate.ingest(msg("x", offset: 0, topic: "a"))
        #expect(separate.ingest(msg("x", offset: 0, topic: "b")) == .new(DedupKey(raw: "x", namespace: "b")))
    }

    @Test func unmatchedMessagesGoToTheDefaultRouteOrAreBadInput() throws {
        var toDefault = try engine()
        #expect(toDefault.ingest(msg("q", offset: 0, value: #"{"kind":"other"}"#)) == .new(DedupKey(raw: "q", namespace: "default")))

        var strict = try engine(unmatched: .deadLetter)
        guard case .bad(let bad) = strict.ingest(msg("q", offset: 0, value: "not json")) else {
            Issue.record("an unmatched message is bad input with routing.unmatched: dead_letter")
            return
        }
        #expect(bad.reason == .noRoute)
        #expect(bad.detail.contains("payments, refunds"))
        #expect(strict.takeCommitPositions() == [tp0: 1], "logged and counted, resolved (no dead-letter topic)")
        #expect(strict.ingest(refund("r9", offset: 1)) == .new(DedupKey(raw: "r9", namespace: "refunds")))
    }

    @Test func aMatchNeedsEveryConditionAndToleratesUnreadableMessages() throws {
        let m = try RouteMatch(topic: "orders", header: "type=refund", json: "/amount=12.5")
        var ok = msg("1", offset: 0, topic: "orders", value: #"{"amount": 12.5}"#)
        ok.headers.append(header("type", "refund"))
        #expect(m.matches(ok))
        var wrongTopic = ok
        wrongTopic.topic = "other"
        #expect(!m.matches(wrongTopic))
        var notJSON = ok
        notJSON.value = Array("<xml/>".utf8)
        #expect(!m.matches(notJSON), "a message that is not JSON does not match a JSON condition")
        #expect(!m.matches(msg("1", offset: 0, topic: "orders", value: #"{"amount": 12.5}"#)), "no type header")

        #expect(throws: SyntaxError.self) { try RouteMatch(header: "no-equals-sign") }
        #expect(throws: SyntaxError.self) { try RouteMatch(json: "kind=refund") }
        #expect(throws: SyntaxError.self) { try RouteMatch() }
    }
}
