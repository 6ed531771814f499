import Dispatch
import CShims
import CryptokiWire
import Glibc
import PinPolicy
import Synchronization

/// The proxy's sockets (dbus/README.md, "The Cryptoki wire"). `Manager1.OpenCryptoki` makes a
/// socket pair and hands one end to its caller over the bus; the daemon serves the other end
/// here, bound to that caller's bus name and cache environment. Nothing listens in the
/// filesystem: the bus is the only way in, and the bus tells who the caller is. Closing the
/// socket ends the environment; the caller leaving the bus closes the socket.
final class CryptokiSockets: Sendable {
    /// Sockets open at once, all callers together, and per uid (issue 12 §2: four users at
    /// their cap still leave room). Each costs a thread and two descriptors (socket, eventfd).
    static let maxOpen = 512
    static let maxPerUID = 128
    /// Descriptors kept free for everything else (modules' files, the bus, PC/SC): a socket
    /// that would eat into them is refused, never an EMFILE somewhere that cannot cope.
    static let descriptorReserve = 128

    /// Bytes the daemon holds for sockets — read and not yet answered (a frame still arriving
    /// included), replies not yet sent — per uid and in all. Over either, that uid's sockets (or all) are not read
    /// until some is answered or sent: memory stays bounded, nobody is cut off.
    static let bytesPerUID = 128 << 20
    static let bytesInAll = 512 << 20

    private struct State {
        var open: [String: CryptokiConnection] = [:]
        var perUID: [UInt32: Int] = [:]
        var calls: UInt64 = 0
        /// Threads of sockets that ended, not yet joined.
        var ended: [pthread_t] = []
        /// closeAll has taken every thread to join: an ending socket adds its own no more
        /// (it would be joined twice).
        var closingAll = false
    }
    private struct Budget {
        var perUID: [UInt32: Int] = [:]
        var total = 0
    }
    private let budget = Mutex(Budget())

    func account(uid: UInt32?, _ delta: Int) {
        guard delta != 0 else { return }
        budget.withLock { b in
            b.total += delta
            guard let uid else { return }
            b.perUID[uid, default: 0] += delta
            if b.perUID[uid] == 0 { b.perUID[uid] = nil }
        }
    }

    func mayRead(uid: UInt32?) -> Bool {
        budget.withLock { b in b.total < Self.bytesInAll && (uid.map { b.perUID[$0, default: 0] < Self.bytesPerUID } ?? true) }
    }

    /// Bytes held for sockets in all (statistics, tests).
    var heldBytes: Int { budget.withLock { $0.total } }
    private let state = Mutex(State())

    var count: Int { state.withLock { $0.open.count } }
    var callsServed: UInt64 { state.withLock { $0.calls } }
    func counted() { state.withLock { $0.calls &+= 1 } }

    enum OpenError: Error {
        case alreadyOpen, tooMany, tooManyForUID, descriptors(inUse: Int, limit: Int), system(Int32)
    }

    /// A new socket for `name`; returns the caller's end, which the caller of this function
    /// closes once it has been sent. `serve` gets every request; `closed` runs once when the
    /// socket ends (on its own thread).
    func open(
        for name: String, uid: UInt32?, serve: @escaping @Sendable (CryptokiRequest) -> Void,
        closed: @escaping @Sendable (String) -> Void
    ) -> Result<Int32, OpenError> {
        reapEnded()
        let (inUse, limit) = DescriptorBudget.usage()
        guard inUse + 4 + Self.descriptorReserve <= limit else {
            return .failure(.descriptors(inUse: inUse, limit: limit))
        }
        var fds: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0 else {
            return .failure(.system(errno))
        }
        let connection: CryptokiConnection
        do {
            connection = try CryptokiConnection(fd: fds[0], name: name, owner: self, serve: serve, closed: closed)
        } catch {
            Glibc.close(fds[0])
            Glibc.close(fds[1])
            return .failure(.system(errno))
        }
        let admitted = state.withLock { s -> OpenError? in
            if s.open[name] != nil { return .alreadyOpen }
            if s.open.count >= Self.maxOpen { return .tooMany }
            if let uid, s.perUID[uid, default: 0] >= Self.maxPerUID { return .tooManyForUID }
            s.open[name] = connection
            if let uid { s.perUID[uid, default: 0] += 1 }
            connection.uid = uid
            return nil
        }
        if let refused = admitted {
            connection.discard()
            Glibc.close(fds[1])
            return .failure(refused)
        }
        connection.start()
        return .success(fds[1])
    }

    /// `name`'s environment is a PKCS#11 application's, served over a socket.
    func isBound(_ name: String) -> Bool { state.withLock { $0.open[name] != nil } }

    /// Ends `name`'s socket (its caller left the bus).
    func close(boundTo name: String) {
        state.withLock { $0.open[name] }?.shutDown()
    }

    /// Ends every socket and waits (until `deadline`) for their threads to be gone, thread-
    /// local destructors included: a socket thread runs module code inline (SoftHSM, hence
    /// OpenSSL), and one still exiting while exit() runs OpenSSL's cleanup frees its
    /// thread state twice.
    func closeAll(deadline: DispatchTime = .now() + .seconds(3)) {
        state.withLock { Array($0.open.values) }.forEach { $0.shutDown() }
        let (threads, _) = threadsToJoin(all: true)
        for thread in threads {
            let now = DispatchTime.now().uptimeNanoseconds
            let left = deadline.uptimeNanoseconds > now ? (deadline.uptimeNanoseconds - now) / 1_000_000 : 0
            _ = pincache_join_within(UInt(thread), UInt32(clamping: left))
        }
    }

    /// Threads of ended sockets, joined when the next socket opens (instantly: they have
    /// returned) so none is left unjoined; `all` also takes those of open sockets.
    private func threadsToJoin(all: Bool) -> ([pthread_t], Int) {
        state.withLock { s in
            var out = s.ended
            s.ended.removeAll()
            if all {
                s.closingAll = true
                out += s.open.values.compactMap { $0.thread }
            }
            return (out, s.open.count)
        }
    }

    func reapEnded() {
        let (threads, _) = threadsToJoin(all: false)
        for thread in threads { pthread_join(thread, nil) }
    }

    func finished(_ connection: CryptokiConnection) {
        state.withLock { s in
            guard s.open[connection.name] === connection else { return }
            s.open[connection.name] = nil
            if !s.closingAll, let thread = connection.thread { s.ended.append(thread) }
            if let uid = connection.uid {
                s.perUID[uid, default: 1] -= 1
                if s.perUID[uid] == 0 { s.perUID[uid] = nil }
            }
        }
    }
}

/// How many descriptors the process has open, against its RLIMIT_NOFILE.
enum DescriptorBudget {
    static func usage() -> (inUse: Int, limit: Int) {
        var limit = rlimit()
        getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
        var count = 0
        if let dir = opendir("/proc/self/fd") {
            while readdir(dir) != nil { count += 1 }
            closedir(dir)
            count -= 3  // ".", ".." and the directory's own descriptor
        }
        let soft = limit.rlim_cur >= rlim_t(Int.max) ? Int.max : Int(limit.rlim_cur)
        return (max(count, 0), soft)
    }

    /// Raises the soft RLIMIT_NOFILE to the hard one (at most 65536): the unit's LimitNOFILE=
    /// or a shell's ulimit then decides, not the 1024 that select() users need.
    static func raiseSoftLimit() -> Int {
        var limit = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return -1 }
        let wanted = min(limit.rlim_max, 65536)
        if limit.rlim_cur < wanted {
            limit.rlim_cur = wanted
            _ = setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
            getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
        }
        return limit.rlim_cur >= rlim_t(Int.max) ? Int.max : Int(limit.rlim_cur)
    }
}
