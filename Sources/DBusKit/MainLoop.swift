import CDBus
import CShims
import Glibc
import Synchronization

/// The poll() loop that drives one libdbus connection: libdbus tells it which fds and
/// timeouts it needs (watch and timeout functions); other threads wake it through an
/// eventfd (wakeup-main and dispatch-status functions, watch toggles, queued jobs).
///
/// libdbus calls the watch and timeout callbacks with its connection lock held, on
/// whichever thread made it change its mind, so the callbacks only record state under
/// `state` and never call back into the connection.
final class MainLoop: @unchecked Sendable {
    /// A libdbus watch or timeout pointer as a dictionary key. Only the loop thread
    /// dereferences it, and only while libdbus still has it registered.
    struct Handle: @unchecked Sendable, Hashable {
        let raw: OpaquePointer
    }

    struct Watch {
        let handle: Handle
        var fd: Int32
        var flags: UInt32
        var enabled: Bool
    }

    struct Timeout {
        let handle: Handle
        var interval: Int64
        var enabled: Bool
        var deadline: UInt64
    }

    struct State {
        var watches: [Handle: Watch] = [:]
        var timeouts: [Handle: Timeout] = [:]
        var jobs: [@Sendable () -> Void] = []
        var stopRequested = false
        var running = false
        var thread: pthread_t?
    }

    let state = Mutex(State())
    /// Read end (and, for an eventfd, also the write end) of the wake-up channel.
    private let wakeFD: Int32
    private let wakeWriteFD: Int32

    private typealias EventFDFunction = @convention(c) (UInt32, Int32) -> Int32

    init() {
        // Glibc's Swift module does not include <sys/eventfd.h>, so eventfd is looked up
        // by name; a pipe serves the same purpose if that ever fails.
        if let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "eventfd") {
            // SAFETY: glibc's eventfd has exactly this C signature.
            let eventfdFunction = unsafeBitCast(symbol, to: EventFDFunction.self)
            let fd = eventfdFunction(0, O_NONBLOCK | O_CLOEXEC)
            if fd >= 0 {
                wakeFD = fd
                wakeWriteFD = fd
                return
            }
        }
        var fds: [Int32] = [-1, -1]
        // A failure leaves -1: poll ignores negative fds, and the loop still runs its
        // watches and timers; only wake-ups from other threads are lost.
        if pipe(&fds) == 0 {
            for fd in fds {
                _ = fcntl(fd, F_SETFL, O_NONBLOCK)
                _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            }
        }
        wakeFD = fds[0]
        wakeWriteFD = fds[1]
    }

    deinit {
        if wakeFD >= 0 { close(wakeFD) }
        if wakeWriteFD >= 0 && wakeWriteFD != wakeFD { close(wakeWriteFD) }
    }

    /// Makes a blocked poll() return.
    func wake() {
        var one: UInt64 = 1
        _ = write(wakeWriteFD, &one, 8)
    }

    /// `wake()` unless called on the loop thread itself.
    func wakeFromOtherThread() {
        if !isLoopThread { wake() }
    }

    /// True when called from inside `run`.
    var isLoopThread: Bool {
        state.withLock { s in s.thread.map { pthread_equal($0, pthread_self()) != 0 } ?? false }
    }

    var isRunning: Bool { state.withLock { $0.running } }

    /// Runs `job` on the loop thread at its next iteration.
    func perform(_ job: @escaping @Sendable () -> Void) {
        state.withLock { $0.jobs.append(job) }
        wake()
    }

    func stop() {
        state.withLock { $0.stopRequested = true }
        wake()
    }

    // libdbus's watch and timeout callbacks, shared by connections and servers; `data` is
    // the unretained MainLoop.
    private static let addWatch: DBusAddWatchFunction = { watch, data in
        guard let watch, let data else { return 0 }
        Unmanaged<MainLoop>.fromOpaque(data).takeUnretainedValue().updateWatch(watch, adding: true)
        return 1
    }
    private static let removeWatch: DBusRemoveWatchFunction = { watch, data in
        guard let watch, let data else { return }
        _ = Unmanaged<MainLoop>.fromOpaque(data).takeUnretainedValue().state.withLock { $0.watches.removeValue(forKey: Handle(raw: watch)) }
    }
    private static let toggleWatch: DBusWatchToggledFunction = { watch, data in
        guard let watch, let data else { return }
        Unmanaged<MainLoop>.fromOpaque(data).takeUnretainedValue().updateWatch(watch, adding: false)
    }
    private static let addTimeout: DBusAddTimeoutFunction = { timeout, data in
        guard let timeout, let data else { return 0 }
        Unmanaged<MainLoop>.fromOpaque(data).takeUnretainedValue().updateTimeout(timeout, adding: true)
        return 1
    }
    private static let removeTimeout: DBusRemoveTimeoutFunction = { timeout, data in
        guard let timeout, let data else { return }
        _ = Unmanaged<MainLoop>.fromOpaque(data).takeUnretainedValue().state.withLock { $0.timeouts.removeValue(forKey: Handle(raw: timeout)) }
    }
    private static let toggleTimeout: DBusTimeoutToggledFunction = { timeout, data in
        guard let timeout, let data else { return }
        Unmanaged<MainLoop>.fromOpaque(data).takeUnretainedValue().updateTimeout(timeout, adding: false)
    }

    /// Registers the loop's callbacks on `connection`. `self` must outlive the
    /// registration (`uninstall` removes it).
    func install(on connection: OpaquePointer) {
        let me = Unmanaged.passUnretained(self).toOpaque()
        dbus_connection_set_watch_functions(connection, Self.addWatch, Self.removeWatch, Self.toggleWatch, me, nil)
        dbus_connection_set_timeout_functions(connection, Self.addTimeout, Self.removeTimeout, Self.toggleTimeout, me, nil)
        // The loop thread dispatches and re-reads its watches before every poll, so only
        // other threads need to interrupt it.
        dbus_connection_set_wakeup_main_function(connection, { data in
            guard let data else { return }
            Unmanaged<MainLoop>.fromOpaque(data).takeUnretainedValue().wakeFromOtherThread()
        }, me, nil)
        dbus_connection_set_dispatch_status_function(connection, { _, status, data in
            guard let data, status == DBUS_DISPATCH_DATA_REMAINS else { return }
            Unmanaged<MainLoop>.fromOpaque(data).takeUnretainedValue().wakeFromOtherThread()
        }, me, nil)
    }

    /// Registers the loop's callbacks on a listening `server`, whose watches then run on
    /// this loop beside its connection's. `self` must outlive the registration.
    func install(onServer server: OpaquePointer) {
        let me = Unmanaged.passUnretained(self).toOpaque()
        dbus_server_set_watch_functions(server, Self.addWatch, Self.removeWatch, Self.toggleWatch, me, nil)
        dbus_server_set_timeout_functions(server, Self.addTimeout, Self.removeTimeout, Self.toggleTimeout, me, nil)
    }

    /// Removes the callbacks (libdbus calls the remove functions for what remains).
    func uninstall(from connection: OpaquePointer) {
        dbus_connection_set_watch_functions(connection, nil, nil, nil, nil, nil)
        dbus_connection_set_timeout_functions(connection, nil, nil, nil, nil, nil)
        dbus_connection_set_wakeup_main_function(connection, nil, nil, nil)
        dbus_connection_set_dispatch_status_function(connection, nil, nil, nil)
    }

    private func updateWatch(_ raw: OpaquePointer, adding: Bool) {
        let handle = Handle(raw: raw)
        let watch = Watch(handle: handle, fd: dbus_watch_get_unix_fd(raw),
                          flags: dbus_watch_get_flags(raw), enabled: dbus_watch_get_enabled(raw) != 0)
        let onLoop = state.withLock { s -> Bool in
            if adding || s.watches[handle] != nil { s.watches[handle] = watch }
            return s.thread.map { pthread_equal($0, pthread_self()) != 0 } ?? false
        }
        // The loop thread re-reads the watches before it polls again; only another thread's
        // change must interrupt a poll in progress.
        if !onLoop { wake() }
    }

    private func updateTimeout(_ raw: OpaquePointer, adding: Bool) {
        let handle = Handle(raw: raw)
        let interval = Int64(dbus_timeout_get_interval(raw))
        let timeout = Timeout(handle: handle, interval: interval, enabled: dbus_timeout_get_enabled(raw) != 0,
                              deadline: MainLoop.now() &+ UInt64(max(interval, 0)) &* 1_000_000)
        let onLoop = state.withLock { s -> Bool in
            if adding || s.timeouts[handle] != nil { s.timeouts[handle] = timeout }
            return s.thread.map { pthread_equal($0, pthread_self()) != 0 } ?? false
        }
        if !onLoop { wake() }
    }

    static func now() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
    }

    /// libdbus reads about 2 KiB per dbus_watch_handle, so a message near the bus's 32 MiB
    /// limit would take some 16 000 trips round the loop (a lock, a snapshot and a poll each),
    /// a third of a second during which nothing queued behind it is read. While the socket
    /// stays readable and no whole message is waiting to be dispatched, this reads on, for at
    /// most 2 ms; then the loop goes round as usual (jobs, timers, other watches).
    private func keepReading(_ watch: Watch, _ connection: OpaquePointer) {
        let deadline = MainLoop.now() &+ 2_000_000
        var fd = pollfd(fd: watch.fd, events: Int16(POLLIN), revents: 0)
        while dbus_connection_get_dispatch_status(connection) != DBUS_DISPATCH_DATA_REMAINS {
            // libdbus disables reading when its incoming queue is full, and may drop the watch.
            let readable = state.withLock { s -> Bool in
                guard let w = s.watches[watch.handle], w.enabled else { return false }
                return w.flags & DBUS_WATCH_READABLE.rawValue != 0
            }
            fd.revents = 0
            guard readable, poll(&fd, 1, 0) == 1, fd.revents == Int16(POLLIN) else { return }
            _ = dbus_watch_handle(watch.handle.raw, DBUS_WATCH_READABLE.rawValue)
            if MainLoop.now() > deadline { return }
        }
    }

    /// Runs until `stop()`. `dispatch` is called whenever libdbus may have queued messages.
    func run(connection: OpaquePointer) {
        let alreadyRunning = state.withLock { s -> Bool in
            if s.running { return true }
            s.running = true
            s.thread = pthread_self()
            return false
        }
        guard !alreadyRunning else { return }
        defer {
            state.withLock { s in
                s.running = false
                s.thread = nil
                s.stopRequested = false
            }
        }
        while true {
            let jobs = state.withLock { s -> [@Sendable () -> Void] in
                defer { s.jobs.removeAll() }
                return s.jobs
            }
            for job in jobs { job() }
            while dbus_connection_get_dispatch_status(connection) == DBUS_DISPATCH_DATA_REMAINS {
                _ = dbus_connection_dispatch(connection)
            }
            let (watches, nextDeadline, stop) = state.withLock { s in
                (Array(s.watches.values.filter { $0.enabled && $0.fd >= 0 }),
                 s.timeouts.values.filter(\.enabled).map(\.deadline).min(),
                 s.stopRequested)
            }
            if stop { return }

            var fds = [pollfd(fd: wakeFD, events: Int16(POLLIN), revents: 0)]
            for w in watches {
                var events: Int16 = 0
                if w.flags & DBUS_WATCH_READABLE.rawValue != 0 { events |= Int16(POLLIN) }
                if w.flags & DBUS_WATCH_WRITABLE.rawValue != 0 { events |= Int16(POLLOUT) }
                fds.append(pollfd(fd: w.fd, events: events, revents: 0))
            }
            var pollTimeout: Int32 = -1
            if let nextDeadline {
                let now = MainLoop.now()
                // Round up so a timer never fires a little early and spins.
                pollTimeout = nextDeadline <= now ? 0 : Int32(min((nextDeadline - now + 999_999) / 1_000_000, 60_000))
            }
            // Blocked in poll, this thread is nowhere in the Swift runtime: a fork of a host
            // process (the proxy) may go ahead meanwhile (CShims' fork gate).
            let ready = fds.withUnsafeMutableBufferPointer {
                pincache_poll_outside_fork_gate($0.baseAddress, UInt($0.count), pollTimeout)
            }
            if ready < 0 && errno != EINTR { usleep(1000) }

            if fds[0].revents != 0 {
                var drain = [UInt8](repeating: 0, count: 64)
                while read(wakeFD, &drain, drain.count) > 0 {}
            }
            for (i, w) in watches.enumerated() where fds[i + 1].revents != 0 {
                let revents = Int32(fds[i + 1].revents)
                var flags: UInt32 = 0
                if revents & Int32(POLLIN) != 0 { flags |= DBUS_WATCH_READABLE.rawValue }
                if revents & Int32(POLLOUT) != 0 { flags |= DBUS_WATCH_WRITABLE.rawValue }
                if revents & Int32(POLLERR) != 0 { flags |= DBUS_WATCH_ERROR.rawValue }
                if revents & Int32(POLLHUP) != 0 { flags |= DBUS_WATCH_HANGUP.rawValue }
                // A watch removed since the snapshot has been freed by libdbus: only handle
                // watches still registered. Removal happens when the connection is closed
                // or the transport dies, and close() is routed through this thread.
                let live = state.withLock { $0.watches[w.handle]?.enabled ?? false }
                if live {
                    _ = dbus_watch_handle(w.handle.raw, flags)
                    if flags == DBUS_WATCH_READABLE.rawValue { keepReading(w, connection) }
                }
            }
            let now = MainLoop.now()
            let due = state.withLock { s -> [Handle] in
                var out: [Handle] = []
                for (key, t) in s.timeouts where t.enabled && t.deadline <= now {
                    out.append(key)
                    // libdbus timeouts repeat until removed or disabled.
                    s.timeouts[key]?.deadline = now &+ UInt64(max(t.interval, 1)) &* 1_000_000
                }
                return out
            }
            for handle in due {
                let live = state.withLock { $0.timeouts[handle] != nil }
                if live { _ = dbus_timeout_handle(handle.raw) }
            }
        }
    }
}
