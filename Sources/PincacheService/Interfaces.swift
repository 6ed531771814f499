import DBusKit

/// The D-Bus names of pincache. Binding contract (DESIGN §2): extend, never rename.
public enum PincacheBus {
    public static let serviceName = "org.pincache.Daemon"
    public static let managerPath = ObjectPath("/org/pincache")!
    public static let tokenPrefix = ObjectPath("/org/pincache/token")!
    public static let sessionPrefix = ObjectPath("/org/pincache/session")!
    public static let version = "0.1.0"
}

/// One declaration per interface: introspection, dispatch and signature checks all read these
/// (DBusKit), and `dbus/*.xml` is generated from them (`pincached --print-introspection`).
public enum PincacheInterfaces {
    public static let manager = DBusInterface(
        "org.pincache.Manager1",
        methods: [
            DBusMethod("GetTokens", out: [DBusArgument("tokens", "ao")]),
            DBusMethod("FlushCaches"),
            DBusMethod("GetCallerState", out: [DBusArgument("state", "a{sv}")]),
            DBusMethod("GetStatistics", out: [DBusArgument("statistics", "a{sv}")]),
        ],
        signals: [
            DBusSignal("TokenInserted", [DBusArgument("token", "o")]),
            DBusSignal("TokenRemoved", [DBusArgument("token", "o")]),
        ],
        properties: [
            DBusProperty("Version", "s", emitsChanged: .constant),
            DBusProperty("CachingMode", "b"),
            DBusProperty("LogoutAfterSign", "b"),
            DBusProperty("ForceLoginBeforeSignKeyUsage", "u"),
        ])

    public static let token = DBusInterface(
        "org.pincache.Token1",
        methods: [
            DBusMethod("OpenSession", out: [DBusArgument("session", "o")]),
            DBusMethod("ListKeys", out: [DBusArgument("keys", "aa{sv}")]),
            DBusMethod(
                "SignOnce",
                in: [
                    DBusArgument("pin", "s", sensitive: true), DBusArgument("key_id", "ay"),
                    DBusArgument("mechanism", "s"), DBusArgument("data", "ay"),
                ],
                out: [DBusArgument("signature", "ay")]),
        ],
        properties: [
            DBusProperty("Label", "s"),
            DBusProperty("Manufacturer", "s"),
            DBusProperty("Model", "s"),
            DBusProperty("Serial", "s"),
            DBusProperty("SlotDescription", "s"),
            DBusProperty("Present", "b"),
            DBusProperty("Recognized", "b"),
            DBusProperty("Kind", "s"),
            DBusProperty("Module", "s", emitsChanged: .constant),
            DBusProperty("ProtectedAuthenticationPath", "b"),
            DBusProperty("PinMinLength", "u"),
            DBusProperty("PinMaxLength", "u"),
            DBusProperty("UserPinCountLow", "b"),
            DBusProperty("UserPinFinalTry", "b"),
            DBusProperty("UserPinLocked", "b"),
        ])

    public static let session = DBusInterface(
        "org.pincache.Session1",
        methods: [
            DBusMethod("Login", in: [DBusArgument("pin", "s", sensitive: true)]),
            DBusMethod("Logout"),
            DBusMethod(
                "Sign",
                in: [DBusArgument("key_id", "ay"), DBusArgument("mechanism", "s"), DBusArgument("data", "ay")],
                out: [DBusArgument("signature", "ay")]),
            DBusMethod(
                "SignWithPin",
                in: [
                    DBusArgument("pin", "s", sensitive: true), DBusArgument("key_id", "ay"),
                    DBusArgument("mechanism", "s"), DBusArgument("data", "ay"),
                ],
                out: [DBusArgument("signature", "ay")]),
            DBusMethod(
                "Decrypt",
                in: [DBusArgument("key_id", "ay"), DBusArgument("mechanism", "s"), DBusArgument("data", "ay")],
                out: [DBusArgument("plaintext", "ay")]),
            DBusMethod("Close"),
        ],
        properties: [
            DBusProperty("Token", "o", emitsChanged: .constant),
            DBusProperty("LoggedIn", "b"),
        ])

    // The proxy's interfaces (dbus/README.md): PKCS#11 over the bus, one round trip per token
    // operation. Handles and CK_ULONGs travel as `t`; templates as a(tay); mechanisms as (tay).
    public static let cryptokiManager = DBusInterface(
        "org.pincache.CryptokiManager1",
        methods: [
            DBusMethod("GetSlots", out: [DBusArgument("slots", "a(oa{sv})")]),
            DBusMethod("OpenChannel", out: [DBusArgument("address", "s"), DBusArgument("ticket", "ay")]),
            DBusMethod("OpenFastPath", out: [DBusArgument("socket", "h")]),
        ])

    /// Answered only on a peer channel that is not bound yet (dbus/README.md, "Channel").
    public static let channelInterface = "org.pincache.Channel1"
    public static let channelBindMember = "Bind"

    public static let cryptokiSlot = DBusInterface(
        "org.pincache.CryptokiSlot1",
        methods: [
            DBusMethod("GetMechanisms", out: [DBusArgument("mechanisms", "a(tttt)")]),
            DBusMethod("OpenSession", in: [DBusArgument("flags", "t")], out: [DBusArgument("session", "o")]),
            DBusMethod(
                "InitToken", in: [DBusArgument("so_pin", "s", sensitive: true), DBusArgument("label", "s")]),
        ])

    public static let cryptokiSession = DBusInterface(
        "org.pincache.CryptokiSession1",
        methods: [
            DBusMethod("GetSessionInfo", out: [DBusArgument("info", "(ttt)")]),
            DBusMethod("Login", in: [DBusArgument("user_type", "t"), DBusArgument("pin", "s", sensitive: true)]),
            DBusMethod("Logout"),
            DBusMethod(
                "FindObjects", in: [DBusArgument("template", "a(tay)"), DBusArgument("max", "t")],
                out: [DBusArgument("handles", "at")]),
            DBusMethod(
                "GetAttributes", in: [DBusArgument("handle", "t"), DBusArgument("types", "at")],
                out: [DBusArgument("attributes", "a(ttay)")]),
            DBusMethod("SetAttributes", in: [DBusArgument("handle", "t"), DBusArgument("template", "a(tay)")]),
            DBusMethod("CreateObject", in: [DBusArgument("template", "a(tay)")], out: [DBusArgument("handle", "t")]),
            DBusMethod(
                "CopyObject", in: [DBusArgument("handle", "t"), DBusArgument("template", "a(tay)")],
                out: [DBusArgument("copy", "t")]),
            DBusMethod("DestroyObject", in: [DBusArgument("handle", "t")]),
            DBusMethod(
                "GenerateKey", in: [DBusArgument("mechanism", "(tay)"), DBusArgument("template", "a(tay)")],
                out: [DBusArgument("handle", "t")]),
            DBusMethod(
                "GenerateKeyPair",
                in: [
                    DBusArgument("mechanism", "(tay)"), DBusArgument("public_template", "a(tay)"),
                    DBusArgument("private_template", "a(tay)"),
                ],
                out: [DBusArgument("public_key", "t"), DBusArgument("private_key", "t")]),
            DBusMethod(
                "Sign", in: [DBusArgument("mechanism", "(tay)"), DBusArgument("key", "t"), DBusArgument("data", "ay")],
                out: [DBusArgument("signature", "ay")]),
            DBusMethod(
                "Verify",
                in: [
                    DBusArgument("mechanism", "(tay)"), DBusArgument("key", "t"), DBusArgument("data", "ay"),
                    DBusArgument("signature", "ay"),
                ]),
            DBusMethod(
                "Encrypt",
                in: [DBusArgument("mechanism", "(tay)"), DBusArgument("key", "t"), DBusArgument("data", "ay")],
                out: [DBusArgument("ciphertext", "ay")]),
            DBusMethod(
                "Decrypt",
                in: [DBusArgument("mechanism", "(tay)"), DBusArgument("key", "t"), DBusArgument("data", "ay")],
                out: [DBusArgument("plaintext", "ay")]),
            DBusMethod(
                "Digest", in: [DBusArgument("mechanism", "(tay)"), DBusArgument("data", "ay")],
                out: [DBusArgument("digest", "ay")]),
            DBusMethod("GenerateRandom", in: [DBusArgument("length", "t")], out: [DBusArgument("random", "ay")]),
            DBusMethod("SeedRandom", in: [DBusArgument("seed", "ay")]),
            DBusMethod("InitPIN", in: [DBusArgument("pin", "s", sensitive: true)]),
            DBusMethod(
                "SetPIN",
                in: [DBusArgument("old_pin", "s", sensitive: true), DBusArgument("new_pin", "s", sensitive: true)]),
        ])

    public static let all = [manager, token, session, cryptokiManager, cryptokiSlot, cryptokiSession]
}
