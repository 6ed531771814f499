import CPKCS11
import DBusKit

// Reply decoding, kept apart from the bus so that it can run without one: the forwarder
// and the entry points call these, and so does the fuzz target (Fuzz/Targets/FuzzProxyReply).
// A reply that passed `check` has the declared signature; everything else is still the
// daemon's word and is checked again here.

enum Replies {
    /// True when `reply` is what `method` declares and stays within the caps.
    static func check(_ reply: [DBusValue], _ method: WireMethod) -> Bool {
        reply.map(\.signature).joined() == method.outSignature && reply.allSatisfy { Wire.withinCaps($0) }
    }

    /// GetSlots → one snapshot per slot, in the daemon's order.
    static func slots(_ reply: [DBusValue]) throws(CKError) -> [SlotSnapshot] {
        guard let entries = reply.first?.arrayValues else { throw .deviceError }
        var parsed: [SlotSnapshot] = []
        for entry in entries {
            guard let fields = entry.structFields, fields.count == 2, let path = fields[0].objectPathValue,
                  let properties = fields[1].vardictValue else { throw .deviceError }
            parsed.append(SlotSnapshot(path: path, properties: properties))
        }
        return parsed
    }

    /// GetMechanisms → the mechanism list.
    static func mechanisms(_ reply: [DBusValue]) throws(CKError) -> [MechanismEntry] {
        guard let entries = reply.first?.arrayValues else { throw .deviceError }
        var list: [MechanismEntry] = []
        for entry in entries {
            guard let f = entry.structFields, f.count == 4, let type = f[0].uint64Value, let min = f[1].uint64Value,
                  let max = f[2].uint64Value, let flags = f[3].uint64Value else { throw .deviceError }
            list.append(MechanismEntry(type: CK_ULONG(type), minKeySize: CK_ULONG(min), maxKeySize: CK_ULONG(max),
                                       flags: CK_ULONG(flags)))
        }
        return list
    }

    /// GetAttributes → one result per requested type, in order; the daemon must answer
    /// exactly the types asked for.
    static func attributes(_ reply: [DBusValue], types: [CK_ATTRIBUTE_TYPE]) throws(CKError) -> [AttributeResult] {
        guard let entries = reply.first?.arrayValues, entries.count == types.count else { throw .deviceError }
        var parsed: [AttributeResult] = []
        for (entry, type) in zip(entries, types) {
            guard let f = entry.structFields, f.count == 3, let t = f[0].uint64Value, CK_ULONG(t) == type,
                  let status = f[1].uint64Value, let value = f[2].bytesValue else { throw .deviceError }
            parsed.append(AttributeResult(type: type, status: CK_RV(status), value: value))
        }
        return parsed
    }

    /// Writes GetAttributes results into the application's template with PKCS#11's rules
    /// for lengths and NULL buffers. `template` holds at least `results.count` entries.
    /// Returns whether this was (partly) a length query, and the call's error if any.
    static func deliver(_ results: [AttributeResult], into template: UnsafeMutablePointer<CK_ATTRIBUTE>)
        -> (lengthQuery: Bool, error: CKError?)
    {
        var sensitive = false, invalid = false, tooSmall = false, other: CK_RV?
        var lengthQuery = false
        for (index, result) in results.enumerated() {
            let attribute = template.advanced(by: index)
            var status = result.status
            // Values of array attributes are the daemon's pointers: meaningless here.
            if status == CKR_OK && result.type & CK_ULONG(CKF_ARRAY_ATTRIBUTE) != 0 && !result.value.isEmpty {
                status = CKR_ATTRIBUTE_TYPE_INVALID
            }
            switch status {
            case CKR_OK:
                let needed = CK_ULONG(result.value.count)
                if let buffer = attribute.pointee.pValue {
                    if attribute.pointee.ulValueLen >= needed {
                        // SAFETY: the application said pValue holds ulValueLen >= needed bytes.
                        result.value.withUnsafeBytes { source in
                            if let base = source.baseAddress { buffer.copyMemory(from: base, byteCount: source.count) }
                        }
                        attribute.pointee.ulValueLen = needed
                    } else {
                        attribute.pointee.ulValueLen = CK_ULONG.max
                        tooSmall = true
                    }
                } else {
                    attribute.pointee.ulValueLen = needed
                    lengthQuery = true
                }
            case CKR_ATTRIBUTE_SENSITIVE:
                attribute.pointee.ulValueLen = CK_ULONG.max
                sensitive = true
            case CKR_ATTRIBUTE_TYPE_INVALID:
                attribute.pointee.ulValueLen = CK_ULONG.max
                invalid = true
            default:
                attribute.pointee.ulValueLen = CK_ULONG.max
                other = other ?? status
            }
        }
        // SoftHSM's precedence, so both paths answer alike.
        if sensitive { return (lengthQuery, CKError(CKR_ATTRIBUTE_SENSITIVE)) }
        if invalid { return (lengthQuery, CKError(CKR_ATTRIBUTE_TYPE_INVALID)) }
        if tooSmall { return (lengthQuery, .bufferTooSmall) }
        return (lengthQuery, other.map { CKError($0) })
    }
}

extension SlotSnapshot {
    /// C_GetSlotInfo's answer.
    var slotInfo: CK_SLOT_INFO {
        let p = properties
        var value = CK_SLOT_INFO()
        withUnsafeMutableBytes(of: &value.slotDescription) { Codec.pad(p["SlotDescription"]?.stringValue ?? "", into: $0) }
        withUnsafeMutableBytes(of: &value.manufacturerID) { Codec.pad(p["SlotManufacturer"]?.stringValue ?? "", into: $0) }
        var flags = CK_FLAGS(p["SlotFlags"]?.uint64Value ?? 0) & ~CK_FLAGS(CKF_TOKEN_PRESENT)
        if tokenPresent { flags |= CK_FLAGS(CKF_TOKEN_PRESENT) }
        value.flags = flags
        value.hardwareVersion = Codec.version(p["HardwareVersion"])
        value.firmwareVersion = Codec.version(p["FirmwareVersion"])
        return value
    }

    /// C_GetTokenInfo's answer (the caller checks that a token is present).
    var tokenInfo: CK_TOKEN_INFO {
        let p = properties
        func number(_ key: String) -> CK_ULONG {
            p[key]?.uint64Value.map { CK_ULONG($0) } ?? CK_ULONG.max
        }
        var value = CK_TOKEN_INFO()
        withUnsafeMutableBytes(of: &value.label) { Codec.pad(p["Label"]?.stringValue ?? "", into: $0) }
        withUnsafeMutableBytes(of: &value.manufacturerID) { Codec.pad(p["Manufacturer"]?.stringValue ?? "", into: $0) }
        withUnsafeMutableBytes(of: &value.model) { Codec.pad(p["Model"]?.stringValue ?? "", into: $0) }
        withUnsafeMutableBytes(of: &value.serialNumber) { Codec.pad(p["Serial"]?.stringValue ?? "", into: $0) }
        value.flags = CK_FLAGS(p["TokenFlags"]?.uint64Value ?? 0)
        value.ulMaxSessionCount = number("MaxSessionCount")
        // Session counts are the backend's business across every caller; not on the wire.
        value.ulSessionCount = CK_ULONG.max
        value.ulMaxRwSessionCount = number("MaxRwSessionCount")
        value.ulRwSessionCount = CK_ULONG.max
        value.ulMaxPinLen = number("MaxPinLen")
        value.ulMinPinLen = number("MinPinLen")
        value.ulTotalPublicMemory = number("TotalPublicMemory")
        value.ulFreePublicMemory = number("FreePublicMemory")
        value.ulTotalPrivateMemory = number("TotalPrivateMemory")
        value.ulFreePrivateMemory = number("FreePrivateMemory")
        value.hardwareVersion = Codec.version(p["TokenHardwareVersion"])
        value.firmwareVersion = Codec.version(p["TokenFirmwareVersion"])
        withUnsafeMutableBytes(of: &value.utcTime) { Codec.pad(p["UtcTime"]?.stringValue ?? "", into: $0) }
        return value
    }
}
