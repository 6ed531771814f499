import PKCS11Kit
import PinPolicy

/// The daemon's own object handles for the proxy. Backend handles do not survive a bracket
/// (SoftHSM renumbers private objects at every login), so each handle keeps a locator: the
/// backend handle last seen plus the attributes that identify the object, re-found when the
/// backend handle no longer matches. Session objects (CKA_TOKEN false) are the caller's that
/// made them, as PKCS#11 makes them the application's: the daemon is one application to the
/// backend, so other callers must never see them.
struct ObjectTable {
    struct Locator {
        var backend: ObjectHandle
        var identity: [UInt8]
        var template: [Attribute]
        var isPrivate: Bool
        /// Session objects only: the caller that made it, and in which session (it dies with it).
        var owner: CallerID?
        var creatingSession: UInt64?
        /// The login epoch in which `backend` was last seen to be this object.
        var checkedEpoch: UInt64?
        /// A private object's non-sensitive attributes as its last search read them, inside
        /// that search's bracket (issue 14 §3): logged-in callers read them without a login.
        var snapshot: [AttributeType: AttributeResult]?

        var keyID: [UInt8]? { template.first { $0.type == .id }?.value }
        var objectClass: UInt? { template.first { $0.type == .class }?.value.pkcs11ULong }
    }
    var locators: [UInt64: Locator] = [:]
    var byIdentity: [[UInt8]: UInt64] = [:]
    var next: UInt64 = 1
    /// The token's private objects as a login last listed them (Token+Catalogue.swift).
    var catalogue: PrivateCatalogue?
    static let capacity = 100_000
}

extension TokenContext {
    static let identityTypes: [AttributeType] = [.class, .id, .label, .private, .token, .keyType, .value]

    /// What a private object's snapshot holds: what describes a key, never what would reveal
    /// one (no CKA_VALUE, private exponent, primes; those are read in a bracket, as the
    /// backend decides).
    static let snapshotTypes: [AttributeType] = [
        .class, .token, .private, .label, .id, .keyType, .subject, .sensitive, .encrypt, .decrypt, .wrap, .unwrap,
        .sign, .signRecover, .verify, .verifyRecover, .derive, .modulus, .modulusBits, .publicExponent, .extractable,
        .local, .neverExtractable, .alwaysSensitive, .keyGenMechanism, .modifiable, .ecParams, .ecPoint,
        .alwaysAuthenticate, .wrapWithTrusted,
        AttributeType(rawValue: 0x4),  // CKA_UNIQUE_ID (3.0)
        AttributeType(rawValue: 0x4000_0600),  // CKA_ALLOWED_MECHANISMS
    ]
    static let snapshotTypeSet = Set(snapshotTypes)

    /// What of a bracketed read may join a private object's snapshot: the described types,
    /// and any type's refusal (sensitive, not applicable), which carries no secret.
    static func snapshotWorthy(_ r: AttributeResult) -> Bool { r.status != .ok || snapshotTypeSet.contains(r.type) }

    /// An object's identity bytes from its attributes; nil if the handle is not valid here.
    /// One C_GetAttributeValue for the plain attributes; CKA_VALUE (sensitive on keys, so it
    /// would cost a call per attribute) only for data objects and certificates.
    private func identity(_ s: SessionHandle, _ h: ObjectHandle) -> (bytes: [UInt8], attrs: [AttributeType: [UInt8]])? {
        guard var a = try? module.getAttributes(s, h, Array(Self.identityTypes.dropLast())), let cls = a[.class] else {
            return nil
        }
        if let c = cls.pkcs11ULong, c == ObjectClass.data.rawValue || c == ObjectClass.certificate.rawValue {
            a[.value] = (try? module.getAttributes(s, h, [.value]))?[.value]
        }
        var bytes: [UInt8] = []
        for t in Self.identityTypes {
            var v = a[t] ?? []
            if t == .value { v = fnv1a(v) }
            withUnsafeBytes(of: UInt64(v.count).littleEndian) { bytes.append(contentsOf: $0) }
            bytes += v
        }
        return (bytes, a)
    }

    /// Gives a backend object a daemon handle (the same one every time it is seen). A session
    /// object is registered only by the caller that created it (`createdIn`); found by anyone
    /// else it is not theirs, and nil hides it.
    func register(_ s: SessionHandle, _ h: ObjectHandle, caller: CallerID, createdIn session: UInt64? = nil) throws
        -> UInt64?
    {
        guard let found = identity(s, h) else {
            throw PKCS11Error(rv: .objectHandleInvalid, function: "C_GetAttributeValue")
        }
        var bytes = found.bytes
        let a = found.attrs
        let isTokenObject = a[.token]?.pkcs11Bool ?? true
        if !isTokenObject { bytes += Array(caller.rawValue.utf8) }
        if let existing = objectTable.byIdentity[bytes] {
            objectTable.locators[existing]?.backend = h
            objectTable.locators[existing]?.checkedEpoch = loginEpoch
            return existing
        }
        if !isTokenObject && session == nil { return nil }
        guard objectTable.locators.count < ObjectTable.capacity else {
            throw PKCS11Error(rv: .deviceMemory, function: "C_FindObjects")
        }
        var template: [Attribute] = []
        for t in [AttributeType.class, .id, .label, .keyType] {
            if let v = a[t] { template.append(Attribute(t, v)) }
        }
        let handle = objectTable.next
        objectTable.next += 1
        objectTable.locators[handle] = ObjectTable.Locator(
            backend: h, identity: bytes, template: template, isPrivate: a[.private]?.pkcs11Bool ?? false,
            owner: isTokenObject ? nil : caller, creatingSession: isTokenObject ? nil : session,
            checkedEpoch: loginEpoch)
        objectTable.byIdentity[bytes] = handle
        if let id = a[.id] { handleKeyIDs.withLock { $0[handle] = id } }
        return handle
    }

    /// register() for objects the caller just made: always gives a handle.
    func registerCreated(_ s: SessionHandle, _ h: ObjectHandle, caller: CallerID, session: UInt64) throws -> UInt64 {
        guard let handle = try register(s, h, caller: caller, createdIn: session) else {
            throw PKCS11Error(rv: .generalError, function: "C_CreateObject")
        }
        return handle
    }

    /// `invalid` is the code for a handle that names nothing here: CKR_KEY_HANDLE_INVALID
    /// where PKCS#11 expects a key, CKR_OBJECT_HANDLE_INVALID elsewhere.
    func locator(_ handle: UInt64, caller: CallerID, function: String, invalid: ReturnValue = .objectHandleInvalid)
        throws -> ObjectTable.Locator
    {
        guard let loc = objectTable.locators[handle], loc.owner == nil || loc.owner == caller else {
            throw PKCS11Error(rv: invalid, function: function)
        }
        return loc
    }

    /// The backend handle of a daemon handle in the current login state.
    func resolve(
        _ handle: UInt64, _ s: SessionHandle, caller: CallerID, function: String,
        invalid: ReturnValue = .objectHandleInvalid
    ) throws -> ObjectHandle {
        let loc = try locator(handle, caller: caller, function: function, invalid: invalid)
        func matches(_ h: ObjectHandle) -> Bool {
            guard var bytes = identity(s, h)?.bytes else { return false }
            if let owner = loc.owner { bytes += Array(owner.rawValue.utf8) }
            return bytes == loc.identity
        }
        // Within one login state backend handles stay put: checked once per epoch.
        if loc.checkedEpoch == loginEpoch { return loc.backend }
        if matches(loc.backend) {
            objectTable.locators[handle]?.checkedEpoch = loginEpoch
            return loc.backend
        }
        for h in try module.findObjects(s, matching: loc.template, limit: 1000) where matches(h) {
            objectTable.locators[handle]?.backend = h
            objectTable.locators[handle]?.checkedEpoch = loginEpoch
            return h
        }
        throw PKCS11Error(rv: invalid, function: function)
    }

    func forgetObject(_ handle: UInt64) {
        if let loc = objectTable.locators.removeValue(forKey: handle) { objectTable.byIdentity[loc.identity] = nil }
        handleKeyIDs.withLock { $0[handle] = nil }
    }

    /// Forgets every handle (the token was swapped or initialised).
    func resetObjects() {
        // Numbering goes on: a program may still hold a handle of the old token's objects,
        // and it must not name one of the new token's (issue 13, handles never reused).
        let next = objectTable.next
        objectTable = ObjectTable()
        objectTable.next = next
        resolvedKeys = [:]
        handleKeyIDs.withLock { $0 = [:] }
    }

    /// The CKA_ID behind a daemon handle as last seen, from any thread (polkit details).
    func knownKeyID(_ handle: UInt64) -> [UInt8]? { handleKeyIDs.withLock { $0[handle] } }

    /// C_SetAttributeValue. The object keeps its handle (issue 13 §3): its locator takes the
    /// new identity (label, id), and its snapshot goes.
    func setAttributes(_ s: SessionHandle, _ handle: UInt64, _ template: [Attribute], caller: CallerID) throws {
        let backend = try resolve(handle, s, caller: caller, function: "C_SetAttributeValue")
        try module.setAttributes(s, backend, template)
        guard var loc = objectTable.locators[handle], let found = identity(s, backend) else {
            forgetObject(handle)
            return
        }
        objectTable.byIdentity[loc.identity] = nil
        loc.identity = found.bytes + (loc.owner.map { Array($0.rawValue.utf8) } ?? [])
        loc.template = [AttributeType.class, .id, .label, .keyType].compactMap { t in found.attrs[t].map { Attribute(t, $0) } }
        loc.isPrivate = found.attrs[.private]?.pkcs11Bool ?? false
        loc.backend = backend
        loc.checkedEpoch = loginEpoch
        loc.snapshot = nil
        objectTable.locators[handle] = loc
        objectTable.catalogue = nil
        resolvedKeys = [:]
        objectTable.byIdentity[loc.identity] = handle
        handleKeyIDs.withLock { $0[handle] = found.attrs[.id] }
    }

    // MARK: - Sessions of the proxy (worker)

    func rawSession(_ id: UInt64, readWrite: Bool) throws -> SessionHandle {
        if let s = rawSessions[id] { return s }
        // The shared session stays open, so closing this one can never end the token's login.
        _ = try backendCall { try session() }
        let s = try backendCall { try module.openSession(slot, readWrite: readWrite) }
        rawSessions[id] = s
        return s
    }

    func closeRawSession(_ id: UInt64) {
        contextPINs[id] = nil
        if let s = rawSessions.removeValue(forKey: id) { try? module.closeSession(s) }
        for (handle, loc) in objectTable.locators where loc.creatingSession == id { forgetObject(handle) }
    }

    /// Public operations run as they are; when the caller is logged in they run in its login
    /// (so its private objects are visible). Another caller's exclusive hold gives TokenBusy to
    /// changes only (issue 13 §4): `readOnly` work (searches, which then see public objects
    /// alone, attribute reads, verification) goes on beside it.
    func withAccess<T>(
        caller: CallerID, settings: Settings, _ s: SessionHandle, readOnly: Bool = false, _ body: () throws -> T
    ) throws -> T {
        if policy.withLock({ $0.state(of: caller).loggedIn }) {
            return try withPrivateAccess(
                caller: caller, settings: settings, kind: .readPrivate, requiresFreshPIN: false, freshPIN: nil,
                alwaysAuthenticate: false, session: s
            ) { _ in try body() }
        }
        if !readOnly { try policy.withLock { try $0.checkAvailable(for: caller) } }
        _ = try presentTokenInfo()
        return try body()
    }

    /// Someone else holds the backend login: the backend would show its private objects.
    func heldByAnother(_ caller: CallerID) -> Bool {
        policy.withLock { p in p.lockHolder.map { $0 != caller } ?? false }
    }

    /// Like withAccess, but an operation on a private object needs the caller's login, and
    /// one on a public object never logs in (issue 14 §3): reading a certificate's or a
    /// public key's attributes, verifying, encrypting cost no bracket (on a card, no VERIFY).
    private func withObjectAccess<T>(
        caller: CallerID, settings: Settings, _ s: SessionHandle, _ loc: ObjectTable.Locator, function: String,
        invalid: ReturnValue = .objectHandleInvalid, _ body: () throws -> T
    ) throws -> T {
        let loggedIn = policy.withLock { $0.state(of: caller).loggedIn }
        if loc.isPrivate && !loggedIn {
            try policy.withLock { try $0.checkAvailable(for: caller) }
            throw PKCS11Error(rv: invalid, function: function)
        }
        if !loc.isPrivate && loggedIn && loc.owner == nil {
            _ = try presentTokenInfo()
            return try body()
        }
        return try withAccess(caller: caller, settings: settings, s, readOnly: true, body)
    }

    /// Every mechanism of the slot with its info, read once per card.
    func mechanismTable() throws -> [(MechanismType, MechanismInfo)] {
        _ = try presentTokenInfo()
        return try backendCall {
            try module.mechanismList(slot).map { ($0, try module.mechanismInfo(slot, $0)) }
        }
    }

    // MARK: - Objects (worker)

    func findObjects(caller: CallerID, settings: Settings, session id: UInt64, rw: Bool, template: [Attribute], max: Int)
        throws -> [UInt64]
    {
        let s = try rawSession(id, readWrite: rw)
        var template = template
        if heldByAnother(caller) && !policy.withLock({ $0.state(of: caller).loggedIn }) {
            // The backend is logged in for the holder: a search of anyone else's must not
            // see the holder's private objects.
            if template.contains(where: { $0.type == .private && $0.value.pkcs11Bool == true }) { return [] }
            template.removeAll { $0.type == .private }
            template.append(Attribute(.private, [0]))
        }
        // Only a caching-mode login pays a bracket per attribute read; a held login reads
        // private attributes directly, so its searches take no snapshot.
        let snapshot = policy.withLock { $0.state(of: caller).cachedPIN }
        if snapshot, let found = try findWithoutLogin(caller: caller, settings: settings, s, template: template, max: max) {
            return found
        }
        return try withAccess(caller: caller, settings: settings, s, readOnly: true) {
            try module.findObjects(s, matching: template, limit: max).compactMap { h -> UInt64? in
                guard let handle = try register(s, h, caller: caller) else { return nil }
                // In this search's bracket, private objects' descriptions are read once for
                // every later attribute read: a search is where an outside change shows.
                if snapshot && objectTable.locators[handle]?.isPrivate == true {
                    objectTable.locators[handle]?.snapshot = (try? module.attributeValues(s, h, Self.snapshotTypes))
                        .map { Dictionary($0.map { ($0.type, $0) }, uniquingKeysWith: { a, _ in a }) }
                }
                return handle
            }
        }
    }

    func getAttributes(caller: CallerID, settings: Settings, session id: UInt64, rw: Bool, handle: UInt64, types: [AttributeType])
        throws -> [AttributeResult]
    {
        let s = try rawSession(id, readWrite: rw)
        let loc = try locator(handle, caller: caller, function: "C_GetAttributeValue")
        var results: [AttributeResult]
        if let snapshot = loc.snapshot, loc.owner == nil, types.allSatisfy({ snapshot[$0] != nil }),
            policy.withLock({ $0.state(of: caller).loggedIn })
        {
            // Described at its last search: no bracket, no login (issue 14 §3).
            try policy.withLock { try $0.checkAvailable(for: caller) }
            _ = try presentTokenInfo()
            results = types.map { snapshot[$0]! }
        } else {
            results = try withObjectAccess(caller: caller, settings: settings, s, loc, function: "C_GetAttributeValue") {
                let h = try resolve(handle, s, caller: caller, function: "C_GetAttributeValue")
                return try module.attributeValues(s, h, types)
            }
            if loc.isPrivate, loc.owner == nil, objectTable.locators[handle] != nil {
                for r in results where Self.snapshotWorthy(r) { objectTable.locators[handle]!.snapshot?[r.type] = r }
            }
        }
        // Force-login keys show CKA_ALWAYS_AUTHENTICATE, so applications ask for the PIN (DESIGN §1).
        if let i = results.firstIndex(where: { $0.type == .alwaysAuthenticate }), results[i].status == .ok,
            requiresFreshPIN(loc, settings: settings)
        {
            results[i].value = [1]
        }
        return results
    }

    /// C_GetObjectSize, answered by the backend (in the caller's login for a private object).
    func objectSize(caller: CallerID, settings: Settings, session id: UInt64, rw: Bool, handle: UInt64) throws -> UInt {
        let s = try rawSession(id, readWrite: rw)
        let loc = try locator(handle, caller: caller, function: "C_GetObjectSize")
        return try withObjectAccess(caller: caller, settings: settings, s, loc, function: "C_GetObjectSize") {
            try module.objectSize(s, try resolve(handle, s, caller: caller, function: "C_GetObjectSize"))
        }
    }

    /// Force-login applies to private keys whose certificate (same CKA_ID) carries nonRepudiation.
    private func requiresFreshPIN(_ loc: ObjectTable.Locator, settings: Settings) -> Bool {
        guard let cls = loc.template.first(where: { $0.type == .class })?.value.pkcs11ULong,
            cls == ObjectClass.privateKey.rawValue,
            let id = loc.template.first(where: { $0.type == .id })?.value
        else { return false }
        return settings.requiresFreshPIN(keyUsage: keyUsage(id))
    }

    private func keyUsage(_ id: [UInt8]) -> UInt32? {
        if keys == nil { _ = try? listKeys() }
        return keys?.first { $0.id == id }?.keyUsage
    }

    func mutateObjects<T>(caller: CallerID, settings: Settings, session id: UInt64, rw: Bool, _ body: (SessionHandle) throws -> T)
        throws -> T
    {
        let s = try rawSession(id, readWrite: rw)
        let result = try withAccess(caller: caller, settings: settings, s) { try body(s) }
        keys = nil  // a new or changed key shows in ListKeys
        for handle in objectTable.locators.keys { objectTable.locators[handle]?.snapshot = nil }
        objectTable.catalogue = nil
        resolvedKeys = [:]
        return result
    }

    // MARK: - Cryptography (worker)

    enum PublicKeyOperation: Equatable {
        case verify(signature: [UInt8]), encrypt
    }

    /// C_Verify / C_Encrypt from Init to the final call (the proxy defers Init and Updates):
    /// public-key operations, in the caller's login when it has one.
    func publicKeyOperation(
        caller: CallerID, settings: Settings, session id: UInt64, rw: Bool, op: PublicKeyOperation, mechanism: Mechanism,
        key handle: UInt64, data: [UInt8]
    ) throws -> [UInt8] {
        let s = try rawSession(id, readWrite: rw)
        let function = op == .encrypt ? "C_EncryptInit" : "C_VerifyInit"
        let loc = try locator(handle, caller: caller, function: function, invalid: .keyHandleInvalid)
        return try withObjectAccess(caller: caller, settings: settings, s, loc, function: function, invalid: .keyHandleInvalid) {
            let h = try resolve(handle, s, caller: caller, function: function, invalid: .keyHandleInvalid)
            if case .verify(let signature) = op {
                try module.verifyRaw(s, mechanism: mechanism, key: h, data: data, signature: signature)
                return []
            }
            return try module.encrypt(s, mechanism: mechanism, key: h, data: data)
        }
    }

    func replaceRawSession(_ id: UInt64, rw: Bool) {
        guard let old = rawSessions[id], let fresh = try? module.openSession(slot, readWrite: rw) else { return }
        rawSessions[id] = fresh
        try? module.closeSession(old)
    }

    /// Digests and random numbers: no object, no login, so no lock stops them.
    func publicOperation<T>(caller: CallerID, session id: UInt64, rw: Bool, _ body: (SessionHandle) throws -> T) throws -> T {
        let s = try rawSession(id, readWrite: rw)
        _ = try presentTokenInfo()
        return try backendCall { try body(s) }
    }

    // MARK: - Logins of the proxy (worker)

    func loginSO(caller: CallerID, settings: Settings, pin: SecretPIN, isAlive: () -> Bool) throws {
        let info = try presentTokenInfo()
        var held = settings
        held.enableCachePIN = false  // SO logins are never cached (DESIGN §1)
        let plan = try policy.withLock {
            try $0.planLogin(for: caller, settings: held, protectedAuthenticationPath: info.protectedAuthenticationPath)
        }
        let s = try backendCall { try session() }
        let usePad = info.protectedAuthenticationPath && pin.count == 0
        try backendCall { try backendLogin(s, .so, usePad ? nil : pin) }
        let stored = policy.withLock { p -> Bool in
            guard isAlive() else { return false }
            p.loginSucceeded(for: caller, plan: plan, settings: held, pin: nil, now: Self.now())
            return true
        }
        if stored {
            soHolder.withLock { $0 = caller }
        } else {
            logoutBackend(s)
        }
    }

    /// C_Login(CKU_CONTEXT_SPECIFIC): the PIN is checked now and kept for the session's next
    /// private operation only.
    func loginContext(caller: CallerID, session id: UInt64, pin: SecretPIN) throws {
        _ = try presentTokenInfo()
        let state = policy.withLock { $0.state(of: caller) }
        guard state.loggedIn else { throw PKCS11Error(rv: .userNotLoggedIn, function: "C_Login") }
        let s = try backendCall { try session() }
        try withFreshPIN(s, caller: caller, holdsLogin: state.holdsLogin, alwaysAuthenticate: false, pin: pin) {}
        contextPINs[id] = pin
    }

    func logoutAll(caller: CallerID) throws {
        try logout(caller: caller)
        soHolder.withLock { if $0 == caller { $0 = nil } }
    }

    func sessionState(caller: CallerID, rw: Bool) -> (state: UInt, flags: UInt) {
        let so = soHolder.withLock { $0 == caller }
        let loggedIn = policy.withLock { $0.state(of: caller).loggedIn }
        let state: UInt =
            so ? 4 : loggedIn ? (rw ? 3 : 1) : (rw ? 2 : 0)  // CKS_RW_SO / RW_USER / RO_USER / RW_PUBLIC / RO_PUBLIC
        return (state, 0x4 | (rw ? 0x2 : 0))  // CKF_SERIAL_SESSION | CKF_RW_SESSION
    }

    // MARK: - PINs and token initialisation (worker)

    func initToken(soPIN: SecretPIN, label: String) throws {
        let sessions = policy.withLock { p in p.callers.reduce(0) { $0 + p.state(of: $1).sessions } }
        guard sessions == 0, rawSessions.isEmpty else { throw PKCS11Error(rv: .sessionExists, function: "C_InitToken") }
        dropSession()
        try soPIN.withBytes { try module.initToken(slot, soPIN: $0, label: label) }
        keys = nil
        resetObjects()
        refresh()
    }

    func initPIN(caller: CallerID, pin: SecretPIN) throws {
        guard soHolder.withLock({ $0 == caller }) else { throw PKCS11Error(rv: .userNotLoggedIn, function: "C_InitPIN") }
        let s = try backendCall { try session() }
        try pin.withBytes { try module.initPIN(s, pin: $0) }
    }

    /// C_SetPIN. Every other environment's cached PIN for the token is stale afterwards and is
    /// wiped; the caller's own is replaced by the new PIN.
    func setPIN(caller: CallerID, settings: Settings, session id: UInt64, rw: Bool, old: SecretPIN, new: SecretPIN) throws {
        let s = try rawSession(id, readWrite: rw)
        try withAccess(caller: caller, settings: settings, s) {
            try old.withBytes { o in try new.withBytes { n in try module.setPIN(s, old: o, new: n) } }
        }
        policy.withLock { p in
            let hadCache = p.state(of: caller).cachedPIN
            p.flushCachedPINs(reason: .stale)
            if hadCache { p.loginSucceeded(for: caller, plan: .verifyThenCache, settings: settings, pin: new, now: Self.now()) }
        }
    }
}

/// A 64-bit FNV-1a digest: tells object values apart in identities, not a security measure.
private func fnv1a(_ bytes: [UInt8]) -> [UInt8] {
    var h: UInt64 = 0xcbf2_9ce4_8422_2325
    for b in bytes {
        h ^= UInt64(b)
        h = h &* 0x100_0000_01b3
    }
    return withUnsafeBytes(of: h.littleEndian) { Array($0) }
}
