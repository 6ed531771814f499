import CryptokiWire
import DBusKit
import Glibc
import PKCS11Kit
import PinPolicy

/// The proxy's front end: each call of the wire table (CryptokiWire/Calls.swift) decoded into
/// the token's typed operations, through the same steps as Session1's methods: the caps were
/// checked by the table's decoder → authorise (Authorisation.swift) → the token's worker, where
/// the bracket, force-login and the after-rules live (Token.swift) → reply.
extension PincacheService {
    // MARK: - Manager1.OpenCryptoki

    func openCryptoki(_ call: MethodCall, _ info: CallerInfo) {
        let name = call.sender
        let opened = cryptokiSockets.open(
            for: name, uid: info.uid,
            serve: { [weak self] request in
                guard let self else { return request.fail(rv: 0x32, "the daemon is shutting down (CKR_DEVICE_REMOVED)") }
                self.serveCryptoki(request)
            },
            closed: { [weak self] name in self?.cryptokiClosed(name) })
        switch opened {
        case .success(let fd):
            // libdbus sends a duplicate; the caller's is the only copy that stays.
            call.reply([.unixFD(fd)])
            Glibc.close(fd)
        case .failure(.alreadyOpen):
            call.reply(error: ServiceError.limits("this connection has its cryptoki socket already (one per bus connection)").dbusError)
        case .failure(.tooMany):
            call.reply(error: ServiceError.limits("too many cryptoki sockets open (\(CryptokiSockets.maxOpen) in all)").dbusError)
        case .failure(.tooManyForUID):
            Log.warning("uid \(Self.uidText(info)) reached \(CryptokiSockets.maxPerUID) cryptoki sockets; \(name) refused", event: .limitReached)
            call.reply(
                error: ServiceError.limits(
                    "uid \(Self.uidText(info)) has \(CryptokiSockets.maxPerUID) cryptoki sockets open already; close some programs").dbusError)
        case .failure(.descriptors(let inUse, let limit)):
            Log.warning("short of file descriptors (\(inUse) of \(limit) in use): a cryptoki socket for \(name) refused", event: .limitReached)
            call.reply(
                error: ServiceError.limits("the daemon is short of file descriptors (\(inUse) of \(limit) in use); try again later").dbusError)
        case .failure(.system(let code)):
            call.reply(error: .failed("cannot make a socket: \(String(cString: strerror(code)))"))
        }
    }

    /// The socket ended (the client closed it, or broke the protocol): so does its environment.
    private func cryptokiClosed(_ name: String) {
        endEnvironment(name)
    }

    // MARK: - Dispatch

    private static let sessionInvalid = ServiceError(
        .backendError, "no such session for this caller (CKR_SESSION_HANDLE_INVALID (0xb3))", rv: 0xb3)

    func serveCryptoki(_ r: CryptokiRequest) {
        guard let info = registry.lookup(r.caller) else {
            return r.fail(rv: 0x32, "this caller's environment has ended (CKR_DEVICE_REMOVED)")
        }
        let requester = Requester(info: info, interactive: false)
        switch r.call.id {
        case Calls.getSlots.id:
            r.reply([.array(tokens.filter { $0.published.load(ordering: .acquiring) }.map(Self.slotInfo))])
        case Calls.getMechanisms.id:
            guard let token = token(named: r.string("slot")) else { return r.fail(Self.slotInvalid) }
            onWorker(token, caller: info.id, inline: true, { try token.mechanismTable() }) { result in
                r.reply(result) { list in [.array(list.map(Self.mechanismInfo))] }
            }
        case Calls.openSession.id:
            guard let token = token(named: r.string("slot")) else { return r.fail(Self.slotInvalid) }
            let flags = r.ulong("flags")
            guard flags & 0x4 != 0 else {  // CKF_SERIAL_SESSION
                return r.fail(rv: 0xb4, "C_OpenSession: CKR_SESSION_PARALLEL_NOT_SUPPORTED")
            }
            if flags & 0x2 == 0 && token.soHolder.withLock({ $0 == info.id }) {
                return r.fail(rv: 0xb8, "C_OpenSession: the SO is logged in (CKR_SESSION_READ_WRITE_SO_EXISTS)")
            }
            r.reply(openSessionRecord(info, token, readWrite: flags & 0x2 != 0)) { [.ulong($0.id)] }
        case Calls.initToken.id:
            guard let token = token(named: r.string("slot")) else { return r.fail(Self.slotInvalid) }
            let label = r.string("label")
            guard case .success(let pin) = readSecret(r, "so_pin") else { return }
            submitPIN([.manage], requester, token, operation: "init-token", inline: false, denied: r.fail, {
                try token.initToken(soPIN: pin, label: label)
            }) { r.reply($0) { _ in [] } }
        default:
            guard let record = sessions.withLock({ $0[r.ulong("session")] }), record.owner == info.id else {
                return r.fail(Self.sessionInvalid)
            }
            serveSession(r, record, requester)
        }
    }

    private static let slotInvalid = ServiceError(.backendError, "no such slot (CKR_SLOT_ID_INVALID (0x3))", rv: 0x3)

    private func token(named id: String) -> TokenContext? {
        tokens.first { $0.id == id && $0.published.load(ordering: .acquiring) }
    }

    /// PIN arguments: held in locked memory, or the request is answered with why not.
    private func readSecret(_ r: CryptokiRequest, _ name: String) -> Result<SecretPIN, ServiceError> {
        switch r.secret(name) {
        case .success(let pin):
            pinMemoryAvailable()
            return .success(pin)
        case .failure(let error):
            let e = pinMemoryError(error)
            r.fail(e)
            return .failure(e)
        }
    }

    private func serveSession(_ r: CryptokiRequest, _ record: SessionRecord, _ requester: Requester) {
        let token = record.token
        let caller = record.owner
        let id = record.id
        let rw = record.readWrite
        let registry = self.registry
        let info = requester.info
        @Sendable func settings() -> Settings { registry.lookup(caller.rawValue)?.settings ?? info.settings }
        /// Authorises, then runs `job` on the token's worker and encodes its result. A polkit
        /// refusal is CKR_FUNCTION_REJECTED, or `refusal` where the spec names a better code.
        /// `shareable`: see Service.onWorker.
        @Sendable func run<T: Sendable>(
            _ needs: [Access], _ operation: String, keyID: [UInt8]? = nil, refusal: UInt? = nil, shareable: Bool = false,
            _ job: @escaping @Sendable () throws -> T, _ encode: @escaping @Sendable (T) -> [WireValue]
        ) {
            let denied: @Sendable (ServiceError) -> Void = { e in
                guard let refusal, e.kind == .notAuthorized else { return r.fail(e) }
                r.fail(ServiceError(e.kind, e.message, rv: refusal))
            }
            authorise(needs, requester, token: token, operation: operation, keyID: keyID, denied: denied) { [weak self] in
                self?.onWorker(token, caller: caller, inline: true, shareable: shareable, job) { r.reply($0, encode) }
            }
        }
        /// The same for a request that carries a typed PIN: PinAttempts.swift.
        @Sendable func runPIN<T: Sendable>(
            _ needs: [Access], _ operation: String, _ job: @escaping @Sendable () throws -> T,
            _ encode: @escaping @Sendable (T) -> [WireValue]
        ) {
            submitPIN(needs, requester, token, operation: operation, inline: true, denied: r.fail, job) { r.reply($0, encode) }
        }
        func mechanism() -> Mechanism? {
            let fields = r.argument("mechanism")?.recordFields ?? []
            let decoded = MechanismParameters.decode(
                type: fields.first?.ulongValue ?? 0, parameter: fields.last?.bytesValue ?? [])
            switch decoded {
            case .success(let m): return m
            case .failure(let e):
                r.fail(e)
                return nil
            }
        }
        let template = { (name: String) in Self.attributes(r.argument(name)) }
        // An array attribute (CKA_WRAP_TEMPLATE, …) travels as a flattened template
        // (NestedTemplate, dbus/README.md), which PKCS11Kit turns into a C array of the
        // daemon's own for the call: one that does not parse is refused here, whoever sends it.
        for name in ["template", "public_template", "private_template"]
        where Self.attributes(r.argument(name)).contains(where: { $0.type.isArray && NestedTemplate.parse($0.value) == nil }) {
            return r.fail(rv: 0x13, "an array attribute's template is malformed (CKR_ATTRIBUTE_VALUE_INVALID)")
        }
        let handle = r.ulong("handle")
        // Calls that run in the caller's login when it has one use its cached PIN.
        let objects: [Access] = [.cachedPIN]
        let changes: [Access] = [.modifyToken, .cachedPIN]
        // PKCS#11 2.40 gives copying, destroying and changing an object a code for "policy
        // forbids it" (CKA_COPYABLE, CKA_DESTROYABLE, CKA_MODIFIABLE); other changes have none.
        let prohibited: UInt = 0x1b  // CKR_ACTION_PROHIBITED

        switch r.call.id {
        case Calls.closeSession.id:
            _ = closeSessionRecord(record, inline: true) { r.reply([]) }
        case Calls.getSessionInfo.id:
            let s = token.sessionState(caller: caller, rw: rw)
            r.reply([.ulong(UInt64(s.state)), .ulong(UInt64(s.flags)), .ulong(0)])
        case Calls.login.id:
            guard case .success(let pin) = readSecret(r, "pin") else { return }
            switch UserType(rawValue: UInt(r.ulong("user_type"))) {
            case .user:
                // PKCS#11's session rules, per application (issue 13 §6): the SO and the user
                // are never logged in at once.
                if token.soHolder.withLock({ $0 == caller }) {
                    return r.fail(rv: 0x104, "C_Login: the SO is logged in (CKR_USER_ANOTHER_ALREADY_LOGGED_IN)")
                }
                runPIN([.login], "login", {
                    try token.login(caller: caller, settings: settings(), pin: pin) { registry.isAlive(caller) }
                    self.forgetCachedUse(token, caller)
                }) { _ in [] }
            case .so:
                if hasReadOnlySession(caller, on: token) {
                    return r.fail(rv: 0xb7, "C_Login: an SO login needs every session read-write (CKR_SESSION_READ_ONLY_EXISTS)")
                }
                if token.policy.withLock({ $0.state(of: caller).loggedIn }) {
                    return r.fail(rv: 0x104, "C_Login: the user is logged in (CKR_USER_ANOTHER_ALREADY_LOGGED_IN)")
                }
                runPIN([.manage], "so-login", {
                    try token.loginSO(caller: caller, settings: settings(), pin: pin) { registry.isAlive(caller) }
                }) { _ in [] }
            case .contextSpecific:
                runPIN([.login], "context-login", { try token.loginContext(caller: caller, session: id, pin: pin) }) { _ in [] }
            default:
                r.fail(rv: 0x103, "C_Login: CKR_USER_TYPE_INVALID")
            }
        case Calls.logout.id:
            run([], "logout", { try token.logoutAll(caller: caller) }) { _ in [] }
        case Calls.findObjects.id:
            let attrs = template("template")
            let max = Int(min(r.ulong("max"), UInt64(Caps.handles)))
            run(objects, "find-objects", shareable: true, {
                try token.findObjects(caller: caller, settings: settings(), session: id, rw: rw, template: attrs, max: max)
            }) { handles in [.array(handles.map { .ulong($0) })] }
        case Calls.getObjectSize.id:
            run(objects, "get-object-size", keyID: token.knownKeyID(handle), {
                try token.objectSize(caller: caller, settings: settings(), session: id, rw: rw, handle: handle)
            }) { size in [.ulong(UInt64(size))] }
        case Calls.getAttributes.id:
            let types = (r.argument("types")?.arrayValues ?? []).map { AttributeType(rawValue: UInt($0.ulongValue ?? 0)) }
            run(objects, "get-attributes", keyID: token.knownKeyID(handle), shareable: true, {
                try token.getAttributes(caller: caller, settings: settings(), session: id, rw: rw, handle: handle, types: types)
            }) { results in [.array(results.map(Self.attributeResult))] }
        case Calls.setAttributes.id:
            let attrs = template("template")
            run(changes, "set-attributes", keyID: token.knownKeyID(handle), refusal: prohibited, {
                try token.mutateObjects(caller: caller, settings: settings(), session: id, rw: rw) { s in
                    try token.setAttributes(s, handle, attrs, caller: caller)
                }
            }) { _ in [] }
        case Calls.createObject.id:
            let attrs = template("template")
            run(changes, "create-object", {
                try token.mutateObjects(caller: caller, settings: settings(), session: id, rw: rw) { s in
                    let (sent, kept) = token.sessionObjectTemplate(attrs, caller: caller)
                    return try token.registerCreated(
                        s, try token.module.createObject(s, sent), caller: caller, session: id, keptPrivate: kept)
                }
            }) { [.ulong($0)] }
        case Calls.copyObject.id:
            let attrs = template("template")
            run(changes, "copy-object", refusal: prohibited, {
                try token.mutateObjects(caller: caller, settings: settings(), session: id, rw: rw) { s in
                    let backend = try token.resolve(handle, s, caller: caller, function: "C_CopyObject")
                    let (sent, kept) = try token.copyTemplate(attrs, of: handle)
                    return try token.registerCreated(
                        s, try token.module.copyObject(s, backend, sent), caller: caller, session: id, keptPrivate: kept)
                }
            }) { [.ulong($0)] }
        case Calls.destroyObject.id:
            run(changes, "destroy-object", keyID: token.knownKeyID(handle), refusal: prohibited, {
                try token.mutateObjects(caller: caller, settings: settings(), session: id, rw: rw) { s in
                    let backend = try token.resolve(handle, s, caller: caller, function: "C_DestroyObject")
                    try token.module.destroyObject(s, backend)
                    token.forgetObject(handle)
                }
            }) { _ in [] }
        case Calls.generateKey.id:
            guard let m = mechanism() else { return }
            let attrs = template("template")
            run(changes, "generate-key", {
                try token.mutateObjects(caller: caller, settings: settings(), session: id, rw: rw) { s in
                    let (sent, kept) = token.sessionObjectTemplate(attrs, caller: caller, impliedClass: .secretKey)
                    return try token.registerCreated(
                        s, try token.module.generateKey(s, mechanism: m, template: sent), caller: caller, session: id,
                        keptPrivate: kept)
                }
            }) { [.ulong($0)] }
        case Calls.generateKeyPair.id:
            guard let m = mechanism() else { return }
            let pub = template("public_template")
            let priv = template("private_template")
            run(changes, "generate-key-pair", {
                try token.mutateObjects(caller: caller, settings: settings(), session: id, rw: rw) { s in
                    let (sentPublic, keptPublic) = token.sessionObjectTemplate(pub, caller: caller, impliedClass: .publicKey)
                    let (sentPrivate, keptPrivate) = token.sessionObjectTemplate(priv, caller: caller, impliedClass: .privateKey)
                    let pair = try token.module.generateKeyPair(
                        s, mechanism: m, publicTemplate: sentPublic, privateTemplate: sentPrivate)
                    return (
                        try token.registerCreated(s, pair.public, caller: caller, session: id, keptPrivate: keptPublic),
                        try token.registerCreated(s, pair.private, caller: caller, session: id, keptPrivate: keptPrivate)
                    )
                }
            }) { pair in [.ulong(pair.0), .ulong(pair.1)] }
        case Calls.sign.id, Calls.decrypt.id, Calls.signRecover.id:
            guard let m = mechanism() else { return }
            let key = r.ulong("key")
            let data = r.bytes("data")
            // A signature with recovery is a signature in everything the policy and audit say.
            let op: PrivateOperation =
                switch r.call.id {
                case Calls.sign.id: .sign(m, data)
                case Calls.signRecover.id: .signRecover(m, data)
                default: .decrypt(m, data)
                }
            let request = KeyOperation(key: .handle(key, session: id, readWrite: rw), operation: op, freshPIN: nil)
            let keyID = token.knownKeyID(key)
            let operation = op.kind == .sign ? "sign" : "decrypt"
            run(objects, operation, keyID: keyID, shareable: true, audited(info, token, operation, keyID: keyID, mechanism: m.type.rawValue, freshPIN: false) {
                try token.perform(caller: caller, settings: settings(), request)
            }) { [.bytes($0)] }
        case Calls.endStreams.id:
            let kinds = r.ulong("kinds")
            run([], "end-streams", { token.endStreams(ofSession: id, kinds: kinds) }) { _ in [] }
        case Calls.optionalFunctions.id:
            run([], "optional-functions", { try token.optionalFunctions(session: id, rw: rw) }) { [.ulong($0.rawValue)] }
        case Calls.verify.id, Calls.encrypt.id, Calls.verifyRecover.id:
            guard let m = mechanism() else { return }
            let op: TokenContext.PublicKeyOperation =
                switch r.call.id {
                case Calls.verify.id: .verify(signature: r.bytes("signature"))
                case Calls.verifyRecover.id: .verifyRecover
                default: .encrypt
                }
            let key = r.ulong("key")
            // VerifyRecover's input is the signature; its answer, the data recovered.
            let data = r.bytes(op == .verifyRecover ? "signature" : "data")
            let verify = op != .encrypt
            run(objects, verify ? "verify" : "encrypt", keyID: token.knownKeyID(key), {
                try token.publicKeyOperation(
                    caller: caller, settings: settings(), session: id, rw: rw, op: op, mechanism: m, key: key, data: data)
            }) { bytes in r.call.id == Calls.verify.id ? [] : [.bytes(bytes)] }
        case Calls.digest.id:
            guard let m = mechanism() else { return }
            let data = r.bytes("data")
            run([], "digest", {
                try token.publicOperation(caller: caller, session: id, rw: rw) { s in try token.module.digest(s, mechanism: m, data: data) }
            }) { [.bytes($0)] }
        case Calls.wrapKey.id:
            guard let m = mechanism() else { return }
            let wrapping = r.ulong("wrapping_key")
            let key = r.ulong("key")
            run(objects, "wrap-key", keyID: token.knownKeyID(key), {
                try token.wrapKey(
                    caller: caller, settings: settings(), session: id, rw: rw, mechanism: m, wrappingKey: wrapping, key: key)
            }) { [.bytes($0)] }
        case Calls.unwrapKey.id, Calls.deriveKey.id:
            guard let m = mechanism() else { return }
            let unwrap = r.call.id == Calls.unwrapKey.id
            let key = r.ulong(unwrap ? "unwrapping_key" : "base_key")
            let wrapped = unwrap ? r.bytes("wrapped") : []
            let attrs = template("template")
            let keyID = token.knownKeyID(key)
            let operation = unwrap ? "unwrap-key" : "derive-key"
            // A key made into the session only (S/MIME's content keys) is a decryption's
            // result, not a change to the token: modify-token is asked for token objects alone.
            let intoToken = attrs.contains { $0.type == .token && $0.value.pkcs11Bool == true }
            run(intoToken ? changes : objects, operation, keyID: keyID, audited(info, token, operation, keyID: keyID, mechanism: m.type.rawValue, freshPIN: false) {
                unwrap
                    ? try token.unwrapKey(
                        caller: caller, settings: settings(), session: id, rw: rw, mechanism: m, unwrappingKey: key,
                        wrapped: wrapped, template: attrs)
                    : try token.deriveKey(
                        caller: caller, settings: settings(), session: id, rw: rw, mechanism: m, baseKey: key, template: attrs)
            }) { [.ulong($0)] }
        case Calls.streamBegin.id:
            guard let m = mechanism() else { return }
            guard let kind = PKCS11Module.StreamKind(rawValue: r.ulong("kind")) else {
                return r.fail(rv: 0x7, "StreamBegin: kind must be 0 to 4 (CKR_ARGUMENTS_BAD)")
            }
            let key = r.ulong("key")
            let keyID = kind == .digest ? nil : token.knownKeyID(key)
            let operation = ["encrypt", "decrypt", "sign", "verify", "digest"][Int(kind.rawValue)]
            let begin: @Sendable () throws -> Bool = {
                try token.streamBegin(caller: caller, session: id, kind: kind, mechanism: m, key: key)
            }
            // A decryption or a signature is a key's use, audited as C_Decrypt and C_Sign are,
            // when it starts or fails; one that does not stream is recorded at its final call.
            // Encryption, verification and digests are not audited.
            let job = kind == .decrypt || kind == .sign
                ? audited(info, token, operation, keyID: keyID, mechanism: m.type.rawValue, freshPIN: false, recordIf: { $0 }, begin)
                : begin
            run(kind == .digest ? [] : objects, operation, keyID: keyID, job) { [.ulong($0 ? 1 : 0)] }
        case Calls.streamUpdate.id, Calls.streamFinal.id:
            guard let kind = PKCS11Module.StreamKind(rawValue: r.ulong("kind")),
                let output = Self.outputBuffer(r.ulong("buffer"), capacity: r.ulong("capacity"))
            else { return r.fail(rv: 0x7, "\(r.call.name): kind 0 to 4, buffer 0, 1 or 2, capacity within the cap (CKR_ARGUMENTS_BAD)") }
            let final = r.call.id == Calls.streamFinal.id
            let data: [UInt8]? = final ? nil : r.bytes("data")
            let digestKey = final ? 0 : r.ulong("key")
            let signature = final ? r.bytes("signature") : []
            run([], "stream", {
                try token.streamPart(
                    caller: caller, session: id, kind: kind, data: data, digestKey: digestKey, signature: signature, output: output)
            }) { answer in
                [
                    .ulong(UInt64(answer.part.rv.rawValue)), .ulong(UInt64(answer.part.length)), .bytes(answer.part.output),
                    .ulong(answer.active ? 1 : 0),
                ]
            }
        case Calls.keyFacts.id:
            let key = r.ulong("key")
            run(objects, "key-facts", keyID: token.knownKeyID(key), {
                try token.keyFacts(caller: caller, settings: settings(), session: id, rw: rw, handle: key)
            }) { results in [.array(results.map(Self.attributeResult))] }
        case Calls.digestParts.id:
            guard let m = mechanism() else { return }
            let parts: [DigestPart] = (r.argument("parts")?.arrayValues ?? []).map { part in
                let fields = part.recordFields ?? []
                let key = fields.first?.ulongValue ?? 0
                return key == 0 ? .data(fields.last?.bytesValue ?? []) : .key(ObjectHandle(rawValue: UInt(key)))
            }
            run(objects, "digest", {
                try token.digestParts(caller: caller, settings: settings(), session: id, rw: rw, mechanism: m, parts: parts)
            }) { [.bytes($0)] }
        case Calls.generateRandom.id:
            let n = r.ulong("length")
            guard n <= UInt64(Caps.random) else {
                return r.fail(.arguments("at most \(Caps.random) random bytes per call"))
            }
            run([], "random", {
                try token.publicOperation(caller: caller, session: id, rw: rw) { s in try token.module.generateRandom(s, count: Int(n)) }
            }) { [.bytes($0)] }
        case Calls.seedRandom.id:
            let seed = r.bytes("seed")
            run([], "random", {
                try token.publicOperation(caller: caller, session: id, rw: rw) { s in try token.module.seedRandom(s, seed) }
            }) { _ in [] }
        case Calls.initPIN.id:
            guard case .success(let pin) = readSecret(r, "pin") else { return }
            run([.manage], "init-pin", { try token.initPIN(caller: caller, pin: pin) }) { _ in [] }
        case Calls.setPIN.id:
            guard case .success(let old) = readSecret(r, "old_pin"), case .success(let new) = readSecret(r, "new_pin") else {
                return
            }
            runPIN([.modifyToken, .cachedPIN], "set-pin", {
                try token.setPIN(caller: caller, settings: settings(), session: id, rw: rw, old: old, new: new)
            }) { _ in [] }
        default:
            r.fail(rv: 0x54, "\(r.call.name): CKR_FUNCTION_NOT_SUPPORTED")
        }
    }

    // MARK: - Values

    /// The application's output buffer as the proxy describes it (Calls.streamUpdate).
    static func outputBuffer(_ buffer: UInt64, capacity: UInt64) -> PKCS11Module.OutputBuffer? {
        switch buffer {
        case 0: .noLength
        case 1: .lengthQuery
        case 2 where capacity <= UInt64(Caps.data): .buffer(capacity: Int(capacity))
        default: nil
        }
    }

    static func attributes(_ v: WireValue?) -> [Attribute] {
        (v?.arrayValues ?? []).compactMap { entry in
            guard let f = entry.recordFields, let t = f.first?.ulongValue, let value = f.last?.bytesValue else { return nil }
            return Attribute(AttributeType(rawValue: UInt(t)), value)
        }
    }

    static func attributeResult(_ r: AttributeResult) -> WireValue {
        .record([.ulong(UInt64(r.type.rawValue)), .ulong(UInt64(r.status.rawValue)), .bytes(r.value)])
    }

    static func mechanismInfo(_ m: (MechanismType, MechanismInfo)) -> WireValue {
        .record([m.0.rawValue, m.1.minKeySize, m.1.maxKeySize, m.1.flags].map { .ulong(UInt64($0)) })
    }

    /// The caller has a read-only session on `token` (a Session1 object or a proxy session).
    func hasReadOnlySession(_ caller: CallerID, on token: TokenContext) -> Bool {
        sessions.withLock { $0.values.contains { $0.owner == caller && $0.token === token && !$0.readWrite } }
    }

    static func slotInfo(_ token: TokenContext) -> WireValue {
        let s = token.snapshot
        func version(_ v: Version) -> WireValue { .record([.ulong(UInt64(v.major)), .ulong(UInt64(v.minor))]) }
        func text(_ t: String) -> WireValue {
            var t = String(t.unicodeScalars.filter { $0 != "\0" })
            while t.utf8.count > Caps.text { t.removeLast() }
            return .string(t)
        }
        let present = s.present && s.info != nil
        let i = present ? s.info : nil
        let numbers: [UInt] = [
            i?.flags ?? 0, i?.maxSessionCount ?? 0, i?.maxRwSessionCount ?? 0, i?.maxPinLength ?? 0,
            i?.minPinLength ?? 0, i?.totalPublicMemory ?? 0, i?.freePublicMemory ?? 0, i?.totalPrivateMemory ?? 0,
            i?.freePrivateMemory ?? 0,
        ]
        var utc = i?.utcTime ?? ""
        while utc.utf8.count > 16 { utc.removeLast() }
        return .record(
            [
                .string(token.id), text(s.slotDescription), text(s.slotManufacturer), .ulong(UInt64(s.slotFlags)),
                // 2: a card is there but its module cannot read it (CKR_TOKEN_NOT_RECOGNIZED).
                version(s.slotHardwareVersion), version(s.slotFirmwareVersion), .ulong(present ? 1 : s.present ? 2 : 0),
                text(i?.label ?? ""), text(i?.manufacturer ?? ""), text(i?.model ?? ""), text(i?.serialNumber ?? ""),
            ] + numbers.map { .ulong(UInt64($0)) } + [
                version(i?.hardwareVersion ?? Version(major: 0, minor: 0)),
                version(i?.firmwareVersion ?? Version(major: 0, minor: 0)), text(utc),
            ])
    }
}
