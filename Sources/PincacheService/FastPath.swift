import DBusKit
import FastPathWire
import Foundation
import Glibc
import Synchronization

/// The fast path (dbus/README.md, "Fast path"): for Sign, Decrypt, Verify and Encrypt only,
/// a SOCK_SEQPACKET socket pair whose other end `CryptokiManager1.OpenFastPath` hands to
/// its caller over the bus. Only that caller ever holds it, so it speaks for that caller's
/// bus name with no further proof; its requests reach exactly the code the D-Bus methods
/// reach (`cryptokiCrypto`), with the same arguments, checks and errors. One thread per
/// fast path reads a request, answers it, and reads the next; an idle token's operation
/// runs on that thread.
final class FastPaths: Sendable {
    static let maxOpen = 512

    private struct State {
        var paths: [String: FastPath] = [:]
        var calls: UInt64 = 0
    }
    private let state = Mutex(State())

    var count: Int { state.withLock { $0.paths.count } }
    var callsServed: UInt64 { state.withLock { $0.calls } }

    func counted() { state.withLock { $0.calls &+= 1 } }

    /// A new fast path for `name` (replacing its previous one); returns the caller's end,
    /// which the caller of this function must close once it has been sent.
    func open(for name: String, serve: @escaping @Sendable (FastPathWire.Request) -> FastPathWire.Reply) -> Int32? {
        var fds: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0 else {
            return nil
        }
        let path = FastPath(fd: fds[0], name: name, serve: serve, owner: self)
        let (admitted, replaced) = state.withLock { s -> (Bool, FastPath?) in
            let old = s.paths[name]
            guard old != nil || s.paths.count < Self.maxOpen else { return (false, nil) }
            s.paths[name] = path
            return (true, old)
        }
        guard admitted else {
            Glibc.close(fds[0])
            Glibc.close(fds[1])
            return nil
        }
        replaced?.shutDown()
        path.start()
        return fds[1]
    }

    /// Ends `name`'s fast path (its caller left the bus).
    func close(boundTo name: String) {
        state.withLock { $0.paths.removeValue(forKey: name) }?.shutDown()
    }

    func closeAll() {
        let all = state.withLock { s -> [FastPath] in
            defer { s.paths.removeAll() }
            return Array(s.paths.values)
        }
        all.forEach { $0.shutDown() }
    }

    fileprivate func finished(_ path: FastPath) {
        state.withLock { s in
            if s.paths[path.name] === path { s.paths[path.name] = nil }
        }
    }
}

final class FastPath: Sendable {
    let fd: Int32
    let name: String
    private let serve: @Sendable (FastPathWire.Request) -> FastPathWire.Reply
    private weak let owner: FastPaths?

    init(fd: Int32, name: String, serve: @escaping @Sendable (FastPathWire.Request) -> FastPathWire.Reply,
         owner: FastPaths) {
        self.fd = fd
        self.name = name
        self.serve = serve
        self.owner = owner
    }

    func start() {
        let thread = Thread { self.run() }
        thread.name = "fast path"
        thread.start()
    }

    /// Makes the thread's next read return 0; the thread then closes the descriptor (closing
    /// it here could close a number another thread has just been given).
    func shutDown() {
        Glibc.shutdown(fd, Int32(SHUT_RDWR))
    }

    private func run() {
        defer {
            Glibc.close(fd)
            owner?.finished(self)
        }
        // One byte more than the largest frame: MSG_TRUNC reports a longer one, which ends
        // the fast path like any other malformed frame.
        var buffer = [UInt8](repeating: 0, count: FastPathWire.maxFrame + 1)
        while true {
            let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, Int32(MSG_TRUNC)) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0, n <= FastPathWire.maxFrame else { return }
            guard let request = buffer.withUnsafeBytes({ FastPathWire.decodeRequest(UnsafeRawBufferPointer(rebasing: $0[..<n])) })
            else { return }
            let reply = FastPathWire.encode(serve(request))
            owner?.counted()
            let sent = reply.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            guard sent == reply.count else { return }
        }
    }
}

/// One fast-path request as the service sees it: answered once, by whichever thread runs
/// the job; the fast path's thread waits for that answer.
final class FastPathCall: CallReply, @unchecked Sendable {
    // @unchecked: `answer` is guarded by `lock`; `done` is a semaphore.
    private let lock = NSLock()
    private var answer: FastPathWire.Reply?
    private let done = DispatchSemaphore(value: 0)
    private let outputs: Bool

    /// `outputs`: the operation returns bytes (all but Verify).
    init(outputs: Bool) { self.outputs = outputs }

    deinit {
        // Dropped unanswered (its caller left before the worker reached it).
        settle(.error(name: "org.freedesktop.DBus.Error.Failed", message: "no reply"))
    }

    func reply(_ values: [DBusValue]) {
        if outputs {
            guard values.count == 1, let bytes = values[0].bytesValue else {
                return settle(.error(name: "org.freedesktop.DBus.Error.Failed", message: "internal error: unexpected reply"))
            }
            settle(.output(bytes))
        } else {
            settle(.output([]))
        }
    }

    func reply(error: DBusError) { settle(.error(name: error.name, message: error.message)) }

    func mayRunInline(besides bus: DBusConnection) -> Bool { true }

    private func settle(_ reply: FastPathWire.Reply) {
        lock.lock()
        let first = answer == nil
        if first { answer = reply }
        lock.unlock()
        if first { done.signal() }
    }

    func wait() -> FastPathWire.Reply {
        done.wait()
        lock.lock()
        defer { lock.unlock() }
        return answer ?? .error(name: "org.freedesktop.DBus.Error.Failed", message: "no reply")
    }
}
