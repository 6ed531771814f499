import CPKCS11
import CryptokiWire
import Glibc

// C arguments -> wire values (CryptokiWire's table gives their caps). Every pointer and length the application hands over is
// checked here before it is read; a length is compared with its cap before it becomes
// an Int, so no conversion can trap.

enum Codec {
    /// The bytes of a (pointer, length) pair; NULL is fine only with length 0.
    static func bytes(_ pointer: UnsafePointer<CK_BYTE>?, _ length: CK_ULONG, max: Int = Caps.data,
                      tooLong: CKError = CKError(CKR_DATA_LEN_RANGE)) throws(CKError) -> [UInt8] {
        guard length > 0 else { return [] }
        guard let pointer else { throw .argumentsBad }
        guard length <= CK_ULONG(max) else { throw tooLong }
        // SAFETY: the application promises `length` readable bytes at `pointer`
        // (PKCS#11's contract for every (pointer, length) pair); we copy them at once.
        return Array(UnsafeBufferPointer(start: pointer, count: Int(length)))
    }

    /// A PIN as the wire carries it: UTF-8 without NUL, at most `Caps.pin` bytes. NULL
    /// with length 0 is the empty PIN (protected authentication path). The caller wipes it.
    static func pin(_ pointer: UnsafePointer<CK_UTF8CHAR>?, _ length: CK_ULONG) throws(CKError) -> [UInt8] {
        guard length > 0 else { return [] }
        guard let pointer else { throw .argumentsBad }
        guard length <= CK_ULONG(Caps.pin) else { throw CKError(CKR_PIN_LEN_RANGE) }
        // SAFETY: `length` bytes at `pointer`, as above.
        let raw = UnsafeBufferPointer(start: pointer, count: Int(length))
        guard !raw.contains(0), isUTF8(raw) else { throw CKError(CKR_PIN_INVALID) }
        return Array(raw)
    }

    /// UTF-8 well-formedness, checked without making a String (which would leave a copy of
    /// the PIN on the heap, unwiped).
    static func isUTF8(_ bytes: UnsafeBufferPointer<UInt8>) -> Bool {
        var i = 0
        while i < bytes.count {
            let b = bytes[i]
            let (length, minimum): (Int, UInt32) =
                b < 0x80 ? (1, 0) : b & 0xE0 == 0xC0 ? (2, 0x80) : b & 0xF0 == 0xE0 ? (3, 0x800) : b & 0xF8 == 0xF0 ? (4, 0x10000) : (0, 0)
            guard length > 0, i + length <= bytes.count else { return false }
            var scalar = length == 1 ? UInt32(b) : UInt32(b) & (0xFF >> (length + 1))
            for j in 1..<max(length, 1) {
                let c = bytes[i + j]
                guard c & 0xC0 == 0x80 else { return false }
                scalar = scalar << 6 | UInt32(c & 0x3F)
            }
            guard scalar >= minimum, scalar <= 0x10FFFF, !(0xD800...0xDFFF).contains(scalar) else { return false }
            i += length
        }
        return true
    }

    /// Overwrites a PIN copy once it has been sent.
    static func wipe(_ bytes: inout [UInt8]) {
        bytes.withUnsafeMutableBytes { raw in if let base = raw.baseAddress { explicit_bzero(base, raw.count) } }
    }

    /// A template: (type, value) records.
    static func template(_ pointer: UnsafePointer<CK_ATTRIBUTE>?, _ count: CK_ULONG) throws(CKError) -> WireValue {
        guard count > 0 else { return .array([]) }
        guard let pointer else { throw .argumentsBad }
        guard count <= CK_ULONG(Caps.templateEntries) else { throw .argumentsBad }
        var items: [WireValue] = []
        for attribute in UnsafeBufferPointer(start: pointer, count: Int(count)) {
            let value =
                attribute.type & CK_ULONG(CKF_ARRAY_ATTRIBUTE) != 0
                ? try nestedTemplate(attribute)
                : try bytes(attribute.pValue?.assumingMemoryBound(to: CK_BYTE.self), attribute.ulValueLen,
                            max: Caps.attributeValue, tooLong: .argumentsBad)
            items.append(.record([.ulong(UInt64(attribute.type)), .bytes(value)]))
        }
        return .array(items)
    }

    /// An array attribute's value (CKA_WRAP_TEMPLATE, …): the CK_ATTRIBUTE array it points
    /// at, flattened (NestedTemplates), since its values sit behind pointers of their own.
    static func nestedTemplate(_ attribute: CK_ATTRIBUTE) throws(CKError) -> [UInt8] {
        let entrySize = CK_ULONG(MemoryLayout<CK_ATTRIBUTE>.stride)
        guard attribute.ulValueLen % entrySize == 0, attribute.ulValueLen / entrySize <= CK_ULONG(NestedTemplates.maxEntries)
        else { throw CKError(CKR_ATTRIBUTE_VALUE_INVALID) }
        let count = Int(attribute.ulValueLen / entrySize)
        guard count == 0 || attribute.pValue != nil else { throw .argumentsBad }
        var entries: [(type: UInt64, value: [UInt8])] = []
        // SAFETY: the application says pValue holds ulValueLen bytes of CK_ATTRIBUTE entries
        // (count checked against its cap); each entry's value is read as any other.
        let inner = UnsafeBufferPointer(start: attribute.pValue?.assumingMemoryBound(to: CK_ATTRIBUTE.self), count: count)
        for entry in inner {
            guard UInt64(entry.type) & NestedTemplates.arrayFlag == 0 else { throw CKError(CKR_ATTRIBUTE_VALUE_INVALID) }
            entries.append(
                (UInt64(entry.type),
                 try bytes(entry.pValue?.assumingMemoryBound(to: CK_BYTE.self), entry.ulValueLen, max: Caps.attributeValue,
                           tooLong: .argumentsBad)))
        }
        let flat = NestedTemplates.flatten(entries)
        guard flat.count <= Caps.attributeValue else { throw .argumentsBad }
        return flat
    }

    /// Attribute types of a template, for GetAttributes.
    static func types(_ pointer: UnsafeMutablePointer<CK_ATTRIBUTE>?, _ count: CK_ULONG) throws(CKError) -> [CK_ATTRIBUTE_TYPE] {
        guard count > 0 else { return [] }
        guard let pointer else { throw .argumentsBad }
        guard count <= CK_ULONG(Caps.templateEntries) else { throw .argumentsBad }
        return UnsafeBufferPointer(start: pointer, count: Int(count)).map(\.type)
    }

    static let oaepMechanisms: Set<CK_MECHANISM_TYPE> = [CK_MECHANISM_TYPE(CKM_RSA_PKCS_OAEP), 0x4002 /* CKM_RSA_PKCS_OAEP_TPM_1_1 */]
    static let oaepParamsSize = 5 * MemoryLayout<CK_ULONG>.size
    static let ecdh1Mechanisms: Set<CK_MECHANISM_TYPE> = [CK_MECHANISM_TYPE(CKM_ECDH1_DERIVE), CK_MECHANISM_TYPE(CKM_ECDH1_COFACTOR_DERIVE)]
    /// `CKM_*_ECB_ENCRYPT_DATA` take a CK_KEY_DERIVATION_STRING_DATA; `CKM_*_CBC_ENCRYPT_DATA` a
    /// CK_DES/AES_CBC_ENCRYPT_DATA_PARAMS (IV, pData, length), here by their IV's size.
    static let derivationStringMechanisms: Set<CK_MECHANISM_TYPE> = [
        CK_MECHANISM_TYPE(CKM_DES_ECB_ENCRYPT_DATA), CK_MECHANISM_TYPE(CKM_DES3_ECB_ENCRYPT_DATA),
        CK_MECHANISM_TYPE(CKM_AES_ECB_ENCRYPT_DATA),
    ]
    static let cbcEncryptDataIVs: [CK_MECHANISM_TYPE: Int] = [
        CK_MECHANISM_TYPE(CKM_DES_CBC_ENCRYPT_DATA): 8, CK_MECHANISM_TYPE(CKM_DES3_CBC_ENCRYPT_DATA): 8,
        CK_MECHANISM_TYPE(CKM_AES_CBC_ENCRYPT_DATA): 16,
    ]

    /// A parameter structure with pointers, as the wire carries it (dbus/README.md): its
    /// numbers, then each byte string's length, as little-endian 64-bit integers, then the
    /// byte strings themselves.
    static func flattened(_ numbers: [CK_ULONG], _ strings: [(UnsafeMutablePointer<CK_BYTE>?, CK_ULONG)]) throws(CKError)
        -> [UInt8]
    {
        var out: [UInt8] = []
        for n in numbers + strings.map(\.1) { withUnsafeBytes(of: UInt64(n).littleEndian) { out += $0 } }
        for (pointer, length) in strings {
            out += try bytes(UnsafePointer(pointer), length, max: Caps.mechanismParameter - out.count,
                             tooLong: CKError(CKR_MECHANISM_PARAM_INVALID))
        }
        return out
    }

    /// A mechanism: its type and parameter bytes. Parameters with pointers are flattened
    /// (dbus/README.md); any other goes as the bytes the application gave, and the daemon
    /// (MechanismParameters, the one check) takes only pointer-free ones. A parameter the
    /// mechanism needs and does not have, or one of the wrong size, is refused here, at Init
    /// (issue 13 §5), with PKCS#11's CKR_MECHANISM_PARAM_INVALID.
    static func mechanism(_ pointer: UnsafePointer<CK_MECHANISM>?) throws(CKError) -> (CK_MECHANISM_TYPE, WireValue) {
        guard let mechanism = pointer?.pointee else { throw .argumentsBad }
        let type = mechanism.mechanism
        let length = mechanism.ulParameterLen
        guard length == 0 || mechanism.pParameter != nil else { throw .argumentsBad }
        var parameter: [UInt8] = []
        if Codec.oaepMechanisms.contains(type), let raw = mechanism.pParameter {
            guard length == CK_ULONG(oaepParamsSize) else { throw CKError(CKR_MECHANISM_PARAM_INVALID) }
            // SAFETY: the application says `raw` is a CK_RSA_PKCS_OAEP_PARAMS (length
            // checked): hashAlg, mgf, source, pSourceData, ulSourceDataLen.
            let fixed = UnsafeRawBufferPointer(start: raw, count: 3 * MemoryLayout<CK_ULONG>.size)
            let sourceData = raw.load(fromByteOffset: 3 * MemoryLayout<CK_ULONG>.size, as: UnsafePointer<CK_BYTE>?.self)
            let sourceLength = raw.load(fromByteOffset: 4 * MemoryLayout<CK_ULONG>.size, as: CK_ULONG.self)
            parameter = Array(fixed)
            parameter += try bytes(sourceData, sourceLength, max: Caps.mechanismParameter - parameter.count,
                                   tooLong: CKError(CKR_MECHANISM_PARAM_INVALID))
        } else if type == CK_MECHANISM_TYPE(CKM_AES_GCM), let raw = mechanism.pParameter {
            guard length == CK_ULONG(MemoryLayout<CK_GCM_PARAMS>.size) else { throw CKError(CKR_MECHANISM_PARAM_INVALID) }
            // SAFETY: the application says `raw` is a CK_GCM_PARAMS (length checked).
            let p = raw.load(as: CK_GCM_PARAMS.self)
            parameter = try flattened(
                [p.ulIvBits, p.ulTagBits], [(p.pIv, p.ulIvLen), (p.pAAD, p.ulAADLen)])
        } else if Codec.ecdh1Mechanisms.contains(type), let raw = mechanism.pParameter {
            guard length == CK_ULONG(MemoryLayout<CK_ECDH1_DERIVE_PARAMS>.size) else {
                throw CKError(CKR_MECHANISM_PARAM_INVALID)
            }
            // SAFETY: the application says `raw` is a CK_ECDH1_DERIVE_PARAMS (length checked).
            let p = raw.load(as: CK_ECDH1_DERIVE_PARAMS.self)
            parameter = try flattened([p.kdf], [(p.pSharedData, p.ulSharedDataLen), (p.pPublicData, p.ulPublicDataLen)])
        } else if Codec.derivationStringMechanisms.contains(type), let raw = mechanism.pParameter {
            guard length == CK_ULONG(MemoryLayout<CK_KEY_DERIVATION_STRING_DATA>.size) else {
                throw CKError(CKR_MECHANISM_PARAM_INVALID)
            }
            // SAFETY: the application says `raw` is a CK_KEY_DERIVATION_STRING_DATA (length checked).
            let p = raw.load(as: CK_KEY_DERIVATION_STRING_DATA.self)
            parameter = try flattened([], [(p.pData, p.ulLen)])
        } else if let ivSize = Codec.cbcEncryptDataIVs[type], let raw = mechanism.pParameter {
            // The IV (8 or 16 bytes), then pData and length, each aligned to 8.
            guard length == CK_ULONG(ivSize + 2 * MemoryLayout<CK_ULONG>.size) else {
                throw CKError(CKR_MECHANISM_PARAM_INVALID)
            }
            // SAFETY: the application says `raw` is a CK_DES/AES_CBC_ENCRYPT_DATA_PARAMS (length
            // checked against its layout).
            let data = raw.load(fromByteOffset: ivSize, as: UnsafeMutablePointer<CK_BYTE>?.self)
            let dataLength = raw.load(fromByteOffset: ivSize + MemoryLayout<CK_ULONG>.size, as: CK_ULONG.self)
            parameter = try flattened([], [(raw.assumingMemoryBound(to: CK_BYTE.self), CK_ULONG(ivSize)), (data, dataLength)])
        } else if length > 0 {
            // A pointer-free structure or IV: its size is the wire's to check, here at Init.
            if let size = MechanismParameterRules.rawSizes[UInt64(type)], length != CK_ULONG(size) {
                throw CKError(CKR_MECHANISM_PARAM_INVALID)
            }
            parameter = try bytes(mechanism.pParameter?.assumingMemoryBound(to: CK_BYTE.self), length,
                                  max: Caps.mechanismParameter, tooLong: CKError(CKR_MECHANISM_PARAM_INVALID))
        } else if MechanismParameterRules.required.contains(UInt64(type)) {
            throw CKError(CKR_MECHANISM_PARAM_INVALID)
        }
        return (type, .record([.ulong(UInt64(type)), .bytes(parameter)]))
    }

    /// PKCS#11's output convention for one result: NULL buffer = length query (result
    /// kept by the caller), too small = CKR_BUFFER_TOO_SMALL (also kept), else copied.
    /// Returns true when the result was delivered.
    static func deliver(_ result: [UInt8], to buffer: UnsafeMutablePointer<CK_BYTE>?,
                        length: UnsafeMutablePointer<CK_ULONG>) throws(CKError) -> Bool {
        let needed = CK_ULONG(result.count)
        guard let buffer else {
            length.pointee = needed
            return false
        }
        guard length.pointee >= needed else {
            length.pointee = needed
            throw .bufferTooSmall
        }
        // SAFETY: the application said `buffer` holds `length.pointee` >= count bytes.
        result.withUnsafeBufferPointer { source in
            if let base = source.baseAddress { buffer.update(from: base, count: source.count) }
        }
        length.pointee = needed
        return true
    }

    /// Copies `text` into a fixed-size PKCS#11 text field: space-padded, never
    /// NUL-terminated, cut at a character boundary if too long.
    static func pad(_ text: String, into field: UnsafeMutableRawBufferPointer) {
        field.initializeMemory(as: UInt8.self, repeating: UInt8(ascii: " "))
        var used = 0
        for scalar in text.unicodeScalars {
            let encoded = Array(String(scalar).utf8)
            guard used + encoded.count <= field.count else { break }
            for byte in encoded {
                field[used] = byte
                used += 1
            }
        }
    }

    /// A (major, minor) version record, or 0.0.
    static func version(_ value: WireValue?) -> CK_VERSION {
        guard let f = value?.recordFields, f.count == 2, let major = f[0].ulongValue, let minor = f[1].ulongValue else {
            return CK_VERSION(major: 0, minor: 0)
        }
        return CK_VERSION(major: CK_BYTE(truncatingIfNeeded: major), minor: CK_BYTE(truncatingIfNeeded: minor))
    }
}
