import Glibc
import Synchronization

/// Where DBusKit reports problems it cannot return to a caller (a handler's reply that
/// does not match its declaration, a signal that could not be sent). Messages never
/// contain argument values.
public enum DBusLog {
    private static let handler = Mutex<(@Sendable (String) -> Void)?>(nil)

    /// Replaces the default (one line on stderr); nil restores it.
    public static func setHandler(_ newHandler: (@Sendable (String) -> Void)?) {
        handler.withLock { $0 = newHandler }
    }

    static func log(_ message: String) {
        if let h = handler.withLock({ $0 }) {
            h(message)
        } else {
            let line = Array("DBusKit: \(message)\n".utf8)
            _ = line.withUnsafeBytes { write(STDERR_FILENO, $0.baseAddress, $0.count) }
        }
    }
}
