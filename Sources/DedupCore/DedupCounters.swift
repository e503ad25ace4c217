/// Running totals, for the stats line, the shutdown summary and tests.
public struct DedupCounters: Sendable, Equatable {
    public var consumed = 0
    public var dispatched = 0
    /// Repeats resolved against this worker's own buffer, without a round trip.
    public var duplicatesLocal = 0
    /// Repeats Redis knew as `done`.
    public var duplicatesStore = 0
    public var invalid = 0
    /// Handler gave up after its last attempt.
    public var failed = 0
    /// Claims given back (revocation, shutdown, failed handler).
    public var released = 0
    /// Times a message was parked because its key was pending under another worker.
    public var parked = 0
    /// Confirms that found another owner holding the key (a copy may have been dispatched twice).
    public var confirmConflicts = 0
    /// Leases extended for messages that waited longer than half a lease.
    public var renewed = 0
    /// Buffered messages whose lease ran out and whose key another worker took meanwhile.
    public var leasesLost = 0
    /// `on_store_error: fail_open`: messages let through without a claim while Redis was down.
    public var unclaimed = 0
    /// Bad input and given-up messages the dead-letter topic acknowledged.
    public var deadLettered = 0
    /// Assignments taken from the group (one per rebalance this worker took part in; an
    /// incremental one may add nothing).
    public var rebalances = 0
    /// Partitions added by those assignments.
    public var partitionsAssigned = 0
    /// Partitions taken away in a rebalance (cooperative: only those that move; eager: all).
    public var partitionsRevoked = 0
    /// Partitions taken away without a rebalance (session timed out, member fenced).
    public var partitionsLost = 0
    /// Messages this worker had read from partitions it then gave up, past the last offset it
    /// stored: their next owner reads them again from the committed offset.
    public var rereadAfterRebalance = 0
    /// Dispatched messages whose confirm never went through before the worker stopped (Redis
    /// down past the confirm retries of a shutdown): their next owner dispatches them again.
    public var unconfirmedAtStop = 0
    /// Guard: unique messages whose transition their entity's recorded state did not allow
    /// (never dispatched), in all and per route index (0: the default route).
    public var rejectedTransitions = 0
    public var rejectedTransitionsByRoute: [Int: Int] = [:]
    /// Guard: times a message waited because another message held its entity.
    public var entityBusy = 0

    public init() {}
    public var duplicates: Int { duplicatesLocal + duplicatesStore }
}
