/// The Lua scripts behind `RedisClaimStore`. Each takes a whole chunk of keys
/// (`KEYS`) and `ARGV = owner[, milliseconds]`, and returns an array with one
/// result per key (two for `inspect`), so a chunk is one `EVALSHA`.
///
/// Values: `pending` is `"p:" .. owner`, `done` is `"d:" .. owner` (keys layout).
/// The compact scripts (`claimCompact`, `confirmCompact`) take several keys per item (a claimed
/// key): every key an item touches is in `KEYS` and carries the item's hash tag, so a chunk whose
/// items share a slot can go to one cluster node.
struct LuaScript: Sendable, Hashable {
    let name: String
    let source: String

    /// The claim of one pending key, shared by `claim` and `claimCompact`: "c" claimed, "o"
    /// already this owner's (lease renewed), "d" a keys-layout done record, or the foreign value.
    /// `combined` turns false, for the rest of the script, on a server that refuses `SET NX GET`.
    private static let claimKey = """
        local combined = true
        local function claimKey(key, mine, lease)
          local v
          if combined then
            v = redis.pcall('SET', key, mine, 'NX', 'GET', 'PX', lease)
            if type(v) == 'table' and v.err then combined = false end
          end
          if not combined then
            v = redis.call('GET', key)
            if not v then redis.call('SET', key, mine, 'PX', lease) end
          end
          if not v then return 'c' end
          if v == mine then
            redis.call('PEXPIRE', key, lease)
            return 'o'
          end
          if string.sub(v, 1, 2) == 'd:' then return 'd' end
          return v
        end

        """

    /// Per key: "c" claimed, "o" already owned (lease renewed), "d" done,
    /// or the foreign value ("p:other") when pending elsewhere.
    ///
    /// A new key costs one call: `SET NX GET` claims it if absent and returns what was there
    /// (Redis >= 7.0). That is most of the claims, and one call instead of `GET` then `SET` costs
    /// Redis less time per key. A server that refuses the
    /// combination (before 7.0) makes the first `pcall` fail; the rest of the chunk then reads
    /// and writes in two calls, as before.
    static let claim = LuaScript(name: "claim", source: claimKey + """
        local mine = 'p:' .. ARGV[1]
        local lease = ARGV[2]
        local out = {}
        for i, key in ipairs(KEYS) do
          out[i] = claimKey(key, mine, lease)
        end
        return out
        """)

    /// Per key: "c" confirmed (or already done), "l" confirmed after the lease
    /// was lost (key was absent), or the foreign value ("p:other").
    static let confirm = LuaScript(name: "confirm", source: """
        local mine = 'p:' .. ARGV[1]
        local done = 'd:' .. ARGV[1]
        local retention = ARGV[2]
        local out = {}
        for i, key in ipairs(KEYS) do
          local v = redis.call('GET', key)
          if v == mine then
            redis.call('SET', key, done, 'PX', retention)
            out[i] = 'c'
          elseif not v then
            redis.call('SET', key, done, 'PX', retention)
            out[i] = 'l'
          elseif string.sub(v, 1, 2) == 'd:' then
            out[i] = 'c'
          else
            out[i] = v
          end
        end
        return out
        """)

    /// Compact layout, per item: "c", "o", "d" or the foreign value, as `claim`.
    /// ARGV = owner, lease ms, keys per item m, then one field per item. An item's keys: its
    /// pending key, then the bucket of every live slot, newest first. While the keys layout is
    /// read (an upgrade, standalone Redis) the pending key is the keys layout's own key, so its
    /// done records (`d:owner`) answer the `SET NX GET` at no extra cost.
    ///
    /// The buckets are read before the pending key is written, in the same script: a confirm
    /// (which writes the field and deletes the pending key in one script on the same keys) is
    /// either wholly before this claim (the field is found) or wholly after (the pending key is
    /// found), never in between.
    static let claimCompact = LuaScript(name: "claim_compact", source: claimKey + """
        local mine = 'p:' .. ARGV[1]
        local lease = ARGV[2]
        local m = tonumber(ARGV[3])
        local out = {}
        for i = 1, #KEYS / m do
          local base = (i - 1) * m
          local field = ARGV[3 + i]
          local done = false
          for b = base + 2, base + m do
            if redis.call('HEXISTS', KEYS[b], field) == 1 then done = true break end
          end
          if done then
            out[i] = 'd'
          else
            out[i] = claimKey(KEYS[base + 1], mine, lease)
          end
        end
        return out
        """)

    /// Compact layout, per item: "c" confirmed, "l" confirmed after the lease was lost (the
    /// pending key was absent), or the foreign value. ARGV = owner, lease ms, then one field per
    /// item. An item's keys: its pending key, the current slot's bucket.
    ///
    /// The pending key is taken with `GETDEL` (one call where `GET` then `DEL` are two: each
    /// call inside a script is most of what a key costs Redis); the rare foreign claim is put
    /// back, with a whole lease. The bucket's TTL is not set here (a `PEXPIRE` per key would be
    /// the costliest call of the script): `RedisClaimStore` sets it once per bucket and slot
    /// (`sweepBuckets`). Figures: docs/performance.md.
    static let confirmCompact = LuaScript(name: "confirm_compact", source: """
        local mine = 'p:' .. ARGV[1]
        local lease = ARGV[2]
        local out = {}
        for i = 1, #KEYS / 2 do
          local key = KEYS[2 * i - 1]
          local v = redis.call('GETDEL', key)
          if v == mine or not v then
            redis.call('HSET', KEYS[2 * i], ARGV[2 + i], '')
            if v then out[i] = 'c' else out[i] = 'l' end
          else
            redis.call('SET', key, v, 'PX', lease)
            out[i] = v
          end
        end
        return out
        """)

    /// Per key: 1 if it was pending under the owner and is now deleted, else 0.
    static let release = LuaScript(name: "release", source: """
        local mine = 'p:' .. ARGV[1]
        local out = {}
        for i, key in ipairs(KEYS) do
          if redis.call('GET', key) == mine then
            redis.call('DEL', key)
            out[i] = 1
          else
            out[i] = 0
          end
        end
        return out
        """)

    /// Per key: 1 if it is pending under the owner and its lease was extended, else 0.
    static let renew = LuaScript(name: "renew", source: """
        local mine = 'p:' .. ARGV[1]
        local lease = ARGV[2]
        local out = {}
        for i, key in ipairs(KEYS) do
          if redis.call('GET', key) == mine then
            redis.call('PEXPIRE', key, lease)
            out[i] = 1
          else
            out[i] = 0
          end
        end
        return out
        """)

    /// Per key, two entries: the value (or nil) and its PTTL, read atomically.
    static let inspect = LuaScript(name: "inspect", source: """
        local out = {}
        for i, key in ipairs(KEYS) do
          local v = redis.call('GET', key)
          out[2 * i - 1] = v
          out[2 * i] = redis.call('PTTL', key)
        end
        return out
        """)

    /// Token mode, issuing. ARGV = ttl ms, memory ms. The value is "i:" .. the expiry in Redis
    /// server time (ms); the key lives ttl + memory, so a late use is told "expired", not "unknown".
    static let issueTokens = LuaScript(name: "issue_tokens", source: """
        local t = redis.call('TIME')
        local expires = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
        local out = {}
        for i, key in ipairs(KEYS) do
          redis.call('SET', key, 'i:' .. string.format('%d', expires), 'PX', tonumber(ARGV[1]) + tonumber(ARGV[2]), 'NX')
          out[i] = 1
        end
        return out
        """)

    /// Token mode, using. ARGV[i] = the mark of the message using KEYS[i]. Per key: "a" accepted
    /// (now used by this mark, or already used by this same mark: a redelivery), "u" unknown,
    /// "e" expired, "r" reused. Checking and using is one atomic step per key.
    static let useTokens = LuaScript(name: "use_tokens", source: """
        local t = redis.call('TIME')
        local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
        local out = {}
        for i, key in ipairs(KEYS) do
          local v = redis.call('GET', key)
          local used = 'u:' .. ARGV[i]
          if not v then
            out[i] = 'u'
          elseif string.sub(v, 1, 2) == 'u:' then
            if v == used then out[i] = 'a' else out[i] = 'r' end
          elseif now > tonumber(string.sub(v, 3)) then
            out[i] = 'e'
          else
            redis.call('SET', key, used, 'KEEPTTL')
            out[i] = 'a'
          end
        end
        return out
        """)

    // Guard: an entity's recorded state is a field of a time-bucketed hash, as done records are
    // (`CompactRecords` with `guard.retention`): the field is the entity's digest, the value its
    // state; a move writes the current slot's bucket and deletes the field from the other live
    // buckets, so one copy exists. A transition in flight is a hold: a small hash of its own,
    // `<prefix>:{<ns>:<tag>}:p:<entity>` with `h` the hold id, `t` the target and `o` the owner,
    // living for the lease (its TTL, on Redis's clock). Every key of one entity carries its hash
    // tag. ARGV[1] = owner, ARGV[2] = keys per entity, then a fixed number of arguments per entity.

    /// The recorded state of the entity whose buckets are `KEYS[first...last]` (newest first),
    /// "" for none; shared by `holdEntities` and `moveEntities`.
    private static let entityState = """
        local function entityState(first, last, field)
          for b = first, last do
            local s = redis.call('HGET', KEYS[b], field)
            if s then return s end
          end
          return ''
        end

        """

    /// Per entity: "h" .. state (held; the state it moves from, "" for none), "r" .. state (the
    /// recorded state does not allow the target), "b" .. owner (held by another hold). KEYS per
    /// entity: its hold, then the bucket of every live slot, newest first. ARGV per entity: field,
    /// hold id, target, allowed states ("|a|b|", "||" standing for no state), lease ms. A hold
    /// that is this one's is extended without judging again.
    static let holdEntities = LuaScript(name: "hold_entities", source: entityState + """
        local owner = ARGV[1]
        local m = tonumber(ARGV[2])
        local out = {}
        for i = 1, #KEYS / m do
          local base, a = (i - 1) * m, 2 + (i - 1) * 5
          local field, id, target, allowed, lease = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5]
          local hold = KEYS[base + 1]
          local h = redis.call('HMGET', hold, 'h', 'o')
          if h[1] and not (h[1] == id and h[2] == owner) then
            out[i] = 'b' .. h[2]
          else
            local state = entityState(base + 2, base + m, field)
            if h[1] or string.find(allowed, '|' .. state .. '|', 1, true) then
              redis.call('HSET', hold, 'h', id, 't', target, 'o', owner)
              redis.call('PEXPIRE', hold, lease)
              out[i] = 'h' .. state
            else
              out[i] = 'r' .. state
            end
          end
        end
        return out
        """)

    /// Per entity: "m" moved (held by this hold); "l" moved with no hold (the lease ran out and
    /// nobody else holds it: the handler did take the message), or found already in the target
    /// state (a retried move); "s" .. state when, with no hold, the recorded state no longer
    /// allows the move (another message moved the entity meanwhile: nothing is written, a newer
    /// state is never overwritten by an older move); "n" .. owner (another hold: nothing
    /// changed). KEYS per entity: its hold, the current slot's bucket, the other live buckets.
    /// ARGV per entity: field, hold id, target, allowed states.
    static let moveEntities = LuaScript(name: "move_entities", source: entityState + """
        local owner = ARGV[1]
        local m = tonumber(ARGV[2])
        local out = {}
        for i = 1, #KEYS / m do
          local base, a = (i - 1) * m, 2 + (i - 1) * 4
          local field, id, target, allowed = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
          local h = redis.call('HMGET', KEYS[base + 1], 'h', 'o')
          local mine = h[1] == id and h[2] == owner
          if h[1] and not mine then
            out[i] = 'n' .. h[2]
          else
            local state = ''
            if not mine then state = entityState(base + 2, base + m, field) end
            if mine or state == target or string.find(allowed, '|' .. state .. '|', 1, true) then
              redis.call('HSET', KEYS[base + 2], field, target)
              for b = base + 3, base + m do redis.call('HDEL', KEYS[b], field) end
              if mine then
                redis.call('DEL', KEYS[base + 1])
                out[i] = 'm'
              else
                out[i] = 'l'
              end
            else
              out[i] = 's' .. state
            end
          end
        end
        return out
        """)

    /// Per entity: 1 if it was held by this hold and the hold is gone, else 0. KEYS per entity:
    /// its hold. ARGV per entity: hold id.
    static let unholdEntities = LuaScript(name: "unhold_entities", source: """
        local owner = ARGV[1]
        local out = {}
        for i, key in ipairs(KEYS) do
          local h = redis.call('HMGET', key, 'h', 'o')
          if h[1] == ARGV[i + 2] and h[2] == owner then
            redis.call('DEL', key)
            out[i] = 1
          else
            out[i] = 0
          end
        end
        return out
        """)

    static let all: [LuaScript] = [
        .claim, .confirm, .claimCompact, .confirmCompact, .release, .renew, .inspect, .issueTokens, .useTokens,
        .holdEntities, .moveEntities, .unholdEntities,
    ]
}
