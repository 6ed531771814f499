import DBusKit
import FastPathWire
import Glibc
import Synchronization

/// The proxy's end of the fast path (dbus/README.md, "Fast path"): a SOCK_SEQPACKET socket
/// the daemon handed over the bus, one request and one reply at a time. A thread that finds
/// it in use takes the peer channel instead, so threads never queue behind each other here.
final class FastPathSocket: @unchecked Sendable {
    // @unchecked: `buffer` and `receiveTimeout` are used only by the thread holding `busy`.
    let fd: Int32
    private let busy = Atomic<Bool>(false)
    /// One byte more than the largest frame (MSG_TRUNC then reports a longer one); kept, so
    /// that no call pays for zeroing 64 KiB.
    private var buffer = [UInt8](repeating: 0, count: FastPathWire.maxFrame + 1)
    /// The SO_RCVTIMEO last set, in milliseconds.
    private var receiveTimeout: Int32 = -1

    init(fd: Int32) { self.fd = fd }

    deinit { Glibc.close(fd) }

    /// Takes the socket for one exchange, or returns false if another thread has it.
    func tryAcquire() -> Bool { busy.compareExchange(expected: false, desired: true, ordering: .acquiring).exchanged }
    func release() { busy.store(false, ordering: .releasing) }

    /// Makes a thread blocked on the socket return; the descriptor closes with the object.
    func shutDown() { Glibc.shutdown(fd, Int32(SHUT_RDWR)) }

    enum Failure: Error {
        /// The daemon closed it (exited, or no longer serves it) before answering.
        case closed
        /// No answer in time: the socket is out of step and must not be used again.
        case timedOut
        /// An answer the decoder refused.
        case malformed
    }

    /// Sends `frame` and waits up to `timeoutMilliseconds` for the reply. Only while holding
    /// the socket (`tryAcquire`).
    func exchange(_ frame: [UInt8], timeoutMilliseconds: Int32) -> Result<FastPathWire.Reply, Failure> {
        if receiveTimeout != timeoutMilliseconds {
            // A blocking receive with a time limit: one system call per reply, not two.
            var limit = timeval(tv_sec: Int(timeoutMilliseconds / 1000), tv_usec: Int(timeoutMilliseconds % 1000) * 1000)
            guard setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &limit, socklen_t(MemoryLayout<timeval>.size)) == 0 else {
                return .failure(.closed)
            }
            receiveTimeout = timeoutMilliseconds
        }
        let sent = frame.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        guard sent == frame.count else { return .failure(.closed) }
        var n: Int
        repeat {
            n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, Int32(MSG_TRUNC)) }
        } while n < 0 && errno == EINTR
        if n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) { return .failure(.timedOut) }
        guard n > 0 else { return .failure(.closed) }
        guard n <= FastPathWire.maxFrame,
            let reply = buffer.withUnsafeBytes({ FastPathWire.decodeReply(UnsafeRawBufferPointer(rebasing: $0[..<n])) })
        else { return .failure(.malformed) }
        return .success(reply)
    }

    /// The request a Cryptoki crypto call's wire arguments stand for, or nil when they do
    /// not fit the fast path (the call then goes over D-Bus as it is).
    static func request(_ operation: FastPathWire.Operation, path: ObjectPath, _ a: [DBusValue]) -> FastPathWire.Request? {
        let prefix = "/org/pincache/session/"
        guard path.rawValue.hasPrefix(prefix), let session = UInt64(path.rawValue.dropFirst(prefix.count)),
            a.count == (operation == .verify ? 4 : 3), case .structure(let m) = a[0], m.count == 2,
            case .uint64(let mechanism) = m[0], case .bytes(let parameter) = m[1], case .uint64(let key) = a[1],
            case .bytes(let data) = a[2]
        else { return nil }
        var signature: [UInt8] = []
        if operation == .verify {
            guard case .bytes(let s) = a[3] else { return nil }
            signature = s
        }
        let request = FastPathWire.Request(operation: operation, session: session, mechanism: mechanism,
                                           parameter: parameter, key: key, data: data, signature: signature)
        return request.fits ? request : nil
    }

    /// Checks what OpenFastPath returned: exactly one descriptor, a SOCK_SEQPACKET socket.
    static func adopt(_ reply: [DBusValue]) -> FastPathSocket? {
        guard reply.count == 1, case .unixFD(let fd) = reply[0], fd >= 0 else {
            reply.forEach(Wire.closeDescriptors)
            return nil
        }
        var type: Int32 = 0
        var size = socklen_t(MemoryLayout<Int32>.size)
        guard getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &size) == 0, type == Int32(SOCK_SEQPACKET.rawValue) else {
            Glibc.close(fd)
            return nil
        }
        return FastPathSocket(fd: fd)
    }
}
