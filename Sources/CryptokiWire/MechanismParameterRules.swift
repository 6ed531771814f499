/// What the wire knows of mechanism parameters, for both ends: the proxy gives its verdict at
/// C_*Init (issue 13 §5), the daemon checks again before any module sees a parameter
/// (PincacheService's MechanismParameters, the one check). Types are CKM_ values.
public enum MechanismParameterRules {
    /// Parameters that are pointer-free C structs (or IVs) of an exact size, passed as bytes.
    public static let rawSizes: [UInt64: Int] = [
        0x0D: 24, 0x0E: 24, 0x43: 24, 0x44: 24, 0x45: 24, 0x47: 24,  // *RSA_PKCS_PSS: CK_RSA_PKCS_PSS_PARAMS
        0x1082: 16, 0x1085: 16,  // AES_CBC(_PAD): the IV
        0x1086: 24,  // AES_CTR: CK_AES_CTR_PARAMS
        0x122: 8, 0x125: 8, 0x133: 8, 0x136: 8,  // DES_CBC(_PAD), DES3_CBC(_PAD): the IV
        // *_MAC_GENERAL and *_HMAC_GENERAL: CK_MAC_GENERAL_PARAMS
        0x1084: 8, 0x108B: 8, 0x222: 8, 0x252: 8, 0x257: 8, 0x262: 8, 0x272: 8,
    ]

    /// Mechanisms PKCS#11 gives a parameter they cannot go without: without one they are
    /// refused with CKR_MECHANISM_PARAM_INVALID (PKCS#11's code for it), at Init by the proxy and
    /// before the module by the daemon — a module may trust its caller to pass one.
    public static let required: Set<UInt64> = Set(rawSizes.keys).union([
        0x09,  // RSA_PKCS_OAEP
        0x1087,  // AES_GCM
        0x1050, 0x1051,  // ECDH1_DERIVE, ECDH1_COFACTOR_DERIVE
        0x1100, 0x1101, 0x1102, 0x1103, 0x1104, 0x1105,  // DES_, DES3_, AES_ECB/CBC_ENCRYPT_DATA
        0x21,  // DH_PKCS_DERIVE: the other party's public value
    ])
}
