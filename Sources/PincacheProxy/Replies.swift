import CPKCS11
import CryptokiWire

// Reply decoding: the wire decoder has checked every field against the table's types and
// caps; what is left is the daemon's word, checked again here for meaning (the fuzz target
// FuzzProxyReply runs these on arbitrary frames).

enum Replies {
    /// GetSlots → one snapshot per slot, in the daemon's order.
    static func slots(_ reply: [WireValue]) throws(CKError) -> [SlotSnapshot] {
        guard case .array(let entries) = reply.first, case .array(let type, _) = Calls.getSlots.response[0].type,
            case .record(let fields) = type
        else { throw .deviceError }
        var parsed: [SlotSnapshot] = []
        for entry in entries {
            guard let values = entry.recordFields, values.count == fields.count, let name = values[0].stringValue,
                !name.isEmpty
            else { throw .deviceError }
            parsed.append(SlotSnapshot(name: name, fields: Dictionary(uniqueKeysWithValues: zip(fields.map(\.name), values))))
        }
        return parsed
    }

    /// GetMechanisms → the mechanism list.
    static func mechanisms(_ reply: [WireValue]) throws(CKError) -> [MechanismEntry] {
        guard case .array(let entries) = reply.first else { throw .deviceError }
        var list: [MechanismEntry] = []
        for entry in entries {
            guard let f = entry.recordFields, f.count == 4, let type = f[0].ulongValue, let min = f[1].ulongValue,
                  let max = f[2].ulongValue, let flags = f[3].ulongValue else { throw .deviceError }
            list.append(MechanismEntry(type: CK_ULONG(type), minKeySize: CK_ULONG(min), maxKeySize: CK_ULONG(max),
                                       flags: CK_ULONG(flags)))
        }
        return list
    }

    /// GetAttributes → one result per requested type, in order; the daemon must answer
    /// exactly the types asked for.
    static func attributes(_ reply: [WireValue], types: [CK_ATTRIBUTE_TYPE]) throws(CKError) -> [AttributeResult] {
        guard case .array(let entries) = reply.first, entries.count == types.count else { throw .deviceError }
        var parsed: [AttributeResult] = []
        for (entry, type) in zip(entries, types) {
            guard let f = entry.recordFields, f.count == 3, let t = f[0].ulongValue, CK_ULONG(t) == type,
                  let status = f[1].ulongValue, let value = f[2].bytesValue else { throw .deviceError }
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
            let status = result.status
            switch status {
            case CKR_OK where result.type & CK_ULONG(CKF_ARRAY_ATTRIBUTE) != 0:
                guard let entries = NestedTemplates.parse(result.value) else {
                    attribute.pointee.ulValueLen = CK_ULONG.max
                    other = other ?? CKR_DEVICE_ERROR
                    continue
                }
                switch deliverNested(entries, into: attribute) {
                case .lengthQuery: lengthQuery = true
                case .tooSmall: tooSmall = true
                case .delivered: break
                }
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

    enum NestedDelivery { case delivered, lengthQuery, tooSmall }

    /// An array attribute's template, by PKCS#11's rules one level down: a NULL pValue learns
    /// the array's size (entries × sizeof(CK_ATTRIBUTE)); an array too short for the entries
    /// is too small; else each entry gets its type, and its value as a plain attribute would
    /// (NULL: its length; too short: CK_UNAVAILABLE_INFORMATION, the call's
    /// CKR_BUFFER_TOO_SMALL, and the entries after it untouched).
    static func deliverNested(_ entries: [(type: UInt64, value: [UInt8])], into attribute: UnsafeMutablePointer<CK_ATTRIBUTE>)
        -> NestedDelivery
    {
        let needed = CK_ULONG(entries.count * MemoryLayout<CK_ATTRIBUTE>.stride)
        guard let buffer = attribute.pointee.pValue else {
            attribute.pointee.ulValueLen = needed
            return .lengthQuery
        }
        guard attribute.pointee.ulValueLen >= needed else {
            attribute.pointee.ulValueLen = CK_ULONG.max
            return .tooSmall
        }
        var result = NestedDelivery.delivered
        // SAFETY: the application said pValue holds ulValueLen >= needed bytes of CK_ATTRIBUTE
        // entries, and each entry's pValue its ulValueLen bytes.
        let inner = buffer.assumingMemoryBound(to: CK_ATTRIBUTE.self)
        for (i, entry) in entries.enumerated() {
            inner[i].type = CK_ATTRIBUTE_TYPE(entry.type)
            let length = CK_ULONG(entry.value.count)
            if let target = inner[i].pValue {
                if inner[i].ulValueLen >= length {
                    entry.value.withUnsafeBytes { source in
                        if let base = source.baseAddress { target.copyMemory(from: base, byteCount: source.count) }
                    }
                    inner[i].ulValueLen = length
                } else {
                    // SoftHSM stops at the first entry too small; so does this.
                    inner[i].ulValueLen = CK_ULONG.max
                    result = .tooSmall
                    break
                }
            } else {
                inner[i].ulValueLen = length
                // A length query one level down: its answer is kept for the call that follows.
                if result == .delivered { result = .lengthQuery }
            }
        }
        attribute.pointee.ulValueLen = needed
        return result
    }
}

extension SlotSnapshot {
    /// C_GetSlotInfo's answer.
    var slotInfo: CK_SLOT_INFO {
        let p = fields
        var value = CK_SLOT_INFO()
        withUnsafeMutableBytes(of: &value.slotDescription) { Codec.pad(p["slot_description"]?.stringValue ?? "", into: $0) }
        withUnsafeMutableBytes(of: &value.manufacturerID) { Codec.pad(p["slot_manufacturer"]?.stringValue ?? "", into: $0) }
        var flags = CK_FLAGS(p["slot_flags"]?.ulongValue ?? 0) & ~CK_FLAGS(CKF_TOKEN_PRESENT)
        if tokenPresent { flags |= CK_FLAGS(CKF_TOKEN_PRESENT) }
        value.flags = flags
        value.hardwareVersion = Codec.version(p["hardware_version"])
        value.firmwareVersion = Codec.version(p["firmware_version"])
        return value
    }

    /// C_GetTokenInfo's answer (the caller checks that a token is present).
    var tokenInfo: CK_TOKEN_INFO {
        let p = fields
        func number(_ key: String) -> CK_ULONG {
            p[key]?.ulongValue.map { CK_ULONG($0) } ?? CK_ULONG.max
        }
        var value = CK_TOKEN_INFO()
        withUnsafeMutableBytes(of: &value.label) { Codec.pad(p["label"]?.stringValue ?? "", into: $0) }
        withUnsafeMutableBytes(of: &value.manufacturerID) { Codec.pad(p["manufacturer"]?.stringValue ?? "", into: $0) }
        withUnsafeMutableBytes(of: &value.model) { Codec.pad(p["model"]?.stringValue ?? "", into: $0) }
        withUnsafeMutableBytes(of: &value.serialNumber) { Codec.pad(p["serial"]?.stringValue ?? "", into: $0) }
        value.flags = CK_FLAGS(p["token_flags"]?.ulongValue ?? 0)
        value.ulMaxSessionCount = number("max_session_count")
        // Session counts are the backend's business across every caller; not on the wire.
        value.ulSessionCount = CK_ULONG.max
        value.ulMaxRwSessionCount = number("max_rw_session_count")
        value.ulRwSessionCount = CK_ULONG.max
        value.ulMaxPinLen = number("max_pin_len")
        value.ulMinPinLen = number("min_pin_len")
        value.ulTotalPublicMemory = number("total_public_memory")
        value.ulFreePublicMemory = number("free_public_memory")
        value.ulTotalPrivateMemory = number("total_private_memory")
        value.ulFreePrivateMemory = number("free_private_memory")
        value.hardwareVersion = Codec.version(p["token_hardware_version"])
        value.firmwareVersion = Codec.version(p["token_firmware_version"])
        withUnsafeMutableBytes(of: &value.utcTime) { Codec.pad(p["utc_time"]?.stringValue ?? "", into: $0) }
        return value
    }
}
