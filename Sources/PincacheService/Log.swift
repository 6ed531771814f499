import Dispatch
import DBusKit
import Glibc
import Synchronization
import SystemKit

/// The daemon's log (issue 16 §3). Under systemd, whose journal is the daemon's stderr
/// (`JOURNAL_STREAM`), every line goes to journald in its native protocol with a PRIORITY
/// (`journalctl -p warning` filters it), SYSLOG_IDENTIFIER=pincached and, for the kinds of
/// event an admin looks for, a MESSAGE_ID (`journalctl MESSAGE_ID=…`, table in
/// docs/logging.md). Elsewhere (a terminal, tests) it is one `pincached[LEVEL]: …` line on
/// stderr. Callers never pass secrets: messages are built from names, codes and counts only.
public enum Log {
    public enum Level: String, Sendable {
        case debug, info, notice, warning, error

        /// syslog(3) priority, as journald and `<N>` prefixes use it.
        var priority: Int {
            switch self {
            case .debug: 7
            case .info: 6
            case .notice: 5
            case .warning: 4
            case .error: 3
            }
        }
    }

    /// Kinds of event with a MESSAGE_ID of their own. Audit records (Audit.Event) have theirs.
    public enum Event: String, Sendable, CaseIterable {
        case started, stopping, reloaded, reloadRefused, moduleLoaded, moduleFailed
        case cardInserted, cardRemoved, slotAdded, slotRemoved, pinsWiped, limitReached
        case guessesThrottled, pcscUnavailable, protocolViolation, memoryLockFailed

        public var messageID: String {
            switch self {
            case .started: "3a6e1f0c8d2b4e79a5c4b7d90e1f2a63"
            case .stopping: "b41d8e2f6c0a4973a1e5d6c7b8a9f014"
            case .reloaded: "e8c2a4f61b3d4e07a9b6c5d4e3f2a1b0"
            case .reloadRefused: "f1a3c5e7092b4d6f8e0a1c3e5b7d9f12"
            case .moduleLoaded: "0d9e8f7a6b5c4d3e9f1a2b3c4d5e6f70"
            case .moduleFailed: "6c5b4a3928174e6d8c9b0a1f2e3d4c5b"
            case .cardInserted: "a7b8c9d0e1f24a3b9c4d5e6f7a8b9c0d"
            case .cardRemoved: "1e2d3c4b5a6948778695a4b3c2d1e0f9"
            case .slotAdded: "9f8e7d6c5b4a43219e8d7c6b5a493827"
            case .slotRemoved: "2b4d6f8a0c1e43579b1d3f5a7c9e0b2d"
            case .pinsWiped: "d5e6f7a8b9c04d1e8f2a3b4c5d6e7f80"
            case .limitReached: "4f3e2d1c0b9a48769f5e4d3c2b1a0f9e"
            case .guessesThrottled: "8e7f6a5b4c3d42e1a0b9c8d7e6f5a4b3"
            case .pcscUnavailable: "c1d2e3f4a5b64c7d8e9fa0b1c2d3e4f5"
            case .protocolViolation: "5a4b3c2d1e0f4a9b8c7d6e5f4a3b2c1d"
            case .memoryLockFailed: "7d6c5b4a39284f1e8d7c6b5a49382716"
            }
        }
    }

    nonisolated(unsafe) public static var verbose = false

    /// journald's socket when the daemon's stderr is the journal, else nil (stderr lines).
    static let journal: Journal? = Journal.forThisProcess()

    /// One record to journald, or one line to stderr.
    public static func write(_ level: Level, _ message: @autoclosure () -> String, event: Event? = nil) {
        if level == .debug && !verbose { return }
        let text = message()
        var fields: [(String, String)] = []
        if let event { fields.append(("MESSAGE_ID", event.messageID)) }
        if let journal, journal.send(priority: level.priority, message: text, fields: fields) { return }
        stderrLine(level, "pincached[\(level.rawValue)]: \(text)")
    }

    /// `line` on stderr as it is, with a `<N>` priority prefix when stderr is the journal, for
    /// the lines that must read the same on a terminal ("pincached: refusing to start: …").
    public static func stderrLine(_ level: Level, _ line: String) {
        let prefix = journal != nil ? "<\(level.priority)>" : ""
        writeAll(STDERR_FILENO, prefix + line + "\n")
    }

    public static func debug(_ m: @autoclosure () -> String, event: Event? = nil) { write(.debug, m(), event: event) }
    public static func info(_ m: @autoclosure () -> String, event: Event? = nil) { write(.info, m(), event: event) }
    public static func notice(_ m: @autoclosure () -> String, event: Event? = nil) { write(.notice, m(), event: event) }
    public static func warning(_ m: @autoclosure () -> String, event: Event? = nil) { write(.warning, m(), event: event) }
    public static func error(_ m: @autoclosure () -> String, event: Event? = nil) { write(.error, m(), event: event) }

    /// DBusKit's reports (a reply that does not match its declaration…) as warnings.
    public static func takeDBusKitReports() {
        DBusLog.setHandler { Log.warning("DBusKit: \($0)") }
    }
}

/// journald's native protocol: `KEY=value` lines in one datagram to its socket. Values are
/// cleaned of newlines, so the protocol's binary form is never needed.
final class Journal: Sendable {
    let path: String
    private let socket: Mutex<Int32> = Mutex(-1)

    init(path: String) { self.path = path }

    /// The journal when stderr is connected to it (`JOURNAL_STREAM` names stderr's device and
    /// inode, as systemd.exec(5) describes), else nil. `PINCACHE_JOURNAL_SOCKET` replaces
    /// journald's socket path (tests listen there).
    static func forThisProcess() -> Journal? {
        guard let stream = getenv("JOURNAL_STREAM").map({ String(cString: $0) }) else { return nil }
        let parts = stream.split(separator: ":")
        var st = stat()
        guard parts.count == 2, let device = UInt64(parts[0]), let inode = UInt64(parts[1]),
            fstat(STDERR_FILENO, &st) == 0, UInt64(st.st_dev) == device, UInt64(st.st_ino) == inode
        else { return nil }
        let override = getenv("PINCACHE_JOURNAL_SOCKET").map { String(cString: $0) }
        return Journal(path: override ?? "/run/systemd/journal/socket")
    }

    /// False if journald cannot be reached; the caller then writes to stderr.
    func send(priority: Int, message: String, fields: [(String, String)]) -> Bool {
        var text = "PRIORITY=\(priority)\nSYSLOG_IDENTIFIER=pincached\nMESSAGE=\(Self.clean(message))\n"
        for (k, v) in fields { text += "\(k)=\(Self.clean(v))\n" }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let pathBytes = Array(path.utf8)
        guard pathBytes.count < MemoryLayout.size(ofValue: address.sun_path) else { return false }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (i, b) in pathBytes.enumerated() { raw[i] = b }
        }
        return socket.withLock { fd in
            if fd < 0 {
                fd = Glibc.socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue | SOCK_CLOEXEC.rawValue), 0)
                guard fd >= 0 else { return false }
            }
            let sent = text.utf8CString.withUnsafeBufferPointer { buffer in
                withUnsafePointer(to: &address) { pointer in
                    pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                        sendto(fd, buffer.baseAddress, buffer.count - 1, Int32(MSG_NOSIGNAL), $0, socklen_t(MemoryLayout<sockaddr_un>.size))
                    }
                }
            }
            return sent >= 0
        }
    }

    static func clean(_ value: String) -> String {
        guard value.utf8.contains(where: { $0 == 10 || $0 == 13 }) || value.utf8.count > 2048 else { return value }
        return String(value.map { $0 == "\n" || $0 == "\r" ? " " : $0 }.prefix(2048))
    }
}
