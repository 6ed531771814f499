import CDBus
@testable import DBusKit
import FuzzDriver
import FuzzSupport
import Glibc

// DBusKit's value decoder (Marshal.decode), which every incoming call and every reply
// goes through, on any message libdbus accepts. Decoded values must marshal again to the
// same signature (the daemon echoes decoded values, e.g. in Properties.Set), and the
// in-place reader of sensitive arguments must stay within the message.

private func containsDescriptor(_ value: DBusValue) -> Bool {
    switch value {
    case .unixFD: true
    case .array(_, let vs), .structure(let vs): vs.contains(where: containsDescriptor)
    case .variant(let v): containsDescriptor(v)
    case .dictionary(_, _, let es): es.contains { containsDescriptor($0.key) || containsDescriptor($0.value) }
    default: false
    }
}

@_cdecl("LLVMFuzzerTestOneInput")
func fuzzOne(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    guard let message = demarshal(data, size) else { return 0 }
    defer { dbus_message_unref(message) }
    let signature = bodySignature(message)

    if case .success(let values) = Marshal.decode(message) {
        expect(values.map(\.signature).joined() == signature, "decoded '\(values.map(\.signature).joined())' from '\(signature)'")
        // A demarshalled message carries no descriptors, so 'h' cannot be sent again.
        if !values.contains(where: containsDescriptor) {
            let copy = dbus_message_new(DBUS_MESSAGE_TYPE_METHOD_RETURN)!
            defer { dbus_message_unref(copy) }
            let problem = Marshal.append(values, to: copy)
            expect(problem == nil, "decoded values do not marshal again: \(problem?.message ?? "")")
            expect(bodySignature(copy) == signature, "re-marshalled as '\(bodySignature(copy))', was '\(signature)'")
        }
    }
    // As the daemon decodes a call with sensitive arguments (Login, SetPIN, InitToken).
    _ = Marshal.decode(message, placeholders: [0, 1, 2])
    for index in 0..<4 {
        _ = Marshal.withArgumentBytes(message, at: index) { touch(UnsafeRawBufferPointer($0)) }
    }
    return 0
}

exit(pincache_fuzz_main(CommandLine.argc, CommandLine.unsafeArgv, fuzzOne))
