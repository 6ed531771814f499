import DBusKit
import PKCS11Kit
import PinPolicy
import Synchronization

/// Session1, the D-Bus front end of a session: callable by the connection that opened it only.
/// Its methods go through the same steps as the proxy's calls (CryptokiCalls.swift).
extension PincacheService {
    /// Token1.OpenSession: a session that is also a Session1 object, callable by its owner only.
    func openSession(_ call: MethodCall, _ info: CallerInfo, _ token: TokenContext) {
        switch openSessionRecord(info, token, readWrite: false) {
        case .failure(let e): call.reply(error: e.dbusError)
        case .success(let record):
            let owner = info.id.rawValue
            busSessions.withLock { $0[record.id] = (record, false) }
            connection.export(record.path, interfaces: [sessionInterface(record, info)], accessCheck: { $0 == owner })
            call.reply([.objectPath(record.path)])
        }
    }

    /// A new session of `info` on `token`, within the caller's quota (both front ends).
    func openSessionRecord(_ info: CallerInfo, _ token: TokenContext, readWrite: Bool) -> Result<SessionRecord, ServiceError> {
        let snapshot = token.snapshot
        if snapshot.present && snapshot.info == nil {
            return .failure(
                ServiceError(.tokenNotPresent, "the card in this slot is not one its module can read (CKR_TOKEN_NOT_RECOGNIZED (0xe1))", rv: 0xe1))
        }
        guard snapshot.recognized else {
            return .failure(ServiceError(.tokenNotPresent, "no usable token in this slot (CKR_TOKEN_NOT_PRESENT (0xe0))"))
        }
        let id = nextSessionID.wrappingAdd(1, ordering: .relaxed).oldValue
        switch registry.reserveSession(
            info.id.rawValue, id: id, max: configuration.maxSessionsPerClient, maxPerUID: Limits.sessionsPerUID)
        {
        case .success: break
        case .failure(.perClient):
            return .failure(
                ServiceError(
                    .tooManySessions, "at most \(configuration.maxSessionsPerClient) sessions per client (MaxSessionsPerClient; CKR_SESSION_COUNT (0xb1))"
                ))
        case .failure(.perUID):
            return .failure(
                ServiceError(
                    .tooManySessions, "uid \(Self.uidText(info)) has \(Limits.sessionsPerUID) sessions open already (CKR_SESSION_COUNT (0xb1))"))
        }
        let path = PincacheBus.sessionPrefix.appending(String(id))!
        let record = SessionRecord(id: id, path: path, owner: info.id, token: token, readWrite: readWrite)
        sessions.withLock { $0[id] = record }
        token.sessionOpened(caller: info.id)
        return .success(record)
    }

    func sessionInterface(_ record: SessionRecord, _ info: CallerInfo) -> ExportedInterface {
        let token = record.token
        let caller = record.owner
        let registry = self.registry
        // Read at each call: a reload (SIGHUP) may change the caller's settings.
        @Sendable func settings() -> Settings { registry.lookup(caller.rawValue)?.settings ?? info.settings }
        @Sendable func privateOp(_ call: MethodCall, pinIndex: Int?, use: NamedMechanism.Use) {
            var fresh: SecretPIN?
            if let pinIndex {
                switch readPIN(call, at: pinIndex) {
                case .success(let p): fresh = p
                case .failure(let e): return call.reply(error: e)
                }
            }
            switch operationArguments(call, first: pinIndex == nil ? 0 : 1, use: use) {
            case .failure(let e): call.reply(error: e)
            case .success(let (keyID, mechanism, data)):
                let operation: PrivateOperation = use == .sign ? .sign(mechanism, data) : .decrypt(mechanism, data)
                let pin = fresh
                let opName = use == .sign ? (pin == nil ? "sign" : "sign-with-pin") : "decrypt"
                let job = audited(info, token, opName, keyID: keyID, mechanism: mechanism.type.rawValue, freshPIN: pin != nil) {
                    try token.perform(
                        caller: caller, settings: settings(), KeyOperation(key: .id(keyID), operation: operation, freshPIN: pin))
                }
                if pin != nil {
                    // A PIN submitted for one operation is a login as far as polkit is concerned.
                    submitPIN(
                        [.login], Requester(info: info, interactive: call.allowsInteractiveAuthorization), token, operation: opName, keyID: keyID, inline: false,
                        denied: { call.reply(error: $0.dbusError) }, job
                    ) { call.reply($0) { [.bytes($0)] } }
                } else {
                    authorized([.cachedPIN], call, info, token: token, operation: opName, keyID: keyID) { [weak self] in
                        self?.onWorker(token, call, caller: caller, shareable: true, job) { [.bytes($0)] }
                    }
                }
            }
        }
        return ExportedInterface(
            PincacheInterfaces.session,
            methods: [
                "Login": { [weak self] call in
                    guard let self else { return }
                    switch self.readPIN(call, at: 0) {
                    case .failure(let e): call.reply(error: e)
                    case .success(let pin):
                        self.submitPIN(
                            [.login], Requester(info: info, interactive: call.allowsInteractiveAuthorization), token, operation: "login", inline: false,
                            denied: { call.reply(error: $0.dbusError) },
                            { [weak self] in
                                try token.login(caller: caller, settings: settings(), pin: pin) { registry.isAlive(caller) }
                                // A new login asks polkit again before its cached PIN is first used.
                                self?.forgetCachedUse(token, caller)
                            }
                        ) { call.reply($0) { _ in [] } }
                    }
                },
                "Logout": { [weak self] call in
                    self?.onWorker(token, call, caller: caller, { try token.logout(caller: caller) }) { _ in [] }
                },
                "Sign": { call in privateOp(call, pinIndex: nil, use: .sign) },
                "SignWithPin": { call in privateOp(call, pinIndex: 0, use: .sign) },
                "Decrypt": { call in privateOp(call, pinIndex: nil, use: .decrypt) },
                "Close": { [weak self] call in self?.closeSession(call, record) },
            ],
            properties: { name in
                switch name {
                case "Token": .objectPath(token.path)
                case "LoggedIn": .boolean(token.policy.withLock { $0.state(of: caller).loggedIn })
                default: nil
                }
            })
    }

    func closeSession(_ call: MethodCall, _ record: SessionRecord) {
        guard closeSessionRecord(record, then: { call.reply([]) }) else {
            return call.reply(error: .unknownObject("session already closed"))
        }
    }

    /// Closes a session (both front ends); false if it was closed already.
    /// `inline`: as for `onWorker`, the caller's own socket thread may run it when the token is idle.
    func closeSessionRecord(_ record: SessionRecord, inline: Bool = false, then done: @escaping @Sendable () -> Void) -> Bool {
        guard sessions.withLock({ $0.removeValue(forKey: record.id) }) != nil else { return false }
        _ = busSessions.withLock { $0.removeValue(forKey: record.id) }
        connection.unexport(record.path)
        registry.releaseSession(record.owner.rawValue, id: record.id)
        // On the worker, so operations queued before Close still see the session's login.
        let job: @Sendable () -> Void = {
            record.token.sessionClosed(caller: record.owner)
            record.token.closeRawSession(record.id)
            done()
        }
        if inline, record.token.worker.runInline(ifFasterThan: Limits.inlineJobNanoseconds, job) { return true }
        record.token.worker.submit(owner: record.owner.rawValue, job)
        return true
    }

    /// Decodes (key_id ay, mechanism s, data ay) starting at `first`.
    func operationArguments(_ call: MethodCall, first: Int, use: NamedMechanism.Use)
        -> Result<([UInt8], Mechanism, [UInt8]), DBusError>
    {
        let a = call.arguments
        guard a.count >= first + 3, let name = a[first + 1].stringValue else {
            return .failure(.invalidArgs("expected (ay key_id, s mechanism, ay data)"))
        }
        return bytesArgument(a[first], name: "key_id", max: Limits.keyIDBytes).flatMap { keyID in
            guard !keyID.isEmpty else { return .failure(.invalidArgs("key_id is empty")) }
            return bytesArgument(a[first + 2], name: "data", max: Limits.dataBytes).flatMap { data in
                NamedMechanism.lookup(name, for: use).mapError(\.dbusError).map { (keyID, $0, data) }
            }
        }
    }

    /// Session1.LoggedIn as PropertiesChanged (issue 16 §6): every Session1 object of `caller`
    /// (of everyone, when nil) on `token` whose caller's login state moved since it was last
    /// told. Called after each job for a caller, after a flush and at each poll (expiry,
    /// removal).
    func announceLoggedIn(_ token: TokenContext, caller: CallerID? = nil) {
        let changed = busSessions.withLock { table -> [(ObjectPath, Bool, String)] in
            var out: [(ObjectPath, Bool, String)] = []
            for (id, entry) in table where entry.record.token === token && (caller == nil || entry.record.owner == caller) {
                let now = token.policy.withLock { $0.state(of: entry.record.owner).loggedIn }
                if now != entry.last {
                    table[id] = (entry.record, now)
                    out.append((entry.record.path, now, entry.record.owner.rawValue))
                }
            }
            return out
        }
        for (path, value, owner) in changed {
            // Unicast: whether a session is logged in is its owner's business.
            connection.emitPropertiesChanged(
                path: path, interface: PincacheInterfaces.session.name, changed: ["LoggedIn": .boolean(value)], destination: owner)
        }
    }
}
