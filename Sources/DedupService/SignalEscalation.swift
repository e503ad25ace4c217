import Dispatch
import Foundation
import Logging
import Synchronization

/// "A second signal exits at once": the first SIGTERM/SIGINT starts the graceful shutdown
/// (ServiceLifecycle), a second one of either ends the process immediately. Nothing is lost by
/// that — unresolved offsets are not committed — but claims wait for their lease to expire.
/// `@unchecked Sendable`: the sources are set once in `init` and only kept alive afterwards.
public final class SignalEscalation: @unchecked Sendable {
    private let sources: [any DispatchSourceSignal]
    private let count = Mutex(0)

    public init(logger: Logger) {
        let queue = DispatchQueue(label: "dedupd.signals")
        var sources: [any DispatchSourceSignal] = []
        for sig in [SIGTERM, SIGINT] {
            // ServiceLifecycle also ignores these and watches them; both sources fire.
            signal(sig, SIG_IGN)
            sources.append(DispatchSource.makeSignalSource(signal: sig, queue: queue))
        }
        self.sources = sources
        for (source, sig) in zip(sources, [SIGTERM, SIGINT]) {
            source.setEventHandler { [self] in
                let n = self.count.withLock { n -> Int in
                    n += 1
                    return n
                }
                if n >= 2 {
                    logger.warning("second signal, exiting now without finishing the shutdown",
                                   metadata: ["signal": "\(sig == SIGTERM ? "SIGTERM" : "SIGINT")"])
                    // `_exit` skips atexit: the operational log's queued lines (this one too) are
                    // written first.
                    OperationalLog.flush()
                    _exit(128 + sig)
                }
            }
            source.resume()
        }
    }
}
