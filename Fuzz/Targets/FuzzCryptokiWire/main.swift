import CryptokiWire
import FuzzDriver
import FuzzSupport
import Glibc

// The wire's framing and decoding, both ways: bytes from a client (read by the daemon) and
// from the daemon (read inside every host application). The input is a byte stream as the
// socket delivers it: written into a pipe in pieces, read back by a FrameBuffer (which starts
// small here, so it grows and moves unread bytes as the real one does), split into frames.
// Each frame's body is decoded as its call's request (with a secret sink like the daemon's,
// which copies the PIN and hands back an index), as its call's response, and as an error.
// Whatever decodes must encode back to exactly the same body, and the frame it came in must be
// exactly what Frames.encode (or Frames.error) makes of it: there is one layout per call, so
// nothing is read that was not checked. A malformed header ends the stream, as it ends the
// socket on both sides.

/// The secret sink's indexes turned back into the bytes they stood for, for re-encoding.
private func restore(_ value: WireValue, _ secrets: [[UInt8]]) -> WireValue {
    switch value {
    case .secret(let index):
        expect(secrets.indices.contains(index), "secret index \(index) of \(secrets.count)")
        return .bytes(secrets[index])
    case .array(let items): return .array(items.map { restore($0, secrets) })
    case .record(let items): return .record(items.map { restore($0, secrets) })
    default: return value
    }
}

/// Whether `fields` hold a secret anywhere (only then may `.secret` values appear).
private func holdsSecret(_ type: FieldType) -> Bool {
    switch type {
    case .secret: true
    case .array(let element, _): holdsSecret(element)
    case .record(let fields): fields.contains { holdsSecret($0.type) }
    default: false
    }
}

private func check(_ header: FrameHeader, _ body: UnsafeRawBufferPointer) {
    expect(body.count == Int(header.bodyLength), "body of \(body.count) bytes for a length of \(header.bodyLength)")
    guard let call = Calls.byID(header.call) else { return }
    expect(call.id == header.call, "call \(header.call) found as \(call.id)")
    let frame = headerBytes(header) + Array(body)
    let decodings: [(FrameHeader.Kind, [Field])] = [(.request, call.request), (.reply, call.response), (.error, Frames.errorFields)]
    for (kind, fields) in decodings {
        var secrets: [[UInt8]] = []
        var decoder = kind == .request
            ? WireDecoder(body) { raw in
                secrets.append(Array(raw))
                return secrets.count - 1
            }
            : WireDecoder(body)
        guard let decoded = try? decoder.decodeAll(fields) else { continue }
        expect(decoder.remaining == 0, "\(call.name): \(decoder.remaining) bytes left after a complete decode")
        expect(secrets.isEmpty || fields.contains { holdsSecret($0.type) }, "\(call.name): a secret outside a secret field")
        let values = decoded.map { restore($0, secrets) }
        var encoder = WireEncoder()
        do {
            try encoder.encode(values, as: fields)
        } catch {
            fatalError("fuzz invariant broken: \(call.name) \(kind): decoded values do not encode: \(error)")
        }
        expect(encoder.bytes.elementsEqual(body), "\(call.name) \(kind): values do not encode to their body")
        // The whole frame, header included, as the sending side makes it.
        let again = try? Frames.encode(tag: header.tag, call: header.call, kind: kind, values, as: fields)
        expect(again.map { Array($0.dropFirst(FrameHeader.size)) == Array(body) } ?? false, "\(call.name) \(kind): Frames.encode differs")
        if kind == header.kind {
            expect(again == frame, "\(call.name) \(kind): Frames.encode makes another frame")
        }
        if kind == .error, let rv = values[0].ulongValue, let message = values[1].stringValue {
            // A decodable message is within the cap and holds no NUL: Frames.error keeps it as it is.
            expect(Frames.error(tag: header.tag, call: header.call, rv: rv, message: message) == headerBytes(FrameHeader(
                bodyLength: header.bodyLength, tag: header.tag, call: header.call, kind: .error)) + Array(body),
                "\(call.name): Frames.error changes a valid message")
        }
    }
}

private func headerBytes(_ h: FrameHeader) -> [UInt8] {
    var e = WireEncoder()
    e.put(h.bodyLength)
    e.put(h.tag)
    e.put(h.call)
    e.put(h.kind.rawValue)
    e.put(UInt8(0))
    return e.bytes
}

@_cdecl("LLVMFuzzerTestOneInput")
func fuzzOne(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    guard let data, size > 0 else { return 0 }
    let stream = UnsafeRawBufferPointer(start: data, count: size)
    var fds: [Int32] = [-1, -1]
    guard pipe(&fds) == 0 else { fatalError("pipe: errno \(errno)") }
    defer {
        close(fds[0])
        close(fds[1])
    }
    let buffer = FrameBuffer(capacity: 16)
    // The stream goes into the pipe in pieces whose size the input's length picks (1 byte to
    // 8 KiB: frames cut at every point; at most ~64 pieces, to keep the syscalls few), and
    // after each piece the buffer reads until the pipe is empty, so no read ever blocks.
    let piece = min(max([1, 5, 12, 13, 100, 4096, 8192][size % 7], size / 64), 65536)  // a pipe holds 64 KiB
    var written = 0, pending = 0, consumed = 0
    while written < size || pending > 0 {
        if pending == 0 {
            let n = write(fds[1], data + written, min(piece, size - written))
            expect(n > 0, "write to the pipe: \(n), errno \(errno)")
            written += n
            pending += n
        }
        let n = buffer.read(from: fds[0])
        expect(n > 0 && n <= pending, "read \(n) of \(pending) pending bytes")
        pending -= n
        let received = written - pending
        while true {
            let next: (FrameHeader, UnsafeRawBufferPointer)?
            do {
                next = try buffer.next()
            } catch {
                // Both ends close the socket here; the rest of the stream is never read.
                let raw = UnsafeRawBufferPointer(rebasing: stream[consumed..<received])
                expect((try? Frames.header(raw)) == nil && raw.count >= FrameHeader.size, "next() threw on a good header")
                return 0
            }
            guard let (header, body) = next else {
                // Nothing complete: the bytes received and not consumed are less than a frame.
                let raw = UnsafeRawBufferPointer(rebasing: stream[consumed..<received])
                if let h = try? Frames.header(raw) {
                    expect(raw.count < FrameHeader.size + Int(h.bodyLength), "a complete frame not returned")
                }
                break
            }
            // The buffer hands out exactly the stream's bytes, wherever it moved them.
            let end = consumed + FrameHeader.size + Int(header.bodyLength)
            expect(end <= received, "a frame beyond the bytes received")
            expect((try? Frames.header(UnsafeRawBufferPointer(rebasing: stream[consumed..<end]))) == header, "header differs")
            expect(body.elementsEqual(stream[(consumed + FrameHeader.size)..<end]), "body differs from the stream's bytes")
            check(header, body)
            buffer.consume(header)
            consumed = end
        }
    }
    return 0
}

exit(pincache_fuzz_main(CommandLine.argc, CommandLine.unsafeArgv, fuzzOne))
