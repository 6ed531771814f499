/// The fast path's frames (dbus/README.md, "Fast path"): one request, one reply, each a
/// single SOCK_SEQPACKET message on a socket pair the daemon hands its caller over the bus.
/// It carries only what a signature or a decryption needs, in fixed little-endian fields,
/// so that neither side pays for D-Bus marshalling on the hottest path. Both decoders take
/// bytes from the other process and accept exactly one layout: every length is checked
/// against a cap and the lengths must add up to the frame.
public enum FastPathWire {
    /// Bytes of data (plus signature) one request may carry; larger operations take the
    /// D-Bus path. Socket buffers hold at least this much for one SEQPACKET message.
    public static let maxData = 64 * 1024
    public static let maxParameter = 1024
    public static let maxOutput = 64 * 1024
    public static let maxErrorName = 255
    public static let maxErrorMessage = 4096
    static let requestHeader = 44
    static let replyHeader = 16
    /// The largest frame either side ever sends or accepts.
    public static let maxFrame = requestHeader + maxParameter + maxData

    static let requestMagic: UInt32 = 0x3146_4350  // "PCF1"
    static let replyMagic: UInt32 = 0x3152_4350  // "PCR1"

    public enum Operation: UInt32, Sendable, CaseIterable {
        case sign = 1, decrypt = 2, verify = 3, encrypt = 4
    }

    public struct Request: Sendable, Equatable {
        public var operation: Operation
        public var session: UInt64
        public var mechanism: UInt64
        public var parameter: [UInt8]
        public var key: UInt64
        public var data: [UInt8]
        /// Verify only; empty otherwise.
        public var signature: [UInt8]

        public init(operation: Operation, session: UInt64, mechanism: UInt64, parameter: [UInt8], key: UInt64,
                    data: [UInt8], signature: [UInt8] = []) {
            self.operation = operation
            self.session = session
            self.mechanism = mechanism
            self.parameter = parameter
            self.key = key
            self.data = data
            self.signature = signature
        }

        /// False when the request is too large for a frame (the caller then uses D-Bus).
        public var fits: Bool {
            parameter.count <= FastPathWire.maxParameter && data.count + signature.count <= FastPathWire.maxData
                && (operation == .verify || signature.isEmpty)
        }
    }

    public enum Reply: Sendable, Equatable {
        case output([UInt8])
        /// A D-Bus error name and message, exactly as the D-Bus path would have replied.
        case error(name: String, message: String)
    }

    // MARK: requests

    /// nil when `request` does not fit a frame.
    public static func encode(_ request: Request) -> [UInt8]? {
        guard request.fits else { return nil }
        var out = [UInt8]()
        out.reserveCapacity(requestHeader + request.parameter.count + request.data.count + request.signature.count)
        put(&out, requestMagic)
        put(&out, request.operation.rawValue)
        put(&out, request.session)
        put(&out, request.mechanism)
        put(&out, request.key)
        put(&out, UInt32(request.parameter.count))
        put(&out, UInt32(request.data.count))
        put(&out, UInt32(request.signature.count))
        out += request.parameter
        out += request.data
        out += request.signature
        return out
    }

    public static func decodeRequest(_ frame: UnsafeRawBufferPointer) -> Request? {
        var r = Reader(frame)
        guard let magic = r.u32(), magic == requestMagic, let rawOp = r.u32(), let op = Operation(rawValue: rawOp),
            let session = r.u64(), let mechanism = r.u64(), let key = r.u64(),
            let parameterCount = r.u32(), let dataCount = r.u32(), let signatureCount = r.u32(),
            parameterCount <= maxParameter, UInt64(dataCount) + UInt64(signatureCount) <= UInt64(maxData),
            op == .verify || signatureCount == 0,
            UInt64(requestHeader) + UInt64(parameterCount) + UInt64(dataCount) + UInt64(signatureCount) == UInt64(frame.count),
            let parameter = r.bytes(Int(parameterCount)), let data = r.bytes(Int(dataCount)),
            let signature = r.bytes(Int(signatureCount))
        else { return nil }
        return Request(operation: op, session: session, mechanism: mechanism, parameter: parameter, key: key,
                       data: data, signature: signature)
    }

    // MARK: replies

    /// Caps an error's name and message (never fails: a message is cut, not refused).
    public static func encode(_ reply: Reply) -> [UInt8] {
        var out = [UInt8]()
        put(&out, replyMagic)
        switch reply {
        case .output(let bytes):
            let kept = bytes.prefix(maxOutput)
            put(&out, UInt32(0))
            put(&out, UInt32(kept.count))
            put(&out, UInt32(0))
            out += kept
        case .error(let name, let message):
            let n = Array(name.utf8.prefix(maxErrorName))
            var m = Array(message.utf8.prefix(maxErrorMessage))
            // A cut in the middle of a character would fail the peer's UTF-8 check.
            while !m.isEmpty && String(validating: m, as: UTF8.self) == nil { m.removeLast() }
            put(&out, UInt32(1))
            put(&out, UInt32(n.count))
            put(&out, UInt32(m.count))
            out += n
            out += m
        }
        return out
    }

    public static func decodeReply(_ frame: UnsafeRawBufferPointer) -> Reply? {
        var r = Reader(frame)
        guard let magic = r.u32(), magic == replyMagic, let status = r.u32(), let first = r.u32(),
            let second = r.u32(), UInt64(replyHeader) + UInt64(first) + UInt64(second) == UInt64(frame.count)
        else { return nil }
        switch status {
        case 0:
            guard second == 0, first <= maxOutput, let bytes = r.bytes(Int(first)) else { return nil }
            return .output(bytes)
        case 1:
            guard first > 0, first <= maxErrorName, second <= maxErrorMessage, let n = r.bytes(Int(first)),
                let m = r.bytes(Int(second)),
                n.allSatisfy({ isNameByte($0) }), let name = String(validating: n, as: UTF8.self),
                let message = String(validating: m, as: UTF8.self)
            else { return nil }
            return .error(name: name, message: message)
        default:
            return nil
        }
    }

    /// What a D-Bus error name is made of (letters, digits, '_', '.').
    static func isNameByte(_ b: UInt8) -> Bool {
        (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5A) || (b >= 0x61 && b <= 0x7A) || b == 0x5F || b == 0x2E
    }

    // MARK: fields

    static func put<T: FixedWidthInteger>(_ out: inout [UInt8], _ value: T) {
        withUnsafeBytes(of: value.littleEndian) { out += $0 }
    }

    struct Reader {
        let frame: UnsafeRawBufferPointer
        var offset = 0

        init(_ frame: UnsafeRawBufferPointer) { self.frame = frame }

        mutating func u32() -> UInt32? { integer() }
        mutating func u64() -> UInt64? { integer() }

        mutating func integer<T: FixedWidthInteger>() -> T? {
            let size = MemoryLayout<T>.size
            guard frame.count - offset >= size else { return nil }
            var value: T = 0
            withUnsafeMutableBytes(of: &value) { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: frame[offset..<offset + size])) }
            offset += size
            return T(littleEndian: value)
        }

        mutating func bytes(_ count: Int) -> [UInt8]? {
            guard count >= 0, frame.count - offset >= count else { return nil }
            defer { offset += count }
            return Array(frame[offset..<offset + count])
        }
    }
}
