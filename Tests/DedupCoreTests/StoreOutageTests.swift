import DedupCore
import Testing

/// A store outage is reported once when it starts and once when it ends, and the retries back
/// off in between. Redis can answer some requests and refuse others (an ACL user allowed the
/// claim commands but not `HSET`): an answer to a claim then says only that Redis runs, not that
/// it takes the confirms. No I/O: a fake Redis answers at the engine's next wait, on a test clock in 10 ms steps.
@Suite struct StoreOutageTests {
    struct Refused: Error, StoreFailureClassifying {
        var storeFailure: StoreFailure { .refused }
    }

    enum Kind: Hashable { case claims, confirms, releases }

    /// The engine, a consumer that brings one new message per poll until `messages` (none while
    /// paused), handlers that succeed, and a Redis that grants every claim and confirm of the
    /// kinds it does not `refuse`.
    struct Run {
        var engine: DedupEngine
        var now = ContinuousClock.now
        var refuse: Set<Kind> = []
        var messages = 0
        var polled: Int64 = 0
        var paused = false
        var reports: [DedupEngine.Report] = []
        /// When each request was sent, by kind.
        var sent: [Kind: [ContinuousClock.Instant]] = [:]
        var dispatched: [String] = []
        var rounds = 0
        /// Answers on their way, delivered at the engine's next wait.
        var inFlight: [DedupEngine.Answer] = []
        let tp = TopicPartition(topic: "t", partition: 0)

        init(window: Duration = .milliseconds(100), lease: Duration = .seconds(1), failOpen: Bool = false) {
            engine = DedupEngine(
                settings: DedupSettings(template: try! KeyTemplate("header:message-id"), window: window, lease: lease),
                options: .init(failOpen: failOpen), now: now, seed: 7)
            engine.handle(.polled([.assigned([tp])]), now: now)
        }

        func answer<T>(_ kind: Kind, _ value: T) -> Result<T, any Error> {
            refuse.contains(kind) ? .failure(Refused()) : .success(value)
        }

        mutating func run(for duration: Duration) {
            let end = now + duration
            while now < end {
                switch engine.nextAction(now: now) {
                case .poll:
                    var events: [SourceEvent] = []
                    if !paused, polled < messages {
                        events.append(.message(msg("m\(polled)", offset: polled)))
                        polled += 1
                    }
                    engine.handle(.polled(events), now: now)
                    now += .milliseconds(10)
                case .wait:
                    // Claims answered first: the confirm sent with them is still in flight when
                    // their answer arrives, as on a pipelined connection.
                    engine.handle(.answered(inFlight.sorted { a, _ in if case .claims = a { true } else { false } }), now: now)
                    inFlight = []
                    now += .milliseconds(10)
                case .claim(let id, let groups, _):
                    sent[.claims, default: []].append(now)
                    inFlight.append(.claims(id, answer(.claims, groups.flatMap(\.keys).map { _ in .claimed })))
                case .confirm(let id, let groups, _):
                    sent[.confirms, default: []].append(now)
                    inFlight.append(.confirms(id, answer(.confirms, groups.flatMap(\.keys).map { _ in .confirmed })))
                case .release(let id, let keys, _):
                    sent[.releases, default: []].append(now)
                    inFlight.append(.releases(id, answer(.releases, keys.map { _ in true })))
                case .dispatch(let id, let due):
                    dispatched += due.map { $0.key.raw }
                    rounds += 1
                    engine.handle(.answered([.round(id, due.map { _ in .success })]), now: now)
                case .pause: paused = true
                case .resume: paused = false
                case .report(let report): reports.append(report)
                default: continue
                }
            }
        }

        var downs: Int { reports.count { if case .storeDown(_, cause: .refused) = $0 { true } else { false } } }
        var ups: Int { reports.count { if case .storeUp = $0 { true } else { false } } }
    }

    /// Confirms refused for ten seconds while claims (new keys and renewals) are granted: one
    /// outage, not one per granted claim; the confirm retries back off to the 5 s maximum
    /// instead of starting again at 100 ms after each claim; nothing more is dispatched (one round
    /// at a time, confirmed before the next). Once Redis takes the confirms, the outage ends once
    /// and every message is dispatched exactly once.
    @Test func confirmsRefusedWhileClaimsAreGrantedAreOneOutage() {
        var run = Run()
        run.messages = 5
        run.run(for: .milliseconds(300))
        #expect(run.dispatched.count == 5 && run.downs == 0)

        run.refuse = [.confirms]
        run.messages = 45
        let roundsBefore = run.rounds, claimsBefore = run.sent[.claims]!.count, confirmsBefore = run.sent[.confirms]!.count
        run.run(for: .seconds(10))
        let claims = run.sent[.claims]!.count - claimsBefore
        let confirms = run.sent[.confirms]!.dropFirst(confirmsBefore)
        #expect(claims >= 2, "new keys and renewals were claimed meanwhile: \(claims)")
        #expect(run.downs == 1 && run.ups == 0, "\(run.reports)")
        // 100 ms doubling, with jitter, to 5 s: at most eight tries in ten seconds.
        #expect(confirms.count >= 4 && confirms.count <= 8, "confirms sent at \(confirms)")
        let gaps = zip(confirms.dropFirst(), confirms).map { $0 - $1 }
        #expect(gaps.last! > .seconds(2), "the retries backed off: \(gaps)")
        #expect(run.rounds == roundsBefore + 1, "one round, whose confirm is refused")

        run.refuse = []
        run.run(for: .seconds(10))
        #expect(run.downs == 1 && run.ups == 1, "\(run.reports)")
        #expect(run.dispatched.count == 45 && Set(run.dispatched).count == 45, "\(run.dispatched.count) dispatched")
        #expect(!run.engine.ledger.hasConfirmsToSend && run.engine.storeDownSince == nil)
    }

    /// Fail-open, the same refusal: the worker dispatches every message without waiting for the
    /// confirms, and it is still one outage, its confirm retries backing off as fail-closed.
    @Test func confirmsRefusedFailOpenAreOneOutageToo() {
        var run = Run(failOpen: true)
        run.refuse = [.confirms]
        run.messages = 200
        run.run(for: .seconds(10))
        #expect(run.downs == 1 && run.ups == 0, "\(run.reports)")
        #expect(run.dispatched.count == 200 && Set(run.dispatched).count == 200)
        #expect((run.sent[.confirms]?.count ?? 0) <= 8, "\(run.sent[.confirms] ?? [])")
    }

    /// The claims that failed are for keys of a partition revoked meanwhile: nothing is left to
    /// claim, so the release that follows the revocation ends the outage (waiting for a claim
    /// to succeed would keep a fail-closed worker from dispatching for good).
    @Test func anOutageOfAKindWithNothingLeftToSendEndsWithTheNextAnswer() {
        var run = Run(window: .seconds(1), lease: .seconds(10))
        run.messages = 1
        run.run(for: .milliseconds(100))
        #expect(run.sent[.claims]?.count == 1 && run.dispatched.isEmpty, "m0 is claimed and in the window")

        run.refuse = [.claims]
        run.messages = 2
        run.run(for: .milliseconds(100))
        #expect(run.downs == 1 && run.engine.ledger.keysToClaimCount == 1, "m1's claim failed: \(run.reports)")

        run.engine.handle(.polled([.revoked([run.tp])]), now: run.now)
        run.run(for: .milliseconds(200))
        #expect(run.sent[.releases]?.count == 1, "m0's claim is given back")
        #expect(run.ups == 1 && run.engine.storeDownSince == nil, "\(run.reports)")
    }
}
