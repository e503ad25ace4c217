import CHiredis

/// Memory for the replies hiredis's reader builds, reused from one reply to the next.
///
/// hiredis's own reply functions `calloc` a `redisReply` per element and `malloc` its string.
/// The claim and confirm answers are an array with one short string per key, so each key's
/// answer cost two allocations (and two frees right after it was parsed). With
/// `ReplyArena.functions` the reader builds the same `redisReply` structs here instead: one
/// reply at a time, valid until `reset()`, which `RedisSocket.nextReply` calls before it reads
/// the next one.
final class ReplyArena {
    /// Bytes per chunk; a reply larger than this takes several chunks.
    private static let chunkSize = 64 * 1024
    /// Chunks kept across `reset()`; what a larger reply took beyond them is given back.
    private static let keptChunks = 16

    /// What the reader's functions touch per element, reached through the reader's `privdata`
    /// without reference counting: the free room of the current chunk. A reply's elements are
    /// built one per call (several per key in a pipeline), so a retain and release of the arena
    /// per call, and an array access per allocation, cost more than the allocation.
    struct Cursor {
        var next: UnsafeMutableRawPointer?
        var remaining = 0
        unowned(unsafe) var arena: ReplyArena
    }

    /// Where the reader's `privdata` points; lives as long as the arena.
    let cursor: UnsafeMutablePointer<Cursor>
    // The arena is touched only from its socket's reads, one at a time, and `reset()` runs
    // before every reply: run-time exclusivity checks on these fields cost more than the
    // arena's own bookkeeping.
    @exclusivity(unchecked) private var chunks: [UnsafeMutableRawPointer] = []
    @exclusivity(unchecked) private var chunk = -1
    /// Single allocations larger than a chunk (a long string), freed at `reset()`.
    @exclusivity(unchecked) private var oversized: [UnsafeMutableRawPointer] = []

    init() {
        cursor = .allocate(capacity: 1)
        cursor.initialize(to: Cursor(arena: self))
    }

    deinit {
        reset()
        for c in chunks { c.deallocate() }
        cursor.deinitialize(count: 1)
        cursor.deallocate()
    }

    /// `byteCount` bytes, 16-byte aligned, valid until `reset()`.
    @inline(__always)
    static func allocate(_ byteCount: Int, in cursor: UnsafeMutablePointer<Cursor>) -> UnsafeMutableRawPointer {
        let size = (byteCount + 15) & ~15
        if size <= cursor.pointee.remaining, let at = cursor.pointee.next {
            cursor.pointee.next = at + size
            cursor.pointee.remaining -= size
            return at
        }
        return cursor.pointee.arena.allocateElsewhere(size)
    }

    /// The next chunk (kept from earlier replies or new), or a single allocation when `size` is
    /// larger than a chunk.
    @inline(never)
    private func allocateElsewhere(_ size: Int) -> UnsafeMutableRawPointer {
        if size > Self.chunkSize {
            let p = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 16)
            oversized.append(p)
            return p
        }
        chunk += 1
        if chunk == chunks.count { chunks.append(.allocate(byteCount: Self.chunkSize, alignment: 16)) }
        cursor.pointee.next = chunks[chunk] + size
        cursor.pointee.remaining = Self.chunkSize - size
        return chunks[chunk]
    }

    /// Everything allocated so far is free to be reused.
    func reset() {
        if !oversized.isEmpty {
            for p in oversized { p.deallocate() }
            oversized.removeAll(keepingCapacity: true)
        }
        while chunks.count > Self.keptChunks { chunks.removeLast().deallocate() }
        // The first chunk again, or none yet (the first allocation takes it).
        chunk = chunks.isEmpty ? -1 : 0
        cursor.pointee.next = chunks.first
        cursor.pointee.remaining = chunks.isEmpty ? 0 : Self.chunkSize
    }

    /// The reader's reply functions: the structs hiredis's own functions build (so `RedisReply`
    /// and the element parsers read them unchanged), allocated in the arena that the reader's
    /// `privdata` points to. Nothing is freed one by one: `freeObject` (called by hiredis for a
    /// reply it abandons) does nothing, and the arena's `reset()` frees everything at once.
    nonisolated(unsafe) static let functions: UnsafeMutablePointer<redisReplyObjectFunctions> = {
        let f = UnsafeMutablePointer<redisReplyObjectFunctions>.allocate(capacity: 1)
        f.initialize(to: redisReplyObjectFunctions(
            createString: { task, str, len in
                let r = ReplyArena.reply(task, type: task!.pointee.type)
                let s = ReplyArena.allocate(len + 1, in: ReplyArena.cursor(task)).bindMemory(to: CChar.self, capacity: len + 1)
                if len > 0 { s.update(from: str!, count: len) }
                s[len] = 0
                r.pointee.str = s
                r.pointee.len = len
                return UnsafeMutableRawPointer(r)
            },
            createArray: { task, elements in
                let r = ReplyArena.reply(task, type: REDIS_REPLY_ARRAY)
                let n = Int(elements)
                if n > 0 {
                    let e = ReplyArena.allocate(n * MemoryLayout<UnsafeMutablePointer<redisReply>?>.stride, in: ReplyArena.cursor(task))
                        .bindMemory(to: UnsafeMutablePointer<redisReply>?.self, capacity: n)
                    e.initialize(repeating: nil, count: n)
                    r.pointee.element = e
                }
                r.pointee.elements = n
                return UnsafeMutableRawPointer(r)
            },
            createInteger: { task, value in
                let r = ReplyArena.reply(task, type: REDIS_REPLY_INTEGER)
                r.pointee.integer = value
                return UnsafeMutableRawPointer(r)
            },
            createNil: { task in UnsafeMutableRawPointer(ReplyArena.reply(task, type: REDIS_REPLY_NIL)) },
            freeObject: { _ in }))
        return f
    }()

    @inline(__always)
    private static func cursor(_ task: UnsafePointer<redisReadTask>?) -> UnsafeMutablePointer<Cursor> {
        task!.pointee.privdata.assumingMemoryBound(to: Cursor.self)
    }

    /// A zeroed reply of `type`, linked into its parent array as hiredis's functions do.
    private static func reply(_ task: UnsafePointer<redisReadTask>?, type: Int32) -> UnsafeMutablePointer<redisReply> {
        let r = allocate(MemoryLayout<redisReply>.stride, in: cursor(task)).bindMemory(to: redisReply.self, capacity: 1)
        r.initialize(to: redisReply())
        r.pointee.type = type
        if let parent = task!.pointee.parent {
            parent.pointee.obj.assumingMemoryBound(to: redisReply.self).pointee.element[Int(task!.pointee.idx)] = r
        }
        return r
    }
}
