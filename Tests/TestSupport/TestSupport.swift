// The harnesses for real servers (redis-server on a free port, temporary directories, spawning
// children with a default signal mask) live in DedupService, because `dedupd demo` uses them
// too. Tests import them from here.
@_exported import DedupService

public typealias TestSupportError = LocalServerError
