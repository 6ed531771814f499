import Glibc
import Dispatch
import DBusKit
import SystemKit
import PinPolicy
import Synchronization

/// One cache environment per caller bus connection (DESIGN §1): who it is, the settings of its
/// executable, and its sessions. PINs themselves live in each token's `TokenPolicy`.
struct CallerInfo: Sendable {
    let id: CallerID
    let uid: UInt32?
    let pid: UInt32?
    let executable: String?
    var settings: Settings
    var sessions: Set<UInt64> = []
}

/// Callers known to the daemon. Unique bus names are never reused on a bus, so a name seen
/// leaving stays "departed": a late call or an in-flight operation of a gone caller can never
/// re-create its environment.
final class CallerRegistry: Sendable {
    private struct State {
        var callers: [String: CallerInfo] = [:]
        var departed: Set<String> = []
        var departedOrder: [String] = []
    }
    private let state = Mutex(State())
    private static let departedMemory = 8192

    func lookup(_ name: String) -> CallerInfo? { state.withLock { $0.callers[name] } }
    func isAlive(_ id: CallerID) -> Bool { state.withLock { $0.callers[id.rawValue] != nil } }
    func hasDeparted(_ name: String) -> Bool { state.withLock { $0.departed.contains(name) } }
    var count: Int { state.withLock { $0.callers.count } }
    var all: [CallerInfo] { state.withLock { Array($0.callers.values) } }

    /// Adds a caller unless it already left the bus or its uid is at its quota of environments.
    func add(_ info: CallerInfo, maxPerUID: Int) -> CallerInfo? {
        state.withLock { s in
            if s.departed.contains(info.id.rawValue) { return nil }
            if let existing = s.callers[info.id.rawValue] { return existing }
            if s.callers.count >= maxPerUID,
                s.callers.values.lazy.filter({ $0.uid == info.uid }).count >= maxPerUID
            {
                return nil
            }
            s.callers[info.id.rawValue] = info
            return info
        }
    }

    /// Marks the caller gone and returns what it had, so its sessions and PINs can be dropped.
    func depart(_ name: String) -> CallerInfo? {
        state.withLock { s in
            if !s.departed.contains(name) {
                s.departed.insert(name)
                s.departedOrder.append(name)
                if s.departedOrder.count > Self.departedMemory {
                    let half = Self.departedMemory / 2
                    for n in s.departedOrder.prefix(half) { s.departed.remove(n) }
                    s.departedOrder.removeFirst(half)
                }
            }
            return s.callers.removeValue(forKey: name)
        }
    }

    func update(_ name: String, _ body: (inout CallerInfo) -> Void) {
        state.withLock { s in
            if var info = s.callers[name] {
                body(&info)
                s.callers[name] = info
            }
        }
    }

    /// Reserves a session slot if the caller is under its quota.
    enum SessionRefusal: Error { case perClient, perUID }

    /// Reserves a session id for `name`: at most `max` for this client and `maxPerUID` for
    /// all of its uid's clients together.
    func reserveSession(_ name: String, id: UInt64, max: Int, maxPerUID: Int) -> Result<Void, SessionRefusal> {
        state.withLock { s in
            guard var info = s.callers[name], info.sessions.count < max else { return .failure(.perClient) }
            if let uid = info.uid {
                let total = s.callers.values.reduce(0) { $0 + ($1.uid == uid ? $1.sessions.count : 0) }
                guard total < maxPerUID else { return .failure(.perUID) }
            }
            info.sessions.insert(id)
            s.callers[name] = info
            return .success(())
        }
    }

    func releaseSession(_ name: String, id: UInt64) {
        update(name) { $0.sessions.remove(id) }
    }
}

/// The executable of a process, read as the kernel reports it (issue 15 §5). The pid comes
/// from the bus daemon (GetConnectionCredentials; dbus-daemon 1.14 gives no ProcessFD). Two
/// checks keep a recycled pid from lending its executable: the process's start time (field 22
/// of /proc/PID/stat) is the same before and after the link is read, so one process answered
/// both; and the process belongs to the uid the bus reported.
///
/// On the installed service the daemon runs as its own user: reading another user's
/// /proc/PID/exe needs CAP_SYS_PTRACE (a ptrace read-access check), which only the
/// ExecutableHelper process keeps. Without it (activation without systemd) the link of
/// another user's process cannot be read and the caller gets the defaults.
func executablePath(pid: UInt32, uid: UInt32?) -> String? {
    let proc = "/proc/\(pid)"
    guard let before = processStartTime(pid) else { return nil }
    guard let exe = ExecutableHelper.executable(pid: pid) ?? readLink(proc + "/exe") else { return nil }
    guard processStartTime(pid) == before else { return nil }
    if let uid {
        var st = stat()
        guard stat(proc, &st) == 0, st.st_uid == uid else { return nil }
    }
    return exe
}

/// Field 22 of /proc/PID/stat (clock ticks since boot at which the process started), read
/// after the command name, which may contain spaces and parentheses.
func processStartTime(_ pid: UInt32) -> UInt64? {
    guard let bytes = try? readFile("/proc/\(pid)/stat"), let close = bytes.lastIndex(of: UInt8(ascii: ")")) else {
        return nil
    }
    let fields = bytes[(close + 1)...].split(separator: UInt8(ascii: " "))
    // After ")" come field 3 (state) onwards: field 22 is the 20th.
    guard fields.count >= 20 else { return nil }
    return UInt64(String(decoding: fields[19], as: UTF8.self))
}
