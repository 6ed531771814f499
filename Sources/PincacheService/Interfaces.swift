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
            DBusMethod(
                "GetTokens", out: [DBusArgument("tokens", "ao")],
                doc: "The Token1 objects, one per slot of every backend module, present or not. Slots appear and go with TokenInserted and TokenRemoved (and ObjectManager's InterfacesAdded and InterfacesRemoved)."),
            DBusMethod(
                "FlushCaches",
                doc: "Wipes every cached PIN of every caller and ends every exclusive login of non-caching mode; sessions stay open, logged out. Needs polkit's org.pincache.manage (an administrator's password by default; set the ALLOW_INTERACTIVE_AUTHORIZATION flag to let polkit ask)."),
            DBusMethod(
                "GetCallerState", out: [DBusArgument("state", "a{sv}")],
                doc: "The calling connection's own cache environment: LoggedIn (ao, tokens it is logged in to), Cached (ao, tokens whose PIN is cached for it), Locked (ao, tokens it holds in non-caching mode), Expiry (a{ou}, seconds until an idle login ends, where PinCacheTimeout applies), UsesLeft (a{ou}, uses a cached PIN has left, where PinCacheMaxUses applies), Sessions (u), Executable (s), CachingMode (b, its mode after [app] sections). Never a PIN."),
            DBusMethod(
                "GetStatistics", out: [DBusArgument("statistics", "a{sv}")],
                doc: "Counts only: Environments, Sessions, CachedPINs, LockedTokens, Tokens, LockedMemoryBytes, PendingAuthorizations, CallsServed, CryptokiSockets, CryptokiCalls, CryptokiHeldBytes, BackendLogins, SharedBracketOperations, Errors (a{su}) and Scope. Root and callers polkit grants org.pincache.manage without a prompt get the daemon's (Scope 'all'); anyone else gets their own uid's first five (Scope 'uid N')."),
            DBusMethod(
                "OpenCryptoki", out: [DBusArgument("socket", "h")],
                doc: "The PKCS#11 proxy's socket, bound to the calling connection and its cache environment: closing either ends the other. One per connection. The protocol is in dbus/README.md, 'The Cryptoki wire'."),
        ],
        signals: [
            DBusSignal(
                "TokenInserted", [DBusArgument("token", "o")],
                doc: "A card was inserted into a reader (Token1.Present became true), or a slot with a token appeared. Sent as soon as PC/SC reports the card: Recognized, Label and the rest follow as PropertiesChanged once the module has read it (seconds, for a card OpenSC does not know)."),
            DBusSignal(
                "TokenRemoved", [DBusArgument("token", "o")],
                doc: "A card was removed (Token1.Present became false), or a slot with a token went away. Every cached PIN and login for the token has been wiped."),
            DBusSignal(
                "CacheCleared", [DBusArgument("token", "o"), DBusArgument("reason", "s")],
                doc: "Sent to one bus client only (a PKCS#11 application through the proxy has no such event): its login on token ended (its cached PIN wiped, or its exclusive login released). reason: logout (Logout, or its last session closed), timeout (PinCacheTimeout), uses (PinCacheMaxUses), removal (the card left), lock or suspend (its desktop session locked, the machine suspending), flush (FlushCaches), stale (the token rejected the PIN or reports it locked or changed), policy (P11_LogoutAfterSign, or a reload changed its mode)."),
        ],
        properties: [
            DBusProperty("Version", "s", emitsChanged: .constant, doc: "pincached's version."),
            DBusProperty(
                "CachingMode", "b",
                doc: "The configured default (P11_EnableCachePIN): true, PIN caching mode (a login is kept per caller and the token is logged in only for each operation); false, non-caching mode (a login locks the token to its caller). [app] sections may differ per program: see GetCallerState."),
            DBusProperty(
                "LogoutAfterSign", "b",
                doc: "The configured default (P11_LogoutAfterSign): every signature ends the caller's login or cached PIN."),
            DBusProperty(
                "ForceLoginBeforeSignKeyUsage", "u",
                doc: "Key usage bits (0x40, nonRepudiation) whose keys need the PIN for every signature (Session1.SignWithPin, or CKA_ALWAYS_AUTHENTICATE through the proxy)."),
        ],
        doc: "pincache's manager at /org/pincache: the tokens, the caller's own cache state, statistics, flushing every cache, and the PKCS#11 proxy's socket. Each client connection has its own cache environment, created at its first Token1 or Session1 call.")

    public static let token = DBusInterface(
        "org.pincache.Token1",
        methods: [
            DBusMethod(
                "OpenSession", out: [DBusArgument("session", "o")],
                doc: "A Session1 object for the calling connection only (MaxSessionsPerClient per connection). All of a connection's sessions on a token share one login. TokenNotPresent without a usable token."),
            DBusMethod(
                "ListKeys", out: [DBusArgument("keys", "aa{sv}")],
                doc: "The token's private keys, read without a PIN: Id (ay, CKA_ID), Label (s), KeyType ('EC' or 'RSA'), Bits (u), CanSign (b), CanDecrypt (b), KeyUsage (u, from the certificate with the same id), AlwaysAuthenticate (b: needs the PIN for every signature), Certificate (ay, DER, empty if none)."),
            DBusMethod(
                "SignOnce",
                in: [
                    DBusArgument("pin", "s", sensitive: true), DBusArgument("key_id", "ay"),
                    DBusArgument("mechanism", "s"), DBusArgument("data", "ay"),
                ],
                out: [DBusArgument("signature", "ay")],
                doc: "Logs in with pin, signs data with the key whose CKA_ID is key_id, and logs out: the PIN is used for this call only and never cached (for scripts and busctl, where each call is a connection of its own). Needs polkit's org.pincache.login. Mechanisms as for Session1.Sign."),
        ],
        properties: [
            DBusProperty("Label", "s", doc: "The token's label (CK_TOKEN_INFO), blanks trimmed; empty without a token."),
            DBusProperty("Manufacturer", "s", doc: "The token's manufacturer."),
            DBusProperty("Model", "s", doc: "The token's model."),
            DBusProperty("Serial", "s", doc: "The token's serial number."),
            DBusProperty("SlotDescription", "s", doc: "The slot's (reader's) description."),
            DBusProperty("Present", "b", doc: "A token (card) is in the slot."),
            DBusProperty("Recognized", "b", doc: "A card is present and its module can use it."),
            DBusProperty("Kind", "s", doc: "'smartcard' (a removable device) or 'software'."),
            DBusProperty("Module", "s", emitsChanged: .constant, doc: "The path of the PKCS#11 module serving the slot."),
            DBusProperty(
                "ProtectedAuthenticationPath", "b",
                doc: "The PIN is entered on the reader's own keypad, not given by the application."),
            DBusProperty("PinMinLength", "u", doc: "The shortest PIN the token accepts."),
            DBusProperty("PinMaxLength", "u", doc: "The longest PIN the token accepts."),
            DBusProperty(
                "UserPinCountLow", "b",
                doc: "A wrong user PIN was entered since the last good one (CKF_USER_PIN_COUNT_LOW). Cached PINs are held back, not sent, until a caller logs in with the right PIN."),
            DBusProperty("UserPinFinalTry", "b", doc: "One more wrong user PIN locks the token (CKF_USER_PIN_FINAL_TRY)."),
            DBusProperty("UserPinLocked", "b", doc: "The user PIN is locked (CKF_USER_PIN_LOCKED): only the SO can unlock it."),
            DBusProperty(
                "PinTriesLeft", "i",
                doc: "Wrong user PINs the token still accepts, where it tells: 0 when locked, 1 at the final try (from CKF_USER_PIN_FINAL_TRY and CKF_USER_PIN_LOCKED); -1 when unknown."),
            DBusProperty(
                "LockedBy", "a{sv}",
                doc: "In non-caching mode, who holds the token's exclusive login: Executable (s) and Uid (u), never more; empty when nobody does."),
        ],
        doc: "One slot of a backend module at /org/pincache/token/<id>, with or without a token in it; the id stays the same while the daemon runs, and for a reader across card swaps. Properties emit PropertiesChanged.")

    public static let session = DBusInterface(
        "org.pincache.Session1",
        methods: [
            DBusMethod(
                "Login", in: [DBusArgument("pin", "s", sensitive: true)],
                doc: "Verifies the user PIN on the token. In PIN caching mode the PIN is then kept, in locked memory, for this connection and this token until Logout, the last session's Close, the connection leaving the bus, PinCacheTimeout or the card's removal; in non-caching mode the token stays logged in and locked to this connection (TokenBusy for others). Needs polkit's org.pincache.login. Errors: PinIncorrect, PinLocked, TokenBusy, NotAuthorized."),
            DBusMethod(
                "Logout",
                doc: "Ends this connection's login on the token: its cached PIN is wiped (caching mode) or the token's lock released (non-caching mode)."),
            DBusMethod(
                "Sign",
                in: [DBusArgument("key_id", "ay"), DBusArgument("mechanism", "s"), DBusArgument("data", "ay")],
                out: [DBusArgument("signature", "ay")],
                doc: "Signs data with the private key whose CKA_ID is key_id. Mechanisms: ECDSA (data is the hash; the signature is raw r||s), ECDSA-SHA256/384/512, RSA-PKCS (data is a DigestInfo), SHA256/384/512-RSA-PKCS, RSA-PSS-SHA256/384/512. Needs a login (NotLoggedIn otherwise); the first use of a cached PIN after each login needs polkit's org.pincache.use-cached-pin. Keys that need the PIN for every signature answer PinRequired: use SignWithPin."),
            DBusMethod(
                "SignWithPin",
                in: [
                    DBusArgument("pin", "s", sensitive: true), DBusArgument("key_id", "ay"),
                    DBusArgument("mechanism", "s"), DBusArgument("data", "ay"),
                ],
                out: [DBusArgument("signature", "ay")],
                doc: "Sign with a PIN verified for this one operation and never cached: the D-Bus form of a context-specific login, for keys that need the PIN for every signature (ForceLoginBeforeSignKeyUsage, CKA_ALWAYS_AUTHENTICATE). Needs polkit's org.pincache.login."),
            DBusMethod(
                "Decrypt",
                in: [DBusArgument("key_id", "ay"), DBusArgument("mechanism", "s"), DBusArgument("data", "ay")],
                out: [DBusArgument("plaintext", "ay")],
                doc: "Decrypts data with the private key whose CKA_ID is key_id. Mechanisms: RSA-OAEP-SHA256, RSA-OAEP-SHA1, RSA-PKCS. Needs a login, as Sign."),
            DBusMethod(
                "Close",
                doc: "Closes the session. Closing a connection's last session on a token ends its login there, as Logout."),
        ],
        properties: [
            DBusProperty("Token", "o", emitsChanged: .constant, doc: "The Token1 object this session is on."),
            DBusProperty(
                "LoggedIn", "b",
                doc: "This connection is logged in to the session's token (a cached PIN or a held login). PropertiesChanged is sent to the owning connection only."),
        ],
        doc: "A session at /org/pincache/session/<n>, usable only by the connection that opened it: anyone else gets org.freedesktop.DBus.Error.AccessDenied, the same reply as for a session that does not exist. Errors are org.pincache.Error.<Name> with the token's CKR_ code in the message.")

    public static let all = [manager, token, session]
}
