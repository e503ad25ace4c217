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

/// The same operator actions on a route whose done records are compact (or may be in both layouts).
extension RedisClaimStore {
    /// Each key's state: pending (its pending key, or a pending value in the keys layout's key),
    /// done (its field in a live bucket, or a done keys-layout key), or absent. For `.keys` this is
    /// `inspect(_:)`.
    public func inspect(_ keys: [String], layout: DoneLayout) async throws -> [KeyState] {
        guard case .compact(let records) = layout else { return try await inspect(keys) }
        return try await compactAdmin(keys, records, mode: "0").map(\.state)
    }

    /// `forget(_:force:)` for `layout`: in the compact layout the key's field is removed from every
    /// live bucket that holds it (and a done keys-layout key is deleted too); a pending claim is
    /// removed only with `force`.
    public func forget(_ keys: [String], force: Bool, layout: DoneLayout) async throws -> [Forgotten] {
        guard case .compact(let records) = layout else { return try await forget(keys, force: force) }
        return try await compactAdmin(keys, records, mode: force ? "2" : "1")
    }

    private func compactAdmin(_ keys: [String], _ records: CompactRecords, mode: String) async throws -> [Forgotten] {
        guard !keys.isEmpty else { return [] }
        // The admin reads what a claim reads: the live buckets, and the keys layout's key only
        // while that layout is read (otherwise the pending key stands in for it, so that every
        // key of the call shares the hash tag, as a Redis Cluster requires).
        let slots = records.liveSlots(at: unixMillis())
        let m = 2 + slots.count
        // One EVAL per key: a key's store keys share one hash tag, different keys may not.
        var out: [Forgotten] = []
        for key in keys {
            let p = records.placement(of: key)
            var command: [RedisArgument] = ["EVAL", RedisArgument(Self.compactAdminScript), RedisArgument(m)]
            command.append(RedisArgument(p.pendingKey))
            command.append(RedisArgument(records.readsKeysLayout ? p.keysLayoutKey : p.pendingKey))
            for slot in slots { command.append(RedisArgument(p.bucketKey(slot: slot))) }
            command.append(RedisArgument(mode))
            command.append(RedisArgument(bytes: p.field))
            let reply = try await redis.command(command, key: p.pendingKey).throwingOnError(mode == "0" ? "inspect" : "forget")
            guard case .array(let items) = reply, items.count == 3, let ttl = items[1].int, let removed = items[2].int else {
                throw RedisError(.protocolError, "compact inspect/forget: unexpected reply")
            }
            let state: KeyState
            switch items[0] {
            case .null: state = .absent
            case let value:
                let text = value.text ?? ""
                if text.hasPrefix("d:") || text == "d" {
                    state = .done(ttlMillis: ttl)
                } else {
                    state = .pending(owner: text.hasPrefix("p:") ? String(text.dropFirst(2)) : text, ttlMillis: ttl)
                }
            }
            out.append(Forgotten(state: state, removed: removed > 0))
        }
        return out
    }

    /// KEYS = pending key, keys-layout key (the same key while the keys layout is read), live
    /// buckets newest first; ARGV = mode ("0" inspect, "1" forget done, "2" forget even pending),
    /// field. Returns the state's value ("d" for a field), its time to live (a bucket's is -1 until
    /// its slot's TTLs are set), and how many records were removed.
    static let compactAdminScript = """
        local mode = ARGV[1]
        local field = ARGV[2]
        local p = redis.call('GET', KEYS[1])
        if p and string.sub(p, 1, 2) ~= 'p:' then p = false end
        local old = redis.call('GET', KEYS[2])
        if old and string.sub(old, 1, 2) ~= 'd:' then old = false end
        local found = {}
        for b = 3, #KEYS do
          if redis.call('HEXISTS', KEYS[b], field) == 1 then found[#found + 1] = KEYS[b] end
        end
        local state, ttl = false, -2
        if p then state, ttl = p, redis.call('PTTL', KEYS[1])
        elseif #found > 0 then state, ttl = 'd', redis.call('PTTL', found[1])
        elseif old then state, ttl = old, redis.call('PTTL', KEYS[2]) end
        local removed = 0
        if mode == '2' and p then redis.call('DEL', KEYS[1]); removed = removed + 1 end
        if mode ~= '0' and not (p and mode == '1') then
          for _, b in ipairs(found) do removed = removed + redis.call('HDEL', b, field) end
          if old then redis.call('DEL', KEYS[2]); removed = removed + 1 end
        end
        return {state, ttl, removed}
        """
}

/// Operator actions on guard entities (`dedupd inspect --entity`, `forget --entity`).
extension RedisClaimStore {
    /// What `forget --entity` found for one entity, and whether it removed it.
    public struct ForgottenEntity: Sendable, Equatable {
        public var state: EntityState
        public var removed: Bool
    }

    /// Each entity's recorded state and a hold in flight, kept as `records` says (the route's
    /// `DedupSettings.entityRecords`).
    public func inspectEntities(_ keys: [String], records: CompactRecords) async throws -> [EntityState] {
        try await entityAdmin(keys, records, mode: "0").map(\.state)
    }

    /// Removes each entity's recorded state, so that it starts again from `guard.initial`. An
    /// entity held by a message in flight is kept unless `force` (the hold is removed too; that
    /// message's move then writes its state anew).
    public func forgetEntities(_ keys: [String], records: CompactRecords, force: Bool) async throws -> [ForgottenEntity] {
        try await entityAdmin(keys, records, mode: force ? "2" : "1")
    }

    private func entityAdmin(_ keys: [String], _ records: CompactRecords, mode: String) async throws -> [ForgottenEntity] {
        let slots = records.liveSlots(at: unixMillis())
        var out: [ForgottenEntity] = []
        // One EVAL per entity: in a cluster they may live on different nodes.
        for key in keys {
            let p = records.placement(of: key)
            var command: [RedisArgument] = ["EVAL", RedisArgument(Self.entityAdminScript), RedisArgument(1 + slots.count), RedisArgument(p.pendingKey)]
            for slot in slots { command.append(RedisArgument(p.bucketKey(slot: slot))) }
            command += [RedisArgument(mode), RedisArgument(bytes: p.field)]
            let reply = try await redis.command(command, key: p.pendingKey).throwingOnError(mode == "0" ? "inspect --entity" : "forget --entity")
            guard case .array(let items) = reply, items.count == 7, let holdTTL = items[3].int, let ttl = items[5].int,
                let removed = items[6].int
            else { throw RedisError(.protocolError, "entity inspect/forget: unexpected reply") }
            let pending = items[1].text.map { (holdID: $0, target: items[2].text ?? "", owner: items[0].text ?? "", ttlMillis: holdTTL) }
            out.append(ForgottenEntity(state: EntityState(state: items[4].text, pending: pending, ttlMillis: ttl), removed: removed > 0))
        }
        return out
    }

    /// KEYS = the entity's hold, then its live buckets newest first; ARGV = mode ("0" inspect,
    /// "1" forget unless held, "2" forget and drop a hold), field. Returns {owner, hold id,
    /// target, hold ms left, state, its bucket's TTL (-2: no state), records removed}.
    static let entityAdminScript = """
        local h = redis.call('HMGET', KEYS[1], 'o', 'h', 't')
        local holdTTL = redis.call('PTTL', KEYS[1])
        local state, ttl, found = false, -2, {}
        for b = 2, #KEYS do
          local s = redis.call('HGET', KEYS[b], ARGV[2])
          if s then
            if not state then state, ttl = s, redis.call('PTTL', KEYS[b]) end
            found[#found + 1] = KEYS[b]
          end
        end
        local removed = 0
        if ARGV[1] == '2' or (ARGV[1] == '1' and not h[2]) then
          for _, b in ipairs(found) do removed = removed + redis.call('HDEL', b, ARGV[2]) end
          if ARGV[1] == '2' then removed = removed + redis.call('DEL', KEYS[1]) end
        end
        return {h[1], h[2], h[3], holdTTL, state, ttl, removed}
        """
}
