import COpenSSL
import DedupCore

extension KeyDigest {
    /// `KeyDigest(of:)` through libcrypto, hashed on the stack. The worker hashes every new key of
    /// a compact route once; swift-crypto's `SHA256` allocates a context per hash and copies it to
    /// finalize, which for a key of a few dozen bytes costs more than the hash itself.
    /// `KeyDigestHashTests` checks that both give the same digest.
    @Sendable
    public static func hashed(_ storeKey: String) -> KeyDigest {
        var digest: (UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0)
        storeKey.withUTF8InPlace { bytes in
            withUnsafeMutableBytes(of: &digest) { out in
                dedupd_sha256(bytes.baseAddress, bytes.count, out.baseAddress!.assumingMemoryBound(to: UInt8.self))
            }
        }
        return KeyDigest(head: UInt64(bigEndian: digest.0), tail: UInt64(bigEndian: digest.1))
    }
}
