import DBusKit

/// The D-Bus names of pincache. Binding contract (DESIGN §2): extend, never rename.
public enum PincacheBus {
    public static let serviceName = "org.pincache.Daemon"
    public static let managerPath = ObjectPath("/org/pincache")!
    public static let tokenPrefix = ObjectPath("/org/pincache/token")!
    public static let sessionPrefix = ObjectPath("/org/pincache/session")!
    public static let version = "0.2.0"
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
            // The PKCS#11 proxy's socket (dbus/README.md, "The Cryptoki wire").
            DBusMethod("OpenCryptoki", out: [DBusArgument("socket", "h")]),
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

    public static let all = [manager, token, session]
}
