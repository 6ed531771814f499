import CPKCS11
import CryptokiWire
import FuzzDriver
import FuzzSupport
import Glibc
@testable import PincacheProxy

// The proxy's decoding of what the application passes (Codec): templates, nested
// templates, attribute-type lists, mechanisms with their parameters (OAEP's label behind
// a pointer), byte strings and PINs. The input describes the C arguments: counts,
// lengths, and for each pointer NULL or a buffer. A buffer always holds as many bytes as
// its length claims (PKCS#11's contract, which no callee can check), except when the
// length is beyond the cap Codec applies: then the buffer is short, and ASan reports any
// read Codec makes before refusing it. Whatever Codec accepts must be encodable as the call
// table's field (template, mechanism, data, PIN): the proxy never builds a request the wire
// refuses. Input layout: see Fuzz/README.md.

/// `value` fits the table's `type` (caps included).
private func encodes(_ value: WireValue, as type: FieldType) -> Bool {
    var e = WireEncoder()
    return (try? e.encode([value], as: [Field("argument", type)])) != nil
}

private struct Reader {
    let bytes: UnsafeBufferPointer<UInt8>
    var position = 0

    mutating func byte() -> UInt8 {
        guard position < bytes.count else { return 0 }
        defer { position += 1 }
        return bytes[position]
    }

    mutating func word() -> UInt64 {
        (0..<8).reduce(UInt64(0)) { value, shift in value | UInt64(byte()) << (8 * UInt64(shift)) }
    }

    /// A length or count: small, medium, any 64-bit value (overflows), or 0.
    mutating func length() -> CK_ULONG {
        switch byte() % 4 {
        case 0: CK_ULONG(byte())
        case 1: CK_ULONG(byte()) | CK_ULONG(byte()) << 8
        case 2: CK_ULONG(word())
        default: 0
        }
    }

    mutating func take(_ count: Int) -> [UInt8] {
        let n = min(count, bytes.count - position)
        defer { position += n }
        return Array(bytes[position..<position + n])
    }
}

/// Every allocation of one input, freed after the call.
private final class Arena {
    var blocks: [UnsafeMutableRawPointer] = []
    func bytes(_ content: [UInt8], count: Int) -> UnsafeMutableRawPointer {
        let block = UnsafeMutableRawPointer.allocate(byteCount: max(count, 1), alignment: 16)
        block.initializeMemory(as: UInt8.self, repeating: 0, count: max(count, 1))
        content.prefix(count).withUnsafeBytes { if let base = $0.baseAddress { block.copyMemory(from: base, byteCount: $0.count) } }
        blocks.append(block)
        return block
    }
    deinit { blocks.forEach { $0.deallocate() } }
}

/// A (pointer, length) pair: NULL, or a buffer honouring the length unless it is above `cap`.
private func buffer(_ r: inout Reader, _ arena: Arena, cap: Int) -> (UnsafeMutableRawPointer?, CK_ULONG) {
    let claimed = r.length()
    let isNull = r.byte() % 4 == 0
    if isNull { return (nil, claimed) }
    let available = r.bytes.count - r.position
    if claimed > CK_ULONG(cap) {
        let content = r.take(min(available, 64))
        return (arena.bytes(content, count: content.count), claimed)
    }
    let length = min(Int(claimed), available)
    return (arena.bytes(r.take(length), count: length), CK_ULONG(length))
}

/// A template whose array attributes may point at further templates, nested to any
/// depth: read level by level (no recursion), then built from the innermost out.
private func template(_ r: inout Reader, _ arena: Arena) -> (UnsafeMutablePointer<CK_ATTRIBUTE>?, CK_ULONG) {
    var levels: [(entries: [CK_ATTRIBUTE], nestedAt: Int?, claimed: CK_ULONG, isNull: Bool)] = []
    while true {
        let claimed = r.length()
        let isNull = r.byte() % 8 == 0
        let count = claimed > CK_ULONG(Caps.templateEntries) ? min(Int(r.byte()), 4) : Int(claimed)
        var entries: [CK_ATTRIBUTE] = []
        var nestedAt: Int?
        for index in 0..<(isNull ? 0 : count) {
            guard r.position < r.bytes.count else { break }
            let type = CK_ATTRIBUTE_TYPE(r.word())
            if type & CK_ULONG(CKF_ARRAY_ATTRIBUTE) != 0 {
                // An array attribute's value is a template, never bytes (the application's
                // contract): a nested one, or none.
                if nestedAt == nil, r.byte() % 2 == 0 { nestedAt = index }
                entries.append(CK_ATTRIBUTE(type: type, pValue: nil, ulValueLen: 0))
            } else {
                let (pointer, length) = buffer(&r, arena, cap: Caps.attributeValue)
                entries.append(CK_ATTRIBUTE(type: type, pValue: pointer, ulValueLen: length))
            }
        }
        // A short input ends the template early; the claimed count still counts when it is
        // beyond the cap (Codec must refuse it unread).
        let honest = claimed > CK_ULONG(Caps.templateEntries) ? claimed : CK_ULONG(entries.count)
        levels.append((entries, nestedAt, honest, isNull))
        if nestedAt == nil || r.position >= r.bytes.count { break }
    }
    var inner: (UnsafeMutablePointer<CK_ATTRIBUTE>?, CK_ULONG) = (nil, 0)
    for level in levels.reversed() {
        var entries = level.entries
        if let at = level.nestedAt {
            entries[at].pValue = inner.0.map { UnsafeMutableRawPointer($0) }
            // A nested count beyond the cap times the entry size may overflow; a wrapped length
            // would claim fewer entries than the count, an array the block does not hold, so
            // the overflow shows as the largest length instead.
            let (length, overflow) = inner.1.multipliedReportingOverflow(by: CK_ULONG(MemoryLayout<CK_ATTRIBUTE>.stride))
            entries[at].ulValueLen = overflow ? CK_ULONG.max : length
        }
        if level.isNull {
            inner = (nil, level.claimed)
            continue
        }
        let block = arena.bytes([], count: max(entries.count, 1) * MemoryLayout<CK_ATTRIBUTE>.stride)
        let typed = block.bindMemory(to: CK_ATTRIBUTE.self, capacity: max(entries.count, 1))
        for (index, entry) in entries.enumerated() { typed[index] = entry }
        inner = (typed, level.claimed)
    }
    return inner
}

private let mechanismTypes: [CK_MECHANISM_TYPE] = [
    CK_MECHANISM_TYPE(CKM_RSA_PKCS_OAEP), CK_MECHANISM_TYPE(CKM_SHA256_RSA_PKCS_PSS), 0x1087 /* AES_GCM */,
    CK_MECHANISM_TYPE(CKM_RSA_PKCS), CK_MECHANISM_TYPE(CKM_AES_CBC), CK_MECHANISM_TYPE(CKM_ECDH1_DERIVE),
    CK_MECHANISM_TYPE(CKM_AES_ECB_ENCRYPT_DATA), CK_MECHANISM_TYPE(CKM_AES_CBC_ENCRYPT_DATA),
]
/// Parameters the proxy reads as structures with pointers: a raw buffer of exactly their size
/// would be one, pointing anywhere, which the application promises never to pass.
private let structSizes: [CK_MECHANISM_TYPE: Int] = [
    CK_MECHANISM_TYPE(CKM_RSA_PKCS_OAEP): MemoryLayout<CK_RSA_PKCS_OAEP_PARAMS>.size,
    CK_MECHANISM_TYPE(CKM_AES_GCM): MemoryLayout<CK_GCM_PARAMS>.size,
    CK_MECHANISM_TYPE(CKM_ECDH1_DERIVE): MemoryLayout<CK_ECDH1_DERIVE_PARAMS>.size,
    CK_MECHANISM_TYPE(CKM_ECDH1_COFACTOR_DERIVE): MemoryLayout<CK_ECDH1_DERIVE_PARAMS>.size,
    CK_MECHANISM_TYPE(CKM_DES_ECB_ENCRYPT_DATA): MemoryLayout<CK_KEY_DERIVATION_STRING_DATA>.size,
    CK_MECHANISM_TYPE(CKM_DES3_ECB_ENCRYPT_DATA): MemoryLayout<CK_KEY_DERIVATION_STRING_DATA>.size,
    CK_MECHANISM_TYPE(CKM_AES_ECB_ENCRYPT_DATA): MemoryLayout<CK_KEY_DERIVATION_STRING_DATA>.size,
    CK_MECHANISM_TYPE(CKM_DES_CBC_ENCRYPT_DATA): MemoryLayout<CK_DES_CBC_ENCRYPT_DATA_PARAMS>.size,
    CK_MECHANISM_TYPE(CKM_DES3_CBC_ENCRYPT_DATA): MemoryLayout<CK_DES_CBC_ENCRYPT_DATA_PARAMS>.size,
    CK_MECHANISM_TYPE(CKM_AES_CBC_ENCRYPT_DATA): MemoryLayout<CK_AES_CBC_ENCRYPT_DATA_PARAMS>.size,
]

private func mechanism(_ r: inout Reader, _ arena: Arena) -> UnsafeMutablePointer<CK_MECHANISM>? {
    let selector = r.byte()
    if selector % 16 == 15 { return nil }
    let type = selector % 16 < 8 ? mechanismTypes[Int(selector % 8)] : CK_MECHANISM_TYPE(r.word())
    var parameter: (UnsafeMutableRawPointer?, CK_ULONG)
    if type == CK_MECHANISM_TYPE(CKM_RSA_PKCS_OAEP) && r.byte() % 2 == 0 {
        // A real CK_RSA_PKCS_OAEP_PARAMS, its label behind pSourceData.
        let (hash, mgf, source) = (r.word(), r.word(), r.word())
        let (label, labelLength) = buffer(&r, arena, cap: Caps.mechanismParameter - 24)
        let block = arena.bytes([], count: MemoryLayout<CK_RSA_PKCS_OAEP_PARAMS>.size)
        block.storeBytes(of: CK_RSA_PKCS_OAEP_PARAMS(hashAlg: CK_MECHANISM_TYPE(hash), mgf: CK_ULONG(mgf), source: CK_ULONG(source),
                                                     pSourceData: label, ulSourceDataLen: labelLength),
                         as: CK_RSA_PKCS_OAEP_PARAMS.self)
        parameter = (block, CK_ULONG(MemoryLayout<CK_RSA_PKCS_OAEP_PARAMS>.size))
    } else if type == CK_MECHANISM_TYPE(CKM_AES_GCM) && r.byte() % 2 == 0 {
        // A real CK_GCM_PARAMS, IV and AAD behind their pointers.
        let (ivBits, tagBits) = (r.word(), r.word())
        let (iv, ivLength) = buffer(&r, arena, cap: Caps.mechanismParameter)
        let (aad, aadLength) = buffer(&r, arena, cap: Caps.mechanismParameter)
        let block = arena.bytes([], count: MemoryLayout<CK_GCM_PARAMS>.size)
        block.storeBytes(
            of: CK_GCM_PARAMS(
                pIv: iv?.assumingMemoryBound(to: CK_BYTE.self), ulIvLen: ivLength, ulIvBits: CK_ULONG(ivBits),
                pAAD: aad?.assumingMemoryBound(to: CK_BYTE.self), ulAADLen: aadLength, ulTagBits: CK_ULONG(tagBits)),
            as: CK_GCM_PARAMS.self)
        parameter = (block, CK_ULONG(MemoryLayout<CK_GCM_PARAMS>.size))
    } else if type == CK_MECHANISM_TYPE(CKM_ECDH1_DERIVE) && r.byte() % 2 == 0 {
        // A real CK_ECDH1_DERIVE_PARAMS, shared and public data behind their pointers.
        let kdf = r.word()
        let (shared, sharedLength) = buffer(&r, arena, cap: Caps.mechanismParameter)
        let (pub, pubLength) = buffer(&r, arena, cap: Caps.mechanismParameter)
        let block = arena.bytes([], count: MemoryLayout<CK_ECDH1_DERIVE_PARAMS>.size)
        block.storeBytes(
            of: CK_ECDH1_DERIVE_PARAMS(
                kdf: CK_ULONG(kdf), ulSharedDataLen: sharedLength, pSharedData: shared?.assumingMemoryBound(to: CK_BYTE.self),
                ulPublicDataLen: pubLength, pPublicData: pub?.assumingMemoryBound(to: CK_BYTE.self)),
            as: CK_ECDH1_DERIVE_PARAMS.self)
        parameter = (block, CK_ULONG(MemoryLayout<CK_ECDH1_DERIVE_PARAMS>.size))
    } else if type == CK_MECHANISM_TYPE(CKM_AES_ECB_ENCRYPT_DATA) && r.byte() % 2 == 0 {
        // A real CK_KEY_DERIVATION_STRING_DATA, the data behind its pointer.
        let (data, dataLength) = buffer(&r, arena, cap: Caps.mechanismParameter)
        let block = arena.bytes([], count: MemoryLayout<CK_KEY_DERIVATION_STRING_DATA>.size)
        block.storeBytes(
            of: CK_KEY_DERIVATION_STRING_DATA(pData: data?.assumingMemoryBound(to: CK_BYTE.self), ulLen: dataLength),
            as: CK_KEY_DERIVATION_STRING_DATA.self)
        parameter = (block, CK_ULONG(MemoryLayout<CK_KEY_DERIVATION_STRING_DATA>.size))
    } else if type == CK_MECHANISM_TYPE(CKM_AES_CBC_ENCRYPT_DATA) && r.byte() % 2 == 0 {
        // A real CK_AES_CBC_ENCRYPT_DATA_PARAMS: 16 IV bytes from the input, the data behind pData.
        let iv = (0..<16).map { _ in r.byte() }
        let (data, dataLength) = buffer(&r, arena, cap: Caps.mechanismParameter)
        let block = arena.bytes(iv, count: MemoryLayout<CK_AES_CBC_ENCRYPT_DATA_PARAMS>.size)
        block.storeBytes(of: data, toByteOffset: 16, as: UnsafeMutableRawPointer?.self)
        block.storeBytes(of: dataLength, toByteOffset: 24, as: CK_ULONG.self)
        parameter = (block, CK_ULONG(MemoryLayout<CK_AES_CBC_ENCRYPT_DATA_PARAMS>.size))
    } else {
        parameter = buffer(&r, arena, cap: Caps.mechanismParameter)
        if let size = structSizes[type], parameter.1 == CK_ULONG(size) { parameter.1 += 1 }
    }
    let block = arena.bytes([], count: MemoryLayout<CK_MECHANISM>.size)
    let typed = block.bindMemory(to: CK_MECHANISM.self, capacity: 1)
    typed.pointee = CK_MECHANISM(mechanism: type, pParameter: parameter.0, ulParameterLen: parameter.1)
    return typed
}

@_cdecl("LLVMFuzzerTestOneInput")
func fuzzOne(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    var r = Reader(bytes: UnsafeBufferPointer(start: data, count: size))
    let arena = Arena()
    switch r.byte() % 5 {
    case 0:
        let (pointer, count) = template(&r, arena)
        if let value = try? Codec.template(pointer, count) {
            let items = value.arrayValues ?? []
            expect(items.count == Int(count), "template of \(count) became \(items.count) entries")
            for (item, attribute) in zip(items, UnsafeBufferPointer(start: pointer, count: items.count)) {
                let value = item.recordFields?[1].bytesValue
                if attribute.type & CK_ULONG(CKF_ARRAY_ATTRIBUTE) != 0 {
                    // Flattened: as many entries as the C array held, none of them an array.
                    let entries = value.flatMap(NestedTemplates.parse)
                    expect(entries?.count == Int(attribute.ulValueLen) / MemoryLayout<CK_ATTRIBUTE>.stride,
                           "nested template of \(attribute.ulValueLen) bytes flattened to \(entries?.count ?? -1) entries")
                } else {
                    expect(value?.count == Int(attribute.ulValueLen), "attribute length changed")
                }
            }
            expect(encodes(value, as: Fields.template), "a template the wire refuses")
        }
    case 1:
        let (pointer, count) = template(&r, arena)
        if let types = try? Codec.types(pointer, count) { expect(types.count == Int(count), "type list length changed") }
    case 2:
        if let (type, value) = try? Codec.mechanism(mechanism(&r, arena)) {
            expect(value.recordFields?.first?.ulongValue == UInt64(type), "mechanism type changed")
            expect(encodes(value, as: Fields.mechanism), "a mechanism the wire refuses")
        }
    case 3:
        let (pointer, length) = buffer(&r, arena, cap: Caps.data)
        if let bytes = try? Codec.bytes(pointer?.assumingMemoryBound(to: CK_BYTE.self), length) {
            expect(bytes.count == Int(length), "\(length) bytes became \(bytes.count)")
            expect(encodes(.bytes(bytes), as: Fields.data), "data the wire refuses")
        }
    default:
        let (pointer, length) = buffer(&r, arena, cap: Caps.pin)
        if let pin = try? Codec.pin(pointer?.assumingMemoryBound(to: CK_UTF8CHAR.self), length) {
            expect(pin.count == Int(length), "PIN of \(length) bytes became \(pin.count)")
            expect(encodes(.bytes(pin), as: Fields.pin), "a PIN the wire refuses")
        }
        // Codec's own UTF-8 check (no String is made of a PIN) agrees with the standard library's.
        if let pointer, length <= CK_ULONG(Caps.pin) {
            let raw = UnsafeBufferPointer(start: pointer.assumingMemoryBound(to: UInt8.self), count: Int(length))
            expect(Codec.isUTF8(raw) == (String(validating: raw, as: UTF8.self) != nil), "isUTF8 disagrees on \(Array(raw))")
        }
    }
    return 0
}

exit(pincache_fuzz_main(CommandLine.argc, CommandLine.unsafeArgv, fuzzOne))
