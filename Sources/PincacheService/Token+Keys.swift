import PKCS11Kit
import PinPolicy

/// What a token holds, read without logging in: key records from public keys and certificates,
/// completed by private-key attributes when they are visible.
extension TokenContext {
    // MARK: - Keys (worker)

    func listKeys() throws -> [KeyRecord] {
        _ = try presentTokenInfo()
        if let keys { return keys }
        // The list is everyone's: it is read in no one's login.
        endSharedLogin()
        let loaded = try backendCall { try loadKeys() }
        keys = loaded
        knownKeys.withLock { $0 = loaded }
        return loaded
    }

    func keyRecord(_ id: [UInt8]) throws -> KeyRecord {
        if let k = keys?.first(where: { $0.id == id }) { return k }
        keys = nil
        if let k = try listKeys().first(where: { $0.id == id }) { return k }
        throw ServiceError(.keyNotFound, "no key with id \(hex(id)) on this token (CKR_KEY_HANDLE_INVALID (0x60))")
    }

    func loadKeys() throws -> [KeyRecord] {
        let s = try session()
        var records: [[UInt8]: KeyRecord] = [:]
        var order: [[UInt8]] = []
        func record(_ id: [UInt8], _ body: (inout KeyRecord) -> Void) {
            if records[id] == nil {
                records[id] = KeyRecord(id: id)
                order.append(id)
            }
            body(&records[id]!)
        }
        for handle in try module.findObjects(s, matching: [.objectClass(.publicKey)]) {
            let a = try module.getAttributes(
                s, handle, [.id, .label, .keyType, .modulusBits, .modulus, .ecParams, .verify, .encrypt])
            guard let id = a[.id] else { continue }
            record(id) { r in
                r.label = a[.label].map { String(decoding: $0, as: UTF8.self) } ?? r.label
                r.keyType = keyTypeName(a[.keyType])
                r.bits = keyBits(a)
                r.canSign = a[.verify]?.pkcs11Bool ?? r.canSign
                r.canDecrypt = a[.encrypt]?.pkcs11Bool ?? r.canDecrypt
            }
        }
        for handle in try module.findObjects(s, matching: [.objectClass(.privateKey)]) {
            let a = try module.getAttributes(
                s, handle, [.id, .label, .keyType, .modulusBits, .modulus, .ecParams, .sign, .decrypt, .alwaysAuthenticate])
            guard let id = a[.id] else { continue }
            record(id) { r in
                if r.label.isEmpty { r.label = a[.label].map { String(decoding: $0, as: UTF8.self) } ?? "" }
                if r.keyType.isEmpty { r.keyType = keyTypeName(a[.keyType]) }
                if r.bits == 0 { r.bits = keyBits(a) }
                if let v = a[.sign]?.pkcs11Bool { r.canSign = v }
                if let v = a[.decrypt]?.pkcs11Bool { r.canDecrypt = v }
                r.backendAlwaysAuthenticate = a[.alwaysAuthenticate]?.pkcs11Bool ?? false
            }
        }
        for handle in try module.findObjects(s, matching: [.objectClass(.certificate)]) {
            let a = try module.getAttributes(s, handle, [.id, .value])
            guard let id = a[.id], records[id] != nil, let der = a[.value] else { continue }
            record(id) { r in
                r.certificate = der
                r.keyUsage = CertificateKeyUsage.parse(certificateDER: der)
            }
        }
        return order.compactMap { records[$0] }
    }
}

private func keyTypeName(_ value: [UInt8]?) -> String {
    guard let raw = value?.pkcs11ULong else { return "" }
    switch KeyType(rawValue: raw) {
    case .rsa: return "RSA"
    case .ec: return "EC"
    default: return "0x" + String(raw, radix: 16)
    }
}

/// Key size from RSA modulus bits or the EC curve's OID.
private func keyBits(_ a: [AttributeType: [UInt8]]) -> UInt32 {
    if let bits = a[.modulusBits]?.pkcs11ULong { return UInt32(clamping: bits) }
    if let modulus = a[.modulus] { return UInt32(clamping: modulus.drop(while: { $0 == 0 }).count * 8) }
    if let params = a[.ecParams] {
        let curves: [[UInt8]: UInt32] = [
            [0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07]: 256,
            [0x06, 0x05, 0x2B, 0x81, 0x04, 0x00, 0x22]: 384,
            [0x06, 0x05, 0x2B, 0x81, 0x04, 0x00, 0x23]: 521,
            [0x06, 0x05, 0x2B, 0x81, 0x04, 0x00, 0x0A]: 256,
            [0x06, 0x09, 0x2B, 0x24, 0x03, 0x03, 0x02, 0x08, 0x01, 0x01, 0x07]: 256,
        ]
        return curves[params] ?? 0
    }
    return 0
}
