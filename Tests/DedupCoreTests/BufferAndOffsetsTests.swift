import DedupCore
import Testing

@Suite struct DelayBufferTests {
    let k1 = EntryRef(slot: 0, generation: 0)
    let k2 = EntryRef(slot: 1, generation: 0)
    let k3 = EntryRef(slot: 0, generation: 1)

    @Test func slotsBecomeDueInDeadlineOrderAcrossLanes() {
        let clock = TestClock()
        var b = DelayBuffer(lanes: 2)
        // Lane 1 has a shorter window: its later arrival is due first.
        b.add(k1, lane: 0, deadline: clock.now + .seconds(5), size: 10)
        b.add(k2, lane: 1, deadline: clock.now + .seconds(2), size: 10)
        b.add(k3, lane: 0, deadline: clock.now + .seconds(6), size: 10)
        #expect(b.nextDeadline { _ in true } == clock.now + .seconds(2))
        #expect(b.popDue(now: clock.now + .seconds(1)) { _ in true }.isEmpty)
        #expect(b.popDue(now: clock.now + .seconds(5)) { _ in true }.map(\.entry) == [k2, k1])
        #expect(b.popDue(now: clock.now + .seconds(9), limit: 1) { _ in true }.map(\.entry) == [k3])
    }

    /// The window and the entry table store a time as a `Moment` (its offset from the clock's
    /// epoch): it must come back as the same instant, and order as the instants do, to the
    /// nanosecond.
    @Test func momentsKeepTheInstantAndItsOrder() {
        let now = ContinuousClock.now
        let instants = [now, now + .nanoseconds(1), now - .nanoseconds(1), now + .seconds(86_400 * 365), now - .seconds(3)]
        for a in instants {
            #expect(Moment(a).instant == a)
            #expect(Moment(a) + .milliseconds(100) == Moment(a + .milliseconds(100)))
            #expect(Moment(a) - .milliseconds(100) == Moment(a - .milliseconds(100)))
            for b in instants { #expect((Moment(a) < Moment(b)) == (a < b)) }
        }
    }

    /// A lane is a FIFO: a slot added with an earlier deadline than the lane's last (a key
    /// claimed again, its window counted from its poll) is due with that last one, not lost
    /// behind it.
    @Test func anEarlierDeadlineInALaneIsDueWithTheLast() {
        let clock = TestClock()
        var b = DelayBuffer()
        b.add(k1, lane: 0, deadline: clock.now + .seconds(5), size: 10)
        #expect(b.add(k2, lane: 0, due: Moment(clock.now + .seconds(3)), size: 10) == Moment(clock.now + .seconds(5)))
        #expect(b.popDue(now: clock.now + .seconds(4)) { _ in true }.isEmpty)
        #expect(b.popDue(now: clock.now + .seconds(5)) { _ in true }.map(\.entry) == [k1, k2])
    }

    @Test func staleSlotsAreSkipped() {
        let clock = TestClock()
        var b = DelayBuffer()
        b.add(k1, lane: 0, deadline: clock.now + .seconds(1), size: 10)
        b.add(k2, lane: 0, deadline: clock.now + .seconds(2), size: 10)
        b.removed(size: 10)  // k1 left the window some other way
        let live: (DelayBuffer.Slot) -> Bool = { $0.entry != k1 }
        #expect(b.nextDeadline(isLive: live) == clock.now + .seconds(2))
        #expect(b.popDue(now: clock.now + .seconds(3), isLive: live).map(\.entry) == [k2])
    }

    /// What is in the window, for the stats (the bounds count every message held: DedupLedgerTests).
    @Test func countsTheMessagesAndBytesInTheWindow() {
        let clock = TestClock()
        var b = DelayBuffer()
        b.add(k1, lane: 0, deadline: clock.now, size: 100)
        b.add(k2, lane: 0, deadline: clock.now, size: 100)
        #expect(b.count == 2 && b.bytes == 200)
        b.removed(size: 100)
        #expect(b.count == 1 && b.bytes == 100)
        b.resized(by: 200)  // keep: last swapped in a larger copy
        #expect(b.count == 1 && b.bytes == 300)
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

    /// The message forms find a partition by topic and number, the last one looked up first:
    /// a message of another topic with the same partition number, or of another partition of
    /// the same topic, must not land in the last one's state.
    @Test func messagesOfAlternatingPartitionsKeepTheirOwnPositions() {
        var t = OffsetTracker()
        func m(_ topic: String, _ partition: Int32, _ offset: Int64) -> InboundMessage {
            InboundMessage(topic: topic, partition: partition, offset: offset, value: [1])
        }
        let order = [m("a", 0, 5), m("b", 0, 9), m("a", 1, 2), m("a", 0, 6), m("b", 0, 10), m("a", 1, 3)]
        for message in order { t.track(message) }
        for message in order where message.offset != 6 { t.resolve(message) }
        #expect(t.takeCommitPositions() == [
            TopicPartition(topic: "a", partition: 0): 6,
            TopicPartition(topic: "b", partition: 0): 11,
            TopicPartition(topic: "a", partition: 1): 4,
        ])
        t.resolve(order[3])
        #expect(t.takeCommitPositions() == [TopicPartition(topic: "a", partition: 0): 7])
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
        // Key and headers share the value's one array: a key adds its bytes, a header its
        // name, its value and 8 bytes of lengths.
        m.key = Array("k".utf8)
        #expect(m.approximateSize == bare + 3 + 1)
        m.headers.append(MessageHeader(name: String(repeating: "h", count: 16), value: [9]))
        #expect(m.approximateSize == bare + 3 + 1 + 8 + 16 + 1)
        m.key = nil
        m.headers = []
        m.value = []
        #expect(m.approximateSize == bare - 100)
        #expect(m.approximateSize == InboundMessage(topic: "t", partition: 0, offset: 0, value: []).approximateSize)
    }
}

@Suite("InboundMessage storage")
struct InboundMessageStorageTests {
    let headers = [
        MessageHeader(name: "message-id", value: Array("a-1".utf8)),
        MessageHeader(name: "empty", value: []),
        MessageHeader(name: "null", value: nil),
        MessageHeader(name: "Message-ID", value: Array("a-2".utf8)),
        MessageHeader(name: "é", value: [0xff]),
    ]

    /// Key, value and headers read back as given, through the copies and in place.
    @Test func partsReadBackAsGiven() {
        let m = InboundMessage(topic: "t", partition: 1, offset: 2, key: [7, 8], value: [1, 2, 3], headers: headers)
        #expect(m.value == [1, 2, 3] && Array(m.valueBytes) == [1, 2, 3] && m.valueCount == 3)
        #expect(m.key == [7, 8] && m.keyBytes.map { Array($0) } == [7, 8])
        #expect(m.headers == headers && m.headerCount == 5)
        var seen: [MessageHeader] = []
        m.forEachHeader { seen.append(MessageHeader(name: String(decoding: $0.name, as: UTF8.self), value: $0.value.map { Array($0) })) }
        #expect(seen == headers)
        // The last header of a name wins; names compare ignoring ASCII case.
        #expect(m.header("MESSAGE-id") == MessageHeader(name: "Message-ID", value: Array("a-2".utf8)))
        #expect(m.headerView("message-id")?.value.map { Array($0) } == Array("a-2".utf8))
        #expect(m.header("empty")?.value == [])
        #expect(m.header("null") != nil && m.header("null")?.value == nil)
        #expect(m.header("nul") == nil && m.header("nulls") == nil)
        #expect(m.header("é")?.value == [0xff] && m.header("e\u{301}")?.value == [0xff])
        #expect(m.header("É") == nil)
        // Read through a pointer, the same answers: last wins, null is nil, absent is not called.
        for name in ["MESSAGE-id", "message-id", "empty", "null", "nul", "nulls", "é", "e\u{301}", "É"] {
            let lent: [UInt8]?? = m.withHeaderValue(name) { $0.map { Array($0) } }
            #expect(lent == m.header(name).map { $0.value }, "\(name)")
        }
    }

    @Test func noKeyAndEmptyKeyDiffer() {
        let none = InboundMessage(topic: "t", partition: 0, offset: 0, value: [1], headers: headers)
        let empty = InboundMessage(topic: "t", partition: 0, offset: 0, key: [], value: [1], headers: headers)
        #expect(none.key == nil && none.keyBytes == nil)
        #expect(empty.key == [] && empty.keyBytes?.isEmpty == true)
        #expect(none.headers == headers && empty.headers == headers)
    }

    /// Each setter rebuilds the array and leaves the other parts as they were.
    @Test func settersKeepTheOtherParts() {
        var m = InboundMessage(topic: "t", partition: 0, offset: 0, key: [7], value: [1, 2], headers: headers)
        m.value = [9, 9, 9]
        #expect(m.key == [7] && m.headers == headers && m.value == [9, 9, 9])
        m.key = nil
        #expect(m.key == nil && m.headers == headers && m.value == [9, 9, 9])
        m.headers.removeFirst()
        #expect(m.headers == Array(headers.dropFirst()) && m.value == [9, 9, 9])
        #expect(m.header("message-id")?.value == Array("a-2".utf8))
        m.headers = []
        #expect(m.headers.isEmpty && m.value == [9, 9, 9] && m.key == nil)
    }

    /// The consumer's way: one array sized up front, filled from raw bytes.
    @Test func builtFromRawBytes() {
        let value: [UInt8] = [1, 2, 3]
        let name = Array("message-id".utf8)
        let id = Array("x-1".utf8)
        // Room for one more byte than is written: what is left over is dropped.
        let bytes = MessageBytes(capacity: value.count + MessageBytes.headerCost(nameCount: name.count, valueCount: id.count)
            + MessageBytes.headerCost(nameCount: 1, valueCount: nil) + 1) { writer in
            value.withUnsafeBytes { writer.value($0) }
            name.withUnsafeBytes { n in id.withUnsafeBytes { writer.header(name: n, value: $0) } }
            [UInt8(ascii: "n")].withUnsafeBytes { writer.header(name: $0, value: nil) }
        }
        let m = InboundMessage(topic: "t", partition: 0, offset: 0, bytes: bytes)
        #expect(m.key == nil && m.value == value)
        #expect(m.headers == [MessageHeader(name: "message-id", value: id), MessageHeader(name: "n", value: nil)])
        #expect(m.bytes.storage.count == value.count + 8 + name.count + id.count + 8 + 1)
        #expect(m.bytes.storage.capacity >= m.bytes.storage.count)
    }
}
