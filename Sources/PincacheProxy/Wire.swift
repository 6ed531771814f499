import FastPathWire
import CPKCS11
import DBusKit
import Glibc

/// One method of org.pincache.Cryptoki1 (cryptoki1.md) as the proxy calls it: every
/// member the proxy uses is listed here once, with its signatures and time limit; the
/// forwarder (`Library.call`) checks arguments and replies against it.
struct WireMethod: Sendable {
    let interface: String
    let member: String
    let inSignature: String
    let outSignature: String
    let target: CallTarget
    /// libdbus's reply timeout for this call.
    let timeoutMilliseconds: Int32
    /// Carries a PIN: goes over the bus, never the peer channel (the daemon refuses it there,
    /// as it can scrub only its bus connection's receive buffer).
    let carriesSecret: Bool
    /// The fast-path operation standing for this method, when it has one.
    let fastPath: FastPathWire.Operation?

    init(_ member: String, _ inSignature: String, _ outSignature: String, _ target: CallTarget,
         timeout seconds: Int32 = Wire.defaultTimeout, interface: String? = nil, carriesSecret: Bool = false,
         fastPath: FastPathWire.Operation? = nil) {
        self.carriesSecret = carriesSecret
        self.fastPath = fastPath
        switch target {
        case .general: self.interface = interface ?? Wire.cryptokiManager
        case .slot: self.interface = interface ?? Wire.cryptokiSlot
        case .session: self.interface = interface ?? Wire.cryptokiSession
        }
        self.member = member
        self.inSignature = inSignature
        self.outSignature = outSignature
        self.target = target
        self.timeoutMilliseconds = seconds * 1000
    }
}

enum Wire {
    static let daemonName = "org.pincache.Daemon"
    /// Seconds allowed for opening and binding the peer channel.
    static let channelTimeout: Int32 = 5
    // cryptoki1.md names one interface, org.pincache.Cryptoki1, on all three kinds of
    // object; the daemon exports one per kind (dbus/org.pincache.Cryptoki*1.xml), and the
    // daemon's names are the ones that answer.
    static let cryptokiManager = "org.pincache.CryptokiManager1"
    static let cryptokiSlot = "org.pincache.CryptokiSlot1"
    static let cryptokiSession = "org.pincache.CryptokiSession1"
    static let managerPath = ObjectPath("/org/pincache")!
    static let tokenPathPrefix = "/org/pincache/token/"

    /// Ordinary calls; anything that may wait for a person (PIN entry, polkit prompt, PIN
    /// pad) or for slow card work gets `slowTimeout`.
    static let defaultTimeout: Int32 = 30
    static let slowTimeout: Int32 = 120

    // Caps on what a reply may hold (cryptoki1.md "Limits"); a reply beyond them is a
    // broken or hostile daemon and the call fails with CKR_DEVICE_ERROR.
    static let maxCount = 100_000
    static let maxBytes = 16 << 20
    static let maxString = 64 << 10
    static let maxTemplate = 256
    static let maxAttributeValue = 1 << 20
    static let maxPin = 256
    static let maxRandomChunk = 1 << 20

    // Manager
    static let getSlots = WireMethod("GetSlots", "", "a(oa{sv})", .general)
    static let openChannel = WireMethod("OpenChannel", "", "say", .general)
    static let openFastPath = WireMethod("OpenFastPath", "", "h", .general)
    static let channelBind = WireMethod("Bind", "ay", "", .general, interface: "org.pincache.Channel1")
    // Slot
    static let getMechanisms = WireMethod("GetMechanisms", "", "a(tttt)", .slot)
    static let openSession = WireMethod("OpenSession", "t", "o", .slot)
    static let initToken = WireMethod("InitToken", "ss", "", .slot, timeout: slowTimeout, carriesSecret: true)
    // Session
    static let close = WireMethod("Close", "", "", .session, interface: "org.pincache.Session1")
    static let getSessionInfo = WireMethod("GetSessionInfo", "", "(ttt)", .session)
    static let login = WireMethod("Login", "ts", "", .session, timeout: slowTimeout, carriesSecret: true)
    static let logout = WireMethod("Logout", "", "", .session)
    static let findObjects = WireMethod("FindObjects", "a(tay)t", "at", .session)
    static let getAttributes = WireMethod("GetAttributes", "tat", "a(ttay)", .session)
    static let setAttributes = WireMethod("SetAttributes", "ta(tay)", "", .session)
    static let createObject = WireMethod("CreateObject", "a(tay)", "t", .session)
    static let copyObject = WireMethod("CopyObject", "ta(tay)", "t", .session)
    static let destroyObject = WireMethod("DestroyObject", "t", "", .session)
    static let generateKey = WireMethod("GenerateKey", "(tay)a(tay)", "t", .session, timeout: slowTimeout)
    // cryptoki1.md says "→ (tt)"; the daemon answers two values (public_key, private_key).
    static let generateKeyPair = WireMethod("GenerateKeyPair", "(tay)a(tay)a(tay)", "tt", .session, timeout: slowTimeout)
    static let sign = WireMethod("Sign", "(tay)tay", "ay", .session, timeout: slowTimeout, fastPath: .sign)
    static let verify = WireMethod("Verify", "(tay)tayay", "", .session, fastPath: .verify)
    static let encrypt = WireMethod("Encrypt", "(tay)tay", "ay", .session, fastPath: .encrypt)
    static let decrypt = WireMethod("Decrypt", "(tay)tay", "ay", .session, timeout: slowTimeout, fastPath: .decrypt)
    static let digest = WireMethod("Digest", "(tay)ay", "ay", .session)
    static let generateRandom = WireMethod("GenerateRandom", "t", "ay", .session)
    static let seedRandom = WireMethod("SeedRandom", "ay", "", .session)
    static let initPIN = WireMethod("InitPIN", "s", "", .session, timeout: slowTimeout, carriesSecret: true)
    static let setPIN = WireMethod("SetPIN", "ss", "", .session, timeout: slowTimeout, carriesSecret: true)

    /// True when a decoded reply stays within the caps: counts, byte strings, strings,
    /// and variant nesting. Anything else (including file descriptors, which no reply
    /// declares) fails the check.
    static func withinCaps(_ value: DBusValue, depth: Int = 0) -> Bool {
        guard depth < 8 else { return false }
        switch value {
        case .bytes(let b): return b.count <= maxBytes
        case .string(let s): return s.utf8.count <= maxString
        case .array(_, let elements):
            return elements.count <= maxCount && elements.allSatisfy { withinCaps($0, depth: depth + 1) }
        case .dictionary(_, _, let entries):
            return entries.count <= maxCount
                && entries.allSatisfy { withinCaps($0.key, depth: depth + 1) && withinCaps($0.value, depth: depth + 1) }
        case .structure(let fields): return fields.allSatisfy { withinCaps($0, depth: depth + 1) }
        case .variant(let inner): return withinCaps(inner, depth: depth + 1)
        case .unixFD: return false
        default: return true
        }
    }

    /// Closes any descriptors a rejected reply carried (libdbus dup'ed them for us).
    static func closeDescriptors(in value: DBusValue) {
        switch value {
        case .unixFD(let fd): if fd >= 0 { _ = Glibc.close(fd) }
        case .array(_, let elements): elements.forEach(closeDescriptors)
        case .dictionary(_, _, let entries): entries.forEach { closeDescriptors(in: $0.key); closeDescriptors(in: $0.value) }
        case .structure(let fields): fields.forEach(closeDescriptors)
        case .variant(let inner): closeDescriptors(in: inner)
        default: break
        }
    }
}
