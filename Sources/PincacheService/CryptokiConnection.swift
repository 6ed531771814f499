import Dispatch
import CShims
import CryptokiWire
import Glibc
import PinPolicy
import Synchronization

/// One request as decoded from the socket: the call, its arguments in the table's order,
/// and the PINs it carried, already in locked memory. Answered exactly once.
final class CryptokiRequest: @unchecked Sendable {
    // @unchecked: `answered` is atomic; the rest is immutable.
    let call: Call
    let tag: UInt32
    let arguments: [WireValue]
    let secrets: [Result<SecretPIN, Error>]
    let connection: CryptokiConnection
    private let answered = Atomic<Bool>(false)

    /// The request's body: held (in `arguments`) until it is answered.
    let size: Int

    init(
        call: Call, tag: UInt32, size: Int, arguments: [WireValue], secrets: [Result<SecretPIN, Error>],
        connection: CryptokiConnection
    ) {
        self.call = call
        self.tag = tag
        self.size = size
        self.arguments = arguments
        self.secrets = secrets
        self.connection = connection
    }

    deinit {
        // Dropped unanswered (its caller left before the worker reached it): the slot in the
        // connection's in-flight count is still freed.
        if !answered.load(ordering: .relaxed) { connection.requestFinished(nil, size: size) }
    }

    var caller: String { connection.name }

    /// The argument named `name` in the table (decoding guaranteed its type).
    func argument(_ name: String) -> WireValue? {
        call.request.firstIndex { $0.name == name }.map { arguments[$0] }
    }
    func ulong(_ name: String) -> UInt64 { argument(name)?.ulongValue ?? 0 }
    func bytes(_ name: String) -> [UInt8] { argument(name)?.bytesValue ?? [] }
    func string(_ name: String) -> String { argument(name)?.stringValue ?? "" }

    /// The PIN argument `name`, or why the daemon could not hold it.
    func secret(_ name: String) -> Result<SecretPIN, Error> {
        guard case .secret(let index) = argument(name), secrets.indices.contains(index) else {
            return .failure(SecretError.tooLong(maximum: Caps.pin))
        }
        return secrets[index]
    }

    func reply(_ values: [WireValue]) {
        guard !answered.exchange(true, ordering: .relaxed) else { return }
        let frame: [UInt8]
        do {
            frame = try Frames.encode(tag: tag, call: call.id, kind: .reply, values, as: call.response)
        } catch {
            // The daemon's own answer broke a cap: a bug, said as one, never sent half-made.
            Log.error("\(call.name): reply refused by the wire table: \(error)")
            frame = Frames.error(tag: tag, call: call.id, rv: 0x5, message: "CKR_GENERAL_ERROR: reply over a cap")
        }
        connection.requestFinished(frame, size: size)
    }

    func fail(rv: UInt, _ message: String) {
        guard !answered.exchange(true, ordering: .relaxed) else { return }
        connection.requestFinished(Frames.error(tag: tag, call: call.id, rv: UInt64(rv), message: message), size: size)
    }

    func fail(_ error: ServiceError) { fail(rv: error.rv, error.message) }

    func reply<T>(_ result: Result<T, ServiceError>, _ encode: (T) -> [WireValue]) {
        switch result {
        case .success(let value): reply(encode(value))
        case .failure(let error): fail(error)
        }
    }
}

/// One socket's thread: reads frames, hands requests to `serve`, and writes replies that any
/// thread queued. Replies are queued, never written by the worker that made them, so a client
/// that stops reading can hold up only its own socket. While 64 requests are in flight or
/// 32 MiB of replies wait, the socket is not read: a client cannot make the daemon buffer
/// without bound.
final class CryptokiConnection: @unchecked Sendable {
    // @unchecked: `outbox` is behind its Mutex; `buffer` and `greeted` belong to the thread.
    static let maxInFlight = 64
    static let maxQueuedBytes = 32 << 20

    let fd: Int32
    let name: String
    /// An eventfd: other threads add to it to wake the socket's poll.
    private let wake: Int32
    /// Its owner's uid, for the per-uid count (set under the sockets' lock).
    nonisolated(unsafe) var uid: UInt32?
    private weak let owner: CryptokiSockets?
    private let serve: @Sendable (CryptokiRequest) -> Void
    private let closed: @Sendable (String) -> Void
    private let buffer = FrameBuffer()
    private var greeted = false
    /// The socket's own thread, set when it starts: replies made on it (an inline job) need no
    /// wake-up, the loop writes them before it polls again.
    private let loopThread = Mutex<pthread_t?>(nil)

    private struct Outbox {
        var frames: [[UInt8]] = []
        var sent = 0
        var bytes = 0
        var inFlight = 0
        /// Bytes this socket has in the sockets' budget.
        var held = 0
        var ended = false
    }
    private let outbox = Mutex(Outbox())

    init(
        fd: Int32, name: String, owner: CryptokiSockets, serve: @escaping @Sendable (CryptokiRequest) -> Void,
        closed: @escaping @Sendable (String) -> Void
    ) throws {
        let wake = pincache_wake_eventfd()
        guard wake >= 0 else { throw SecretError.cannotLockMemory(errno: errno) }
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        self.fd = fd
        self.wake = wake
        self.name = name
        self.owner = owner
        self.serve = serve
        self.closed = closed
    }

    /// Never started (refused): only the descriptors go.
    func discard() {
        Glibc.close(fd)
        Glibc.close(wake)
    }

    /// A joinable POSIX thread (not a Foundation Thread): CryptokiSockets joins it once it
    /// has ended, so the daemon can wait for every socket thread to be gone before exit.
    func start() {
        let context = Unmanaged.passRetained(self).toOpaque()
        var id = pthread_t()
        let created = pthread_create(&id, nil, { raw in
            let connection = Unmanaged<CryptokiConnection>.fromOpaque(raw!).takeRetainedValue()
            pincache_name_this_thread("pincache-cryptok")
            connection.run()
            return nil
        }, context)
        if created != 0 {
            Unmanaged<CryptokiConnection>.fromOpaque(context).release()
            discard()
            owner?.finished(self)
            closed(name)
        }
    }

    /// The socket's thread, once it runs (it records itself first thing).
    var thread: pthread_t? { loopThread.withLock { $0 } }

    /// The thread's next poll sees the socket closed and ends; it closes the descriptors
    /// (closing them here could close a number another thread has just been given).
    func shutDown() {
        Glibc.shutdown(fd, Int32(SHUT_RDWR))
        signal()
    }

    private func signal() {
        if let own = loopThread.withLock({ $0 }), pthread_equal(own, pthread_self()) != 0 { return }
        var one: UInt64 = 1
        // A counter at its maximum already holds a wake-up: the write may fail without loss.
        _ = Glibc.write(wake, &one, 8)
    }

    /// A request of `size` bytes is done; `frame` is its answer (nil: nobody to answer).
    func requestFinished(_ frame: [UInt8]?, size: Int) {
        outbox.withLock { o in
            o.inFlight -= 1
            if let frame {
                o.frames.append(frame)
                o.bytes += frame.count
            }
            account(&o, (frame?.count ?? 0) - size)
        }
        signal()
    }

    /// Moves `delta` bytes into (or out of) what the daemon holds for this socket, under the
    /// outbox's lock; once the socket has ended everything it held was given back already.
    private func account(_ o: inout Outbox, _ delta: Int) {
        guard !o.ended else { return }
        o.held += delta
        owner?.account(uid: uid, delta)
    }

    private func send(_ frame: [UInt8]) {
        outbox.withLock { o in
            o.frames.append(frame)
            o.bytes += frame.count
        }
    }

    private func run() {
        loopThread.withLock { $0 = pthread_self() }
        defer {
            Glibc.close(fd)
            Glibc.close(wake)
            // What it still held goes back to the budget now; requests finishing later and
            // replies never sent count no more.
            outbox.withLock { o in
                owner?.account(uid: uid, -o.held)
                o.held = 0
                o.ended = true
            }
            owner?.finished(self)
            closed(name)
        }
        while true {
            let (ownRoom, wantWrite) = outbox.withLock { o in
                (o.inFlight < Self.maxInFlight && o.bytes < Self.maxQueuedBytes, !o.frames.isEmpty)
            }
            // Over the uid's (or everyone's) byte budget: not read, and polled again in a while,
            // since what frees the budget may be another socket's reply.
            let budgetRoom = owner?.mayRead(uid: uid) ?? true
            let wantRead = ownRoom && budgetRoom
            var fds = [
                pollfd(fd: fd, events: Int16((wantRead ? POLLIN : 0) | (wantWrite ? POLLOUT : 0)), revents: 0),
                pollfd(fd: wake, events: Int16(POLLIN), revents: 0),
            ]
            var n: Int32 = 0
            if wantRead && !wantWrite, let spin = spinBudget() {
                n = Self.spinPoll(&fds, spin)
                Self.spinners.wrappingSubtract(1, ordering: .relaxed)
            }
            if n == 0 { n = poll(&fds, 2, ownRoom && !budgetRoom ? 20 : -1) }
            if n < 0 {
                if errno == EINTR { continue }
                return
            }
            if fds[1].revents != 0 {
                var drain: UInt64 = 0
                _ = Glibc.read(wake, &drain, 8)
            }
            if fds[0].revents & Int16(POLLERR | POLLNVAL) != 0 { return }
            // Replies queued while polling are written now, not one wake-up later.
            guard flush() else { return }
            if fds[0].revents & Int16(POLLIN | POLLHUP) != 0 {
                let got = buffer.read(from: fd)
                if got > 0 { outbox.withLock { account(&$0, got) } }
                let now = Self.now()
                requestGap = now &- lastRequest
                lastRequest = now
                if got == 0 { return }
                if got < 0 && errno != EAGAIN && errno != EINTR { return }
                guard handleFrames() else { return }
            }
        }
    }

    /// Spinning: a client that streams calls sends its next request a few µs after reading a
    /// reply, and on a VM a blocked thread takes 15–30 µs to wake. While a socket's requests
    /// come back to back (the last two less than `streamGap` apart), its thread polls without
    /// blocking for up to `spinWindow` before it sleeps, yielding the CPU between polls. At
    /// most one thread daemon-wide spins at a time, so this costs the machine at most one CPU
    /// while clients stream and nothing while they are idle: a lone call never spins.
    static let spinners = Atomic<Int>(0)
    static let spinWindow: UInt64 = 60_000
    static let streamGap: UInt64 = 500_000
    private var lastRequest: UInt64 = 0
    private var requestGap = UInt64.max

    static func now() -> UInt64 {
        var t = timespec()
        clock_gettime(CLOCK_MONOTONIC, &t)
        return UInt64(t.tv_sec) &* 1_000_000_000 &+ UInt64(t.tv_nsec)
    }

    private func spinBudget() -> UInt64? {
        guard requestGap < Self.streamGap else { return nil }
        guard Self.spinners.compareExchange(expected: 0, desired: 1, ordering: .relaxed).exchanged else { return nil }
        return Self.spinWindow
    }

    /// Polls without blocking until something is ready or `budget` ns have passed; 0 if nothing was.
    private static func spinPoll(_ fds: inout [pollfd], _ budget: UInt64) -> Int32 {
        let end = now() &+ budget
        repeat {
            let n = poll(&fds, 2, 0)
            if n != 0 { return n }
            sched_yield()
        } while now() < end
        return 0
    }

    /// Writes what it can of the queued replies; false when the peer is gone.
    private func flush() -> Bool {
        while true {
            let next = outbox.withLock { o -> ([UInt8], Int)? in o.frames.first.map { ($0, o.sent) } }
            guard let (frame, offset) = next else { return true }
            let n = frame.withUnsafeBytes { raw in
                Glibc.send(fd, raw.baseAddress! + offset, raw.count - offset, Int32(MSG_NOSIGNAL))
            }
            if n < 0 {
                return errno == EAGAIN || errno == EINTR
            }
            outbox.withLock { o in
                o.sent += n
                if o.sent == frame.count {
                    o.frames.removeFirst()
                    o.bytes -= frame.count
                    o.sent = 0
                    account(&o, -frame.count)
                }
            }
            if offset + n < frame.count { return true }
        }
    }

    /// Decodes and dispatches every complete frame; false ends the socket (a frame this
    /// protocol cannot contain: the peer is broken or hostile, and gets no second guess).
    private func handleFrames() -> Bool {
        while true {
            let frame: (FrameHeader, UnsafeRawBufferPointer)?
            do {
                frame = try buffer.next()
            } catch {
                Log.notice("cryptoki socket of \(name): \(error); closed", event: .protocolViolation)
                return false
            }
            guard let (header, body) = frame else { return true }
            defer { buffer.consume(header) }
            guard header.kind == .request, let call = Calls.byID(header.call) else {
                Log.notice("cryptoki socket of \(name): not a request of a known call (\(header.call)); closed", event: .protocolViolation)
                return false
            }
            var secrets: [Result<SecretPIN, Error>] = []
            let arguments: [WireValue]
            do {
                var decoder = WireDecoder(body) { raw in
                    secrets.append(Result { try SecretPIN(copying: raw) })
                    return secrets.count - 1
                }
                arguments = try decoder.decodeAll(call.request)
            } catch {
                Log.notice("cryptoki socket of \(name): \(call.name): \(error); closed", event: .protocolViolation)
                return false
            }
            if !greeted {
                guard call == Calls.hello, arguments.first?.ulongValue == Calls.magic else {
                    Log.notice("cryptoki socket of \(name): no Hello first; closed", event: .protocolViolation)
                    return false
                }
                greeted = true
            }
            owner?.counted()
            // The body's bytes, counted when they were read, move into the request (held until
            // it is answered); only the header leaves the budget here.
            outbox.withLock { o in
                o.inFlight += 1
                account(&o, -FrameHeader.size)
            }
            let request = CryptokiRequest(
                call: call, tag: header.tag, size: body.count, arguments: arguments, secrets: secrets, connection: self)
            if call == Calls.hello {
                request.reply([.ulong(Calls.version), .string("pincached \(PincacheBus.version)")])
            } else {
                serve(request)
            }
        }
    }
}
