/// Every call of the proxy's RPC, declared once: its id, name, request and response fields
/// with the cap on every count and length. The daemon's dispatcher, the proxy's forwarder,
/// the fuzz target and the Python test client (through `dbus/cryptoki-wire.json`, generated
/// from this table) all read it. Calls are appended, never renumbered; a new field is a new
/// call.
public struct Call: Sendable, Equatable {
    public let id: UInt16
    public let name: String
    public let request: [Field]
    public let response: [Field]
    /// May wait for a person (PIN pad, polkit prompt) or slow card work: the proxy's long timeout.
    public let slow: Bool

    init(_ id: UInt16, _ name: String, _ request: [Field], _ response: [Field] = [], slow: Bool = false) {
        self.id = id
        self.name = name
        self.request = request
        self.response = response
        self.slow = slow
    }
}

/// The caps, each written once (dbus/README.md "Limits").
public enum Caps {
    public static let slotName = 64
    public static let text = 256
    public static let pin = 256
    public static let tokenLabel = 32
    public static let templateEntries = 256
    public static let attributeValue = 1 << 20
    public static let mechanismParameter = 4096
    public static let data = 16 << 20
    public static let handles = 100_000
    public static let slots = 1024
    public static let mechanisms = 4096
    public static let random = 1 << 20
    /// Parts of one multi-part digest (DigestParts): updates and keys in the order made.
    public static let digestParts = 1024
    public static let errorMessage = 4096
    /// The largest frame body: one call's data plus room for its other fields.
    public static let frameBody = data + (64 << 10)
}

/// Field types used by several calls.
public enum Fields {
    public static let slot = Field("slot", .string(max: Caps.slotName))
    public static let session = Field("session", .ulong)
    public static let handle = Field("handle", .ulong)
    public static let key = Field("key", .ulong)
    public static let attribute = FieldType.record([
        Field("type", .ulong), Field("value", .bytes(max: Caps.attributeValue)),
    ])
    public static let template = FieldType.array(attribute, max: Caps.templateEntries)
    public static let mechanism = FieldType.record([
        Field("type", .ulong), Field("parameter", .bytes(max: Caps.mechanismParameter)),
    ])
    public static let data = FieldType.bytes(max: Caps.data)
    public static let pin = FieldType.secret(max: Caps.pin)
    public static let text = FieldType.string(max: Caps.text)
    public static let version = FieldType.record([Field("major", .ulong), Field("minor", .ulong)])
    /// What one part of a stream produced (Calls.streamUpdate).
    public static let streamOutput = [
        Field("status", .ulong), Field("length", .ulong), Field("output", data), Field("active", .ulong),
    ]
    /// CK_SLOT_INFO and, when `token_present` is 1, CK_TOKEN_INFO (zeros and empty text
    /// otherwise; 2: a card the module cannot read, CKR_TOKEN_NOT_RECOGNIZED).
    public static let slotInfo = FieldType.record([
        slot,
        Field("slot_description", text), Field("slot_manufacturer", text), Field("slot_flags", .ulong),
        Field("hardware_version", version), Field("firmware_version", version),
        Field("token_present", .ulong),
        Field("label", text), Field("manufacturer", text), Field("model", text), Field("serial", text),
        Field("token_flags", .ulong), Field("max_session_count", .ulong), Field("max_rw_session_count", .ulong),
        Field("max_pin_len", .ulong), Field("min_pin_len", .ulong),
        Field("total_public_memory", .ulong), Field("free_public_memory", .ulong),
        Field("total_private_memory", .ulong), Field("free_private_memory", .ulong),
        Field("token_hardware_version", version), Field("token_firmware_version", version),
        Field("utc_time", .string(max: 16)),
    ])
    public static let mechanismInfo = FieldType.record([
        Field("type", .ulong), Field("min_key_size", .ulong), Field("max_key_size", .ulong), Field("flags", .ulong),
    ])
    /// One C_GetAttributeValue result: status 0 (value valid), CKR_ATTRIBUTE_SENSITIVE or
    /// CKR_ATTRIBUTE_TYPE_INVALID (value empty).
    public static let attributeResult = FieldType.record([
        Field("type", .ulong), Field("status", .ulong), Field("value", .bytes(max: Caps.attributeValue)),
    ])
}

public enum Calls {
    /// Protocol version: the Hello exchange opens every socket with it.
    public static let version: UInt64 = 1
    /// the bytes "PPINACHE" as a little-endian number: a peer that is not the proxy fails at once.
    public static let magic: UInt64 = 0x4548_4341_4E49_5050

    public static let hello = Call(
        0, "Hello", [Field("magic", .ulong), Field("version", .ulong)],
        [Field("version", .ulong), Field("daemon", .string(max: 64))])
    public static let getSlots = Call(1, "GetSlots", [], [Field("slots", .array(Fields.slotInfo, max: Caps.slots))])
    public static let getMechanisms = Call(
        2, "GetMechanisms", [Fields.slot], [Field("mechanisms", .array(Fields.mechanismInfo, max: Caps.mechanisms))],
        slow: true)
    public static let openSession = Call(3, "OpenSession", [Fields.slot, Field("flags", .ulong)], [Fields.session])
    public static let closeSession = Call(4, "CloseSession", [Fields.session])
    public static let initToken = Call(
        5, "InitToken", [Fields.slot, Field("so_pin", Fields.pin), Field("label", .string(max: Caps.tokenLabel))],
        slow: true)
    public static let getSessionInfo = Call(
        6, "GetSessionInfo", [Fields.session],
        [Field("state", .ulong), Field("flags", .ulong), Field("device_error", .ulong)])
    public static let login = Call(
        7, "Login", [Fields.session, Field("user_type", .ulong), Field("pin", Fields.pin)], slow: true)
    public static let logout = Call(8, "Logout", [Fields.session])
    public static let findObjects = Call(
        9, "FindObjects", [Fields.session, Field("template", Fields.template), Field("max", .ulong)],
        [Field("handles", .array(.ulong, max: Caps.handles))])
    public static let getAttributes = Call(
        10, "GetAttributes",
        [Fields.session, Fields.handle, Field("types", .array(.ulong, max: Caps.templateEntries))],
        [Field("attributes", .array(Fields.attributeResult, max: Caps.templateEntries))])
    public static let setAttributes = Call(
        11, "SetAttributes", [Fields.session, Fields.handle, Field("template", Fields.template)])
    public static let createObject = Call(
        12, "CreateObject", [Fields.session, Field("template", Fields.template)], [Fields.handle])
    public static let copyObject = Call(
        13, "CopyObject", [Fields.session, Fields.handle, Field("template", Fields.template)], [Fields.handle])
    public static let destroyObject = Call(14, "DestroyObject", [Fields.session, Fields.handle])
    public static let generateKey = Call(
        15, "GenerateKey", [Fields.session, Field("mechanism", Fields.mechanism), Field("template", Fields.template)],
        [Fields.handle], slow: true)
    public static let generateKeyPair = Call(
        16, "GenerateKeyPair",
        [
            Fields.session, Field("mechanism", Fields.mechanism), Field("public_template", Fields.template),
            Field("private_template", Fields.template),
        ],
        [Field("public_key", .ulong), Field("private_key", .ulong)], slow: true)
    public static let sign = Call(
        17, "Sign", [Fields.session, Field("mechanism", Fields.mechanism), Fields.key, Field("data", Fields.data)],
        [Field("signature", Fields.data)], slow: true)
    public static let verify = Call(
        18, "Verify",
        [
            Fields.session, Field("mechanism", Fields.mechanism), Fields.key, Field("data", Fields.data),
            Field("signature", Fields.data),
        ])
    public static let encrypt = Call(
        19, "Encrypt", [Fields.session, Field("mechanism", Fields.mechanism), Fields.key, Field("data", Fields.data)],
        [Field("ciphertext", Fields.data)])
    public static let decrypt = Call(
        20, "Decrypt", [Fields.session, Field("mechanism", Fields.mechanism), Fields.key, Field("data", Fields.data)],
        [Field("plaintext", Fields.data)], slow: true)
    public static let digest = Call(
        21, "Digest", [Fields.session, Field("mechanism", Fields.mechanism), Field("data", Fields.data)],
        [Field("digest", Fields.data)])
    public static let generateRandom = Call(
        22, "GenerateRandom", [Fields.session, Field("length", .ulong)], [Field("random", .bytes(max: Caps.random))])
    public static let seedRandom = Call(23, "SeedRandom", [Fields.session, Field("seed", Fields.data)])
    public static let initPIN = Call(24, "InitPIN", [Fields.session, Field("pin", Fields.pin)], slow: true)
    public static let setPIN = Call(
        25, "SetPIN", [Fields.session, Field("old_pin", Fields.pin), Field("new_pin", Fields.pin)], slow: true)

    /// Indexed by id: `all[Int(id)].id == id` (a unit test checks it).
    /// C_GetObjectSize (issue 13 §7): the backend's answer, or its refusal.
    public static let getObjectSize = Call(26, "GetObjectSize", [Fields.session, Fields.handle], [Field("size", .ulong)])
    /// C_DigestInit, then C_DigestUpdate or C_DigestKey per part in order, then C_DigestFinal
    /// (issue 13 §7): a part with key 0 is data, any other is the key C_DigestKey was given.
    public static let digestParts = Call(
        27, "DigestParts",
        [
            Fields.session, Field("mechanism", Fields.mechanism),
            Field(
                "parts", .array(.record([Field("key", .ulong), Field("data", Fields.data)]), max: Caps.digestParts)),
        ],
        [Field("digest", Fields.data)])
    /// C_SignInit, C_VerifyInit, C_EncryptInit, C_DecryptInit's look at the key (issue 13 §5):
    /// CKA_CLASS, CKA_KEY_TYPE, CKA_SIGN, CKA_VERIFY, CKA_ENCRYPT, CKA_DECRYPT as GetAttributes
    /// answers them, or the error the operation would meet (CKR_KEY_HANDLE_INVALID,
    /// CKR_USER_NOT_LOGGED_IN), without a login where the daemon knows the key.
    public static let keyFacts = Call(
        28, "KeyFacts", [Fields.session, Fields.key],
        [Field("attributes", .array(Fields.attributeResult, max: 16))])
    /// C_WrapKey (issue 13 §11): `key` wrapped under `wrapping_key`, in the caller's login
    /// when either is private.
    public static let wrapKey = Call(
        29, "WrapKey",
        [Fields.session, Field("mechanism", Fields.mechanism), Field("wrapping_key", .ulong), Fields.key],
        [Field("wrapped", Fields.data)], slow: true)
    /// C_UnwrapKey (issue 13 §11): a new key from `wrapped`; a private unwrapping key is used as
    /// in a decryption (its bracket, its count).
    public static let unwrapKey = Call(
        30, "UnwrapKey",
        [
            Fields.session, Field("mechanism", Fields.mechanism), Field("unwrapping_key", .ulong),
            Field("wrapped", Fields.data), Field("template", Fields.template),
        ],
        [Fields.handle], slow: true)
    /// C_DeriveKey (issue 13 §11): a new key from `base_key` (ECDH: the other party's point
    /// travels in the flattened mechanism parameter, dbus/README.md).
    public static let deriveKey = Call(
        31, "DeriveKey",
        [Fields.session, Field("mechanism", Fields.mechanism), Field("base_key", .ulong), Field("template", Fields.template)],
        [Fields.handle], slow: true)

    /// A multi-part operation the token runs part by part (issue 13 §10), in a backend session
    /// of its own: its Init when the proxy starts streaming (an encryption's or decryption's
    /// first update; a signature's, verification's or digest's first MiB). `kind` 0 encrypt, 1
    /// decrypt, 2 sign, 3 verify, 4 digest (`key` unused). `streaming` 0: the daemon keeps to
    /// its own path (a key that needs a login the caller does not hold, any private key's
    /// signature), and the proxy gathers the parts for the final call as before.
    public static let streamBegin = Call(
        32, "StreamBegin", [Fields.session, Field("kind", .ulong), Field("mechanism", Fields.mechanism), Fields.key],
        [Field("streaming", .ulong)])
    /// An update of a stream as the application made it: `data`, or a `C_DigestKey` of `key`
    /// (non-zero). `buffer` 0 no length pointer, 1 a NULL output buffer (a length query), 2 one
    /// of `capacity` bytes (encryption and decryption only). The answer: the token's verdict
    /// (`status`), the length it wrote, its output, and whether its operation goes on
    /// (`active`: after an error the daemon asks the token, whose rules differ — SoftHSM keeps
    /// the operation after CKR_ARGUMENTS_BAD).
    public static let streamUpdate = Call(
        33, "StreamUpdate",
        [
            Fields.session, Field("kind", .ulong), Field("data", Fields.data), Fields.key, Field("buffer", .ulong),
            Field("capacity", .ulong),
        ],
        Fields.streamOutput, slow: true)
    /// The final call of a stream, as StreamUpdate; `signature` is C_VerifyFinal's.
    public static let streamFinal = Call(
        34, "StreamFinal",
        [
            Fields.session, Field("kind", .ulong), Field("signature", Fields.data), Field("buffer", .ulong),
            Field("capacity", .ulong),
        ],
        Fields.streamOutput, slow: true)

    /// The functions PKCS#11 lets a module leave out that the token's module implements
    /// (issue 13 §11), as bits: 1 C_SignRecover, 2 C_VerifyRecover, 4 C_DigestEncryptUpdate,
    /// 8 C_DecryptDigestUpdate, 16 C_SignEncryptUpdate, 32 C_DecryptVerifyUpdate,
    /// 64 C_GetOperationState, 128 C_SetOperationState; 256 a session may run operations of
    /// different kinds at once; PKCS#11 3.0's 512 C_LoginUser, 1024 C_SessionCancel. The
    /// proxy answers CKR_FUNCTION_NOT_SUPPORTED where the module would.
    public static let optionalFunctions = Call(35, "OptionalFunctions", [Fields.session], [Field("functions", .ulong)])
    /// C_SignRecoverInit and C_SignRecover (issue 13 §11): a signature's path and policy.
    public static let signRecover = Call(
        36, "SignRecover", [Fields.session, Field("mechanism", Fields.mechanism), Fields.key, Field("data", Fields.data)],
        [Field("signature", Fields.data)], slow: true)
    /// C_VerifyRecoverInit and C_VerifyRecover (issue 13 §11): the data `signature` carries.
    public static let verifyRecover = Call(
        37, "VerifyRecover",
        [Fields.session, Field("mechanism", Fields.mechanism), Fields.key, Field("signature", Fields.data)],
        [Field("data", Fields.data)])
    /// C_SessionCancel (PKCS#11 3.0): the streams of the session whose kinds are set in
    /// `kinds` (bit 1 << StreamBegin's kind) end, their backend sessions closed.
    public static let endStreams = Call(38, "EndStreams", [Fields.session, Field("kinds", .ulong)])

    public static let all: [Call] = [
        hello, getSlots, getMechanisms, openSession, closeSession, initToken, getSessionInfo, login, logout,
        findObjects, getAttributes, setAttributes, createObject, copyObject, destroyObject, generateKey,
        generateKeyPair, sign, verify, encrypt, decrypt, digest, generateRandom, seedRandom, initPIN, setPIN,
        getObjectSize, digestParts, keyFacts, wrapKey, unwrapKey, deriveKey, streamBegin, streamUpdate, streamFinal,
        optionalFunctions, signRecover, verifyRecover, endStreams,
    ]

    public static func byID(_ id: UInt16) -> Call? { Int(id) < all.count ? all[Int(id)] : nil }
}
