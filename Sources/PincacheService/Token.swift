import DBusKit
import Foundation
import PKCS11Kit
import PinPolicy
import Synchronization

/// A loaded backend PKCS#11 module.
final class Backend: Sendable {
    let index: Int
    let path: String
    let module: PKCS11Module
    /// Module-wide calls (the slot list) run here, never on a token's worker or the bus thread.
    let worker: SerialWorker

    init(index: Int, path: String, module: PKCS11Module) {
        self.index = index
        self.path = path
        self.module = module
        self.worker = SerialWorker(name: "pincache-module-\(index)")
    }
}

/// What the daemon last saw of a slot; read by property getters from any thread.
struct TokenSnapshot: Sendable, Equatable {
    var slotDescription = ""
    var slotManufacturer = ""
    var slotFlags: UInt = 0
    var slotHardwareVersion = Version(major: 0, minor: 0)
    var slotFirmwareVersion = Version(major: 0, minor: 0)
    var present = false
    var removable = false
    var info: TokenInfo?

    var recognized: Bool { present && (info?.tokenInitialized ?? false) }

    /// Cache entries belong to one physical token: slot plus these (DESIGN §1).
    var identity: [String]? {
        guard present, let info else { return nil }
        return [info.serialNumber, info.model, info.manufacturer, info.label]
    }
}

/// Public facts about one key, gathered without logging in (certificates and public keys),
/// completed by private-key attributes whenever they are visible.
struct KeyRecord: Sendable {
    var id: [UInt8]
    var label = ""
    var keyType = ""
    var bits: UInt32 = 0
    var canSign = false
    var canDecrypt = false
    var keyUsage: UInt32?
    var backendAlwaysAuthenticate = false
    var certificate: [UInt8] = []
}

enum PrivateOperation: Sendable {
    case sign(Mechanism, [UInt8])
    case decrypt(Mechanism, [UInt8])

    var kind: OperationKind {
        switch self {
        case .sign: .sign
        case .decrypt: .decrypt
        }
    }
}

/// One backend slot: its D-Bus identity, its serial worker, and the policy state of every
/// caller on it. Methods marked "worker" run only on `worker`; the policy mutex is never held
/// across a PKCS#11 call, so property reads and GetCallerState never wait for card I/O.
final class TokenContext: @unchecked Sendable {
    let id: String
    let path: ObjectPath
    let backend: Backend
    let slot: SlotID
    let worker: SerialWorker
    let policy = Mutex(TokenPolicy())
    /// Set once the object is on the bus: before that, changes are not announced.
    let published = Atomic<Bool>(false)
    private let snapshotState = Mutex(TokenSnapshot())
    /// The last key list read, for readers off the worker (polkit details).
    private let knownKeys = Mutex<[KeyRecord]>([])
    /// Called on the worker after a refresh changed what clients can see.
    let onChange: @Sendable (TokenContext, TokenSnapshot, TokenSnapshot) -> Void

    // Worker-only state.
    var opSession: SessionHandle?
    var keys: [KeyRecord]?
    private var mechanisms: Set<MechanismType>?
    // Worker-only state of the proxy's interface (TokenCryptoki.swift).
    var rawSessions: [UInt64: SessionHandle] = [:]
    /// Moves at every backend login, logout or session loss (see logoutBackend).
    var loginEpoch: UInt64 = 0
    var contextPINs: [UInt64: SecretPIN] = [:]
    var objectTable = ObjectTable()
    /// Handle → CKA_ID, readable off the worker (TokenCryptoki.knownKeyID).
    let handleKeyIDs = Mutex<[UInt64: [UInt8]]>([:])
    /// The caller holding an SO login (held like a non-caching login, never cached).
    let soHolder = Mutex<CallerID?>(nil)

    var module: PKCS11Module { backend.module }

    /// keyUsage of a key as last read, without touching the token.
    func knownKeyUsage(_ id: [UInt8]) -> UInt32? {
        knownKeys.withLock { keys in keys.first { $0.id == id }?.keyUsage }
    }
    var snapshot: TokenSnapshot { snapshotState.withLock { $0 } }

    init(
        backend: Backend, slot: SlotID,
        onChange: @escaping @Sendable (TokenContext, TokenSnapshot, TokenSnapshot) -> Void
    ) {
        self.backend = backend
        self.slot = slot
        self.id = "m\(backend.index)_s\(slot.rawValue)"
        self.path = PincacheBus.tokenPrefix.appending(id)!
        self.worker = SerialWorker(name: "pincache-token-\(id)")
        self.onChange = onChange
    }

    static func now() -> UInt64 { DispatchTime.now().uptimeNanoseconds }

    // MARK: - State refresh (worker)

    /// Re-reads slot and token info. A token that went away or was swapped for another card
    /// loses every cached PIN and lock before anything else can present them.
    @discardableResult
    func refresh() -> TokenSnapshot {
        var next = TokenSnapshot()
        if let slotInfo = try? module.slotInfo(slot) {
            next.slotDescription = slotInfo.description
            next.slotManufacturer = slotInfo.manufacturer
            next.slotFlags = slotInfo.flags
            next.slotHardwareVersion = slotInfo.hardwareVersion
            next.slotFirmwareVersion = slotInfo.firmwareVersion
            next.present = slotInfo.tokenPresent
            next.removable = slotInfo.removableDevice
            if slotInfo.tokenPresent { next.info = try? module.tokenInfo(slot) }
        }
        let previous = snapshotState.withLock { s -> TokenSnapshot in
            let old = s
            s = next
            return old
        }
        if previous.identity != next.identity {
            if previous.identity != nil {
                policy.withLock { $0.tokenRemoved() }
                dropSession()
            }
            keys = nil
            mechanisms = nil
            resetObjects()
            soHolder.withLock { $0 = nil }
        }
        if previous != next { onChange(self, previous, next) }
        return next
    }

    /// Refreshes and returns the token info an operation needs, or TokenNotPresent. `fresh:
    /// false` trusts the last snapshot: for a caller holding the login, whose operations present
    /// no PIN (the poller and PC/SC events keep the snapshot current).
    func presentTokenInfo(fresh: Bool = true) throws -> TokenInfo {
        let snap = fresh ? refresh() : snapshot
        guard snap.present, let info = snap.info else {
            throw ServiceError(
                .tokenNotPresent,
                "no token in \(snap.slotDescription.isEmpty ? id : snap.slotDescription) (CKR_TOKEN_NOT_PRESENT (0xe0))")
        }
        guard info.tokenInitialized else {
            throw ServiceError(.tokenNotPresent, "the token in this slot is not initialised (CKR_TOKEN_NOT_RECOGNIZED (0xe1))", rv: 0xe1)
        }
        return info
    }

    // MARK: - Backend session (worker)

    func session() throws -> SessionHandle {
        if let opSession { return opSession }
        // Read-write where the token allows it: an SO login fails while any read-only session exists.
        let s: SessionHandle
        do {
            s = try module.openSession(slot, readWrite: true)
        } catch let e as PKCS11Error where e.rv == .tokenWriteProtected {
            s = try module.openSession(slot, readWrite: false)
        }
        opSession = s
        return s
    }

    func dropSession() {
        loginEpoch &+= 1
        if let s = opSession { try? module.closeSession(s) }
        opSession = nil
    }

    /// Replaces the backend session after a failed multi-step operation left state in it.
    /// The new one opens first: closing a token's last session would end a held login.
    func resetSession() {
        guard let old = opSession else { return }
        if let fresh = (try? module.openSession(slot, readWrite: true)) ?? (try? module.openSession(slot, readWrite: false)) {
            opSession = fresh
            try? module.closeSession(old)
        }
    }

    /// Runs `body`, translating a vanished session or token into a refresh and a precise error.
    func backendCall<T>(_ body: () throws -> T) throws -> T {
        do {
            return try body()
        } catch let e as PKCS11Error {
            switch e.rv {
            case .sessionHandleInvalid, .sessionClosed, .deviceRemoved, .tokenNotPresent:
                opSession = nil
                refresh()
            default: break
            }
            throw e
        }
    }

    // MARK: - Keys (worker)

    func listKeys() throws -> [KeyRecord] {
        _ = try presentTokenInfo()
        if let keys { return keys }
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

    private func loadKeys() throws -> [KeyRecord] {
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

    // MARK: - Login and logout (worker)

    func login(caller: CallerID, settings: Settings, pin: SecretPIN, isAlive: () -> Bool) throws {
        func attempt() throws -> (LoginPlan, SessionHandle) {
            let info = try presentTokenInfo()
            let plan = try policy.withLock {
                try $0.planLogin(
                    for: caller, settings: settings, protectedAuthenticationPath: info.protectedAuthenticationPath)
            }
            let s = try backendCall { try session() }
            let usePad = info.protectedAuthenticationPath && pin.count == 0
            try backendCall { try backendLogin(s, .user, usePad ? nil : pin) }
            return (plan, s)
        }
        let (plan, s): (LoginPlan, SessionHandle)
        do {
            (plan, s) = try attempt()
        } catch let e as PKCS11Error where e.rv == .sessionHandleInvalid || e.rv == .sessionClosed {
            // The shared session went stale under us (a card swapped or reset since it was
            // opened): the PIN never reached a card, so one more try, on a fresh session and a
            // fresh look at the token, costs no PIN attempt. backendCall has dropped it.
            (plan, s) = try attempt()
        }
        switch plan {
        case .verifyThenCache:
            logoutBackend(s)
        case .holdLogin:
            break
        }
        let stored = policy.withLock { p -> Bool in
            // Checked under the policy lock: a caller that left meanwhile gets nothing stored.
            guard isAlive() else { return false }
            p.loginSucceeded(for: caller, plan: plan, settings: settings, pin: pin, now: Self.now())
            return true
        }
        if !stored, plan == .holdLogin { logoutBackend(s) }
    }

    /// C_Login; a backend left logged in (a held login released without logout, a crash in a
    /// bracket) is logged out and the login tried once more.
    func backendLogin(_ s: SessionHandle, _ type: UserType, _ pin: SecretPIN?) throws {
        loginEpoch &+= 1
        func attempt() throws {
            if let pin {
                try pin.withBytes { try module.login(s, userType: type, pin: $0) }
            } else {
                try module.login(s, userType: type, pin: nil)
            }
        }
        do {
            try attempt()
        } catch let e as PKCS11Error where e.rv == .userAlreadyLoggedIn && type == .user {
            logoutBackend(s)
            try attempt()
        }
    }

    func logout(caller: CallerID) throws {
        let action = try policy.withLock { try $0.logout(for: caller) }
        if action == .logout { backendLogout() }
    }

    func backendLogout() {
        if let s = opSession { logoutBackend(s) }
    }

    /// C_Logout, through here only: every change of the backend's login state moves the epoch,
    /// so object handles checked in an earlier one are checked again (TokenCryptoki).
    func logoutBackend(_ s: SessionHandle) {
        loginEpoch &+= 1
        try? module.logout(s)
    }

    func sessionOpened(caller: CallerID) {
        policy.withLock { $0.sessionOpened(by: caller) }
    }

    func sessionClosed(caller: CallerID) {
        if policy.withLock({ $0.sessionClosed(by: caller) }) == .logout { backendLogout() }
    }

    func callerGone(_ caller: CallerID) {
        if policy.withLock({ $0.callerGone(caller) }) == .logout {
            worker.submit { [self] in backendLogout() }
        }
    }

    // MARK: - Private operations (worker)

    /// Runs a sign or decrypt for a caller according to the policy's plan (DESIGN §1).
    func perform(
        caller: CallerID, settings: Settings, keyID: [UInt8], operation: PrivateOperation, freshPIN: SecretPIN?
    ) throws -> [UInt8] {
        let key = try keyRecord(keyID)
        let s = try backendCall { try session() }
        let requiresFresh =
            operation.kind == .sign
            && (settings.requiresFreshPIN(keyUsage: key.keyUsage) || key.backendAlwaysAuthenticate)
        return try withPrivateAccess(
            caller: caller, settings: settings, kind: operation.kind, requiresFreshPIN: requiresFresh,
            freshPIN: freshPIN, alwaysAuthenticate: key.backendAlwaysAuthenticate, session: s
        ) { contextPIN in
            try run(s, key, operation, contextPIN: contextPIN)
        }
    }

    /// The one place a caller's login state becomes a backend login (DESIGN §1): asks the policy
    /// for a plan, brackets `body` with the cached PIN (caching), runs it in the held login
    /// (non-caching), or verifies a PIN typed for this one operation. `body` gets the PIN to use
    /// as a context-specific login when the backend key needs one. A cached PIN the token rejects
    /// is purged from every environment before the error goes back.
    func withPrivateAccess<T>(
        caller: CallerID, settings: Settings, kind: OperationKind, requiresFreshPIN: Bool, freshPIN: SecretPIN?,
        alwaysAuthenticate: Bool, session s: SessionHandle, _ body: (SecretPIN?) throws -> T
    ) throws -> T {
        // A held login presents no PIN: no need to re-read the token before using it.
        let holds = policy.withLock { $0.state(of: caller).holdsLogin }
        let info = try presentTokenInfo(fresh: !holds || freshPIN != nil)
        let plan = try policy.withLock {
            try $0.planOperation(
                for: caller, settings: settings, kind: kind, requiresFreshPIN: requiresFreshPIN,
                freshPINSupplied: freshPIN != nil, pinStatus: PinStatus(tokenFlags: info.flags), now: Self.now())
        }
        var outcome = OperationOutcome.failed
        defer {
            let action = policy.withLock {
                $0.operationFinished(for: caller, settings: settings, kind: kind, outcome: outcome)
            }
            if action == .logout { backendLogout() }
        }
        let result: T
        switch plan {
        case .bracket(let pin):
            do {
                try backendCall { try backendLogin(s, .user, pin) }
            } catch let e as PKCS11Error where e.rv == .pinIncorrect || e.rv == .pinLocked {
                outcome = .cachedPINRejected
                Log.notice("token \(id): a cached PIN was rejected (\(e.rv.name)); purged from every environment")
                throw e
            }
            defer { logoutBackend(s) }
            result = try body(nil)
        case .heldLogin:
            do {
                result = try body(nil)
            } catch let e as PKCS11Error where e.rv == .userNotLoggedIn {
                // The token ended the login itself (e.g. an OpenPGP card whose PIN is good for one
                // signature): the caller no longer holds it, and says so in its state.
                _ = try? policy.withLock { try $0.logout(for: caller) }
                backendLogout()
                throw e
            }
        case .freshPIN:
            guard let fresh = freshPIN else { throw PolicyError.pinRequired }
            let holds = policy.withLock { $0.state(of: caller).holdsLogin }
            result = try withFreshPIN(s, caller: caller, holdsLogin: holds, alwaysAuthenticate: alwaysAuthenticate, pin: fresh) {
                try body(alwaysAuthenticate ? fresh : nil)
            }
        }
        outcome = .success
        return result
    }

    /// SignOnce: a PIN for one signature, never cached, no session needed.
    func signOnce(caller: CallerID, keyID: [UInt8], mechanism: Mechanism, data: [UInt8], pin: SecretPIN) throws
        -> [UInt8]
    {
        _ = try presentTokenInfo()
        let key = try keyRecord(keyID)
        try policy.withLock { try $0.checkAvailable(for: caller) }
        let holds = policy.withLock { $0.state(of: caller).holdsLogin }
        let s = try backendCall { try session() }
        let op = PrivateOperation.sign(mechanism, data)
        return try withFreshPIN(
            s, caller: caller, holdsLogin: holds, alwaysAuthenticate: key.backendAlwaysAuthenticate, pin: pin
        ) {
            try run(s, key, op, contextPIN: key.backendAlwaysAuthenticate ? pin : nil)
        }
    }

    /// Verifies a PIN the caller typed for this one operation. Keys the backend marks
    /// always-authenticate get it as a context-specific login inside `body`; other keys need a
    /// user login with it, which for a caller holding the login means logging out first.
    func withFreshPIN<T>(
        _ s: SessionHandle, caller: CallerID, holdsLogin: Bool, alwaysAuthenticate: Bool, pin: SecretPIN,
        _ body: () throws -> T
    ) throws -> T {
        if holdsLogin {
            if !alwaysAuthenticate {
                logoutBackend(s)
                do {
                    try backendCall { try backendLogin(s, .user, pin) }
                } catch {
                    // The held login is gone with the failed attempt: say so in the policy.
                    _ = try? policy.withLock { try $0.logout(for: caller) }
                    throw error
                }
            }
            return try body()
        }
        try backendCall { try backendLogin(s, .user, pin) }
        defer { logoutBackend(s) }
        return try body()
    }

    func findPrivateKey(_ s: SessionHandle, _ id: [UInt8]) throws -> ObjectHandle {
        let found = try module.findObjects(s, matching: [.objectClass(.privateKey), Attribute(.id, id)], limit: 2)
        guard let handle = found.first else {
            throw ServiceError(.keyNotFound, "no private key with id \(hex(id)) on this token (CKR_KEY_HANDLE_INVALID (0x60))")
        }
        return handle
    }

    func run(_ s: SessionHandle, _ key: KeyRecord, _ op: PrivateOperation, contextPIN: SecretPIN?) throws
        -> [UInt8]
    {
        try backendCall {
            let handle = try findPrivateKey(s, key.id)
            switch try adapted(op, s) {
            case .sign(let mechanism, let data):
                if let pin = contextPIN {
                    try module.signInit(s, mechanism: mechanism, key: handle)
                    do {
                        try backendLogin(s, .contextSpecific, pin)
                        return try module.signAfterInit(s, data: data)
                    } catch {
                        resetSession()
                        throw error
                    }
                }
                if !key.backendAlwaysAuthenticate,
                    (try? module.getAttributes(s, handle, [.alwaysAuthenticate]))?[.alwaysAuthenticate]?.pkcs11Bool == true
                {
                    // Learned only now (private attributes were hidden before login): remember it
                    // and ask for the PIN rather than fail inside the signature.
                    markAlwaysAuthenticate(key.id)
                    throw PolicyError.pinRequired
                }
                return try module.sign(s, mechanism: mechanism, key: handle, data: data)
            case .decrypt(let mechanism, let data):
                return try module.decrypt(s, mechanism: mechanism, key: handle, data: data)
            }
        }
    }

    /// Hash-and-sign ECDSA on a token that only signs prehashed data (SoftHSM, many cards):
    /// the token hashes with C_Digest, then signs with CKM_ECDSA. The result is the same signature.
    func adapted(_ op: PrivateOperation, _ s: SessionHandle) throws -> PrivateOperation {
        guard case .sign(let mechanism, let data) = op,
            let hash = Self.ecdsaHashes[mechanism.type]
        else { return op }
        if mechanisms == nil { mechanisms = Set((try? module.mechanismList(slot)) ?? []) }
        guard let mechanisms, !mechanisms.contains(mechanism.type), mechanisms.contains(.ecdsa) else { return op }
        let digest = try module.digest(s, mechanism: Mechanism(hash), data: data)
        return .sign(Mechanism(.ecdsa), digest)
    }

    private static let ecdsaHashes: [MechanismType: MechanismType] = [
        .ecdsaSHA1: .sha1, .ecdsaSHA256: .sha256, .ecdsaSHA384: .sha384, .ecdsaSHA512: .sha512,
    ]

    func markAlwaysAuthenticate(_ id: [UInt8]) {
        guard let i = keys?.firstIndex(where: { $0.id == id }) else { return }
        keys?[i].backendAlwaysAuthenticate = true
    }

    func shutdown() {
        worker.submit { [self] in dropSession() }
        worker.stop()
    }

    /// Daemon exit: closes the backend session on the worker and waits until that is done,
    /// at most until `deadline`. The worker thread is left parked, not ended: exit() runs the
    /// libraries' exit handlers (the module's destructors, OpenSSL's cleanup), and a worker
    /// still calling the module then, or a thread ending then (OpenSSL's thread-exit hook
    /// takes a lock its cleanup freed), crashes the daemon on its way out.
    @discardableResult
    func finishForExit(deadline: DispatchTime) -> Bool {
        let done = DispatchSemaphore(value: 0)
        worker.submit { [self] in
            dropSession()
            done.signal()
        }
        return done.wait(timeout: deadline) == .success
    }
}

func hex(_ bytes: [UInt8]) -> String {
    bytes.prefix(64).map { String(format: "%02x", $0) }.joined() + (bytes.count > 64 ? "…" : "")
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
