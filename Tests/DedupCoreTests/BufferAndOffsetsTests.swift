import DedupCore
import Testing

@Suite struct DelayBufferTests {
    let k1 = DedupKey(raw: "a", namespace: "n")
    let k2 = DedupKey(raw: "b", namespace: "n")

    @Test func entriesWaitForTheWindow() {
        var clock = TestClock()
        var b = DelayBuffer(window: .seconds(5), maxMessages: 10, maxBytes: 1 << 20)
        b.insert(k1, msg("a", offset: 0), now: clock.now)
        clock.advance(.seconds(1))
        b.insert(k2, msg("b", offset: 1), now: clock.now)
        clock.advance(.milliseconds(3999))
        #expect(b.popDue(now: clock.now).isEmpty)
        clock.advance(.milliseconds(1))
        #expect(b.popDue(now: clock.now).map(\.key) == [k1])
        #expect(b.nextDeadline == clock.now + .seconds(1))
        clock.advance(.seconds(1))
        #expect(b.popDue(now: clock.now).map(\.key) == [k2])
        #expect(b.isEmpty && b.bytes == 0)
    }

    @Test func boundedByMessagesAndBytes() {
        let clock = TestClock()
        var b = DelayBuffer(window: .seconds(5), maxMessages: 2, maxBytes: 1 << 20)
        b.insert(k1, msg("a", offset: 0), now: clock.now)
        #expect(!b.isFull)
        b.insert(k2, msg("b", offset: 1), now: clock.now)
        #expect(b.isFull && !b.hasRoom)

        var small = DelayBuffer(window: .seconds(5), maxMessages: 100, maxBytes: 300)
        small.insert(k1, msg("a", offset: 0, value: String(repeating: "x", count: 400)), now: clock.now)
        #expect(small.isFull)
    }

    @Test func keepLastReplacesButKeepsTheDeadline() {
        var clock = TestClock()
        var b = DelayBuffer(window: .seconds(5), maxMessages: 10, maxBytes: 1 << 20)
        b.insert(k1, msg("a", offset: 0, value: "old"), now: clock.now)
        clock.advance(.seconds(3))
        let old = b.replace(k1, with: msg("a", offset: 7, value: "new"))
        #expect(old?.offset == 0)
        clock.advance(.seconds(2))
        let due = b.popDue(now: clock.now)
        #expect(due.count == 1 && due[0].message.offset == 7)
    }

    @Test func revocationRemovesOnlyThosePartitions() {
        let clock = TestClock()
        var b = DelayBuffer(window: .seconds(5), maxMessages: 10, maxBytes: 1 << 20)
        b.insert(k1, msg("a", partition: 0, offset: 0), now: clock.now)
        b.insert(k2, msg("b", partition: 1, offset: 0), now: clock.now)
        let removed = b.removeAll(in: [TopicPartition(topic: "t", partition: 1)])
        #expect(removed.map(\.key) == [k2])
        #expect(b.count == 1 && b.contains(k1) && !b.contains(k2))
    }
}

@Suite struct OffsetTrackerTests {
    let tp = TopicPartition(topic: "t", partition: 0)

    @Test func commitStopsAtTheLowestUnresolvedOffset() {
        var t = OffsetTracker()
        for o in Int64(10)...14 { t.track(tp, offset: o) }
        t.resolve(tp, offset: 11)
        t.resolve(tp, offset: 12)
        #expect(t.takeCommitPositions().isEmpty)
        t.resolve(tp, offset: 10)
        #expect(t.takeCommitPositions() == [tp: 13])
        #expect(t.takeCommitPositions().isEmpty, "positions are reported once")
        t.resolve(tp, offset: 14)
        #expect(t.takeCommitPositions().isEmpty)
        t.resolve(tp, offset: 13)
        #expect(t.takeCommitPositions() == [tp: 15])
        #expect(t.unresolvedCount == 0)
    }

    @Test func gapsInOffsetsAreFine() {
        var t = OffsetTracker()
        for o: Int64 in [3, 7, 20] { t.track(tp, offset: o) }
        t.resolve(tp, offset: 7)
        t.resolve(tp, offset: 3)
        #expect(t.takeCommitPositions() == [tp: 8])
        t.resolve(tp, offset: 20)
        #expect(t.takeCommitPositions() == [tp: 21])
    }

    @Test func partitionsAreIndependentAndForgettable() {
        var t = OffsetTracker()
        let other = TopicPartition(topic: "t", partition: 1)
        t.track(tp, offset: 0)
        t.track(other, offset: 0)
        t.resolve(other, offset: 0)
        #expect(t.takeCommitPositions() == [other: 1])
        t.forget(tp)
        #expect(t.unresolvedCount == 0)
    }
}

@Suite("InboundMessage size")
struct InboundMessageSizeTests {
    /// The size is kept with the message, so it must follow every change of what it counts.
    @Test func sizeFollowsKeyValueAndHeaders() {
        var m = InboundMessage(topic: "t", partition: 0, offset: 0, value: Array(repeating: 1, count: 100))
        let bare = m.approximateSize
        m.value.append(contentsOf: [1, 2, 3])
        #expect(m.approximateSize == bare + 3)
        m.key = Array("k".utf8)
        #expect(m.approximateSize == bare + 3 + 48 + 1)
        m.headers.append(MessageHeader(name: String(repeating: "h", count: 16), value: [9]))
        #expect(m.approximateSize == bare + 3 + 48 + 1 + 24 + 48 + 1 + 48 + 16)
        m.key = nil
        m.headers = []
        m.value = []
        #expect(m.approximateSize == bare - 100)
        #expect(m.approximateSize == InboundMessage(topic: "t", partition: 0, offset: 0, value: []).approximateSize)
    }
}
