import Glibc
import Dispatch
import DBusKit
import SystemKit
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
    /// `CKF_HW_SLOT`: a reader, not a module's own software slot.
    var hardware = false
    var info: TokenInfo?
    /// `info` is the last one read: C_GetTokenInfo failed since (not with a removal code)
    /// while the slot still reported the token. The token keeps its state and caches, but no
    /// cached PIN is presented on it until the token answers again (its flags are unknown).
    var infoUnconfirmed: (any Error & Sendable)? = nil

    var recognized: Bool { present && (info?.tokenInitialized ?? false) }

    /// The snapshot without what moves with every session and every second (session counts,
    /// free memory, the token's clock): what Token1's listeners are told about.
    var withoutCounters: TokenSnapshot {
        var s = self
        s.info?.sessionCount = 0
        s.info?.rwSessionCount = 0
        s.info?.freePublicMemory = 0
        s.info?.freePrivateMemory = 0
        s.info?.utcTime = ""
        return s
    }

    static func == (a: TokenSnapshot, b: TokenSnapshot) -> Bool {
        a.slotDescription == b.slotDescription && a.slotManufacturer == b.slotManufacturer && a.slotFlags == b.slotFlags
            && a.slotHardwareVersion == b.slotHardwareVersion && a.slotFirmwareVersion == b.slotFirmwareVersion
            && a.present == b.present && a.removable == b.removable && a.info == b.info
            && (a.infoUnconfirmed == nil) == (b.infoUnconfirmed == nil)
    }

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
    /// CKA_ALWAYS_AUTHENTICATE was read in a login (it is hidden before one).
    var alwaysAuthenticateChecked = false
    var certificate: [UInt8] = []
}

/// A private-key operation as either front end asks for it: Session1 names the key by its
/// CKA_ID, the proxy by the daemon's object handle in one of its sessions. From here on both
/// take one path (TokenContext.perform).
struct KeyOperation: Sendable {
    enum Key: Sendable {
        case id([UInt8])
        case handle(UInt64, session: UInt64, readWrite: Bool)
    }
    var key: Key
    var operation: PrivateOperation
    /// A PIN for this one operation (SignWithPin); the proxy's comes from a context-specific login.
    var freshPIN: SecretPIN?
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
    let policy = PolicyBox()
    /// Token1.LockedBy as last announced (non-caching mode's lock holder).
    let lockedBy = Mutex<LockHolder?>(nil)
    /// Set once the object is on the bus: before that, changes are not announced.
    let published = Atomic<Bool>(false)
    let snapshotState = Mutex(TokenSnapshot())
    /// The last key list read, for readers off the worker (polkit details).
    let knownKeys = Mutex<[KeyRecord]>([])
    /// Called on the worker after a refresh changed what clients can see.
    let onChange: @Sendable (TokenContext, TokenSnapshot, TokenSnapshot) -> Void

    // Worker-only state.
    var opSession: SessionHandle?
    var keys: [KeyRecord]?
    var mechanisms: Set<MechanismType>?
    // Worker-only state of the proxy's interface (TokenCryptoki.swift).
    var rawSessions: [UInt64: SessionHandle] = [:]
    /// Multi-part operations run part by part (Token+Streams).
    var streams: [OperationStreamKey: OperationStream] = [:]
    /// The optional functions the module implements, asked once (Calls.optionalFunctions).
    var moduleFunctions: PKCS11Module.OptionalFunctions?
    /// Moves at every backend login, logout or session loss (see logoutBackend).
    var loginEpoch: UInt64 = 0
    var contextPINs: [UInt64: SecretPIN] = [:]
    /// A caching-mode login left open for the next queued private operation (Token+SharedLogin).
    var sharedLogin: SharedLogin?
    /// `LoginLinger` in nanoseconds, as configured (Token+SharedLogin.lingerNanoseconds).
    let loginLinger = Atomic<UInt64>(0)
    /// Private keys by CKA_ID as found in the current login epoch (findPrivateKey).
    var resolvedKeys: [[UInt8]: (handle: ObjectHandle, epoch: UInt64)] = [:]
    let loginCounts = Mutex(LoginCounts())
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
        installSharedLoginHooks()
    }

    static func now() -> UInt64 { DispatchTime.now().uptimeNanoseconds }

    // MARK: - State refresh (worker)

    /// Waits between C_GetTokenInfo attempts while the slot reports a token (µs).
    static let tokenInfoRetries: [UInt32] = [2_000, 10_000, 50_000]

    /// The token's info, asked again after a failure: nil with the last error if every try
    /// failed. Only removal codes on every try confirm a removal (`removed`).
    private func readTokenInfo() -> (info: TokenInfo?, error: (any Error & Sendable)?, removed: Bool) {
        var last: (any Error & Sendable)?
        for wait in [0] + Self.tokenInfoRetries {
            if wait > 0 { usleep(wait) }
            do {
                return (try module.tokenInfo(slot), nil, false)
            } catch let e as PKCS11Error {
                last = e
                if e.rv == .slotIDInvalid { return (nil, e, true) }
            } catch {
                last = PKCS11Error(rv: .generalError, function: "C_GetTokenInfo")
            }
        }
        let removal = (last as? PKCS11Error).map { $0.rv == .deviceRemoved || $0.rv == .tokenNotPresent } ?? false
        return (nil, last, removal)
    }

    /// Re-reads slot and token info. A token that went away or was swapped for another card
    /// loses every cached PIN and lock before anything else can present them; a token that
    /// only failed to answer keeps them (`infoUnconfirmed`).
    @discardableResult
    func refresh() -> TokenSnapshot {
        var next = TokenSnapshot()
        let before = snapshot
        var why = "the slot reports no token"
        do {
            let slotInfo = try module.slotInfo(slot)
            next.slotDescription = slotInfo.description
            next.slotManufacturer = slotInfo.manufacturer
            next.slotFlags = slotInfo.flags
            next.slotHardwareVersion = slotInfo.hardwareVersion
            next.slotFirmwareVersion = slotInfo.firmwareVersion
            next.present = slotInfo.tokenPresent
            next.removable = slotInfo.removableDevice
            next.hardware = slotInfo.hardwareSlot
            if slotInfo.tokenPresent {
                let read = readTokenInfo()
                if let info = read.info {
                    next.info = info
                } else if read.removed || before.identity == nil {
                    why = "C_GetTokenInfo: \(read.error.map { "\($0)" } ?? "failed")"
                } else {
                    // Transient is not removal (issue 12 §6): the token keeps its state.
                    next.info = before.info
                    next.infoUnconfirmed = read.error
                    if before.infoUnconfirmed == nil {
                        Log.warning("token \(id): C_GetTokenInfo failed \(Self.tokenInfoRetries.count + 1) times (\(read.error.map { "\($0)" } ?? "?")) while the slot reports a token; keeping its state and caches, no cached PIN is used until it answers")
                    }
                }
            }
        } catch let e as PKCS11Error where e.rv != .slotIDInvalid && before.identity != nil {
            // The slot did not answer: nothing says the token went.
            next = before
            next.infoUnconfirmed = e
        } catch {
            why = "C_GetSlotInfo: \(error)"
        }
        let previous = snapshotState.withLock { s -> TokenSnapshot in
            let old = s
            s = next
            return old
        }
        if previous.identity != next.identity {
            if previous.identity != nil {
                let wiped = policy.withLock { p in
                    defer { p.tokenRemoved() }
                    return p.cachedPINCount
                }
                dropSession()
                let what = next.identity == nil ? "removed (\(why))" : "replaced by another token"
                Log.notice("token \(id): \(what); \(wiped) cached PIN(s) wiped, any exclusive login ended", event: .pinsWiped)
            }
            keys = nil
            mechanisms = nil
            resetObjects()
            soHolder.withLock { $0 = nil }
        }
        // Sessions opened and closed change the counts at every login: no listener cares.
        if previous.withoutCounters != next.withoutCounters { onChange(self, previous, next) }
        return next
    }

    /// Refreshes and returns the token info an operation needs, or TokenNotPresent. `fresh:
    /// false` trusts the last snapshot: for a caller holding the login, whose operations present
    /// no PIN (the poller and PC/SC events keep the snapshot current).
    func presentTokenInfo(fresh: Bool = true) throws -> TokenInfo {
        let snap = fresh ? refresh() : snapshot
        if fresh, let error = snap.infoUnconfirmed {
            throw ServiceError(
                .backendError,
                "the token did not report its state (\(error)); nothing was sent to it and every cache is kept: try again (CKR_DEVICE_ERROR (0x30))",
                rv: 0x30)
        }
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
        endSharedLogin()
        loginEpoch &+= 1
        if let s = opSession { try? module.closeSession(s) }
        opSession = nil
    }

    /// Replaces the backend session after a failed multi-step operation left state in it.
    /// The new one opens first: closing a token's last session would end a held login.
    func resetSession() {
        guard let old = opSession else { return }
        endSharedLogin()
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

    // MARK: - Login and logout (worker)

    func login(caller: CallerID, settings: Settings, pin: SecretPIN, isAlive: () -> Bool) throws {
        func attempt() throws -> (LoginPlan, SessionHandle) {
            let info = try presentTokenInfo()
            let plan = try policy.withLock {
                try $0.planLogin(
                    for: caller, settings: settings, protectedAuthenticationPath: info.protectedAuthenticationPath,
                    pinStatus: PinStatus(tokenFlags: info.flags))
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
        } catch let e as PKCS11Error where Self.leavesSessionSuspect(e.rv) {
            // Not retried (the PIN may have reached the card), but the next login or
            // operation gets a fresh session (closed outright when no login is held, so
            // that OpenSC lets go of the card).
            if policy.withLock({ $0.lockHolder == nil }) { dropSession() } else { resetSession() }
            throw e
        }
        switch plan {
        case .verifyThenCache:
            // Logged in anyway: list the private objects (unless a login listed them within the
            // second), so this caller's searches need none.
            refreshCatalogueIfOld(s, caller: caller)
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
        // A context-specific login belongs to the operation inside the current login; any
        // other is a new login state, which no shared one may outlive.
        if type != .contextSpecific {
            endSharedLogin()
            loginCounts.withLock { $0.logins += 1 }
        }
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
        sharedLogin = nil
        loginEpoch &+= 1
        try? module.logout(s)
    }

    func sessionOpened(caller: CallerID) {
        policy.withLock { $0.sessionOpened(by: caller) }
    }

    func sessionClosed(caller: CallerID) {
        if policy.withLock({ $0.sessionClosed(by: caller) }) == .logout { backendLogout() }
    }

    /// The lock's release and the backend's logout happen in one job on the worker: released
    /// earlier, a login queued meanwhile could take the token and then be logged out by us.
    func callerGone(_ caller: CallerID) {
        worker.submit(owner: caller.rawValue) { [self] in
            if policy.withLock({ $0.callerGone(caller) }) == .logout { backendLogout() }
        }
    }

    /// FlushCaches: the cached PINs go at once; the lock (and the backend login) on the worker.
    /// - Returns: how many cached PINs were dropped.
    func flushAll(reason: String) -> Int {
        let dropped = policy.withLock { $0.flushCachedPINs(reason: .flush) }
        worker.submit { [self] in
            let (_, action) = policy.withLock { $0.flushAll() }
            if action == .logout {
                backendLogout()
                Log.notice("token \(id): the exclusive login was ended (\(reason))")
            }
        }
        return dropped
    }

    /// An exclusive login idle for its holder's PinCacheTimeout ends (non-caching mode).
    func expireIdleLock() {
        worker.submit { [self] in
            if let holder = policy.withLock({ $0.expireIdleLock(now: Self.now()) }) {
                backendLogout()
                Log.notice("token \(id): the exclusive login of \(holder.rawValue) was idle for its PinCacheTimeout and ended")
            }
        }
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
    hexString(bytes.prefix(64)) + (bytes.count > 64 ? "…" : "")
}
