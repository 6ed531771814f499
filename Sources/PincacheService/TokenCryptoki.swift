import PKCS11Kit
import PinPolicy

extension TokenContext {
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
        endStreams(ofSession: id)
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
        let (backendTemplate, privacy) = privacyFilter(template, caller: caller)
        template = backendTemplate
        // Only a caching-mode login pays a bracket per attribute read; a held login reads
        // private attributes directly, so its searches take no snapshot.
        let snapshot = policy.withLock { $0.state(of: caller).cachedPIN }
        if snapshot, let found = try findWithoutLogin(caller: caller, settings: settings, s, template: template, max: max) {
            return found.filter(privacy)
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
        }.filter(privacy)
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
        if loc.keptPrivate, let i = results.firstIndex(where: { $0.type == .private && $0.status == .ok }) {
            results[i].value = [1]
        }
        // Force-login keys show CKA_ALWAYS_AUTHENTICATE, so applications ask for the PIN (DESIGN §1).
        if let i = results.firstIndex(where: { $0.type == .alwaysAuthenticate }), results[i].status == .ok,
            requiresFreshPIN(loc, settings: settings)
        {
            results[i].value = [1]
        }
        return results
    }

    /// What C_*Init needs to know of a key (issue 13 §5; Calls.keyFacts), in the order
    /// asked. A private key's come from its snapshot, so a cached PIN costs no login; read
    /// in a bracket, they join the snapshot.
    static let keyFactTypes: [AttributeType] = [
        .class, .keyType, .sign, .verify, .encrypt, .decrypt, .signRecover, .verifyRecover,
    ]

    func keyFacts(caller: CallerID, settings: Settings, session id: UInt64, rw: Bool, handle: UInt64) throws
        -> [AttributeResult]
    {
        let s = try rawSession(id, readWrite: rw)
        let loc = try locator(handle, caller: caller, function: "C_SignInit", invalid: .keyHandleInvalid)
        let types = Self.keyFactTypes
        if loc.isPrivate {
            let state = policy.withLock { $0.state(of: caller) }
            if !state.loggedIn {
                try policy.withLock { try $0.checkAvailable(for: caller) }
                throw PKCS11Error(rv: .userNotLoggedIn, function: "C_SignInit")
            }
            if let snapshot = loc.snapshot, loc.owner == nil, types.allSatisfy({ snapshot[$0] != nil }) {
                _ = try presentTokenInfo()
                return types.map { snapshot[$0]! }
            }
        }
        let results = try withObjectAccess(
            caller: caller, settings: settings, s, loc, function: "C_SignInit", invalid: .keyHandleInvalid
        ) {
            let h = try resolve(handle, s, caller: caller, function: "C_SignInit", invalid: .keyHandleInvalid)
            return try module.attributeValues(s, h, types)
        }
        if loc.isPrivate, loc.owner == nil, objectTable.locators[handle] != nil {
            var snapshot = objectTable.locators[handle]!.snapshot ?? [:]
            for r in results { snapshot[r.type] = r }
            objectTable.locators[handle]!.snapshot = snapshot
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

    /// Calls.optionalFunctions: asked of the module once, in a session of its own with no
    /// operation in it, and never in a login.
    func optionalFunctions(session id: UInt64, rw: Bool) throws -> PKCS11Module.OptionalFunctions {
        _ = try rawSession(id, readWrite: rw)
        if let known = moduleFunctions { return known }
        // The shared session stays open, so closing this one can never end the token's login.
        _ = try backendCall { try session() }
        let s = try backendCall { try module.openSession(slot, readWrite: false) }
        defer { try? module.closeSession(s) }
        let found = try backendCall { module.optionalFunctions(s) }
        moduleFunctions = found
        return found
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
        objectsChanged()
        return result
    }

    /// After the daemon made, changed or destroyed an object: what was recorded of the token's
    /// objects is read again when next needed.
    func objectsChanged() {
        keys = nil  // a new or changed key shows in ListKeys
        for handle in objectTable.locators.keys { objectTable.locators[handle]?.snapshot = nil }
        objectTable.catalogue = nil
        resolvedKeys = [:]
    }

    // MARK: - Cryptography (worker)

    enum PublicKeyOperation: Equatable {
        /// `verifyRecover`: the signature is the data.
        case verify(signature: [UInt8]), encrypt, verifyRecover
    }

    /// C_Verify / C_Encrypt from Init to the final call (the proxy defers Init and Updates):
    /// public-key operations, in the caller's login when it has one.
    func publicKeyOperation(
        caller: CallerID, settings: Settings, session id: UInt64, rw: Bool, op: PublicKeyOperation, mechanism: Mechanism,
        key handle: UInt64, data: [UInt8]
    ) throws -> [UInt8] {
        let s = try rawSession(id, readWrite: rw)
        let function =
            switch op {
            case .encrypt: "C_EncryptInit"
            case .verify: "C_VerifyInit"
            case .verifyRecover: "C_VerifyRecoverInit"
            }
        let loc = try locator(handle, caller: caller, function: function, invalid: .keyHandleInvalid)
        if let refused = MechanismKeyTypes.refusal(mechanism, keyType: loc.keyType, function: function) { throw refused }
        return try withObjectAccess(caller: caller, settings: settings, s, loc, function: function, invalid: .keyHandleInvalid) {
            let h = try resolve(handle, s, caller: caller, function: function, invalid: .keyHandleInvalid)
            switch op {
            case .verify(let signature):
                try module.verifyRaw(s, mechanism: mechanism, key: h, data: data, signature: signature)
                return []
            case .verifyRecover: return try module.verifyRecover(s, mechanism: mechanism, key: h, signature: data)
            case .encrypt: return try module.encrypt(s, mechanism: mechanism, key: h, data: data)
            }
        }
    }

    /// A backend session that answered as if broken gets a fresh one, unless the application
    /// made objects in it: closing it would destroy them, while a session that was only
    /// handed one bad answer (SoftHSM's CKR_GENERAL_ERROR for a GCM tag that does not match)
    /// goes on working. A truly dead one keeps failing, and the application can open another.
    func replaceRawSession(_ id: UInt64, rw: Bool) {
        if objectTable.locators.values.contains(where: { $0.creatingSession == id }) { return }
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

    /// A multi-part digest with C_DigestKey parts (issue 13 §7): each key is the caller's
    /// daemon handle; a private one needs the caller's login (its bracket), as its value does.
    func digestParts(
        caller: CallerID, settings: Settings, session id: UInt64, rw: Bool, mechanism: Mechanism, parts: [DigestPart]
    ) throws -> [UInt8] {
        let s = try rawSession(id, readWrite: rw)
        let keys = parts.compactMap { part -> UInt64? in
            if case .key(let handle) = part { return UInt64(handle.rawValue) }
            return nil
        }
        let locators = try keys.map { try locator($0, caller: caller, function: "C_DigestKey", invalid: .keyHandleInvalid) }
        let run = {
            let backendParts = try parts.map { part -> DigestPart in
                guard case .key(let handle) = part else { return part }
                return .key(try self.resolve(UInt64(handle.rawValue), s, caller: caller, function: "C_DigestKey", invalid: .keyHandleInvalid))
            }
            return try self.backendCall { try self.module.digest(s, mechanism: mechanism, parts: backendParts) }
        }
        if locators.contains(where: \.isPrivate) || locators.contains(where: { $0.owner != nil }) {
            return try withAccess(caller: caller, settings: settings, s, readOnly: true, run)
        }
        _ = try presentTokenInfo()
        return try run()
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
