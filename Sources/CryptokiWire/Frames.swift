#if canImport(Glibc)
    import Glibc
#endif

/// One frame on the socket: a 12-byte header, then the body the call table describes.
/// `u32 body length, u32 tag, u16 call id, u8 kind, u8 zero`. The tag is the client's: the
/// reply carries the request's tag, so one socket serves the proxy's threads at once.
public struct FrameHeader: Sendable, Equatable {
    public enum Kind: UInt8, Sendable {
        case request = 0
        /// The call's response fields follow.
        case reply = 1
        /// `Frames.errorFields` follow: the CK_RV as a number, and a message for people.
        case error = 2
    }

    public static let size = 12

    public var bodyLength: UInt32
    public var tag: UInt32
    public var call: UInt16
    public var kind: Kind

    public init(bodyLength: UInt32, tag: UInt32, call: UInt16, kind: Kind) {
        self.bodyLength = bodyLength
        self.tag = tag
        self.call = call
        self.kind = kind
    }
}

public enum Frames {
    public static let errorFields = [Field("rv", .ulong), Field("message", .string(max: Caps.errorMessage))]

    /// A whole frame: header and the body encoded from `values` as `fields` say.
    public static func encode(
        tag: UInt32, call: UInt16, kind: FrameHeader.Kind, _ values: [WireValue], as fields: [Field]
    ) throws(WireError) -> [UInt8] {
        var e = WireEncoder()
        e.put(UInt32(0))
        e.put(tag)
        e.put(call)
        e.put(kind.rawValue)
        e.put(UInt8(0))
        try e.encode(values, as: fields)
        let body = e.bytes.count - FrameHeader.size
        guard body <= Caps.frameBody else { throw WireError("frame", "\(body) bytes, at most \(Caps.frameBody)") }
        // In place: a copy of a 16 MiB frame would cost more than the call.
        withUnsafeBytes(of: UInt32(body).littleEndian) { raw in
            for i in 0..<4 { e.bytes[i] = raw[i] }
        }
        return e.bytes
    }

    /// An error reply; the message is cut to its cap (never refused) at a character boundary.
    public static func error(tag: UInt32, call: UInt16, rv: UInt64, message: String) -> [UInt8] {
        var m = message
        while m.utf8.count > Caps.errorMessage { m.removeLast() }
        m = String(m.unicodeScalars.filter { $0 != "\0" })
        return (try? encode(tag: tag, call: call, kind: .error, [.ulong(rv), .string(m)], as: errorFields)) ?? []
    }

    /// The header at the start of `bytes`, if 12 bytes are there; throws when it cannot
    /// be a frame of this protocol (kind unknown, body over the cap).
    public static func header(_ bytes: UnsafeRawBufferPointer) throws(WireError) -> FrameHeader? {
        guard bytes.count >= FrameHeader.size else { return nil }
        var d = WireDecoder(UnsafeRawBufferPointer(rebasing: bytes[0..<FrameHeader.size]))
        let length: UInt32 = try d.integer("length")
        let tag: UInt32 = try d.integer("tag")
        let call: UInt16 = try d.integer("call")
        let rawKind: UInt8 = try d.integer("kind")
        let zero: UInt8 = try d.integer("reserved")
        guard length <= Caps.frameBody else { throw WireError("length", "\(length) over the cap of \(Caps.frameBody)") }
        guard let kind = FrameHeader.Kind(rawValue: rawKind), zero == 0 else {
            throw WireError("kind", "unknown frame kind \(rawKind)/\(zero)")
        }
        return FrameHeader(bodyLength: length, tag: tag, call: call, kind: kind)
    }
}

/// Bytes read from the socket and not yet consumed. Its memory is manual so that nothing a
/// frame held (a PIN) is ever left behind: consumed frames are wiped, and so is the whole
/// buffer before it grows or is freed.
public final class FrameBuffer {
    private var storage: UnsafeMutableRawBufferPointer
    private var start = 0
    private var end = 0

    public init(capacity: Int = 64 << 10) {
        storage = .allocate(byteCount: capacity, alignment: 16)
        storage.initializeMemory(as: UInt8.self, repeating: 0)
    }

    deinit {
        wipe(storage)
        storage.deallocate()
    }

    private func wipe(_ region: UnsafeMutableRawBufferPointer) {
        guard let base = region.baseAddress, region.count > 0 else { return }
        #if canImport(Glibc)
            explicit_bzero(base, region.count)
        #else
            region.initializeMemory(as: UInt8.self, repeating: 0)
        #endif
    }

    /// Room for at least `count` more bytes, moving unread bytes to the front first.
    private func reserve(_ count: Int) {
        if start > 0 {
            let unread = end - start
            if unread > 0, let base = storage.baseAddress {
                memmove(base, base + start, unread)
            }
            wipe(UnsafeMutableRawBufferPointer(rebasing: storage[unread..<end]))
            start = 0
            end = unread
        }
        guard storage.count - end < count else { return }
        var size = storage.count
        while size - end < count { size *= 2 }
        let grown = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 16)
        grown.initializeMemory(as: UInt8.self, repeating: 0)
        if end > 0 { UnsafeMutableRawBufferPointer(rebasing: grown[0..<end]).copyMemory(from: UnsafeRawBufferPointer(rebasing: storage[0..<end])) }
        wipe(storage)
        storage.deallocate()
        storage = grown
    }

    /// One read(2) from `fd` into the buffer: >0 bytes read, 0 at end of stream, -1 with errno.
    /// Room grows with what arrives, 1 MiB at a time at most: a header that claims 16 MiB and
    /// then sends nothing costs the reader nothing like 16 MiB.
    public func read(from fd: Int32) -> Int {
        let want: Int
        if let needed = try? neededForNextFrame(), needed > 0 {
            want = Swift.min(Swift.max(needed, 4096), 1 << 20)
        } else {
            want = 64 << 10
        }
        reserve(want)
        let n = Glibc.read(fd, storage.baseAddress! + end, storage.count - end)
        if n > 0 { end += n }
        return n
    }

    /// Bytes still missing for the frame at the front (0 when it is complete).
    func neededForNextFrame() throws(WireError) -> Int {
        let unread = UnsafeRawBufferPointer(rebasing: UnsafeRawBufferPointer(storage)[start..<end])
        guard let header = try Frames.header(unread) else { return FrameHeader.size - unread.count }
        return Swift.max(0, FrameHeader.size + Int(header.bodyLength) - unread.count)
    }

    /// The complete frame at the front, if there is one; throws on a malformed header. The
    /// body is valid until `consume` is called.
    public func next() throws(WireError) -> (FrameHeader, UnsafeRawBufferPointer)? {
        let unread = UnsafeRawBufferPointer(rebasing: UnsafeRawBufferPointer(storage)[start..<end])
        guard let header = try Frames.header(unread), unread.count >= FrameHeader.size + Int(header.bodyLength) else {
            return nil
        }
        let body = UnsafeRawBufferPointer(rebasing: unread[FrameHeader.size..<FrameHeader.size + Int(header.bodyLength)])
        return (header, body)
    }

    /// Drops (and wipes) the frame `next` returned.
    public func consume(_ header: FrameHeader) {
        let size = FrameHeader.size + Int(header.bodyLength)
        wipe(UnsafeMutableRawBufferPointer(rebasing: storage[start..<start + size]))
        start += size
        if start == end {
            start = 0
            end = 0
        }
    }
}
