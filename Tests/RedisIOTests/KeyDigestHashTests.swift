import DedupCore
import RedisIO
import Testing

/// The worker hashes new keys through libcrypto (`KeyDigest.hashed`); `inspect`, `forget`, the
/// bench and the model test's fake store through swift-crypto (`KeyDigest(of:)`). A done record is
/// found by its digest, so the two must agree on every key, whatever its length or bytes.
@Suite("Key digests: libcrypto and swift-crypto agree")
struct KeyDigestHashTests {
    @Test func knownDigests() {
        // FIPS 180-2's "abc" and the empty message, first 16 bytes.
        #expect(KeyDigest.hashed("abc") == KeyDigest(head: 0xba78_16bf_8f01_cfea, tail: 0x4141_40de_5dae_2223))
        #expect(KeyDigest.hashed("") == KeyDigest(head: 0xe3b0_c442_98fc_1c14, tail: 0x9afb_f4c8_996f_b924))
    }

    @Test func bothLibrariesGiveTheSameDigest() {
        // Lengths around SHA-256's 64-byte block and its 55-byte padding limit, non-ASCII keys,
        // and the store key of a hashed long key.
        var keys = (0...130).map { "dedupd:orders:" + String(repeating: "k", count: $0) }
        keys += ["dedupd:ns:clé-ünïcode-✓", "dedupd:ns:日本語のキー", "dedupd:ns:emoji-🧾", "dedupd:ns:a\u{0}b"]
        keys.append(DedupKey(raw: String(repeating: "x", count: DedupKey.maxRawLength + 1), namespace: "ns").storeKey)
        for key in keys {
            #expect(KeyDigest.hashed(key) == KeyDigest(of: key), "\(key)")
        }
    }
}
