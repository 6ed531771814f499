import CryptokiWire
import PKCS11Kit

/// The one check of mechanism parameters from clients (both front ends come through here):
/// only parameters that are pointer-free C structs of an exact size pass as raw bytes, and
/// the ones the proxy flattens (OAEP's source data, GCM's IV and AAD, ECDH's shared and public
/// data, the key-derivation strings of `*_ENCRYPT_DATA`; layouts in dbus/README.md), rebuilt here
/// with pointers of the daemon's own. Any other
/// parameter could carry a pointer the module would follow into the daemon's memory, so it is
/// refused.
enum MechanismParameters {
    static let rawSizes: [UInt: Int] = Dictionary(
        uniqueKeysWithValues: MechanismParameterRules.rawSizes.map { (UInt($0.key), $0.value) })

    static let gcm: UInt = 0x1087  // CKM_AES_GCM
    static let ecdh1: Set<UInt> = [0x1050, 0x1051]  // CKM_ECDH1_DERIVE, CKM_ECDH1_COFACTOR_DERIVE
    /// CKM_DES_, DES3_, AES_ECB_ENCRYPT_DATA: CK_KEY_DERIVATION_STRING_DATA.
    static let derivationStrings: Set<UInt> = [0x1100, 0x1102, 0x1104]
    /// CKM_DES_, DES3_, AES_CBC_ENCRYPT_DATA: CK_DES/AES_CBC_ENCRYPT_DATA_PARAMS, by IV size.
    static let cbcEncryptData: [UInt: Int] = [0x1101: 8, 0x1103: 8, 0x1105: 16]
    /// Parameters that are a byte string of any length: CKM_DH_PKCS_DERIVE's public value.
    static let byteStrings: Set<UInt> = [0x21]

    static func invalid(_ what: String) -> ServiceError {
        ServiceError(.mechanismInvalid, "\(what) (CKR_MECHANISM_PARAM_INVALID (0x71))", rv: 0x71)
    }

    /// The mechanism a client named, with its parameter checked (OAEP: hashAlg, mgf, source
    /// as three little-endian CK_ULONGs, then the source data).
    static func decode(type raw: UInt64, parameter p: [UInt8]) -> Result<Mechanism, ServiceError> {
        let type = MechanismType(rawValue: UInt(raw))
        if p.isEmpty {
            guard !MechanismParameterRules.required.contains(raw) else {
                return .failure(invalid("\(type.name): this mechanism needs its parameter"))
            }
            return .success(Mechanism(type))
        }
        // Little-endian CK_ULONGs, then the byte strings they count, and nothing after them.
        func ulong(_ at: Int) -> UInt { p[at..<at + 8].reversed().reduce(0) { $0 << 8 | UInt($1) } }
        if type == .rsaPKCSOAEP {
            guard p.count >= 24 else { return .failure(invalid("CK_RSA_PKCS_OAEP_PARAMS: need 24 bytes")) }
            guard ulong(16) == 1 else { return .failure(invalid("OAEP source must be CKZ_DATA_SPECIFIED")) }
            return .success(
                Mechanism(
                    type,
                    parameter: .oaep(
                        hash: MechanismType(rawValue: ulong(0)), mgf: MGF(rawValue: ulong(8)), sourceData: Array(p[24...]))))
        }
        func strings(after fixed: Int, _ lengths: [UInt]) -> [[UInt8]]? {
            guard p.count >= fixed else { return nil }
            var at = fixed
            var out: [[UInt8]] = []
            for n in lengths {
                guard n <= UInt(p.count - at) else { return nil }
                out.append(Array(p[at..<at + Int(n)]))
                at += Int(n)
            }
            return at == p.count ? out : nil
        }
        if type.rawValue == gcm {
            guard p.count >= 32, let parts = strings(after: 32, [ulong(16), ulong(24)]) else {
                return .failure(invalid("CK_GCM_PARAMS: ivBits, tagBits, ivLen, aadLen, then IV and AAD"))
            }
            return .success(Mechanism(type, parameter: .gcm(iv: parts[0], ivBits: ulong(0), aad: parts[1], tagBits: ulong(8))))
        }
        if ecdh1.contains(type.rawValue) {
            guard p.count >= 24, let parts = strings(after: 24, [ulong(8), ulong(16)]) else {
                return .failure(invalid("CK_ECDH1_DERIVE_PARAMS: kdf, sharedDataLen, publicDataLen, then the data"))
            }
            return .success(Mechanism(type, parameter: .ecdh1(kdf: ulong(0), sharedData: parts[0], publicData: parts[1])))
        }
        if derivationStrings.contains(type.rawValue) {
            guard p.count >= 8, let parts = strings(after: 8, [ulong(0)]) else {
                return .failure(invalid("CK_KEY_DERIVATION_STRING_DATA: ulLen, then the data"))
            }
            return .success(Mechanism(type, parameter: .derivationString(parts[0])))
        }
        if let ivSize = cbcEncryptData[type.rawValue] {
            guard p.count >= 16, ulong(0) == UInt(ivSize), let parts = strings(after: 16, [ulong(0), ulong(8)]) else {
                return .failure(invalid("\(type.name): ivLen (\(ivSize)), length, then the IV and the data"))
            }
            return .success(Mechanism(type, parameter: .cbcEncryptData(iv: parts[0], data: parts[1])))
        }
        if byteStrings.contains(type.rawValue) { return .success(Mechanism(type, parameter: .raw(p))) }
        guard let size = rawSizes[type.rawValue] else {
            return .failure(invalid("\(type.name): parameters of this mechanism are not supported"))
        }
        guard p.count == size else {
            return .failure(invalid("\(type.name): parameter must be \(size) bytes, got \(p.count)"))
        }
        return .success(Mechanism(type, parameter: .raw(p)))
    }
}
