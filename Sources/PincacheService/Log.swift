import Foundation

/// Minimal stderr logger (journald adds timestamps under systemd). Callers never pass secrets:
/// messages are built from names, codes and counts only.
public enum Log {
    public enum Level: String, Sendable { case debug, info, notice, warning, error }
    nonisolated(unsafe) public static var verbose = false
    private static let lock = NSLock()

    public static func write(_ level: Level, _ message: @autoclosure () -> String) {
        if level == .debug && !verbose { return }
        let line = "pincached[\(level.rawValue)]: \(message())\n"
        lock.lock()
        FileHandle.standardError.write(Data(line.utf8))
        lock.unlock()
    }
    public static func debug(_ m: @autoclosure () -> String) { write(.debug, m()) }
    public static func info(_ m: @autoclosure () -> String) { write(.info, m()) }
    public static func notice(_ m: @autoclosure () -> String) { write(.notice, m()) }
    public static func warning(_ m: @autoclosure () -> String) { write(.warning, m()) }
    public static func error(_ m: @autoclosure () -> String) { write(.error, m()) }
}
