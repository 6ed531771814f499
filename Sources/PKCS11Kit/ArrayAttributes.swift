import CPKCS11

/// Array attributes (`CKF_ARRAY_ATTRIBUTE`: `CKA_WRAP_TEMPLATE`, `CKA_UNWRAP_TEMPLATE`,
/// `CKA_DERIVE_TEMPLATE`, …) hold a template: an array of `CK_ATTRIBUTE` whose values sit
/// behind pointers. An `Attribute` of such a type carries the template *flattened* — per entry
/// its type and its value's length as little-endian u64s, then the value — so no pointer ever
/// travels; the C array is built only for the duration of one call (`withTemplate`), and read
/// back into the flattened form (`PKCS11Module.arrayAttribute`). One level only: an entry that is an
/// array attribute itself is refused going in and left out coming back.
public enum NestedTemplate {
    /// Most entries a nested template may hold either way.
    public static let maxEntries = 64

    public static func flatten(_ entries: [Attribute]) -> [UInt8] {
        var out: [UInt8] = []
        for entry in entries {
            for n in [UInt64(entry.type.rawValue), UInt64(entry.value.count)] {
                withUnsafeBytes(of: n.littleEndian) { out += $0 }
            }
            out += entry.value
        }
        return out
    }

    /// The entries of a flattened template, or nil when it is malformed: cut short, more than
    /// `maxEntries` entries, or an entry that is itself an array attribute.
    public static func parse(_ bytes: [UInt8]) -> [Attribute]? {
        var entries: [Attribute] = []
        var at = 0
        func u64() -> UInt64? {
            guard bytes.count - at >= 8 else { return nil }
            defer { at += 8 }
            return bytes[at..<at + 8].reversed().reduce(0) { $0 << 8 | UInt64($1) }
        }
        while at < bytes.count {
            guard entries.count < maxEntries, let type = u64(), let length = u64(), type <= UInt64(UInt.max),
                length <= UInt64(bytes.count - at)
            else { return nil }
            let attributeType = AttributeType(rawValue: UInt(type))
            guard !attributeType.isArray else { return nil }
            entries.append(Attribute(attributeType, Array(bytes[at..<at + Int(length)])))
            at += Int(length)
        }
        return entries
    }
}

extension AttributeType {
    /// Whether values of this type are templates (`CKF_ARRAY_ATTRIBUTE`).
    public var isArray: Bool { rawValue & UInt(CKF_ARRAY_ATTRIBUTE) != 0 }
}

extension PKCS11Module {
    /// One array attribute's value, flattened (NestedTemplate). PKCS#11 fills an array
    /// attribute in the caller's CK_ATTRIBUTE array: the types and lengths when the entries'
    /// pValue are NULL, the values too when they are not. So: a zeroed array of `maxEntries`
    /// entries for the types and lengths (not the length query, which SoftHSM 2.6 answers
    /// with 0), then buffers of those lengths for the values.
    func arrayAttribute(_ s: SessionHandle, _ object: ObjectHandle, _ type: AttributeType) throws -> AttributeResult {
        let name = "C_GetAttributeValue"
        let accepting: [ReturnValue] = [.attributeSensitive, .attributeTypeInvalid, .bufferTooSmall]
        let entrySize = MemoryLayout<CK_ATTRIBUTE>.stride
        let empty = CK_ATTRIBUTE(type: 0, pValue: nil, ulValueLen: 0)
        func fetch(_ inner: inout [CK_ATTRIBUTE]) throws -> (ReturnValue, CK_ULONG) {
            try inner.withUnsafeMutableBytes { entries in
                var outer = CK_ATTRIBUTE(type: type.rawValue, pValue: entries.baseAddress, ulValueLen: CK_ULONG(entries.count))
                let rv = try call(name, \.C_GetAttributeValue, accepting: accepting) { f in
                    f(s.rawValue, object.rawValue, &outer, 1)
                }
                return (rv, outer.ulValueLen)
            }
        }
        for _ in 0..<4 {
            var inner = Array(repeating: empty, count: NestedTemplate.maxEntries)
            let (rv, length) = try fetch(&inner)
            // Too small for maxEntries entries: more than this side carries.
            if rv == .bufferTooSmall { throw PKCS11Error(rv: .generalError, function: name) }
            if rv != .ok { return AttributeResult(type: type, status: rv, value: []) }
            guard length % CK_ULONG(entrySize) == 0, length <= CK_ULONG(inner.count * entrySize) else {
                throw PKCS11Error(rv: .generalError, function: name)
            }
            inner.removeLast(inner.count - Int(length) / entrySize)
            let lengths = inner.map(\.ulValueLen)
            guard lengths.allSatisfy({ $0 <= CK_ULONG(Self.maxLength) }),
                lengths.reduce(0, { $0 + Int($1) }) <= Self.maxLength
            else { throw PKCS11Error(rv: .generalError, function: name) }
            // SAFETY: one zeroed buffer carved into the entries' values; freed after the
            // values have been copied out.
            let total = lengths.reduce(0) { $0 + Int($1) }
            let storage = UnsafeMutableRawBufferPointer.allocate(byteCount: max(total, 1), alignment: 16)
            defer { storage.deallocate() }
            storage.initializeMemory(as: UInt8.self, repeating: 0)
            var offset = 0
            for i in inner.indices {
                inner[i].pValue = storage.baseAddress! + offset
                offset += Int(lengths[i])
            }
            let (again, _) = try fetch(&inner)
            // The object changed between the two calls: start over.
            if again == .bufferTooSmall { continue }
            if again != .ok { return AttributeResult(type: type, status: again, value: []) }
            var entries: [Attribute] = []
            for (entry, size) in zip(inner, lengths) where !AttributeType(rawValue: entry.type).isArray {
                guard entry.ulValueLen <= size, let p = entry.pValue else { throw PKCS11Error(rv: .generalError, function: name) }
                entries.append(
                    Attribute(AttributeType(rawValue: entry.type), Array(UnsafeRawBufferPointer(start: p, count: Int(entry.ulValueLen)))))
            }
            return AttributeResult(type: type, status: .ok, value: NestedTemplate.flatten(entries))
        }
        throw PKCS11Error(rv: .bufferTooSmall, function: name)
    }
}
