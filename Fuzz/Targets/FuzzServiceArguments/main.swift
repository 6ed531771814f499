import CDBus
import CPKCS11
@testable import DBusKit
import FuzzDriver
import FuzzSupport
import Glibc
@testable import PKCS11Kit
import PinPolicy
@testable import PincacheService

// The daemon's argument decoding after DBusKit's: for a message whose signature matches
// a declared method, the arguments are decoded as dispatch does (sensitive ones left in
// the message) and handed to the service's decoders for their declared types: templates
// (Wire.template), mechanisms (Wire.mechanism, then the C structures the module would
// get), data, mechanism names, PINs into locked memory, and a{sv}. Every decoded value
// also goes through every decoder, whatever its type, to catch type confusion.

private let methods: [DBusMethod] = {
    var seen = Set<String>()
    return PincacheInterfaces.all.flatMap(\.methods).filter { method in
        seen.insert(method.inSignature + "/" + method.inArguments.map { $0.sensitive ? "1" : "0" }.joined()).inserted
    }
}()

private func checkTemplate(_ value: DBusValue) {
    guard case .success(let attributes) = Wire.template(value) else { return }
    expect(attributes.count <= Wire.maxTemplateEntries, "template of \(attributes.count) entries passed")
    expect(attributes.allSatisfy { $0.value.count <= Wire.maxAttributeBytes }, "oversized attribute passed")
}

private func checkMechanism(_ value: DBusValue) {
    guard case .success(let mechanism) = Wire.mechanism(value) else { return }
    // What the module would read: the parameter, and OAEP's label behind its pointer.
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
        } else if let size = Wire.rawParameterSizes[UInt(m.pointee.mechanism)] {
            expect(length == size, "raw parameter of \(length) bytes, expected \(size)")
        } else {
            fatalError("mechanism \(m.pointee.mechanism) passed with a parameter of \(length) bytes")
        }
    }
}

private func everyDecoder(_ value: DBusValue, depth: Int = 0) {
    checkTemplate(value)
    checkMechanism(value)
    if case .success(let bytes) = Wire.data(value) { expect(bytes.count <= Wire.maxDataBytes, "oversized data passed") }
    if let name = value.stringValue {
        _ = NamedMechanism.lookup(name, for: .sign)
        _ = NamedMechanism.lookup(name, for: .decrypt)
    }
    if let dictionary = value.vardictValue { dictionary.values.forEach { everyDecoder($0, depth: depth + 1) } }
    guard depth < 4 else { return }
    switch value {
    case .array(_, let vs), .structure(let vs): vs.prefix(16).forEach { everyDecoder($0, depth: depth + 1) }
    case .variant(let v): everyDecoder(v, depth: depth + 1)
    default: break
    }
}

@_cdecl("LLVMFuzzerTestOneInput")
func fuzzOne(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    guard let message = demarshal(data, size) else { return 0 }
    defer { dbus_message_unref(message) }
    let signature = bodySignature(message)

    for method in methods where method.inSignature == signature {
        let sensitive = Set(method.inArguments.indices.filter { method.inArguments[$0].sensitive })
        guard case .success(let values) = Marshal.decode(message, placeholders: sensitive) else { continue }
        for (index, (argument, value)) in zip(method.inArguments, values).enumerated() {
            if argument.sensitive {
                // readPIN: the bytes go from the message straight into locked memory.
                Marshal.withArgumentBytes(message, at: index) { bytes in
                    if let pin = try? SecretPIN(copying: UnsafeRawBufferPointer(bytes)) {
                        expect(pin.count == bytes.count, "PIN of \(bytes.count) bytes kept as \(pin.count)")
                    }
                }
                continue
            }
            switch argument.signature {
            case "a(tay)": checkTemplate(value)
            case "(tay)": checkMechanism(value)
            case "ay": _ = Wire.data(value)
            case "at": _ = value.arrayValues?.compactMap(\.uint64Value)
            case "s": if let name = value.stringValue { _ = NamedMechanism.lookup(name, for: .sign) }
            default: break
            }
        }
    }
    if case .success(let values) = Marshal.decode(message) {
        values.forEach { everyDecoder($0) }
    }
    return 0
}

exit(pincache_fuzz_main(CommandLine.argc, CommandLine.unsafeArgv, fuzzOne))
