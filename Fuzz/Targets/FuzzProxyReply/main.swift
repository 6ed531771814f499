import CPKCS11
import CryptokiWire
import FuzzDriver
import FuzzSupport
import Glibc
@testable import PincacheProxy

// The proxy's reply decoding: whatever answers as the daemon controls these bytes, and the
// proxy runs inside the application. The first input byte picks a call (bits 0-6, mod the
// number of calls) and whether the rest is its reply body or an error body (bit 7). A body is
// decoded as WireClient does (the table's fields and caps; an error's CK_RV must not be
// CKR_OK) and, when it decodes, further exactly as the entry points do: Replies.slots down to
// CK_SLOT_INFO and CK_TOKEN_INFO, Replies.mechanisms, Replies.attributes and Replies.deliver
// into the application's attribute buffers.

/// A buffer's length for a value of `count` bytes, by `variant`: NULL (a length query), one
/// byte short, exact, or larger.
private func bufferLength(_ count: Int, _ variant: Int) -> Int? {
    switch variant % 4 {
    case 0: nil
    case 1: max(count - 1, 0)
    case 2: count
    default: count + 7
    }
}

/// C_GetAttributeValue's delivery into buffers sized by the input, each allocated on its own so
/// ASan sees overflows. An array attribute whose value parses gets what an application would
/// pass: no array (a size query), one entry too few, or enough entries, each with a buffer of
/// its own sized as above.
private func deliverAttributes(_ results: [AttributeResult], sizes seed: UInt8) {
    var buffers: [UnsafeMutableRawPointer] = []
    defer { buffers.forEach { $0.deallocate() } }
    func allocate(_ count: Int) -> UnsafeMutableRawPointer {
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: max(count, 1), alignment: 8)
        buffers.append(buffer)
        return buffer
    }
    let entrySize = MemoryLayout<CK_ATTRIBUTE>.stride
    var template: [CK_ATTRIBUTE] = []
    var nested: [Int: (entries: [(type: UInt64, value: [UInt8])], array: UnsafeMutablePointer<CK_ATTRIBUTE>?, count: Int)] = [:]
    for (index, result) in results.enumerated() {
        let variant = Int(seed) + index
        if result.type & CK_ULONG(CKF_ARRAY_ATTRIBUTE) != 0, result.status == CKR_OK,
           let entries = NestedTemplates.parse(result.value) {
            let count = variant % 4 == 0 ? nil : variant % 4 == 1 ? max(entries.count - 1, 0) : entries.count + variant % 4 - 2
            var array: UnsafeMutablePointer<CK_ATTRIBUTE>?
            if let count {
                let typed = allocate(count * entrySize).bindMemory(to: CK_ATTRIBUTE.self, capacity: max(count, 1))
                for j in 0..<count {
                    let length = bufferLength(j < entries.count ? entries[j].value.count : 0, variant + j)
                    typed[j] = CK_ATTRIBUTE(type: 0, pValue: length.map(allocate), ulValueLen: CK_ULONG(length ?? 0))
                }
                array = typed
            }
            nested[index] = (entries, array, count ?? 0)
            template.append(CK_ATTRIBUTE(type: result.type, pValue: array.map { UnsafeMutableRawPointer($0) },
                                         ulValueLen: CK_ULONG((count ?? 0) * entrySize)))
            continue
        }
        let length = bufferLength(result.value.count, variant)
        template.append(CK_ATTRIBUTE(type: result.type, pValue: length.map(allocate), ulValueLen: CK_ULONG(length ?? 0)))
    }
    template.withUnsafeMutableBufferPointer { t in
        guard let base = t.baseAddress else { return }
        let outcome = Replies.deliver(results, into: base)
        for (index, (attribute, result)) in zip(t, results).enumerated() where attribute.ulValueLen != CK_ULONG.max {
            guard let (entries, array, count) = nested[index] else {
                expect(attribute.ulValueLen == CK_ULONG(result.value.count), "length \(attribute.ulValueLen) for \(result.value.count) bytes")
                continue
            }
            expect(attribute.ulValueLen == CK_ULONG(entries.count * entrySize), "array of \(entries.count) entries as \(attribute.ulValueLen)")
            // The entries up to the first too short one carry their type and length.
            guard let array, count >= entries.count else { continue }
            for (j, entry) in entries.enumerated() {
                if array[j].ulValueLen == CK_ULONG.max { break }
                expect(array[j].type == CK_ATTRIBUTE_TYPE(entry.type) && array[j].ulValueLen == CK_ULONG(entry.value.count),
                       "entry \(j) delivered wrong")
            }
        }
        if outcome.error == nil {
            expect(t.allSatisfy { $0.ulValueLen != CK_ULONG.max }, "an unavailable attribute without an error")
        }
    }
}

@_cdecl("LLVMFuzzerTestOneInput")
func fuzzOne(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    guard let data, size > 0 else { return 0 }
    let call = Calls.all[Int(data[0] & 0x7F) % Calls.all.count]
    var decoder = WireDecoder(UnsafeRawBufferPointer(start: data + 1, count: size - 1))
    if data[0] & 0x80 != 0 {
        guard let error = try? decoder.decodeAll(Frames.errorFields), let rv = error.first?.ulongValue, rv != 0 else { return 0 }
        expect(CKError(WireClient.Failure.refused(rv: rv)).rv == CK_RV(truncatingIfNeeded: rv), "CK_RV \(rv) changed")
        return 0
    }
    guard let reply = try? decoder.decodeAll(call.response) else { return 0 }
    switch call.id {
    case Calls.getSlots.id:
        guard let slots = try? Replies.slots(reply) else { break }
        expect(slots.count == reply.first?.arrayValues?.count, "\(slots.count) slots of \(reply.first?.arrayValues?.count ?? -1)")
        for slot in slots {
            expect(!slot.name.isEmpty, "a slot without a name")
            let slotInfo = slot.slotInfo
            expect((slotInfo.flags & CK_FLAGS(CKF_TOKEN_PRESENT) != 0) == slot.tokenPresent, "CKF_TOKEN_PRESENT wrong")
            let tokenInfo = slot.tokenInfo
            // Space-padded text fields: every byte written, never a NUL (the wire has none).
            for text in [
                withUnsafeBytes(of: slotInfo.slotDescription, Array.init), withUnsafeBytes(of: slotInfo.manufacturerID, Array.init),
                withUnsafeBytes(of: tokenInfo.label, Array.init), withUnsafeBytes(of: tokenInfo.manufacturerID, Array.init),
                withUnsafeBytes(of: tokenInfo.model, Array.init), withUnsafeBytes(of: tokenInfo.serialNumber, Array.init),
                withUnsafeBytes(of: tokenInfo.utcTime, Array.init),
            ] {
                expect(!text.contains(0), "a NUL in a padded text field")
            }
        }
    case Calls.getMechanisms.id:
        guard let list = try? Replies.mechanisms(reply) else { break }
        expect(list.count == reply.first?.arrayValues?.count, "mechanism list length changed")
    case Calls.getAttributes.id:
        // The types the application asked for: the ones answered (the usual case), and the
        // same list shifted by one (a daemon answering something else).
        let answered = reply.first?.arrayValues?.compactMap { $0.recordFields?.first?.ulongValue }.map { CK_ULONG($0) } ?? []
        for types in [answered, Array(answered.dropFirst()) + [0]] {
            guard let results = try? Replies.attributes(reply, types: types) else { continue }
            expect(results.map(\.type) == types, "results for other types than asked")
            deliverAttributes(results, sizes: UInt8(truncatingIfNeeded: size))
        }
    default:
        // Byte results (Sign, GenerateRandom, ...) and handles are used as they are.
        _ = reply.first?.bytesValue
    }
    for value in reply { _ = Codec.version(value) }
    return 0
}

exit(pincache_fuzz_main(CommandLine.argc, CommandLine.unsafeArgv, fuzzOne))
