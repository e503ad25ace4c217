import DedupCore
import Testing

@Suite struct KeyTemplateTests {
    @Test func headerKey() throws {
        let t = try KeyTemplate("header:message-id")
        #expect(try t.key(for: msg("abc", offset: 0)) == "abc")
    }

    @Test func headerNamesCompareWithoutCase() throws {
        let t = try KeyTemplate("header:Message-ID")
        #expect(try t.key(for: msg("abc", offset: 0)) == "abc")
    }

    @Test func missingHeaderIsBadInput() throws {
        let t = try KeyTemplate("header:message-id")
        #expect(throws: BadInput(.missingHeader, "header \"message-id\" is missing")) {
            try t.key(for: msg(nil, offset: 0))
        }
    }

    @Test func emptyHeaderIsBadInput() throws {
        let t = try KeyTemplate("header:message-id")
        let error = #expect(throws: BadInput.self) { try t.key(for: msg("", offset: 0)) }
        #expect(error?.reason == .emptyKey)
    }

    @Test func invalidUTF8HeaderIsBadInput() throws {
        let t = try KeyTemplate("header:message-id")
        var m = msg(nil, offset: 0)
        m.headers = [MessageHeader(name: "message-id", value: [0xff, 0xfe])]
        let error = #expect(throws: BadInput.self) { try t.key(for: m) }
        #expect(error?.reason == .invalidUTF8)
    }

    /// Keys are read as ASCII a word at a time, else validated as UTF-8: every length around a
    /// word, with a byte ≥ 0x80 at every position, valid or not, must give what the validator gives.
    @Test func keyBytesAreUTF8ExactlyWhenTheValidatorSaysSo() throws {
        let t = try KeyTemplate("key")
        for length in 1...19 {
            let ascii = (0..<length).map { UInt8(ascii: "a") + UInt8($0 % 26) }
            #expect(try t.key(for: msg(nil, offset: 0, key: String(decoding: ascii, as: UTF8.self))) == String(decoding: ascii, as: UTF8.self))
            for at in 0..<length {
                for bytes in [[0xC3, 0xA9], [0xff], [0xC3], [0xE2, 0x82, 0xAC], [0x80]] as [[UInt8]] {
                    var key = ascii
                    key.replaceSubrange(at..<at + 1, with: bytes)
                    var m = msg(nil, offset: 0)
                    m.key = key
                    if let expected = String(validating: key, as: UTF8.self) {
                        #expect(try t.key(for: m) == expected)
                    } else {
                        let error = #expect(throws: BadInput.self) { try t.key(for: m) }
                        #expect(error?.reason == .invalidUTF8)
                    }
                }
            }
        }
    }

    @Test func recordKey() throws {
        let t = try KeyTemplate("key")
        #expect(try t.key(for: msg(nil, offset: 0, key: "u-1")) == "u-1")
        let error = #expect(throws: BadInput.self) { try t.key(for: msg(nil, offset: 0)) }
        #expect(error?.reason == .missingKey)
    }

    @Test func jsonPointer() throws {
        let t = try KeyTemplate("json:/order/no")
        #expect(try t.key(for: msg(nil, offset: 0, value: #"{"order":{"no":"A-1"}}"#)) == "A-1")
        #expect(try t.key(for: msg(nil, offset: 0, value: #"{"order":{"no":42}}"#)) == "42")
        let missing = #expect(throws: BadInput.self) { try t.key(for: msg(nil, offset: 0, value: #"{"order":{}}"#)) }
        #expect(missing?.reason == .missingField)
        let invalid = #expect(throws: BadInput.self) { try t.key(for: msg(nil, offset: 0, value: "{not json")) }
        #expect(invalid?.reason == .invalidJSON)
    }

    @Test func jsonPointerEscapesAndArrays() throws {
        let t = try KeyTemplate("json:/a~1b/1")
        #expect(try t.key(for: msg(nil, offset: 0, value: #"{"a/b":["x","y"]}"#)) == "y")
    }

    @Test func sha256OfValue() throws {
        let t = try KeyTemplate("sha256:value")
        let k = try t.key(for: msg(nil, offset: 0, value: "abc"))
        #expect(k == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
    }

    @Test func sha256OfJSONFieldsIgnoresOrderAndWhitespace() throws {
        let t = try KeyTemplate("sha256:json:/user,/items")
        let a = try t.key(for: msg(nil, offset: 0, value: #"{"user":"u1","items":[{"sku":"A","qty":1}],"at":1}"#))
        let b = try t.key(for: msg(nil, offset: 1, value: #"{ "at": 2, "items": [ {"qty": 1, "sku": "A"} ], "user": "u1" }"#))
        let c = try t.key(for: msg(nil, offset: 2, value: #"{"user":"u1","items":[{"sku":"A","qty":2}]}"#))
        #expect(a == b)
        #expect(a != c)
    }

    @Test func composite() throws {
        let t = try KeyTemplate("{header:message-id}:{json:/userId}")
        #expect(try t.key(for: msg("m1", offset: 0, value: #"{"userId":"u9"}"#)) == "m1:u9")
    }

    @Test(arguments: ["", "nope", "header:", "json:noslash", "{header:a", "x}{key}", "sha256:json:"])
    func badTemplatesAreRejected(_ text: String) {
        #expect(throws: SyntaxError.self) { try KeyTemplate(text) }
    }

    @Test func longKeysAreHashedAndNamespaced() {
        let short = DedupKey(raw: "abc", namespace: "orders")
        #expect(short.storeKey == "dedupd:orders:abc")
        // Written byte by byte into a string of its final size: empty, multi-byte and
        // longer-than-small pieces come out as interpolation would write them.
        for (raw, namespace, prefix) in [("", "n", "p"), ("zoë-👍", "naïve", "dedupd"), (String(repeating: "k", count: 200), "orders-eu-west-1", "dedupd-entity")] {
            let key = DedupKey(raw: raw, namespace: namespace, prefix: prefix)
            #expect(key.storeKey == "\(prefix):\(namespace):\(raw)")
            #expect(key.storeKey.utf8.count == prefix.utf8.count + namespace.utf8.count + raw.utf8.count + 2)
        }
        let long = DedupKey(raw: String(repeating: "x", count: 500), namespace: "orders")
        #expect(long.storeKey.hasPrefix("dedupd:orders:h:"))
        #expect(long.storeKey.count == "dedupd:orders:h:".count + 64)
        #expect(long.raw.count == 500)
    }

    /// The worker makes a message's key with `dedupKey(for:head:)`, which writes a header's or
    /// the record key's bytes straight into the store key: for every template and message shape
    /// it must give the key (or the error) the raw key's string gives.
    @Test func keysMadeFromBytesAreTheKeysMadeFromStrings() throws {
        let head = DedupKey.head(namespace: "orders")
        var messages: [InboundMessage] = []
        for id in [nil, "", "a", "order-17", "zoë-👍", String(repeating: "k", count: 200), String(repeating: "k", count: 201)] {
            for key in [nil, "", "u-1", "naïve", String(repeating: "r", count: 500)] as [String?] {
                messages.append(msg(id, offset: 0, key: key, value: #"{"n":"A-1"}"#))
            }
        }
        var invalid = msg(nil, offset: 0)
        invalid.headers = [MessageHeader(name: "message-id", value: [0x61, 0xff])]
        invalid.key = [0xC3]
        messages.append(invalid)
        var null = msg(nil, offset: 0)
        null.headers = [MessageHeader(name: "Message-ID", value: nil)]
        messages.append(null)

        for text in ["header:message-id", "header:MESSAGE-ID", "key", "json:/n", "{key}:{header:message-id}"] {
            let t = try KeyTemplate(text)
            for m in messages {
                let fromString = Result { () throws(BadInput) in DedupKey(raw: try t.key(for: m), head: head) }
                let fromBytes = Result { () throws(BadInput) in try t.dedupKey(for: m, head: head) }
                switch (fromString, fromBytes) {
                case (.success(let a), .success(let b)):
                    #expect(a == b && a.hashValue == b.hashValue && a.storeKey == b.storeKey, "\(text): \(a.raw)")
                    #expect(b.raw == a.raw)
                    b.withRawUTF8 { #expect(Array($0) == Array(a.raw.utf8)) }
                case (.failure(let a), .failure(let b)):
                    #expect(a == b, "\(text)")
                default:
                    Issue.record("\(text): \(fromString) from the string, \(fromBytes) from the bytes")
                }
            }
        }
    }

    /// The raw key is the store key's tail, or a long key's own string: it reads back as given,
    /// and keys that differ only in where the namespace ends are not equal.
    @Test func rawKeysReadBackAsGiven() {
        for raw in ["", "a", "zoë-👍", String(repeating: "k", count: 200), String(repeating: "x", count: 201)] {
            let key = DedupKey(raw: raw, namespace: "n")
            #expect(key.raw == raw)
            #expect(key.description == raw)
            key.withRawUTF8 { #expect(Array($0) == Array(raw.utf8)) }
        }
        let a = DedupKey(raw: "b:c", namespace: "a"), b = DedupKey(raw: "c", namespace: "a:b")
        #expect(a.storeKey == b.storeKey)
        #expect(a != b)
        // A long key keeps its raw key after the store key in one string: equal raw keys make
        // equal keys, and the store key is the digest alone.
        let long = String(repeating: "y", count: 300)
        let c = DedupKey(raw: long, namespace: "n"), d = DedupKey(raw: long, namespace: "n")
        let e = DedupKey(raw: long + "z", namespace: "n")
        #expect(c == d && c.hashValue == d.hashValue)
        #expect(c != e && c.storeKey != e.storeKey)
        #expect(!c.storeKey.contains("yyy"))
    }

    /// A waiting key is copied into several queues and requests: one string, its hash and where
    /// the raw key starts, 32 bytes (at 72, the memory bound test went over its bound; at 48 the
    /// compiler copied it through its type's value witnesses). Its digest is the ledger entry's.
    @Test func aKeyIsThirtyTwoBytes() {
        #expect(MemoryLayout<DedupKey>.stride == 32)
        #expect(MemoryLayout<DedupKey?>.stride == 32)
    }
}
@Suite("DedupKey hashing")
struct DedupKeyHashingTests {
    /// The cached hash and the seeded mix keep Hashable's contract: equal keys (made separately)
    /// hash alike in every table; a large set finds, dedups and removes every key.
    @Test func equalKeysHashAlikeAndTablesWork() {
        let a = DedupKey(raw: "order-17", namespace: "n")
        let b = DedupKey(raw: String("order-1") + "7", namespace: "n")
        #expect(a == b)
        #expect(a.hashValue == b.hashValue)
        for seed in [0, 1, -1, 0x5eed, Int.max] { #expect(a._rawHashValue(seed: seed) == b._rawHashValue(seed: seed)) }
        #expect(a != DedupKey(raw: "order-17", namespace: "other"))

        let keys = (0..<50_000).map { DedupKey(raw: "id-\($0)", namespace: "n") }
        var set = Set(keys)
        #expect(set.count == keys.count)
        for k in keys.prefix(1000) { #expect(set.insert(DedupKey(raw: k.raw, namespace: "n")).inserted == false) }
        // A table filled from another table's order (different seed and capacity) still works.
        var copy: [DedupKey: Int] = [:]
        for (i, k) in set.enumerated() { copy[k] = i }
        #expect(copy.count == keys.count)
        for k in keys { set.remove(k) }
        #expect(set.isEmpty)
    }
}
