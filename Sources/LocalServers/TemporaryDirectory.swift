import Foundation

/// A fresh directory under the system temp dir, removed when this object goes
/// away (or by `remove()`).
public final class TemporaryDirectory: @unchecked Sendable {
    // Immutable after init; `remove()` is idempotent (FileManager tolerates a missing dir).
    public let url: URL
    public var path: String { url.path }

    public init(prefix: String = "dedupd") throws {
        let base = URL(fileURLWithPath: NSTemporaryDirectory(), isDirectory: true)
        var template = Array(base.appendingPathComponent("\(prefix)-XXXXXX").path.utf8CString)
        guard let made = mkdtemp(&template) else {
            throw NSError(domain: "TemporaryDirectory", code: Int(errno),
                          userInfo: [NSLocalizedDescriptionKey: "mkdtemp failed: \(String(cString: strerror(errno)))"])
        }
        url = URL(fileURLWithPath: String(cString: made), isDirectory: true)
    }

    /// A path inside the directory.
    public func file(_ name: String) -> URL { url.appendingPathComponent(name) }

    public func remove() {
        try? FileManager.default.removeItem(at: url)
    }

    deinit { remove() }
}
