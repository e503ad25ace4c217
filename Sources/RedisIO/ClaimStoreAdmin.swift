import DedupCore

/// Operator actions on the seen-set (`dedupd forget`). Not on the hot path: one `EVAL` per call.
extension RedisClaimStore {
    /// What `forget` found for one key, and whether it removed it.
    public struct Forgotten: Sendable, Equatable {
        public var state: KeyState
        public var removed: Bool
    }

    /// Removes each key that is `done`, so that a resend of its message is dispatched again. A key
    /// `pending` under a worker is a copy in flight: it is removed only with `force` (that worker
    /// cannot confirm it afterwards, and a resend may then be dispatched twice). Atomic per key.
    public func forget(_ keys: [String], force: Bool) async throws -> [Forgotten] {
        guard !keys.isEmpty else { return [] }
        // One EVAL per key: in a cluster the keys may live on different nodes.
        var items: [RedisReply] = []
        for key in keys {
            let command: [RedisArgument] = ["EVAL", RedisArgument(Self.forgetScript), 1, RedisArgument(key), force ? "1" : "0"]
            let reply = try await redis.command(command, key: key).throwingOnError("forget")
            guard case .array(let three) = reply, three.count == 3 else {
                throw RedisError(.protocolError, "forget: unexpected reply")
            }
            items += three
        }
        return try stride(from: 0, to: items.count, by: 3).map { i in
            guard let ttl = items[i + 1].int, let removed = items[i + 2].int else {
                throw RedisError(.protocolError, "forget: unexpected reply")
            }
            let state: KeyState
            switch items[i] {
            case .null: state = .absent
            case let value:
                let text = value.text ?? ""
                if text.hasPrefix("d:") {
                    state = .done(ttlMillis: ttl)
                } else {
                    state = .pending(owner: text.hasPrefix("p:") ? String(text.dropFirst(2)) : text, ttlMillis: ttl)
                }
            }
            return Forgotten(state: state, removed: removed == 1)
        }
    }

    static let forgetScript = """
        local out = {}
        local force = ARGV[1] == '1'
        for i, key in ipairs(KEYS) do
          local v = redis.call('GET', key)
          local ttl = redis.call('PTTL', key)
          local removed = 0
          if v and (force or string.sub(v, 1, 2) == 'd:') then
            redis.call('DEL', key)
            removed = 1
          end
          out[3 * i - 2] = v
          out[3 * i - 1] = ttl
          out[3 * i] = removed
        end
        return out
        """
}
