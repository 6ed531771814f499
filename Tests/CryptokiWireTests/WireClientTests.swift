import Foundation
import Testing

@testable import CryptokiWire

/// The client end against deliberately broken peers, in process: whatever the peer does, a
/// call ends with a defined failure, never a crash or a hang.
@Suite struct WireClientTests {
    /// A scripted peer on the other end of a socket pair: answers Hello, then runs `script`
    /// with each request's header.
    final class Peer: @unchecked Sendable {
        let fd: Int32
        let client: WireClient
        private let thread: Thread

        init(_ script: @escaping @Sendable (Int32, FrameHeader) -> Bool) throws {
            var fds: [Int32] = [-1, -1]
            guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0 else { throw WireError("socketpair", "") }
            let serverFD = fds[0]
            fd = serverFD
            thread = Thread {
                let buffer = FrameBuffer()
                var greeted = false
                loop: while buffer.read(from: serverFD) > 0 {
                    while let (header, _) = (try? buffer.next()) ?? nil {
                        buffer.consume(header)
                        if !greeted {
                            greeted = true
                            Peer.send(serverFD, try! Frames.encode(tag: header.tag, call: 0, kind: .reply, [.ulong(1), .string("test")], as: Calls.hello.response))
                            continue
                        }
                        if !script(serverFD, header) { break loop }
                    }
                }
                close(serverFD)
            }
            thread.start()
            client = try WireClient(fd: fds[1])
        }

        static func send(_ fd: Int32, _ bytes: [UInt8]) {
            _ = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        }

        func sign() throws(WireClient.Failure) -> [WireValue] {
            try client.exchange(
                Calls.sign, [.ulong(1), .record([.ulong(0x1041), .bytes([])]), .ulong(7), .bytes([1, 2, 3])],
                timeoutMilliseconds: 2000)
        }
    }

    static func reply(_ header: FrameHeader, _ values: [WireValue], call: Call = Calls.sign) -> [UInt8] {
        try! Frames.encode(tag: header.tag, call: call.id, kind: .reply, values, as: call.response)
    }

    @Test func answersAndErrorsArriveAsTyped() throws {
        let peer = try Peer { fd, header in
            Peer.send(fd, header.tag % 2 == 0 ? Self.reply(header, [.bytes([9, 9])]) : Frames.error(tag: header.tag, call: header.call, rv: 0xa0, message: "no"))
            return true
        }
        var outcomes: [String] = []
        for _ in 0..<4 {
            do {
                outcomes.append("ok \(try peer.sign())")
            } catch {
                outcomes.append("\(error)")
            }
        }
        #expect(outcomes.contains("ok [CryptokiWire.WireValue.bytes([9, 9])]"))
        #expect(outcomes.contains("refused(rv: 160)"))
    }

    @Test(arguments: ["short-frame", "wrong-call", "oversize", "gone", "unknown-tag", "over-cap", "rv-zero", "silent"])
    func brokenPeersEndTheCallCleanly(_ mode: String) throws {
        let peer = try Peer { fd, header in
            switch mode {
            case "short-frame":
                let frame = Self.reply(header, [.bytes(Array(repeating: 1, count: 64))])
                Peer.send(fd, Array(frame.prefix(frame.count - 10)))
                return false
            case "wrong-call":
                Peer.send(fd, Self.reply(FrameHeader(bodyLength: 0, tag: header.tag, call: 0, kind: .reply), [.ulong(1), .string("x")], call: Calls.hello))
            case "oversize":
                var e = WireEncoder()
                e.put(UInt32(Caps.frameBody + 1)); e.put(header.tag); e.put(header.call); e.put(UInt8(1)); e.put(UInt8(0))
                Peer.send(fd, e.bytes)
            case "gone":
                return false
            case "unknown-tag":
                Peer.send(fd, Self.reply(FrameHeader(bodyLength: 0, tag: header.tag + 1000, call: header.call, kind: .reply), [.bytes([])]))
            case "over-cap":
                // A body whose byte string claims more than the cap.
                var e = WireEncoder()
                e.put(UInt32(4)); e.put(header.tag); e.put(header.call); e.put(UInt8(1)); e.put(UInt8(0))
                e.put(UInt32(Caps.data + 1))
                Peer.send(fd, e.bytes)
            case "rv-zero":
                Peer.send(fd, Frames.error(tag: header.tag, call: header.call, rv: 0, message: "ok?"))
            default:  // silent: never answers
                break
            }
            return true
        }
        let started = Date()
        var failure: WireClient.Failure?
        do {
            _ = try peer.sign()
        } catch {
            failure = error
        }
        let expected: WireClient.Failure =
            switch mode {
            case "short-frame", "gone": .closed
            case "silent": .timedOut
            default: .malformed
            }
        #expect(failure == expected)
        #expect(Date().timeIntervalSince(started) < 5)
        // A broken or closed socket stays so: the next call fails at once.
        if expected != .timedOut {
            #expect(throws: WireClient.Failure.self) { try peer.sign() }
            #expect(peer.client.isBroken)
        }
    }

    @Test func manyThreadsGetTheirOwnAnswersOutOfOrder() throws {
        let pending = Mutex<[FrameHeader]>([])
        let peer = try Peer { fd, header in
            // Answers in batches of four, last first.
            let batch = pending.withLock { p -> [FrameHeader] in
                p.append(header)
                guard p.count == 4 else { return [] }
                defer { p.removeAll() }
                return p.reversed()
            }
            for h in batch { Peer.send(fd, Self.reply(h, [.bytes(withUnsafeBytes(of: h.tag.littleEndian) { Array($0) })])) }
            return true
        }
        let results = Mutex<[Bool]>([])
        let done = DispatchSemaphore(value: 0)
        // Threads of their own: the batches need four calls waiting at once.
        for _ in 0..<16 {
            Thread {
                let ok = (try? peer.sign()).map { $0.count == 1 } ?? false
                results.withLock { $0.append(ok) }
                done.signal()
            }.start()
        }
        for _ in 0..<16 { done.wait() }
        #expect(results.withLock { $0 } == Array(repeating: true, count: 16))
    }

    @Test func argumentsOverACapAreNeverSent() throws {
        let peer = try Peer { _, _ in Issue.record("an over-cap request reached the peer"); return true }
        #expect(throws: WireClient.Failure.unencodable) {
            try peer.client.exchange(
                Calls.sign, [.ulong(1), .record([.ulong(1), .bytes([])]), .ulong(7), .bytes(Array(repeating: 0, count: Caps.data + 1))],
                timeoutMilliseconds: 1000)
        }
    }
}

import Synchronization
