/// One D-Bus value of any type, as sent or received.
///
/// Arrays carry their element signature so that empty arrays keep their type. `ay` has
/// its own case (`bytes`) because it is by far the most common array and libdbus can
/// copy it in one go; received `ay` values always decode as `.bytes`.
public indirect enum DBusValue: Sendable, Hashable {
    case byte(UInt8), boolean(Bool), int16(Int16), uint16(UInt16), int32(Int32),
         uint32(UInt32), int64(Int64), uint64(UInt64), double(Double)
    case string(String), objectPath(ObjectPath), signature(String)
    /// A file descriptor this value's holder owns: received descriptors are dup'ed by
    /// libdbus and must be closed by whoever takes the value; sending dups it again.
    case unixFD(Int32)
    /// `ay`.
    case bytes([UInt8])
    /// Any array other than `ay` and dictionaries; every element must have `elementSignature`.
    case array(elementSignature: String, [DBusValue])
    /// `a{kv}`.
    case dictionary(keySignature: String, valueSignature: String, [DBusDictEntry])
    case structure([DBusValue])
    case variant(DBusValue)

    /// The D-Bus type signature of this value (one complete type).
    public var signature: String {
        switch self {
        case .byte: "y"
        case .boolean: "b"
        case .int16: "n"
        case .uint16: "q"
        case .int32: "i"
        case .uint32: "u"
        case .int64: "x"
        case .uint64: "t"
        case .double: "d"
        case .string: "s"
        case .objectPath: "o"
        case .signature: "g"
        case .unixFD: "h"
        case .bytes: "ay"
        case .array(let element, _): "a" + element
        case .dictionary(let key, let value, _): "a{" + key + value + "}"
        case .structure(let fields): "(" + fields.map(\.signature).joined() + ")"
        case .variant: "v"
        }
    }

    /// `a{sv}` with every value wrapped in `.variant` and keys sorted, so equal
    /// dictionaries always marshal to equal bytes.
    public static func vardict(_ d: [String: DBusValue]) -> DBusValue {
        .dictionary(keySignature: "s", valueSignature: "v",
                    d.sorted { $0.key < $1.key }.map { DBusDictEntry(key: .string($0.key), value: .variant($0.value)) })
    }

    public var stringValue: String? { if case .string(let v) = self { v } else { nil } }
    public var boolValue: Bool? { if case .boolean(let v) = self { v } else { nil } }
    public var uint32Value: UInt32? { if case .uint32(let v) = self { v } else { nil } }
    public var int32Value: Int32? { if case .int32(let v) = self { v } else { nil } }
    public var uint64Value: UInt64? { if case .uint64(let v) = self { v } else { nil } }
    /// `ay`, whether it arrived as `.bytes` or as an `.array` of `.byte`.
    public var bytesValue: [UInt8]? {
        switch self {
        case .bytes(let v): return v
        case .array("y", let elements):
            var out: [UInt8] = []
            for case .byte(let b) in elements { out.append(b) }
            return out.count == elements.count ? out : nil
        default: return nil
        }
    }
    public var objectPathValue: ObjectPath? { if case .objectPath(let v) = self { v } else { nil } }
    /// Elements of any array (`.bytes` included, as `.byte` values; dictionaries excluded).
    public var arrayValues: [DBusValue]? {
        switch self {
        case .array(_, let v): v
        case .bytes(let b): b.map { .byte($0) }
        default: nil
        }
    }
    public var variantValue: DBusValue? { if case .variant(let v) = self { v } else { nil } }
    /// An `a{sv}` as a Swift dictionary, variants unwrapped; nil for anything else.
    public var vardictValue: [String: DBusValue]? {
        guard case .dictionary("s", "v", let entries) = self else { return nil }
        var out: [String: DBusValue] = [:]
        for entry in entries {
            guard let key = entry.key.stringValue, let value = entry.value.variantValue else { return nil }
            out[key] = value
        }
        return out
    }
    /// Fields of a struct.
    public var structFields: [DBusValue]? { if case .structure(let v) = self { v } else { nil } }
    /// Entries of any dictionary.
    public var dictionaryEntries: [DBusDictEntry]? {
        if case .dictionary(_, _, let v) = self { v } else { nil }
    }

    /// Why this value cannot be marshalled (nil if it can): libdbus aborts on invalid
    /// input, so values are checked completely before the first byte is written.
    func marshallingProblem(depth: Int = 0) -> String? {
        guard depth < 64 else { return "nesting too deep" }
        switch self {
        case .string(let s):
            return s.utf8.contains(0) ? "string contains NUL" : nil
        case .signature(let g):
            return DBusNames.isValidSignature(g) ? nil : "invalid signature '\(g)'"
        case .array(let element, let values):
            guard DBusNames.isSingleCompleteType(element), !element.hasPrefix("{") else {
                return "invalid array element signature '\(element)'"
            }
            for value in values {
                if value.signature != element { return "array element '\(value.signature)' in 'a\(element)'" }
                if let p = value.marshallingProblem(depth: depth + 1) { return p }
            }
            return nil
        case .dictionary(let key, let valueSig, let entries):
            guard DBusNames.isBasicType(key), DBusNames.isSingleCompleteType(valueSig) else {
                return "invalid dictionary signature 'a{\(key)\(valueSig)}'"
            }
            for entry in entries {
                if entry.key.signature != key || entry.value.signature != valueSig {
                    return "dictionary entry '{\(entry.key.signature)\(entry.value.signature)}' in 'a{\(key)\(valueSig)}'"
                }
                if let p = entry.key.marshallingProblem(depth: depth + 1) ?? entry.value.marshallingProblem(depth: depth + 1) {
                    return p
                }
            }
            return nil
        case .structure(let fields):
            if fields.isEmpty { return "empty struct" }
            for field in fields { if let p = field.marshallingProblem(depth: depth + 1) { return p } }
            return nil
        case .variant(let inner):
            return inner.marshallingProblem(depth: depth + 1)
        default:
            return nil
        }
    }
}

/// One entry of a D-Bus dictionary (`{kv}`).
public struct DBusDictEntry: Sendable, Hashable {
    public var key: DBusValue
    public var value: DBusValue
    public init(key: DBusValue, value: DBusValue) {
        self.key = key
        self.value = value
    }
}

extension [DBusValue] {
    /// The concatenated signature of a message body.
    var signature: String { map(\.signature).joined() }

    /// Why these values cannot be sent as one message body, or nil.
    func marshallingProblem() -> String? {
        for value in self { if let p = value.marshallingProblem() { return p } }
        let sig = signature
        return DBusNames.isValidSignature(sig) ? nil : "invalid body signature '\(sig)'"
    }
}
