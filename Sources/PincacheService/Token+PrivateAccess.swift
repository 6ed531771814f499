import PKCS11Kit
import PinPolicy

/// What a private key does for a caller: the operations that go through `perform`.
enum PrivateOperation: Sendable {
    case sign(Mechanism, [UInt8])
    case decrypt(Mechanism, [UInt8])
    /// C_SignRecover: a signature in everything the policy says of one.
    case signRecover(Mechanism, [UInt8])

    var kind: OperationKind {
        switch self {
        case .sign, .signRecover: .sign
        case .decrypt: .decrypt
        }
    }

    var mechanism: Mechanism {
        switch self {
        case .sign(let m, _), .decrypt(let m, _), .signRecover(let m, _): m
        }
    }
}

/// The bracket (DESIGN §1): where a caller's login state becomes a backend login, for both
/// front ends — cached PIN, held login, or a PIN for one operation — and the after-rules.
extension TokenContext {
    // MARK: - Private operations (worker)

    /// Runs a sign or decrypt for a caller according to the policy's plan (DESIGN §1): the one
    /// path of both front ends, from the key's facts through the bracket to the after-rules.
    func perform(caller: CallerID, settings: Settings, _ request: KeyOperation) throws -> [UInt8] {
        let kind = request.operation.kind
        let mechanism = request.operation.mechanism
        let function: String =
            switch request.operation {
            case .sign: "C_SignInit"
            case .signRecover: "C_SignRecoverInit"
            case .decrypt: "C_DecryptInit"
            }
        return try withKey(
            caller: caller, settings: settings, request.key, kind: kind, function: function,
            mechanism: mechanism, freshPIN: request.freshPIN
        ) { s, handle, record, contextPIN in
            try run(s, handle, record: record, request.operation, contextPIN: contextPIN)
        }
    }

    /// What every use of a key for a caller goes through: the key's facts, then the bracket (or
    /// held login, or fresh PIN) the policy plans for `kind`, the after-rules, and a fresh
    /// backend session if the module failed in a way that leaves it suspect. `body` gets the
    /// backend session and key, and the PIN for a context-specific login if one is due.
    func withKey<T>(
        caller: CallerID, settings: Settings, _ key: KeyOperation.Key, kind: OperationKind, function: String,
        mechanism: Mechanism, freshPIN: SecretPIN?, invalid: ReturnValue = .keyHandleInvalid,
        _ body: (SessionHandle, ObjectHandle, KeyRecord?, SecretPIN?) throws -> T
    ) throws -> T {
        let s: SessionHandle
        var fresh = freshPIN
        let record: KeyRecord?
        var isPrivate = true
        var isPrivateKey = true
        switch key {
        case .id(let id):
            record = try keyRecord(id)
            let type = record.flatMap { MechanismKeyTypes.keyType(named: $0.keyType) }
            if let refused = MechanismKeyTypes.refusal(mechanism, keyType: type, function: function) { throw refused }
            s = try backendCall { try session() }
        case .handle(let handle, let session, let readWrite):
            s = try rawSession(session, readWrite: readWrite)
            // A context-specific login of this session is good for its next operation only.
            if fresh == nil { fresh = contextPINs.removeValue(forKey: session) }
            let loc = try locator(handle, caller: caller, function: function, invalid: invalid)
            if let refused = MechanismKeyTypes.refusal(mechanism, keyType: loc.keyType, function: function) { throw refused }
            isPrivate = loc.isPrivate
            isPrivateKey = loc.objectClass == ObjectClass.privateKey.rawValue
            if keys == nil { _ = try? listKeys() }
            record = loc.keyID.flatMap { id in keys?.first { $0.id == id } }
            if !isPrivate && !policy.withLock({ $0.state(of: caller).loggedIn }) {
                // A key object that is not private (a secret key marked so): no login needed.
                return try withAccess(caller: caller, settings: settings, s) {
                    try body(s, try resolveKey(key, s, caller: caller, function: function, invalid: invalid), nil, nil)
                }
            }
        }
        let alwaysAuthenticate = record?.backendAlwaysAuthenticate ?? false
        let requiresFresh =
            kind == .sign && isPrivateKey
            && (settings.requiresFreshPIN(keyUsage: record?.keyUsage) || alwaysAuthenticate)
        do {
            return try withPrivateAccess(
                caller: caller, settings: settings, kind: kind, requiresFreshPIN: requiresFresh, freshPIN: fresh,
                alwaysAuthenticate: alwaysAuthenticate, keyUsage: record?.keyUsage ?? 0, session: s
            ) { contextPIN in
                let handle = try resolveKey(key, s, caller: caller, function: function, invalid: invalid)
                do {
                    return try body(s, handle, record, contextPIN)
                } catch {
                    // A context-specific login that failed leaves the operation it was for
                    // active, which would block the session's next one. Any other failure ended
                    // it (PKCS#11 5.2), and a proxy session is not replaced for it: that would
                    // destroy the session objects the application made in it.
                    if contextPIN != nil { reset(s, key) }
                    throw error
                }
            }
        } catch let e as PKCS11Error where Self.leavesSessionSuspect(e.rv) {
            // A card reset by another program can leave this backend session answering
            // CKR_GENERAL_ERROR to everything (OpenSC): the next operation gets a fresh one.
            // With nobody holding a login, the shared session is closed outright, not
            // replaced: OpenSC lets go of the card only when its last session closes.
            // The token itself is fine, so no cache goes (that is for removals only).
            if case .id = key, policy.withLock({ $0.lockHolder == nil }) {
                dropSession()
            } else {
                reset(s, key)
            }
            throw e
        }
    }

    static func leavesSessionSuspect(_ rv: ReturnValue) -> Bool {
        rv == .generalError || rv == .deviceError || rv == .functionFailed
    }

    /// The backend object of the key in the current login state.
    private func resolveKey(
        _ key: KeyOperation.Key, _ s: SessionHandle, caller: CallerID, function: String, invalid: ReturnValue
    ) throws -> ObjectHandle {
        switch key {
        case .id(let id): return try findPrivateKey(s, id)
        case .handle(let handle, _, _): return try resolve(handle, s, caller: caller, function: function, invalid: invalid)
        }
    }

    private func reset(_ s: SessionHandle, _ key: KeyOperation.Key) {
        switch key {
        case .id: resetSession()
        case .handle(_, let session, let readWrite): replaceRawSession(session, rw: readWrite)
        }
    }

    /// The one place a caller's login state becomes a backend login (DESIGN §1): asks the policy
    /// for a plan, brackets `body` with the cached PIN (caching), runs it in the held login
    /// (non-caching), or verifies a PIN typed for this one operation. `body` gets the PIN to use
    /// as a context-specific login when the backend key needs one. A cached PIN the token rejects
    /// is purged from every environment before the error goes back.
    func withPrivateAccess<T>(
        caller: CallerID, settings: Settings, kind: OperationKind, requiresFreshPIN: Bool, freshPIN: SecretPIN?,
        alwaysAuthenticate: Bool, keyUsage: UInt32 = 0, session s: SessionHandle, withoutLogin: Bool = false,
        _ body: (SecretPIN?) throws -> T
    ) throws -> T {
        // A held login presents no PIN: no need to re-read the token before using it. An
        // operation that will ride a shared login (Token+SharedLogin) presents none either, but
        // reads the flags all the same: a token that started counting wrong PINs (someone typed
        // one elsewhere) holds cached PINs back whether or not a login happens to be open.
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
                $0.operationFinished(for: caller, settings: settings, kind: kind, outcome: outcome, keyUsage: keyUsage)
            }
            if action == .logout { backendLogout() }
        }
        let result: T
        switch plan {
        case .bracket where withoutLogin:
            // Served from what an earlier login recorded (Token+Catalogue): the policy has
            // checked the caller's cached PIN; the backend is not asked to log in.
            result = try body(nil)
        case .bracket(let pin):
            // A login left open by the previous job for this PIN (Token+SharedLogin) serves
            // this operation too; otherwise the bracket makes its own.
            let joined = joinSharedLogin(pin)
            let loggedInAt = sharedLogin?.bracket.opened ?? Self.now()
            if !joined {
                do {
                    try backendCall { try backendLogin(s, .user, pin) }
                } catch let e as PKCS11Error where e.rv == .pinIncorrect || e.rv == .pinLocked {
                    outcome = .cachedPINRejected
                    Log.notice("token \(id): a cached PIN was rejected (\(e.rv.name)); purged from every environment", event: .pinsWiped)
                    throw e
                } catch let e as PKCS11Error where Self.leavesSessionSuspect(e.rv) {
                    // A login that failed half-way may leave the module holding the card (OpenSC
                    // locks it for a login): give it back, as the bracket's end would have.
                    logoutBackend(s)
                    throw e
                }
            }
            var keepOpen = false
            defer { if !keepOpen { logoutBackend(s) } }
            result = try body(nil)
            refreshCatalogueIfOld(s, caller: caller)
            keepOpen = keepLoginOpen(pin: pin, session: s, loggedInAt: loggedInAt)
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
            try run(s, try findPrivateKey(s, key.id), record: key, op, contextPIN: key.backendAlwaysAuthenticate ? pin : nil)
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

    /// The backend handle of the private key with CKA_ID `id` (issue 14 §2): the operations
    /// one shared bracket serves find it once. Any other login is a new epoch and the key is
    /// found again, since SoftHSM renumbers private objects at every login and an old handle
    /// could name another object; a held login finds it every time, as objects may change
    /// under it for as long as it lasts.
    func findPrivateKey(_ s: SessionHandle, _ id: [UInt8]) throws -> ObjectHandle {
        if sharedLogin != nil, let known = resolvedKeys[id], known.epoch == loginEpoch { return known.handle }
        let found = try module.findObjects(s, matching: [.objectClass(.privateKey), Attribute(.id, id)], limit: 2)
        guard let handle = found.first else {
            throw ServiceError(.keyNotFound, "no private key with id \(hex(id)) on this token (CKR_KEY_HANDLE_INVALID (0x60))")
        }
        if resolvedKeys.count > 64 { resolvedKeys.removeAll() }
        resolvedKeys[id] = (handle, loginEpoch)
        return handle
    }

    /// The operation itself, on a resolved key, inside whatever login the bracket made.
    /// `contextPIN`: the key needs a context-specific login right after its *Init.
    func run(_ s: SessionHandle, _ handle: ObjectHandle, record key: KeyRecord?, _ op: PrivateOperation, contextPIN: SecretPIN?)
        throws -> [UInt8]
    {
        try backendCall {
            switch try adapted(op, s) {
            case .sign(let mechanism, let data):
                if contextPIN == nil, let key, !key.backendAlwaysAuthenticate, !key.alwaysAuthenticateChecked {
                    // Private attributes were hidden when the key list was read: look once, in a
                    // login, and ask for the PIN rather than fail inside the signature.
                    let always = (try? module.getAttributes(s, handle, [.alwaysAuthenticate]))?[.alwaysAuthenticate]?.pkcs11Bool
                    markAlwaysAuthenticate(key.id, always == true)
                    if always == true { throw PolicyError.pinRequired }
                }
                return try initThenRun(s, contextPIN, { try module.signInit(s, mechanism: mechanism, key: handle) }) {
                    try module.signAfterInit(s, data: data)
                }
            case .signRecover(let mechanism, let data):
                return try initThenRun(s, contextPIN, { try module.signRecoverInit(s, mechanism: mechanism, key: handle) }) {
                    try module.signRecoverAfterInit(s, data: data)
                }
            case .decrypt(let mechanism, let data):
                return try initThenRun(s, contextPIN, { try module.decryptInit(s, mechanism: mechanism, key: handle) }) {
                    try module.decryptAfterInit(s, data: data)
                }
            }
        }
    }

    /// An operation's Init (`begin`), the context-specific login right after it when one is
    /// due, then its single-part call (`finish`).
    private func initThenRun(
        _ s: SessionHandle, _ contextPIN: SecretPIN?, _ begin: () throws -> Void, _ finish: () throws -> [UInt8]
    ) throws -> [UInt8] {
        try begin()
        if let contextPIN { try backendLogin(s, .contextSpecific, contextPIN) }
        return try finish()
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

    func markAlwaysAuthenticate(_ id: [UInt8], _ value: Bool) {
        guard let i = keys?.firstIndex(where: { $0.id == id }) else { return }
        keys?[i].alwaysAuthenticateChecked = true
        if value { keys?[i].backendAlwaysAuthenticate = true }
    }
}
