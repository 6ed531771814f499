import CDBus
import Glibc

// Everything that walks a DBusMessageIter lives here: DBusValue <-> message body.

/// D-Bus type codes as libdbus's iterator functions take them (`DBUS_TYPE_*`).
enum TypeCode {
    static let invalid: Int32 = 0
    static let byte = Int32(UInt8(ascii: "y")), boolean = Int32(UInt8(ascii: "b"))
    static let int16 = Int32(UInt8(ascii: "n")), uint16 = Int32(UInt8(ascii: "q"))
    static let int32 = Int32(UInt8(ascii: "i")), uint32 = Int32(UInt8(ascii: "u"))
    static let int64 = Int32(UInt8(ascii: "x")), uint64 = Int32(UInt8(ascii: "t"))
    static let double = Int32(UInt8(ascii: "d")), string = Int32(UInt8(ascii: "s"))
    static let objectPath = Int32(UInt8(ascii: "o")), signature = Int32(UInt8(ascii: "g"))
    static let unixFD = Int32(UInt8(ascii: "h")), array = Int32(UInt8(ascii: "a"))
    static let variant = Int32(UInt8(ascii: "v")), structure = Int32(UInt8(ascii: "r"))
    static let dictEntry = Int32(UInt8(ascii: "e"))
}

enum Marshal {
    /// Libdbus itself refuses deeper bodies; this bound keeps our recursion finite even if it did not.
    static let maxDepth = 72

    /// Appends `values` to a message under construction. Values are validated first, as
    /// libdbus aborts the process on invalid input.
    static func append(_ values: [DBusValue], to message: OpaquePointer) -> DBusError? {
        if let problem = values.marshallingProblem() { return .invalidArgs("cannot marshal: \(problem)") }
        var iter = DBusMessageIter()
        dbus_message_iter_init_append(message, &iter)
        for value in values where !write(value, &iter) {
            return .noMemory("cannot marshal value of type '\(value.signature)'")
        }
        return nil
    }

    private static func write(_ value: DBusValue, _ iter: inout DBusMessageIter) -> Bool {
        // SAFETY: each append_basic receives a pointer to a local of exactly the C type
        // the type code names; libdbus copies the value before returning.
        switch value {
        case .byte(var v): return dbus_message_iter_append_basic(&iter, TypeCode.byte, &v) != 0
        case .boolean(let b):
            var v: dbus_bool_t = b ? 1 : 0
            return dbus_message_iter_append_basic(&iter, TypeCode.boolean, &v) != 0
        case .int16(var v): return dbus_message_iter_append_basic(&iter, TypeCode.int16, &v) != 0
        case .uint16(var v): return dbus_message_iter_append_basic(&iter, TypeCode.uint16, &v) != 0
        case .int32(var v): return dbus_message_iter_append_basic(&iter, TypeCode.int32, &v) != 0
        case .uint32(var v): return dbus_message_iter_append_basic(&iter, TypeCode.uint32, &v) != 0
        case .int64(var v): return dbus_message_iter_append_basic(&iter, TypeCode.int64, &v) != 0
        case .uint64(var v): return dbus_message_iter_append_basic(&iter, TypeCode.uint64, &v) != 0
        case .double(var v): return dbus_message_iter_append_basic(&iter, TypeCode.double, &v) != 0
        case .unixFD(var v): return dbus_message_iter_append_basic(&iter, TypeCode.unixFD, &v) != 0
        case .string(let s): return appendString(s, TypeCode.string, &iter)
        case .objectPath(let p): return appendString(p.rawValue, TypeCode.objectPath, &iter)
        case .signature(let g): return appendString(g, TypeCode.signature, &iter)
        case .bytes(let bytes):
            return container(TypeCode.array, "y", &iter) { sub in
                guard !bytes.isEmpty else { return true }
                return bytes.withUnsafeBufferPointer { buffer in
                    // SAFETY: append_fixed_array reads `count` bytes through the pointer
                    // stored in `base` and copies them before returning.
                    var base = buffer.baseAddress
                    return dbus_message_iter_append_fixed_array(&sub, TypeCode.byte, &base, Int32(buffer.count)) != 0
                }
            }
        case .array(let element, let values):
            return container(TypeCode.array, element, &iter) { sub in values.allSatisfy { write($0, &sub) } }
        case .dictionary(let key, let valueSignature, let entries):
            return container(TypeCode.array, "{" + key + valueSignature + "}", &iter) { sub in
                entries.allSatisfy { entry in
                    container(TypeCode.dictEntry, nil, &sub) { e in write(entry.key, &e) && write(entry.value, &e) }
                }
            }
        case .structure(let fields):
            return container(TypeCode.structure, nil, &iter) { sub in fields.allSatisfy { write($0, &sub) } }
        case .variant(let inner):
            return container(TypeCode.variant, inner.signature, &iter) { sub in write(inner, &sub) }
        }
    }

    private static func appendString(_ s: String, _ type: Int32, _ iter: inout DBusMessageIter) -> Bool {
        s.withCString { cString in
            // SAFETY: libdbus copies the NUL-terminated string before returning.
            var pointer: UnsafePointer<CChar>? = cString
            return dbus_message_iter_append_basic(&iter, type, &pointer) != 0
        }
    }

    private static func container(_ type: Int32, _ signature: String?, _ iter: inout DBusMessageIter,
                                  _ body: (inout DBusMessageIter) -> Bool) -> Bool {
        var sub = DBusMessageIter()
        let opened: Bool
        if let signature {
            opened = signature.withCString { dbus_message_iter_open_container(&iter, type, $0, &sub) } != 0
        } else {
            opened = dbus_message_iter_open_container(&iter, type, nil, &sub) != 0
        }
        guard opened else { return false }
        guard body(&sub) else {
            dbus_message_iter_abandon_container(&iter, &sub)
            return false
        }
        return dbus_message_iter_close_container(&iter, &sub) != 0
    }

    /// Decodes a whole message body. Top-level arguments whose index is in `placeholders`
    /// are not copied: `s` becomes `.string("")`, `ay` becomes `.bytes([])`.
    static func decode(_ message: OpaquePointer, placeholders: Set<Int> = []) -> Result<[DBusValue], DBusError> {
        var iter = DBusMessageIter()
        guard dbus_message_iter_init(message, &iter) != 0 else { return .success([]) }
        var values: [DBusValue] = []
        var index = 0
        while dbus_message_iter_get_arg_type(&iter) != TypeCode.invalid {
            let type = dbus_message_iter_get_arg_type(&iter)
            if placeholders.contains(index) && type == TypeCode.string {
                values.append(.string(""))
            } else if placeholders.contains(index) && type == TypeCode.array
                        && dbus_message_iter_get_element_type(&iter) == TypeCode.byte {
                values.append(.bytes([]))
            } else {
                guard let value = read(&iter, depth: 0) else {
                    return .failure(.invalidArgs("cannot decode argument \(index)"))
                }
                values.append(value)
            }
            index += 1
            _ = dbus_message_iter_next(&iter)
        }
        return .success(values)
    }

    private static func read(_ iter: inout DBusMessageIter, depth: Int) -> DBusValue? {
        guard depth < maxDepth else { return nil }
        let type = dbus_message_iter_get_arg_type(&iter)
        switch type {
        case TypeCode.byte: return .byte(basic(&iter, UInt8(0)))
        case TypeCode.boolean: return .boolean(basic(&iter, dbus_bool_t(0)) != 0)
        case TypeCode.int16: return .int16(basic(&iter, Int16(0)))
        case TypeCode.uint16: return .uint16(basic(&iter, UInt16(0)))
        case TypeCode.int32: return .int32(basic(&iter, Int32(0)))
        case TypeCode.uint32: return .uint32(basic(&iter, UInt32(0)))
        case TypeCode.int64: return .int64(basic(&iter, Int64(0)))
        case TypeCode.uint64: return .uint64(basic(&iter, UInt64(0)))
        case TypeCode.double: return .double(basic(&iter, Double(0)))
        // libdbus returns a dup of the descriptor: ownership passes to the value's holder.
        case TypeCode.unixFD: return .unixFD(basic(&iter, Int32(-1)))
        case TypeCode.string: return readString(&iter).map { .string($0) }
        case TypeCode.objectPath: return readString(&iter).flatMap(ObjectPath.init).map { .objectPath($0) }
        case TypeCode.signature: return readString(&iter).map { .signature($0) }
        case TypeCode.variant:
            var sub = DBusMessageIter()
            dbus_message_iter_recurse(&iter, &sub)
            return read(&sub, depth: depth + 1).map { .variant($0) }
        case TypeCode.structure:
            var sub = DBusMessageIter()
            dbus_message_iter_recurse(&iter, &sub)
            guard let fields = readAll(&sub, depth: depth + 1), !fields.isEmpty else { return nil }
            return .structure(fields)
        case TypeCode.array:
            return readArray(&iter, depth: depth)
        default:
            return nil
        }
    }

    private static func readArray(_ iter: inout DBusMessageIter, depth: Int) -> DBusValue? {
        guard let signature = currentSignature(&iter), signature.hasPrefix("a") else { return nil }
        let element = String(signature.dropFirst())
        var sub = DBusMessageIter()
        let elementType = dbus_message_iter_get_element_type(&iter)
        dbus_message_iter_recurse(&iter, &sub)
        if elementType == TypeCode.byte {
            // SAFETY: get_fixed_array points into the message's own buffer, valid while the
            // message lives; the bytes are copied into a Swift array at once.
            var base: UnsafeRawPointer? = nil
            var count: Int32 = 0
            dbus_message_iter_get_fixed_array(&sub, &base, &count)
            guard let base, count > 0 else { return .bytes([]) }
            return .bytes(Array(UnsafeRawBufferPointer(start: base, count: Int(count))))
        }
        if elementType == TypeCode.dictEntry {
            // element is "{kv}": one key code, then one complete value type.
            let inner = element.utf8.dropFirst().dropLast()
            guard let keyCode = inner.first else { return nil }
            let key = String(decoding: [keyCode], as: UTF8.self)
            let value = String(decoding: inner.dropFirst(), as: UTF8.self)
            var entries: [DBusDictEntry] = []
            while dbus_message_iter_get_arg_type(&sub) == TypeCode.dictEntry {
                var entryIter = DBusMessageIter()
                dbus_message_iter_recurse(&sub, &entryIter)
                guard let pair = readAll(&entryIter, depth: depth + 2), pair.count == 2 else { return nil }
                entries.append(DBusDictEntry(key: pair[0], value: pair[1]))
                _ = dbus_message_iter_next(&sub)
            }
            return .dictionary(keySignature: key, valueSignature: value, entries)
        }
        guard let elements = readAll(&sub, depth: depth + 1) else { return nil }
        return .array(elementSignature: element, elements)
    }

    private static func readAll(_ iter: inout DBusMessageIter, depth: Int) -> [DBusValue]? {
        var values: [DBusValue] = []
        while dbus_message_iter_get_arg_type(&iter) != TypeCode.invalid {
            guard let v = read(&iter, depth: depth) else { return nil }
            values.append(v)
            _ = dbus_message_iter_next(&iter)
        }
        return values
    }

    private static func basic<T>(_ iter: inout DBusMessageIter, _ initial: T) -> T {
        var value = initial
        // SAFETY: callers pass a T whose size matches the current argument's type code.
        withUnsafeMutableBytes(of: &value) { dbus_message_iter_get_basic(&iter, $0.baseAddress) }
        return value
    }

    private static func readString(_ iter: inout DBusMessageIter) -> String? {
        // SAFETY: the returned pointer is into the message buffer; copied at once.
        var pointer: UnsafePointer<CChar>? = nil
        dbus_message_iter_get_basic(&iter, &pointer)
        return pointer.map { String(cString: $0) }
    }

    private static func currentSignature(_ iter: inout DBusMessageIter) -> String? {
        guard let raw = dbus_message_iter_get_signature(&iter) else { return nil }
        defer { dbus_free(raw) }
        return String(cString: raw)
    }

    /// Calls `body` with the bytes of top-level argument `index` (an `s` without its NUL,
    /// or an `ay`) in place in the message's buffer, or with an empty buffer if that
    /// argument is neither.
    static func withArgumentBytes<R>(_ message: OpaquePointer, at index: Int,
                                     _ body: (UnsafeMutableRawBufferPointer) throws -> R) rethrows -> R {
        var iter = DBusMessageIter()
        var current = 0
        if index >= 0, dbus_message_iter_init(message, &iter) != 0 {
            while current < index, dbus_message_iter_next(&iter) != 0 { current += 1 }
            if current == index {
                let type = dbus_message_iter_get_arg_type(&iter)
                if type == TypeCode.string {
                    var pointer: UnsafeMutablePointer<CChar>? = nil
                    dbus_message_iter_get_basic(&iter, &pointer)
                    if let pointer {
                        // SAFETY: the string lives in the message body, which the caller
                        // keeps alive; strlen stops at the NUL libdbus guarantees.
                        return try body(UnsafeMutableRawBufferPointer(start: pointer, count: strlen(pointer)))
                    }
                } else if type == TypeCode.array && dbus_message_iter_get_element_type(&iter) == TypeCode.byte {
                    var sub = DBusMessageIter()
                    dbus_message_iter_recurse(&iter, &sub)
                    var base: UnsafeMutableRawPointer? = nil
                    var count: Int32 = 0
                    dbus_message_iter_get_fixed_array(&sub, &base, &count)
                    if let base, count > 0 {
                        // SAFETY: `count` bytes in the message body, alive as above.
                        return try body(UnsafeMutableRawBufferPointer(start: base, count: Int(count)))
                    }
                }
            }
        }
        return try body(UnsafeMutableRawBufferPointer(start: nil, count: 0))
    }
}
