import PKCS11Kit
import PinPolicy

/// The bracket (DESIGN §1): where a caller's login state becomes a backend login, for both
/// front ends — cached PIN, held login, or a PIN for one operation — and the after-rules.
extension TokenContext {
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
}
