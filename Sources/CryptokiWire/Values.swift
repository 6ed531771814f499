/// The proxy's RPC (dbus/README.md, "The Cryptoki wire"): the types every request and reply
/// field is made of, and the one encoder and decoder, both driven by a field list from the
/// call table (`Calls.swift`). Little-endian throughout: the two ends are on one machine,
/// but a fixed order keeps the format a format. Pure Swift: the daemon, the proxy, the fuzz
/// target and the tests share it.

/// What a field holds, with its cap. Every length and count is checked against its cap on
/// both sides, and a value must use up its frame exactly.
public indirect enum FieldType: Sendable, Equatable {
    /// A CK_ULONG, handle, flag word or enum: 8 bytes.
    case ulong
    /// u32 length, then the bytes.
    case bytes(max: Int)
    /// Like `bytes`, but a secret (a PIN): the daemon takes it in place from its receive
    /// buffer into locked memory, and wipes the buffer; it never becomes a Swift array.
    case secret(max: Int)
    /// u32 length, then UTF-8 without NUL.
    case string(max: Int)
    /// u32 count, then the elements.
    case array(FieldType, max: Int)
    /// The fields one after the other.
    case record([Field])
}

public struct Field: Sendable, Equatable {
    public let name: String
    public let type: FieldType
    public init(_ name: String, _ type: FieldType) {
        self.name = name
        self.type = type
    }
}

/// A decoded (or to-be-encoded) value.
public indirect enum WireValue: Sendable, Equatable {
    case ulong(UInt64)
    case bytes([UInt8])
    case string(String)
    case array([WireValue])
    case record([WireValue])
    /// A secret as the daemon decodes it: the index its `secret` sink returned.
    case secret(Int)

    public var ulongValue: UInt64? {
        if case .ulong(let v) = self { return v }
        return nil
    }
    public var bytesValue: [UInt8]? {
        if case .bytes(let v) = self { return v }
        return nil
    }
    public var stringValue: String? {
        if case .string(let v) = self { return v }
        return nil
    }
    public var arrayValues: [WireValue]? {
        if case .array(let v) = self { return v }
        return nil
    }
    public var recordFields: [WireValue]? {
        if case .record(let v) = self { return v }
        return nil
    }
}

/// Why bytes were refused: which field, and what was wrong. Never includes the bytes.
public struct WireError: Error, Sendable, Equatable, CustomStringConvertible {
    public let field: String
    public let reason: String
    public init(_ field: String, _ reason: String) {
        self.field = field
        self.reason = reason
    }
    public var description: String { "\(field): \(reason)" }
}

// MARK: - Encoding

public struct WireEncoder {
    public var bytes: [UInt8] = []

    public init(reserving capacity: Int = 0) { bytes.reserveCapacity(capacity) }

    public mutating func put<T: FixedWidthInteger>(_ value: T) {
        withUnsafeBytes(of: value.littleEndian) { bytes += $0 }
    }

    /// Appends `values` as `fields` say; refuses a value of the wrong kind or over its cap, so
    /// neither side ever sends what the other must refuse.
    public mutating func encode(_ values: [WireValue], as fields: [Field]) throws(WireError) {
        guard values.count == fields.count else {
            throw WireError(fields.map(\.name).joined(separator: ","), "\(values.count) values for \(fields.count) fields")
        }
        for (value, field) in zip(values, fields) { try encode(value, field.type, field.name) }
    }

    mutating func encode(_ value: WireValue, _ type: FieldType, _ name: String) throws(WireError) {
        switch (type, value) {
        case (.ulong, .ulong(let v)):
            put(v)
        case (.bytes(let max), .bytes(let b)), (.secret(let max), .bytes(let b)):
            guard b.count <= max else { throw WireError(name, "\(b.count) bytes, at most \(max)") }
            put(UInt32(b.count))
            bytes += b
        case (.string(let max), .string(let s)):
            let utf8 = s.utf8
            guard utf8.count <= max else { throw WireError(name, "\(utf8.count) bytes of text, at most \(max)") }
            guard !utf8.contains(0) else { throw WireError(name, "text holds a NUL") }
            put(UInt32(utf8.count))
            bytes += utf8
        case (.array(let element, let max), .array(let items)):
            guard items.count <= max else { throw WireError(name, "\(items.count) elements, at most \(max)") }
            put(UInt32(items.count))
            for item in items { try encode(item, element, name) }
        case (.record(let fields), .record(let items)):
            guard items.count == fields.count else { throw WireError(name, "record of \(items.count), expected \(fields.count)") }
            for (item, field) in zip(items, fields) { try encode(item, field.type, name + "." + field.name) }
        default:
            throw WireError(name, "value does not match the declared type")
        }
    }

}

// MARK: - Decoding

public struct WireDecoder {
    let buffer: UnsafeRawBufferPointer
    public private(set) var offset = 0
    /// Receives each secret in place (daemon); nil decodes secrets as `bytes` (tests, tools).
    let secret: ((UnsafeRawBufferPointer) throws -> Int)?

    public init(_ buffer: UnsafeRawBufferPointer, secret: ((UnsafeRawBufferPointer) throws -> Int)? = nil) {
        self.buffer = buffer
        self.secret = secret
    }

    public var remaining: Int { buffer.count - offset }

    public mutating func integer<T: FixedWidthInteger>(_ name: String) throws(WireError) -> T {
        let size = MemoryLayout<T>.size
        guard remaining >= size else { throw WireError(name, "frame ends inside a number") }
        var value: T = 0
        withUnsafeMutableBytes(of: &value) {
            $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: buffer[offset..<offset + size]))
        }
        offset += size
        return T(littleEndian: value)
    }

    /// A length or count, checked against its cap and against what is left of the frame
    /// (each element takes at least `minimumSize` bytes) before anything is allocated.
    mutating func count(_ name: String, max: Int, minimumSize: Int) throws(WireError) -> Int {
        let n: UInt32 = try integer(name)
        guard n <= max else { throw WireError(name, "\(n) over the cap of \(max)") }
        guard Int(n) * minimumSize <= remaining else { throw WireError(name, "\(n) runs past the end of the frame") }
        return Int(n)
    }

    /// Decodes `fields` and requires the frame to end exactly there.
    public mutating func decodeAll(_ fields: [Field]) throws(WireError) -> [WireValue] {
        var out: [WireValue] = []
        out.reserveCapacity(fields.count)
        for field in fields { out.append(try decode(field.type, field.name)) }
        guard remaining == 0 else { throw WireError("frame", "\(remaining) bytes after the last field") }
        return out
    }

    mutating func decode(_ type: FieldType, _ name: String) throws(WireError) -> WireValue {
        switch type {
        case .ulong:
            return .ulong(try integer(name))
        case .bytes(let max):
            let n = try count(name, max: max, minimumSize: 1)
            defer { offset += n }
            return .bytes(Array(buffer[offset..<offset + n]))
        case .secret(let max):
            let n = try count(name, max: max, minimumSize: 1)
            defer { offset += n }
            let slice = UnsafeRawBufferPointer(rebasing: buffer[offset..<offset + n])
            guard let secret else { return .bytes(Array(slice)) }
            do {
                return .secret(try secret(slice))
            } catch {
                throw WireError(name, "secret refused: \(error)")
            }
        case .string(let max):
            let n = try count(name, max: max, minimumSize: 1)
            let raw = UnsafeRawBufferPointer(rebasing: buffer[offset..<offset + n])
            guard !raw.contains(0), let s = String(validating: raw, as: UTF8.self) else {
                throw WireError(name, "not UTF-8 text without NUL")
            }
            offset += n
            return .string(s)
        case .array(let element, let max):
            let n = try count(name, max: max, minimumSize: element.minimumSize)
            var items: [WireValue] = []
            items.reserveCapacity(n)
            for _ in 0..<n { items.append(try decode(element, name)) }
            return .array(items)
        case .record(let fields):
            var items: [WireValue] = []
            items.reserveCapacity(fields.count)
            for field in fields { items.append(try decode(field.type, name + "." + field.name)) }
            return .record(items)
        }
    }
}

extension FieldType {
    /// The fewest bytes a value of this type takes: bounds counts before allocating.
    var minimumSize: Int {
        switch self {
        case .ulong: 8
        case .bytes, .secret, .string, .array: 4
        case .record(let fields): Swift.max(1, fields.reduce(0) { $0 + $1.type.minimumSize })
        }
    }
}
