import Glibc

/// The client end of a cryptoki socket (dbus/README.md, "The Cryptoki wire"): the proxy has
/// one per initialised process, shared by all its threads. Each request carries a tag and its
/// reply comes back with it, in any order; whichever waiting thread finds nobody reading
/// reads for everyone (no thread of our own: a host may forbid them) and hands the others
/// their replies. Nothing a broken or hostile daemon sends can crash the host: every frame is
/// decoded against the call table's caps, and anything off makes the socket `malformed` for
/// good; a closed one is `closed`.
public final class WireClient: @unchecked Sendable {
    public enum Failure: Error, Equatable, Sendable {
        /// The peer closed the socket, or did not answer in time.
        case closed
        case timedOut
        /// The peer broke the protocol: nothing it says is trusted any more.
        case malformed
        /// The arguments do not fit the call's declared fields or caps (never sent).
        case unencodable
        /// The call's answer: the PKCS#11 return value the daemon gave.
        case refused(rv: UInt64)
    }

    // @unchecked: the state below is guarded by `monitor`; `buffer` belongs to the thread
    // that is `reading`; writes are serialised by `writing`.
    let fd: Int32
    private let monitor = Monitor()
    private let writing = Monitor()
    private let buffer = FrameBuffer()

    private enum Answer {
        case values([WireValue])
        case error(UInt64)
    }
    /// Tags sent and not answered yet, with their call.
    private var waiting: [UInt32: Call] = [:]
    private var answers: [UInt32: Answer] = [:]
    private var nextTag: UInt32 = 1
    private var reading = false
    /// Set once: every call from then on fails with it.
    private var broken: Failure?

    /// Takes `fd` (the socket the daemon passed); Hello opens it.
    public init(fd: Int32) throws(Failure) {
        self.fd = fd
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        let hello = try exchange(Calls.hello, [.ulong(Calls.magic), .ulong(Calls.version)], timeoutMilliseconds: 5000)
        guard hello.first?.ulongValue ?? 0 >= 1 else { throw .malformed }
    }

    deinit { Glibc.close(fd) }

    public var isBroken: Bool { monitor.locked { broken != nil } }

    /// Ends every call in progress (C_Finalize, a reconnect).
    public func shutDown() {
        Glibc.shutdown(fd, Int32(SHUT_RDWR))
    }

    /// One call: sends the request and waits for its answer at most `timeoutMilliseconds`.
    public func exchange(_ call: Call, _ arguments: [WireValue], timeoutMilliseconds: Int32) throws(Failure) -> [WireValue] {
        let deadline = Self.now() + Int64(timeoutMilliseconds)
        let tag = try monitor.locked { () throws(Failure) -> UInt32 in
            if let broken { throw broken }
            let tag = nextTag
            nextTag = nextTag == UInt32.max ? 1 : nextTag + 1
            waiting[tag] = call
            return tag
        }
        var frame: [UInt8]
        do {
            frame = try Frames.encode(tag: tag, call: call.id, kind: .request, arguments, as: call.request)
        } catch {
            _ = monitor.locked { waiting.removeValue(forKey: tag) }
            throw .unencodable
        }
        let secret = call.request.contains { if case .secret = $0.type { true } else { false } }
        defer {
            if secret { wipe(&frame) }
        }
        do throws(Failure) {
            try writing.locked { () throws(Failure) in try send(frame, deadline: deadline) }
        } catch {
            fail(error)
        }
        return try awaitAnswer(tag, deadline: deadline)
    }

    private func wipe(_ bytes: inout [UInt8]) {
        bytes.withUnsafeMutableBytes { raw in if let base = raw.baseAddress { explicit_bzero(base, raw.count) } }
    }

    private static func now() -> Int64 {
        var t = timespec()
        clock_gettime(CLOCK_MONOTONIC, &t)
        return Int64(t.tv_sec) * 1000 + Int64(t.tv_nsec) / 1_000_000
    }

    private func send(_ frame: [UInt8], deadline: Int64) throws(Failure) {
        var offset = 0
        while offset < frame.count {
            let n = frame.withUnsafeBytes { raw in
                Glibc.send(fd, raw.baseAddress! + offset, raw.count - offset, Int32(MSG_NOSIGNAL))
            }
            if n > 0 {
                offset += n
                continue
            }
            guard n < 0, errno == EAGAIN || errno == EINTR else { throw .closed }
            let left = deadline - Self.now()
            guard left > 0 else { throw .timedOut }
            var p = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
            _ = poll(&p, 1, Int32(min(left, 1000)))
        }
    }

    /// Marks the socket broken (once) and wakes every waiter.
    private func fail(_ error: Failure) {
        monitor.locked {
            if broken == nil { broken = error }
            monitor.broadcast()
        }
    }

    private enum Step {
        case done(Answer)
        case lead
    }

    private func awaitAnswer(_ tag: UInt32, deadline: Int64) throws(Failure) -> [WireValue] {
        while true {
            let step = try monitor.locked { () throws(Failure) -> Step in
                while true {
                    if let answer = answers.removeValue(forKey: tag) {
                        waiting[tag] = nil
                        return .done(answer)
                    }
                    if let broken {
                        waiting[tag] = nil
                        throw broken
                    }
                    let left = deadline - Self.now()
                    if left <= 0 {
                        // Abandoned: a late answer is dropped when it comes.
                        waiting[tag] = nil
                        throw .timedOut
                    }
                    if !reading {
                        reading = true
                        return .lead
                    }
                    monitor.wait(milliseconds: Int(min(left, 1000)))
                }
            }
            switch step {
            case .done(.values(let values)): return values
            case .done(.error(let rv)): throw .refused(rv: rv)
            case .lead:
                let outcome = readOnce(deadline: deadline)
                monitor.locked {
                    reading = false
                    if case .failure(let e) = outcome, broken == nil { broken = e }
                    monitor.broadcast()
                }
            }
        }
    }

    /// One poll and read, then every complete frame is decoded and filed under its tag.
    private func readOnce(deadline: Int64) -> Result<Void, Failure> {
        let left = deadline - Self.now()
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        let ready = poll(&p, 1, Int32(max(0, min(left, 1000))))
        if ready < 0 { return errno == EINTR ? .success(()) : .failure(.closed) }
        if ready == 0 { return .success(()) }
        let n = buffer.read(from: fd)
        if n == 0 { return .failure(.closed) }
        if n < 0 { return errno == EAGAIN || errno == EINTR ? .success(()) : .failure(.closed) }
        while true {
            let frame: (FrameHeader, UnsafeRawBufferPointer)?
            do {
                frame = try buffer.next()
            } catch {
                return .failure(.malformed)
            }
            guard let (header, body) = frame else { return .success(()) }
            defer { buffer.consume(header) }
            let verdict = monitor.locked { () -> Result<Void, Failure> in
                guard let call = waiting[header.tag] else {
                    // A tag sent and given up (timed out) is dropped; one never sent is a lie.
                    return header.tag != 0 && header.tag < nextTag ? .success(()) : .failure(.malformed)
                }
                guard header.call == call.id, header.kind != .request else { return .failure(.malformed) }
                var decoder = WireDecoder(body)
                do {
                    if header.kind == .error {
                        let e = try decoder.decodeAll(Frames.errorFields)
                        let rv = e.first?.ulongValue ?? 0
                        // CKR_OK as an error is no answer a daemon may give.
                        guard rv != 0 else { return .failure(.malformed) }
                        answers[header.tag] = .error(rv)
                    } else {
                        answers[header.tag] = .values(try decoder.decodeAll(call.response))
                    }
                } catch {
                    return .failure(.malformed)
                }
                return .success(())
            }
            if case .failure = verdict { return verdict }
        }
    }
}
