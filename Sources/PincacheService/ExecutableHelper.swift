import CShims
import Glibc
import Synchronization
import SystemKit

/// Reading another user's /proc/PID/exe needs CAP_SYS_PTRACE, and a process with that
/// capability may also read any process's memory through /proc/PID/mem. So the daemon does not
/// keep it (issue 15 §5): at start, before any thread exists, it forks this helper, which keeps
/// CAP_SYS_PTRACE and does one thing — answer "which executable is pid N" over a socket pair —
/// and then drops every capability for good. A compromised daemon can ask for executable
/// paths, nothing more.
///
/// Protocol: request u32 pid (host order); reply u16 length and the path's bytes (0: unknown).
public enum ExecutableHelper {
    static let capSysPtrace: Int32 = 19
    private static let channel = Mutex<Int32>(-1)

    /// Starts the helper when the process holds CAP_SYS_PTRACE (the installed unit grants it),
    /// then drops all capabilities. Call first thing, while the process has one thread.
    /// - Returns: whether the helper runs.
    @discardableResult
    public static func startIfCapable() -> Bool {
        guard pincache_has_capability(capSysPtrace) != 0 else { return false }
        var fds: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue), 0, &fds) == 0 else {
            _ = pincache_keep_only_capability(-1)
            return false
        }
        let child = fork()
        if child == 0 {
            close(fds[0])
            serve(fds[1])
        }
        close(fds[1])
        // The daemon itself never needs the capability: drop it (and any other) for good.
        if pincache_keep_only_capability(-1) != 0 {
            Log.error("cannot drop CAP_SYS_PTRACE: \(String(cString: strerror(errno))); refusing to run with it")
            exit(1)
        }
        guard child > 0 else {
            close(fds[0])
            return false
        }
        channel.withLock { $0 = fds[0] }
        return true
    }

    /// The helper's executable path for `pid`, nil when it is not running or does not know.
    static func executable(pid: UInt32) -> String? {
        channel.withLock { fd -> String? in
            guard fd >= 0 else { return nil }
            var request = pid
            let sent = withUnsafeBytes(of: &request) { send(fd, $0.baseAddress, 4, Int32(MSG_NOSIGNAL)) }
            var header = [UInt8](repeating: 0, count: 2)
            guard sent == 4, readExactly(fd, &header) else {
                Log.warning("the executable helper is gone: [app] sections now apply only to pincache's own user")
                close(fd)
                fd = -1
                return nil
            }
            let length = Int(header[0]) | Int(header[1]) << 8
            guard length > 0 else { return nil }
            var path = [UInt8](repeating: 0, count: length)
            guard readExactly(fd, &path) else {
                close(fd)
                fd = -1
                return nil
            }
            return String(decoding: path, as: UTF8.self)
        }
    }

    /// The helper's whole life: keeps CAP_SYS_PTRACE alone, dies with the daemon.
    private static func serve(_ fd: Int32) -> Never {
        _ = pincache_die_with_parent()
        if getppid() == 1 { exit(0) }  // the daemon died before PR_SET_PDEATHSIG took hold
        _ = pincache_keep_only_capability(capSysPtrace)
        // The main thread's name is the process's (comm): `pgrep -x pincached` finds the daemon alone.
        setThreadName("pincache-exe")
        for other in 3..<1024 where other != fd { close(Int32(other)) }
        var request = [UInt8](repeating: 0, count: 4)
        while readExactly(fd, &request) {
            let pid = request.withUnsafeBytes { $0.load(as: UInt32.self) }
            let path = Array((readLink("/proc/\(pid)/exe") ?? "").utf8.prefix(4096))
            let reply = [UInt8(path.count & 0xff), UInt8(path.count >> 8)] + path
            guard writeAll(fd, reply) else { break }
        }
        exit(0)
    }

    private static func readExactly(_ fd: Int32, _ buffer: inout [UInt8]) -> Bool {
        var offset = 0
        while offset < buffer.count {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress! + offset, $0.count - offset) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { return false }
            offset += n
        }
        return true
    }
}
