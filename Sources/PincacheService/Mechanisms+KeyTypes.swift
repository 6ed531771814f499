import PKCS11Kit

/// Which key types a mechanism takes, for the mechanisms whose family is certain. A module is
/// entitled to trust that the key fits the mechanism, and SoftHSM does: CKM_DSA with a secret
/// key crashes it, and with it the daemon and every caller's cache. So a key of another type
/// never reaches the module; the caller gets CKR_KEY_TYPE_INCONSISTENT, at the call where the
/// module would have reported it (the final call: the proxy's Init asks only KeyFacts).
/// Mechanisms not listed pass as they are.
enum MechanismKeyTypes {
    private static let rsa: Set<UInt> = [0]  // CKK_RSA
    private static let dsa: Set<UInt> = [1]  // CKK_DSA
    private static let ec: Set<UInt> = [3]  // CKK_EC
    private static let edwards: Set<UInt> = [0x40]  // CKK_EC_EDWARDS
    private static let aes: Set<UInt> = [0x1F]  // CKK_AES
    private static let des: Set<UInt> = [0x13, 0x14, 0x15]  // CKK_DES, CKK_DES2, CKK_DES3
    /// CKK_GENERIC_SECRET and the HMAC key types (CKK_MD5_HMAC … CKK_SHA224_HMAC).
    private static let hmac: Set<UInt> = [0x10, 0x27, 0x28, 0x29, 0x2A, 0x2B, 0x2C, 0x2D, 0x2E]

    static func keyTypes(for mechanism: UInt) -> Set<UInt>? {
        switch mechanism {
        case 0x1...0x6, 0x9, 0xD, 0xE, 0x40...0x47: rsa  // RSA PKCS, X.509, OAEP, PSS, hash-and-sign
        case 0x11...0x16: dsa  // CKM_DSA, CKM_DSA_SHA1 … SHA512
        case 0x1041...0x1046: ec  // ECDSA and its hashes
        case 0x1050, 0x1051: ec.union([0x41])  // ECDH, also with CKK_EC_MONTGOMERY (X25519, X448)
        case 0x1057: edwards  // CKM_EDDSA
        case 0x1081...0x108A, 0x2109, 0x210A: aes  // AES ECB … CMAC, key wrap
        case 0x121, 0x122, 0x125, 0x132...0x136, 0x138: des  // DES and DES3 ECB/CBC/PAD/CMAC
        case 0x211, 0x212, 0x221, 0x222, 0x231, 0x232, 0x251, 0x252, 0x256, 0x257, 0x261, 0x262, 0x271, 0x272:
            hmac  // MD5, SHA-1, SHA-2 HMAC (and _GENERAL)
        default: nil
        }
    }

    /// A key list's key type (KeyRecord.keyType: "RSA", "EC" or "0x…") as CKK_ number.
    static func keyType(named name: String) -> UInt? {
        switch name {
        case "RSA": 0
        case "EC": 3
        default: name.hasPrefix("0x") ? UInt(name.dropFirst(2), radix: 16) : nil
        }
    }

    /// The error a key of `keyType` meets with `mechanism`, or nil if it may be tried.
    static func refusal(_ mechanism: Mechanism, keyType: UInt?, function: String) -> PKCS11Error? {
        guard let keyType, let allowed = keyTypes(for: mechanism.type.rawValue), !allowed.contains(keyType) else {
            return nil
        }
        let rv: ReturnValue =
            switch function {
            case "C_WrapKey": .wrappingKeyTypeInconsistent
            case "C_UnwrapKey": .unwrappingKeyTypeInconsistent
            default: .keyTypeInconsistent
            }
        return PKCS11Error(rv: rv, function: function)
    }
}
