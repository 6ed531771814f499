import CDBus
import CPKCS11
@testable import DBusKit
import FuzzDriver
import FuzzSupport
import Glibc
@testable import PincacheProxy

// The proxy's reply decoding: whatever answers as the daemon (any process that owns the
// name on a session bus, or a broken daemon) controls these bytes, and the proxy runs
// inside the application. A reply is decoded as the forwarder does (Marshal.decode, then
// Replies.check against the method's declared signature and the caps) and, when it
// passes, decoded further exactly as the entry points do, down to the C structures and
// the application's attribute buffers.

private let methods: [WireMethod] = [
    Wire.getSlots, Wire.getMechanisms, Wire.openSession, Wire.getSessionInfo, Wire.findObjects, Wire.getAttributes,
    Wire.createObject, Wire.generateKeyPair, Wire.sign, Wire.generateRandom, Wire.close,
]

/// C_GetAttributeValue's delivery into buffers sized by the input: NULL (length query),
/// one byte short, exact, and larger, each allocated on its own so ASan sees overflows.
private func deliverAttributes(_ results: [AttributeResult], sizes seed: UInt8) {
    var buffers: [UnsafeMutableRawPointer?] = []
    var template: [CK_ATTRIBUTE] = []
    for (index, result) in results.enumerated() {
        let length: Int?
        switch (Int(seed) + index) % 4 {
        case 0: length = nil
        case 1: length = max(result.value.count - 1, 0)
        case 2: length = result.value.count
        default: length = result.value.count + 7
        }
        let buffer = length.map { UnsafeMutableRawPointer.allocate(byteCount: max($0, 1), alignment: 8) }
        buffers.append(buffer)
        template.append(CK_ATTRIBUTE(type: result.type, pValue: buffer, ulValueLen: CK_ULONG(length ?? 0)))
    }
    defer { buffers.forEach { $0?.deallocate() } }
    template.withUnsafeMutableBufferPointer { t in
        guard let base = t.baseAddress else { return }
        let outcome = Replies.deliver(results, into: base)
        for (attribute, result) in zip(t, results) where attribute.ulValueLen != CK_ULONG.max {
            expect(attribute.ulValueLen == CK_ULONG(result.value.count), "length \(attribute.ulValueLen) for \(result.value.count) bytes")
        }
        if outcome.error == nil {
            expect(t.allSatisfy { $0.ulValueLen != CK_ULONG.max }, "an unavailable attribute without an error")
        }
    }
}

@_cdecl("LLVMFuzzerTestOneInput")
func fuzzOne(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    guard let message = demarshal(data, size) else { return 0 }
    defer { dbus_message_unref(message) }
    guard case .success(let reply) = Marshal.decode(message) else { return 0 }
    defer { reply.forEach(Wire.closeDescriptors) }

    for method in methods where Replies.check(reply, method) {
        switch method.member {
        case Wire.getSlots.member:
            guard let slots = try? Replies.slots(reply) else { continue }
            for slot in slots {
                let slotInfo = slot.slotInfo
                expect((slotInfo.flags & CK_FLAGS(CKF_TOKEN_PRESENT) != 0) == slot.tokenPresent, "CKF_TOKEN_PRESENT wrong")
                _ = slot.tokenInfo
            }
        case Wire.getMechanisms.member:
            _ = try? Replies.mechanisms(reply)
        case Wire.getAttributes.member:
            // The types the application asked for: the ones answered (the usual case),
            // and the same list shifted by one (a daemon answering something else).
            let answered = reply[0].arrayValues?.compactMap { $0.structFields?.first?.uint64Value }.map { CK_ULONG($0) } ?? []
            for types in [answered, Array(answered.dropFirst()) + [0]] {
                guard let results = try? Replies.attributes(reply, types: types) else { continue }
                expect(results.map(\.type) == types, "results for other types than asked")
                deliverAttributes(results, sizes: UInt8(truncatingIfNeeded: size))
            }
        default:
            // Byte results (Sign, GenerateRandom, ...) and handles are used as they are.
            _ = reply.first?.bytesValue
        }
    }
    for value in reply { _ = Codec.version(value) }
    return 0
}

exit(pincache_fuzz_main(CommandLine.argc, CommandLine.unsafeArgv, fuzzOne))
