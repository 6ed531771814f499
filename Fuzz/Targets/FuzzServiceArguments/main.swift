import CPKCS11
import CryptokiWire
import FuzzDriver
import FuzzSupport
import Glibc
@testable import PKCS11Kit
import PinPolicy
@testable import PincacheService

// The daemon's request path after the socket's framing (FuzzCryptokiWire has the framing):
// the first input byte picks a call of the table (mod the number of calls), the rest is its
// request body, decoded as CryptokiConnection.handleFrames does, PINs going from the buffer
// straight into locked memory through the secret sink. What decodes then goes through what the
// service does with it before any token is involved: templates through
// PincacheService.attributes, mechanisms through MechanismParameters.decode (the one check)
// down to the C structures the module would read. Every record and array found is also tried
// as a template and a mechanism, to catch type confusion.

private func checkMechanism(_ value: WireValue) {
    guard let f = value.recordFields, f.count == 2, let type = f[0].ulongValue, let parameter = f[1].bytesValue,
        case .success(let mechanism) = MechanismParameters.decode(type: type, parameter: parameter)
    else { return }
    // What the module would read: the parameter, and the bytes behind the pointers of the
    // structures the daemon rebuilds (OAEP's label, GCM's IV and AAD, ECDH's data, derivation strings).
    mechanism.withCMechanism { m in
        let length = Int(m.pointee.ulParameterLen)
        expect((m.pointee.pParameter == nil) == (length == 0), "parameter pointer and length disagree")
        guard let p = m.pointee.pParameter else { return }
        _ = touch(UnsafeRawBufferPointer(start: p, count: length))
        if m.pointee.mechanism == CK_MECHANISM_TYPE(CKM_RSA_PKCS_OAEP) {
            expect(length == MemoryLayout<CK_RSA_PKCS_OAEP_PARAMS>.size, "OAEP parameter of \(length) bytes")
            let oaep = p.load(as: CK_RSA_PKCS_OAEP_PARAMS.self)
            expect(oaep.source == CK_RSA_PKCS_OAEP_SOURCE_TYPE(CKZ_DATA_SPECIFIED), "OAEP source \(oaep.source)")
            _ = touch(UnsafeRawBufferPointer(start: oaep.pSourceData, count: Int(oaep.ulSourceDataLen)))
        } else if UInt(m.pointee.mechanism) == MechanismParameters.gcm {
            expect(length == MemoryLayout<CK_GCM_PARAMS>.size, "GCM parameter of \(length) bytes")
            let gcm = p.load(as: CK_GCM_PARAMS.self)
            _ = touch(UnsafeRawBufferPointer(start: gcm.pIv, count: Int(gcm.ulIvLen)))
            _ = touch(UnsafeRawBufferPointer(start: gcm.pAAD, count: Int(gcm.ulAADLen)))
        } else if MechanismParameters.ecdh1.contains(UInt(m.pointee.mechanism)) {
            expect(length == MemoryLayout<CK_ECDH1_DERIVE_PARAMS>.size, "ECDH parameter of \(length) bytes")
            let ecdh = p.load(as: CK_ECDH1_DERIVE_PARAMS.self)
            _ = touch(UnsafeRawBufferPointer(start: ecdh.pSharedData, count: Int(ecdh.ulSharedDataLen)))
            _ = touch(UnsafeRawBufferPointer(start: ecdh.pPublicData, count: Int(ecdh.ulPublicDataLen)))
        } else if MechanismParameters.derivationStrings.contains(UInt(m.pointee.mechanism)) {
            expect(length == MemoryLayout<CK_KEY_DERIVATION_STRING_DATA>.size, "derivation string of \(length) bytes")
            let string = p.load(as: CK_KEY_DERIVATION_STRING_DATA.self)
            _ = touch(UnsafeRawBufferPointer(start: string.pData, count: Int(string.ulLen)))
        } else if let iv = MechanismParameters.cbcEncryptData[UInt(m.pointee.mechanism)] {
            expect(length == iv + 16, "CBC_ENCRYPT_DATA parameter of \(length) bytes")
            let data = p.load(fromByteOffset: iv, as: UnsafeRawPointer?.self)
            _ = touch(UnsafeRawBufferPointer(start: data, count: Int(p.load(fromByteOffset: iv + 8, as: CK_ULONG.self))))
        } else if MechanismParameters.byteStrings.contains(UInt(m.pointee.mechanism)) {
            expect(length <= Caps.mechanismParameter, "byte-string parameter of \(length) bytes")
        } else if let size = MechanismParameters.rawSizes[UInt(m.pointee.mechanism)] {
            expect(length == size, "raw parameter of \(length) bytes, expected \(size)")
        } else {
            fatalError("mechanism \(m.pointee.mechanism) passed with a parameter of \(length) bytes")
        }
    }
}

private func everyDecoder(_ value: WireValue, depth: Int = 0) {
    let attributes = PincacheService.attributes(value)
    expect(attributes.count <= Caps.templateEntries, "template of \(attributes.count) entries passed")
    expect(attributes.allSatisfy { $0.value.count <= Caps.attributeValue }, "oversized attribute passed")
    checkMechanism(value)
    guard depth < 4 else { return }
    switch value {
    case .array(let items), .record(let items): items.prefix(16).forEach { everyDecoder($0, depth: depth + 1) }
    default: break
    }
}

/// A template field as the service reads it: every entry the decoder let through is kept,
/// with its type and value unchanged.
private func checkTemplate(_ value: WireValue) {
    let entries = value.arrayValues ?? []
    let attributes = PincacheService.attributes(value)
    expect(attributes.count == entries.count, "template of \(entries.count) entries became \(attributes.count)")
    for (entry, attribute) in zip(entries, attributes) {
        let f = entry.recordFields ?? []
        expect(f.count == 2 && UInt64(attribute.type.rawValue) == f[0].ulongValue && attribute.value == f[1].bytesValue,
               "attribute changed on its way in")
        // An array attribute's template, as the daemon reads it (the call is refused when it
        // does not parse), says exactly what it was sent.
        if attribute.type.isArray, let entries = NestedTemplate.parse(attribute.value) {
            expect(NestedTemplate.flatten(entries) == attribute.value, "nested template read differently")
            expect(entries.count <= NestedTemplate.maxEntries && !entries.contains { $0.type.isArray }, "nested template passed")
        }
    }
}

@_cdecl("LLVMFuzzerTestOneInput")
func fuzzOne(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    guard let data, size > 0 else { return 0 }
    let call = Calls.all[Int(data[0]) % Calls.all.count]
    // The daemon's sink: a PIN that cannot be held in locked memory is not a decoding error,
    // the call is answered with why (CryptokiRequest.secret).
    var secrets: [Result<SecretPIN, Error>] = []
    var decoder = WireDecoder(UnsafeRawBufferPointer(start: data + 1, count: size - 1)) { raw in
        let pin: Result<SecretPIN, Error> = Result { try SecretPIN(copying: raw) }
        if case .success(let kept) = pin {
            expect(kept.withBytes { $0.elementsEqual(raw) }, "PIN of \(raw.count) bytes kept as \(kept.count) other bytes")
        }
        secrets.append(pin)
        return secrets.count - 1
    }
    guard let values = try? decoder.decodeAll(call.request) else { return 0 }
    for (field, value) in zip(call.request, values) {
        switch field.type {
        case .secret:
            guard case .secret(let index) = value else { fatalError("fuzz invariant broken: \(field.name) decoded as \(value)") }
            expect(secrets.indices.contains(index), "secret index \(index) of \(secrets.count)")
        case Fields.template:
            checkTemplate(value)
        case Fields.mechanism:
            // Either refused (the call fails with CKR_MECHANISM_PARAM_INVALID) or safe for the
            // module: checkMechanism traps on anything else.
            checkMechanism(value)
        default:
            break
        }
        everyDecoder(value)
    }
    return 0
}

exit(pincache_fuzz_main(CommandLine.argc, CommandLine.unsafeArgv, fuzzOne))
