// Typed wrappers for the PKCS#11 integers (rust-cryptoki's shape): a slot can never be
// passed where a session goes, and open C enumerations are structs with constants so a
// vendor value still round-trips.
import CPKCS11

/// A `CK_SLOT_ID`.
public struct SlotID: RawRepresentable, Hashable, Sendable, Comparable, CustomStringConvertible {
    public var rawValue: UInt
    public init(rawValue: UInt) { self.rawValue = rawValue }
    public static func < (lhs: SlotID, rhs: SlotID) -> Bool { lhs.rawValue < rhs.rawValue }
    public var description: String { "slot \(rawValue)" }
}

/// A `CK_SESSION_HANDLE`.
public struct SessionHandle: RawRepresentable, Hashable, Sendable {
    public var rawValue: UInt
    public init(rawValue: UInt) { self.rawValue = rawValue }
}

/// A `CK_OBJECT_HANDLE`.
public struct ObjectHandle: RawRepresentable, Hashable, Sendable {
    public var rawValue: UInt
    public init(rawValue: UInt) { self.rawValue = rawValue }
}

/// The name of a value from one of the generated tables; values nobody named still print
/// recognisably, split at the vendor range so a vendor code reads as "which vendor code".
func pkcs11Name(_ raw: UInt, prefix: String, table: [UInt: String]) -> String {
    if let name = table[raw] { return name }
    let vendorBase: UInt = 0x8000_0000
    if raw >= vendorBase {
        return "\(prefix)_VENDOR_DEFINED+0x\(String(raw - vendorBase, radix: 16))"
    }
    return "\(prefix)_0x\(String(raw, radix: 16))"
}

/// A `CK_RV` return value. Constants for every `CKR_` name in the header live in
/// `ReturnValue+Constants.swift`.
public struct ReturnValue: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public var rawValue: UInt
    public init(rawValue: UInt) { self.rawValue = rawValue }
    /// The header's name, e.g. `CKR_PIN_INCORRECT`; unknown values give
    /// `CKR_VENDOR_DEFINED+0x…` or `CKR_0x…`.
    public var name: String { pkcs11Name(rawValue, prefix: "CKR", table: NameTables.returnValues) }
    /// `CKR_PIN_INCORRECT (0xa0)`: the exact code travels with the name so the proxy can
    /// hand it back unchanged.
    public var description: String { "\(name) (0x\(String(rawValue, radix: 16)))" }
}

/// A `CK_MECHANISM_TYPE`.
public struct MechanismType: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public var rawValue: UInt
    public init(rawValue: UInt) { self.rawValue = rawValue }
    /// The header's name, e.g. `CKM_ECDSA_SHA256`.
    public var name: String { pkcs11Name(rawValue, prefix: "CKM", table: NameTables.mechanisms) }
    public var description: String { name }

    /// `CKM_RSA_PKCS_KEY_PAIR_GEN`
    public static let rsaPKCSKeyPairGen = MechanismType(rawValue: CKM_RSA_PKCS_KEY_PAIR_GEN)
    /// `CKM_RSA_PKCS`
    public static let rsaPKCS = MechanismType(rawValue: CKM_RSA_PKCS)
    /// `CKM_RSA_X_509`
    public static let rsaX509 = MechanismType(rawValue: CKM_RSA_X_509)
    /// `CKM_SHA1_RSA_PKCS`
    public static let sha1RSAPKCS = MechanismType(rawValue: CKM_SHA1_RSA_PKCS)
    /// `CKM_SHA224_RSA_PKCS`
    public static let sha224RSAPKCS = MechanismType(rawValue: CKM_SHA224_RSA_PKCS)
    /// `CKM_SHA256_RSA_PKCS`
    public static let sha256RSAPKCS = MechanismType(rawValue: CKM_SHA256_RSA_PKCS)
    /// `CKM_SHA384_RSA_PKCS`
    public static let sha384RSAPKCS = MechanismType(rawValue: CKM_SHA384_RSA_PKCS)
    /// `CKM_SHA512_RSA_PKCS`
    public static let sha512RSAPKCS = MechanismType(rawValue: CKM_SHA512_RSA_PKCS)
    /// `CKM_RSA_PKCS_PSS`
    public static let rsaPKCSPSS = MechanismType(rawValue: CKM_RSA_PKCS_PSS)
    /// `CKM_SHA1_RSA_PKCS_PSS`
    public static let sha1RSAPKCSPSS = MechanismType(rawValue: CKM_SHA1_RSA_PKCS_PSS)
    /// `CKM_SHA224_RSA_PKCS_PSS`
    public static let sha224RSAPKCSPSS = MechanismType(rawValue: CKM_SHA224_RSA_PKCS_PSS)
    /// `CKM_SHA256_RSA_PKCS_PSS`
    public static let sha256RSAPKCSPSS = MechanismType(rawValue: CKM_SHA256_RSA_PKCS_PSS)
    /// `CKM_SHA384_RSA_PKCS_PSS`
    public static let sha384RSAPKCSPSS = MechanismType(rawValue: CKM_SHA384_RSA_PKCS_PSS)
    /// `CKM_SHA512_RSA_PKCS_PSS`
    public static let sha512RSAPKCSPSS = MechanismType(rawValue: CKM_SHA512_RSA_PKCS_PSS)
    /// `CKM_RSA_PKCS_OAEP`
    public static let rsaPKCSOAEP = MechanismType(rawValue: CKM_RSA_PKCS_OAEP)
    /// `CKM_SHA_1`
    public static let sha1 = MechanismType(rawValue: CKM_SHA_1)
    /// `CKM_SHA224`
    public static let sha224 = MechanismType(rawValue: CKM_SHA224)
    /// `CKM_SHA256`
    public static let sha256 = MechanismType(rawValue: CKM_SHA256)
    /// `CKM_SHA384`
    public static let sha384 = MechanismType(rawValue: CKM_SHA384)
    /// `CKM_SHA512`
    public static let sha512 = MechanismType(rawValue: CKM_SHA512)
    /// `CKM_EC_KEY_PAIR_GEN`
    public static let ecKeyPairGen = MechanismType(rawValue: CKM_EC_KEY_PAIR_GEN)
    /// `CKM_AES_KEY_GEN`
    public static let aesKeyGen = MechanismType(rawValue: CKM_AES_KEY_GEN)
    /// `CKM_ECDSA`
    public static let ecdsa = MechanismType(rawValue: CKM_ECDSA)
    /// `CKM_ECDSA_SHA1`
    public static let ecdsaSHA1 = MechanismType(rawValue: CKM_ECDSA_SHA1)
    /// `CKM_ECDSA_SHA224`
    public static let ecdsaSHA224 = MechanismType(rawValue: CKM_ECDSA_SHA224)
    /// `CKM_ECDSA_SHA256`
    public static let ecdsaSHA256 = MechanismType(rawValue: CKM_ECDSA_SHA256)
    /// `CKM_ECDSA_SHA384`
    public static let ecdsaSHA384 = MechanismType(rawValue: CKM_ECDSA_SHA384)
    /// `CKM_ECDSA_SHA512`
    public static let ecdsaSHA512 = MechanismType(rawValue: CKM_ECDSA_SHA512)
}

/// A `CK_RSA_PKCS_MGF_TYPE` (`CKG_MGF1_*`), for PSS and OAEP parameters.
public struct MGF: RawRepresentable, Hashable, Sendable {
    public var rawValue: UInt
    public init(rawValue: UInt) { self.rawValue = rawValue }
    /// `CKG_MGF1_SHA1`
    public static let sha1 = MGF(rawValue: CKG_MGF1_SHA1)
    /// `CKG_MGF1_SHA224`
    public static let sha224 = MGF(rawValue: CKG_MGF1_SHA224)
    /// `CKG_MGF1_SHA256`
    public static let sha256 = MGF(rawValue: CKG_MGF1_SHA256)
    /// `CKG_MGF1_SHA384`
    public static let sha384 = MGF(rawValue: CKG_MGF1_SHA384)
    /// `CKG_MGF1_SHA512`
    public static let sha512 = MGF(rawValue: CKG_MGF1_SHA512)
}

/// A `CK_ATTRIBUTE_TYPE`.
public struct AttributeType: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public var rawValue: UInt
    public init(rawValue: UInt) { self.rawValue = rawValue }
    /// The header's name, e.g. `CKA_EC_POINT`.
    public var name: String { pkcs11Name(rawValue, prefix: "CKA", table: NameTables.attributes) }
    public var description: String { name }

    /// `CKA_CLASS`
    public static let `class` = AttributeType(rawValue: CKA_CLASS)
    /// `CKA_TOKEN`
    public static let token = AttributeType(rawValue: CKA_TOKEN)
    /// `CKA_PRIVATE`
    public static let `private` = AttributeType(rawValue: CKA_PRIVATE)
    /// `CKA_LABEL`
    public static let label = AttributeType(rawValue: CKA_LABEL)
    /// `CKA_APPLICATION`
    public static let application = AttributeType(rawValue: CKA_APPLICATION)
    /// `CKA_VALUE`
    public static let value = AttributeType(rawValue: CKA_VALUE)
    /// `CKA_OBJECT_ID`
    public static let objectID = AttributeType(rawValue: CKA_OBJECT_ID)
    /// `CKA_CERTIFICATE_TYPE`
    public static let certificateType = AttributeType(rawValue: CKA_CERTIFICATE_TYPE)
    /// `CKA_ISSUER`
    public static let issuer = AttributeType(rawValue: CKA_ISSUER)
    /// `CKA_SERIAL_NUMBER`
    public static let serialNumber = AttributeType(rawValue: CKA_SERIAL_NUMBER)
    /// `CKA_TRUSTED`
    public static let trusted = AttributeType(rawValue: CKA_TRUSTED)
    /// `CKA_CERTIFICATE_CATEGORY`
    public static let certificateCategory = AttributeType(rawValue: CKA_CERTIFICATE_CATEGORY)
    /// `CKA_KEY_TYPE`
    public static let keyType = AttributeType(rawValue: CKA_KEY_TYPE)
    /// `CKA_SUBJECT`
    public static let subject = AttributeType(rawValue: CKA_SUBJECT)
    /// `CKA_ID`
    public static let id = AttributeType(rawValue: CKA_ID)
    /// `CKA_SENSITIVE`
    public static let sensitive = AttributeType(rawValue: CKA_SENSITIVE)
    /// `CKA_ENCRYPT`
    public static let encrypt = AttributeType(rawValue: CKA_ENCRYPT)
    /// `CKA_DECRYPT`
    public static let decrypt = AttributeType(rawValue: CKA_DECRYPT)
    /// `CKA_WRAP`
    public static let wrap = AttributeType(rawValue: CKA_WRAP)
    /// `CKA_UNWRAP`
    public static let unwrap = AttributeType(rawValue: CKA_UNWRAP)
    /// `CKA_SIGN`
    public static let sign = AttributeType(rawValue: CKA_SIGN)
    /// `CKA_SIGN_RECOVER`
    public static let signRecover = AttributeType(rawValue: CKA_SIGN_RECOVER)
    /// `CKA_VERIFY`
    public static let verify = AttributeType(rawValue: CKA_VERIFY)
    /// `CKA_VERIFY_RECOVER`
    public static let verifyRecover = AttributeType(rawValue: CKA_VERIFY_RECOVER)
    /// `CKA_DERIVE`
    public static let derive = AttributeType(rawValue: CKA_DERIVE)
    /// `CKA_MODULUS`
    public static let modulus = AttributeType(rawValue: CKA_MODULUS)
    /// `CKA_MODULUS_BITS`
    public static let modulusBits = AttributeType(rawValue: CKA_MODULUS_BITS)
    /// `CKA_PUBLIC_EXPONENT`
    public static let publicExponent = AttributeType(rawValue: CKA_PUBLIC_EXPONENT)
    /// `CKA_VALUE_LEN`
    public static let valueLen = AttributeType(rawValue: CKA_VALUE_LEN)
    /// `CKA_EXTRACTABLE`
    public static let extractable = AttributeType(rawValue: CKA_EXTRACTABLE)
    /// `CKA_LOCAL`
    public static let local = AttributeType(rawValue: CKA_LOCAL)
    /// `CKA_NEVER_EXTRACTABLE`
    public static let neverExtractable = AttributeType(rawValue: CKA_NEVER_EXTRACTABLE)
    /// `CKA_ALWAYS_SENSITIVE`
    public static let alwaysSensitive = AttributeType(rawValue: CKA_ALWAYS_SENSITIVE)
    /// `CKA_KEY_GEN_MECHANISM`
    public static let keyGenMechanism = AttributeType(rawValue: CKA_KEY_GEN_MECHANISM)
    /// `CKA_MODIFIABLE`
    public static let modifiable = AttributeType(rawValue: CKA_MODIFIABLE)
    /// `CKA_EC_PARAMS`
    public static let ecParams = AttributeType(rawValue: CKA_EC_PARAMS)
    /// `CKA_EC_POINT`
    public static let ecPoint = AttributeType(rawValue: CKA_EC_POINT)
    /// `CKA_ALWAYS_AUTHENTICATE`
    public static let alwaysAuthenticate = AttributeType(rawValue: CKA_ALWAYS_AUTHENTICATE)
    /// `CKA_WRAP_WITH_TRUSTED`
    public static let wrapWithTrusted = AttributeType(rawValue: CKA_WRAP_WITH_TRUSTED)
}

/// A `CK_OBJECT_CLASS`.
public struct ObjectClass: RawRepresentable, Hashable, Sendable {
    public var rawValue: UInt
    public init(rawValue: UInt) { self.rawValue = rawValue }
    /// `CKO_DATA`
    public static let data = ObjectClass(rawValue: CKO_DATA)
    /// `CKO_CERTIFICATE`
    public static let certificate = ObjectClass(rawValue: CKO_CERTIFICATE)
    /// `CKO_PUBLIC_KEY`
    public static let publicKey = ObjectClass(rawValue: CKO_PUBLIC_KEY)
    /// `CKO_PRIVATE_KEY`
    public static let privateKey = ObjectClass(rawValue: CKO_PRIVATE_KEY)
    /// `CKO_SECRET_KEY`
    public static let secretKey = ObjectClass(rawValue: CKO_SECRET_KEY)
}

/// A `CK_KEY_TYPE`.
public struct KeyType: RawRepresentable, Hashable, Sendable {
    public var rawValue: UInt
    public init(rawValue: UInt) { self.rawValue = rawValue }
    /// `CKK_RSA`
    public static let rsa = KeyType(rawValue: CKK_RSA)
    /// `CKK_EC`
    public static let ec = KeyType(rawValue: CKK_EC)
    /// `CKK_AES`
    public static let aes = KeyType(rawValue: CKK_AES)
}

/// A `CK_USER_TYPE`.
public struct UserType: RawRepresentable, Hashable, Sendable {
    public var rawValue: UInt
    public init(rawValue: UInt) { self.rawValue = rawValue }
    /// `CKU_SO`
    public static let so = UserType(rawValue: CKU_SO)
    /// `CKU_USER`
    public static let user = UserType(rawValue: CKU_USER)
    /// `CKU_CONTEXT_SPECIFIC`
    public static let contextSpecific = UserType(rawValue: CKU_CONTEXT_SPECIFIC)
}

/// One `CK_ATTRIBUTE`: the type and its value bytes exactly as the module encodes them
/// (`CK_BBOOL` is one byte, `CK_ULONG` is a native-endian machine word).
public struct Attribute: Sendable, Hashable {
    public var type: AttributeType
    public var value: [UInt8]
    public init(_ type: AttributeType, _ value: [UInt8]) {
        self.type = type
        self.value = value
    }
    /// A `CK_BBOOL` attribute.
    public static func bool(_ t: AttributeType, _ v: Bool) -> Attribute { Attribute(t, [v ? 1 : 0]) }
    /// A `CK_ULONG` attribute.
    public static func ulong(_ t: AttributeType, _ v: UInt) -> Attribute {
        Attribute(t, withUnsafeBytes(of: v) { Array($0) })
    }
    /// A UTF-8 string attribute such as `CKA_LABEL`, without terminator.
    public static func string(_ t: AttributeType, _ v: String) -> Attribute { Attribute(t, Array(v.utf8)) }
    /// `CKA_CLASS`.
    public static func objectClass(_ c: ObjectClass) -> Attribute { .ulong(.class, c.rawValue) }
    /// `CKA_KEY_TYPE`.
    public static func keyType(_ k: KeyType) -> Attribute { .ulong(.keyType, k.rawValue) }
}

extension Array where Element == UInt8 {
    /// The value as a `CK_BBOOL`, or nil when it is not exactly one byte.
    public var pkcs11Bool: Bool? { count == 1 ? self[0] != 0 : nil }
    /// The value as a `CK_ULONG`, or nil when it is not exactly one machine word.
    public var pkcs11ULong: UInt? {
        guard count == MemoryLayout<UInt>.size else { return nil }
        return withUnsafeBytes { $0.loadUnaligned(as: UInt.self) }
    }
}

/// A `CK_VERSION`.
public struct Version: Sendable, Hashable, CustomStringConvertible {
    public var major: UInt8
    public var minor: UInt8
    public init(major: UInt8, minor: UInt8) {
        self.major = major
        self.minor = minor
    }
    public var description: String { "\(major).\(minor)" }
}

/// `CK_INFO` from `C_GetInfo`.
public struct ModuleInfo: Sendable, Hashable {
    public var cryptokiVersion: Version
    public var manufacturer: String
    public var libraryDescription: String
    public var libraryVersion: Version
}

/// `CK_SLOT_INFO` from `C_GetSlotInfo`; strings have their padding trimmed.
public struct SlotInfo: Sendable, Hashable {
    public var description: String
    public var manufacturer: String
    public var flags: UInt
    public var hardwareVersion: Version
    public var firmwareVersion: Version
    /// `CKF_TOKEN_PRESENT`
    public var tokenPresent: Bool { flags & CKF_TOKEN_PRESENT != 0 }
    /// `CKF_REMOVABLE_DEVICE`
    public var removableDevice: Bool { flags & CKF_REMOVABLE_DEVICE != 0 }
    /// `CKF_HW_SLOT`
    public var hardwareSlot: Bool { flags & CKF_HW_SLOT != 0 }
}

/// `CK_TOKEN_INFO` from `C_GetTokenInfo`; strings have their padding trimmed.
public struct TokenInfo: Sendable, Hashable {
    public var label: String
    public var manufacturer: String
    public var model: String
    public var serialNumber: String
    public var flags: UInt
    public var minPinLength: UInt
    public var maxPinLength: UInt
    /// `ulMaxSessionCount`. This and the other counts below are passed on as given: a
    /// module may answer `CK_UNAVAILABLE_INFORMATION` (`UInt.max`) or, for the maxima,
    /// `CK_EFFECTIVELY_INFINITE` (0).
    public var maxSessionCount: UInt
    /// `ulSessionCount`
    public var sessionCount: UInt
    /// `ulMaxRwSessionCount`
    public var maxRwSessionCount: UInt
    /// `ulRwSessionCount`
    public var rwSessionCount: UInt
    /// `ulTotalPublicMemory`
    public var totalPublicMemory: UInt
    /// `ulFreePublicMemory`
    public var freePublicMemory: UInt
    /// `ulTotalPrivateMemory`
    public var totalPrivateMemory: UInt
    /// `ulFreePrivateMemory`
    public var freePrivateMemory: UInt
    /// `hardwareVersion`
    public var hardwareVersion: Version
    /// `firmwareVersion`
    public var firmwareVersion: Version
    /// `utcTime` (`YYYYMMDDhhmmss00`) as the module gave it, without NULs; "" when the
    /// field is empty or blank (tokens without `CKF_CLOCK_ON_TOKEN` usually leave it so).
    public var utcTime: String
    /// `CKF_TOKEN_INITIALIZED`
    public var tokenInitialized: Bool { flags & CKF_TOKEN_INITIALIZED != 0 }
    /// `CKF_LOGIN_REQUIRED`
    public var loginRequired: Bool { flags & CKF_LOGIN_REQUIRED != 0 }
    /// `CKF_USER_PIN_INITIALIZED`
    public var userPinInitialized: Bool { flags & CKF_USER_PIN_INITIALIZED != 0 }
    /// `CKF_PROTECTED_AUTHENTICATION_PATH`
    public var protectedAuthenticationPath: Bool { flags & CKF_PROTECTED_AUTHENTICATION_PATH != 0 }
    /// `CKF_USER_PIN_COUNT_LOW`
    public var userPinCountLow: Bool { flags & CKF_USER_PIN_COUNT_LOW != 0 }
    /// `CKF_USER_PIN_FINAL_TRY`
    public var userPinFinalTry: Bool { flags & CKF_USER_PIN_FINAL_TRY != 0 }
    /// `CKF_USER_PIN_LOCKED`
    public var userPinLocked: Bool { flags & CKF_USER_PIN_LOCKED != 0 }
    /// `CKF_CLOCK_ON_TOKEN`
    public var clockOnToken: Bool { flags & CKF_CLOCK_ON_TOKEN != 0 }
}

/// One attribute of `PKCS11Module.attributeValues`: `status` is `.ok` with the value, or
/// the code `C_GetAttributeValue` gives for this attribute alone (`.attributeSensitive`,
/// `.attributeTypeInvalid`) with an empty value.
public struct AttributeResult: Sendable, Hashable {
    public var type: AttributeType
    public var status: ReturnValue
    public var value: [UInt8]
    public init(type: AttributeType, status: ReturnValue, value: [UInt8]) {
        self.type = type
        self.status = status
        self.value = value
    }
}

/// `CK_SESSION_INFO` from `C_GetSessionInfo`.
public struct SessionInfo: Sendable, Hashable {
    public var slot: SlotID
    /// `CKS_*`
    public var state: UInt
    public var flags: UInt
    /// `CKF_RW_SESSION`
    public var readWrite: Bool { flags & CKF_RW_SESSION != 0 }
    /// `CKS_RO_USER_FUNCTIONS` or `CKS_RW_USER_FUNCTIONS`.
    public var userLoggedIn: Bool { state == CKS_RO_USER_FUNCTIONS || state == CKS_RW_USER_FUNCTIONS }
}

/// `CK_MECHANISM_INFO` from `C_GetMechanismInfo`.
public struct MechanismInfo: Sendable, Hashable {
    public var minKeySize: UInt
    public var maxKeySize: UInt
    /// `CKF_SIGN`, `CKF_DECRYPT`, …
    public var flags: UInt
}
