import DBusKit
import Glibc
import FastPathWire
import PKCS11Kit
import PinPolicy

/// Argument decoding for the proxy's interfaces: every size and count is capped before any
/// work (the proxy is as strict with the replies).
enum Wire {
    static let maxTemplateEntries = 256
    static let maxAttributeBytes = 1 << 20
    static let maxDataBytes = 16 << 20
    static let maxFindResults = 100_000
    static let maxRandomBytes = 1 << 20

    static func invalid(_ what: String) -> DBusError { .invalidArgs("\(what) (CKR_ARGUMENTS_BAD (0x7))") }

    static func template(_ v: DBusValue) -> Result<[Attribute], DBusError> {
        guard let entries = v.arrayValues else { return .failure(invalid("template: expected a(tay)")) }
        guard entries.count <= maxTemplateEntries else { return .failure(invalid("template longer than \(maxTemplateEntries)")) }
        var out: [Attribute] = []
        for e in entries {
            guard let f = e.structFields, f.count == 2, let t = f[0].uint64Value, let value = f[1].bytesValue else {
                return .failure(invalid("template entry: expected (tay)"))
            }
            guard value.count <= maxAttributeBytes else { return .failure(invalid("attribute value too long")) }
            out.append(Attribute(AttributeType(rawValue: UInt(t)), value))
        }
        return .success(out)
    }

    /// Mechanisms whose parameter is a pointer-free C struct, with its exact size. Only these
    /// pass through as raw bytes: any other parameter could carry a pointer the module would
    /// follow into the daemon's memory, so it is refused (CKR_MECHANISM_PARAM_INVALID).
    static let rawParameterSizes: [UInt: Int] = [
        0x0D: 24, 0x0E: 24, 0x43: 24, 0x44: 24, 0x45: 24, 0x47: 24,  // *RSA_PKCS_PSS: CK_RSA_PKCS_PSS_PARAMS
        0x1082: 16, 0x1085: 16,  // AES_CBC(_PAD): the IV
        0x1086: 24,  // AES_CTR: CK_AES_CTR_PARAMS
        0x133: 8, 0x136: 8,  // DES3_CBC(_PAD): the IV
        0x1084: 8, 0x1105: 8, 0x252: 8, 0x262: 8, 0x272: 8, 0x227: 8, 0x256: 8,  // *_MAC_GENERAL: CK_MAC_GENERAL_PARAMS
    ]

    static func paramInvalid(_ what: String) -> DBusError {
        DBusError(
            name: ServiceError.prefix + ServiceError.Kind.mechanismInvalid.rawValue,
            message: "\(what) (CKR_MECHANISM_PARAM_INVALID (0x71))")
    }

    /// (tay): the mechanism type and its parameter bytes; OAEP's source data pointer travels flattened.
    static func mechanism(_ v: DBusValue) -> Result<Mechanism, DBusError> {
        guard let f = v.structFields, f.count == 2, let t = f[0].uint64Value, let p = f[1].bytesValue else {
            return .failure(invalid("mechanism: expected (tay)"))
        }
        guard p.count <= 4096 else { return .failure(paramInvalid("mechanism parameter too long")) }
        let type = MechanismType(rawValue: UInt(t))
        if p.isEmpty { return .success(Mechanism(type)) }
        if type == .rsaPKCSOAEP {
            guard p.count >= 24 else { return .failure(paramInvalid("CK_RSA_PKCS_OAEP_PARAMS: need 24 bytes")) }
            func ulong(_ at: Int) -> UInt { p[at..<at + 8].reversed().reduce(0) { $0 << 8 | UInt($1) } }
            guard ulong(16) == 1 else { return .failure(paramInvalid("OAEP source must be CKZ_DATA_SPECIFIED")) }
            return .success(
                Mechanism(
                    type,
                    parameter: .oaep(
                        hash: MechanismType(rawValue: ulong(0)), mgf: MGF(rawValue: ulong(8)), sourceData: Array(p[24...]))))
        }
        guard let size = rawParameterSizes[type.rawValue] else {
            return .failure(paramInvalid("\(type.name): parameters of this mechanism are not supported over the bus"))
        }
        guard p.count == size else {
            return .failure(paramInvalid("\(type.name): parameter must be \(size) bytes, got \(p.count)"))
        }
        return .success(Mechanism(type, parameter: .raw(p)))
    }

    static func data(_ v: DBusValue, _ name: String = "data") -> Result<[UInt8], DBusError> {
        guard let b = v.bytesValue else { return .failure(invalid("\(name): expected ay")) }
        guard b.count <= maxDataBytes else { return .failure(invalid("\(name) longer than \(maxDataBytes) bytes")) }
        return .success(b)
    }
}

extension PincacheService {
    // MARK: - CryptokiManager1

    func cryptokiManagerInterface() -> ExportedInterface {
        ExportedInterface(
            PincacheInterfaces.cryptokiManager,
            methods: [
                "GetSlots": { [weak self] call in
                    guard let self else { return }
                    let slots = self.tokens.filter { $0.published.load(ordering: .acquiring) }.map {
                        DBusValue.structure([.objectPath($0.path), Self.slotDescription($0)])
                    }
                    call.reply([.array(elementSignature: "(oa{sv})", slots)])
                },
                "OpenChannel": { [weak self] call in
                    guard let self else { return }
                    self.withCaller(call) { info in self.openChannel(call, info) }
                },
                "OpenFastPath": { [weak self] call in
                    guard let self else { return }
                    self.withCaller(call) { info in self.openFastPath(call, info) }
                },
            ])
    }

    private func openChannel(_ call: MethodCall, _ info: CallerInfo) {
        guard let address = channelAddress else {
            return call.reply(error: DBusError(name: "org.freedesktop.DBus.Error.NotSupported", message: "this daemon serves no peer channels"))
        }
        guard let uid = info.uid, let pid = info.pid,
            let ticket = channelTickets.issue(name: call.sender, uid: uid, pid: pid)
        else {
            return call.reply(error: DBusError(name: "org.freedesktop.DBus.Error.LimitsExceeded", message: "too many channel tickets outstanding for this caller"))
        }
        call.reply([.string(address), .bytes(ticket)])
    }

    private func openFastPath(_ call: MethodCall, _ info: CallerInfo) {
        let name = call.sender
        guard let fd = fastPaths.open(for: name, serve: { [weak self] request in
            self?.serveFastPath(request, for: name)
                ?? .error(name: "org.freedesktop.DBus.Error.Failed", message: "the daemon is shutting down")
        }) else {
            return call.reply(error: DBusError(name: "org.freedesktop.DBus.Error.LimitsExceeded", message: "too many fast paths open"))
        }
        // libdbus sends a duplicate; the caller's is the only copy that stays.
        call.reply([.unixFD(fd)])
        Glibc.close(fd)
    }

    /// One fast-path request of `name`: the same arguments, checks and code as the
    /// CryptokiSession1 method it stands for, on a session only `name` may use.
    func serveFastPath(_ request: FastPathWire.Request, for name: String) -> FastPathWire.Reply {
        guard let info = registry.lookup(name),
            let record = sessions.withLock({ $0[request.session] }), record.owner == info.id
        else {
            // What the bus says for another caller's session, or one that does not exist.
            return .error(name: DBusConnection.accessDeniedError.name, message: DBusConnection.accessDeniedError.message)
        }
        var arguments: [DBusValue] = [
            .structure([.uint64(request.mechanism), .bytes(request.parameter)]), .uint64(request.key),
            .bytes(request.data),
        ]
        let op: TokenContext.RawOperation?
        switch request.operation {
        case .sign: op = .sign
        case .decrypt: op = .decrypt
        case .encrypt: op = .encrypt
        case .verify:
            op = nil
            arguments.append(.bytes(request.signature))
        }
        let call = FastPathCall(outputs: op != nil)
        cryptokiCrypto(record, info, op, arguments, reply: call)
        return call.wait()
    }

    private static func encodeMechanism(_ m: (MechanismType, MechanismInfo)) -> DBusValue {
        let fields: [UInt] = [m.0.rawValue, m.1.minKeySize, m.1.maxKeySize, m.1.flags]
        return .structure(fields.map { .uint64(UInt64($0)) })
    }

    private static func encodeAttribute(_ r: AttributeResult) -> DBusValue {
        .structure([.uint64(UInt64(r.type.rawValue)), .uint64(UInt64(r.status.rawValue)), .bytes(r.value)])
    }

    private static func slotDescription(_ token: TokenContext) -> DBusValue {
        let s = token.snapshot
        func version(_ v: Version) -> DBusValue { .structure([.byte(v.major), .byte(v.minor)]) }
        var d: [String: DBusValue] = [
            "SlotDescription": .string(s.slotDescription),
            "SlotManufacturer": .string(s.slotManufacturer),
            "SlotFlags": .uint64(UInt64(s.slotFlags)),
            "HardwareVersion": version(s.slotHardwareVersion),
            "FirmwareVersion": version(s.slotFirmwareVersion),
            "TokenPresent": .boolean(s.present && s.info != nil),
        ]
        if s.present, let i = s.info {
            d["Label"] = .string(i.label)
            d["Manufacturer"] = .string(i.manufacturer)
            d["Model"] = .string(i.model)
            d["Serial"] = .string(i.serialNumber)
            d["TokenFlags"] = .uint64(UInt64(i.flags))
            d["MaxSessionCount"] = .uint64(UInt64(i.maxSessionCount))
            d["MaxRwSessionCount"] = .uint64(UInt64(i.maxRwSessionCount))
            d["MaxPinLen"] = .uint64(UInt64(i.maxPinLength))
            d["MinPinLen"] = .uint64(UInt64(i.minPinLength))
            d["TotalPublicMemory"] = .uint64(UInt64(i.totalPublicMemory))
            d["FreePublicMemory"] = .uint64(UInt64(i.freePublicMemory))
            d["TotalPrivateMemory"] = .uint64(UInt64(i.totalPrivateMemory))
            d["FreePrivateMemory"] = .uint64(UInt64(i.freePrivateMemory))
            d["TokenHardwareVersion"] = version(i.hardwareVersion)
            d["TokenFirmwareVersion"] = version(i.firmwareVersion)
            d["UtcTime"] = .string(i.utcTime)
        }
        return .vardict(d)
    }

    // MARK: - CryptokiSlot1

    func cryptokiSlotInterface(_ token: TokenContext) -> ExportedInterface {
        ExportedInterface(
            PincacheInterfaces.cryptokiSlot,
            methods: [
                "GetMechanisms": { [weak self] call in
                    guard let self else { return }
                    self.withCaller(call) { info in
                        self.onWorker(token, call, caller: info.id, { try token.mechanismTable() }) { list in
                            [.array(elementSignature: "(tttt)", list.map(Self.encodeMechanism))]
                        }
                    }
                },
                "OpenSession": { [weak self] call in
                    guard let self, let flags = call.arguments.first?.uint64Value else { return }
                    guard flags & 0x4 != 0 else {  // CKF_SERIAL_SESSION
                        return call.reply(
                            error: ServiceError(.backendError, "C_OpenSession: CKR_SESSION_PARALLEL_NOT_SUPPORTED (0xb4)").dbusError)
                    }
                    self.withCaller(call) { info in self.openSession(call, info, token, readWrite: flags & 0x2 != 0) }
                },
                "InitToken": { [weak self] call in
                    guard let self, let label = call.arguments.last?.stringValue else { return }
                    guard label.utf8.count <= 32 else { return call.reply(error: Wire.invalid("label longer than 32 bytes")) }
                    switch self.readPIN(call, at: 0) {
                    case .failure(let e): call.reply(error: e)
                    case .success(let pin):
                        self.withCaller(call) { info in
                            self.authorized(.manage, call, self.details(token, info, "init-token", keyID: nil)) {
                                self.onWorker(token, call, caller: info.id, { try token.initToken(soPIN: pin, label: label) }) {
                                    _ in []
                                }
                            }
                        }
                    }
                },
            ])
    }

    // MARK: - CryptokiSession1

    /// Sign, Decrypt, Encrypt, or Verify (`op` nil) with CryptokiSession1's arguments
    /// `(tay) mechanism, t key, ay data[, ay signature]`, already checked against the
    /// signature: the one implementation behind the D-Bus methods and the fast path.
    func cryptokiCrypto(
        _ record: SessionRecord, _ info: CallerInfo, _ op: TokenContext.RawOperation?, _ a: [DBusValue],
        reply: any CallReply
    ) {
        let token = record.token
        let caller = record.owner
        let registry = self.registry
        let decoded: Result<@Sendable () throws -> [UInt8], DBusError> =
            Wire.mechanism(a[0]).flatMap { m in
                guard let key = a[1].uint64Value else { return .failure(Wire.invalid("expected a handle (t)")) }
                return Wire.data(a[2]).flatMap { data in
                    var operation = op
                    if op == nil {
                        switch Wire.data(a[3], "signature") {
                        case .failure(let e): return .failure(e)
                        case .success(let sig): operation = .verify(signature: sig)
                        }
                    }
                    let final = operation!
                    return .success({
                        try token.rawOperation(
                            caller: caller, settings: registry.lookup(caller.rawValue)?.settings ?? info.settings,
                            session: record.id, rw: record.readWrite, op: final, mechanism: m, key: key, data: data)
                    })
                }
            }
        switch decoded {
        case .failure(let e): reply.reply(error: e)
        case .success(let job):
            onWorker(token, reply, caller: caller, job) { (bytes: [UInt8]) in op == nil ? [] : [.bytes(bytes)] }
        }
    }

    func cryptokiSessionInterface(_ record: SessionRecord, _ info: CallerInfo) -> ExportedInterface {
        let token = record.token
        let caller = record.owner
        let id = record.id
        let rw = record.readWrite
        let registry = self.registry
        @Sendable func settings() -> Settings { registry.lookup(caller.rawValue)?.settings ?? info.settings }
        /// Decodes, then runs `job` on the token's worker and encodes its result.
        @Sendable func work<T: Sendable>(
            _ call: MethodCall, _ decode: () -> Result<@Sendable () throws -> T, DBusError>,
            _ encode: @escaping @Sendable (T) -> [DBusValue]
        ) {
            switch decode() {
            case .failure(let e): call.reply(error: e)
            case .success(let job): onWorker(token, call, caller: caller, job, reply: encode)
            }
        }
        @Sendable func handle(_ v: DBusValue?) -> Result<UInt64, DBusError> {
            guard let h = v?.uint64Value else { return .failure(Wire.invalid("expected a handle (t)")) }
            return .success(h)
        }
        @Sendable func crypto(_ call: MethodCall, _ op: TokenContext.RawOperation?) {
            self.cryptokiCrypto(record, info, op, call.arguments, reply: call)
        }
        return ExportedInterface(
            PincacheInterfaces.cryptokiSession,
            methods: [
                "GetSessionInfo": { call in
                    let s = token.sessionState(caller: caller, rw: rw)
                    call.reply([.structure([.uint64(UInt64(s.state)), .uint64(UInt64(s.flags)), .uint64(0)])])
                },
                "Login": { [weak self] call in
                    guard let self, let userType = call.arguments.first?.uint64Value else { return }
                    let pin: SecretPIN
                    switch self.readPIN(call, at: 1) {
                    case .failure(let e): return call.reply(error: e)
                    case .success(let p): pin = p
                    }
                    let details = self.details(token, info, "login", keyID: nil)
                    switch UserType(rawValue: UInt(userType)) {
                    case .user:
                        self.authorized(.login, call, details) {
                            self.onWorker(token, call, caller: caller, {
                                try token.login(caller: caller, settings: settings(), pin: pin) { registry.isAlive(caller) }
                            }) { _ in [] }
                        }
                    case .so:
                        self.authorized(.login, call, details) {
                            self.onWorker(token, call, caller: caller, {
                                try token.loginSO(caller: caller, settings: settings(), pin: pin) { registry.isAlive(caller) }
                            }) { _ in [] }
                        }
                    case .contextSpecific:
                        self.authorized(.login, call, details) {
                            self.onWorker(token, call, caller: caller, {
                                try token.loginContext(caller: caller, session: id, pin: pin)
                            }) { _ in [] }
                        }
                    default:
                        call.reply(error: ServiceError(.backendError, "C_Login: CKR_USER_TYPE_INVALID (0x103)").dbusError)
                    }
                },
                "Logout": { [weak self] call in
                    self?.onWorker(token, call, caller: caller, { try token.logoutAll(caller: caller) }) { _ in [] }
                },
                "FindObjects": { call in
                    let a = call.arguments
                    work(call, {
                        Wire.template(a[0]).map { template in
                            let max = Int(min(a[1].uint64Value ?? 0, UInt64(Wire.maxFindResults)))
                            return {
                                try token.findObjects(
                                    caller: caller, settings: settings(), session: id, rw: rw, template: template, max: max)
                            }
                        }
                    }) { (handles: [UInt64]) in [.array(elementSignature: "t", handles.map { DBusValue.uint64($0) })] }
                },
                "GetAttributes": { call in
                    let a = call.arguments
                    work(call, {
                        handle(a[0]).flatMap { h in
                            guard let types = a[1].arrayValues, types.count <= Wire.maxTemplateEntries else {
                                return .failure(Wire.invalid("types: at most \(Wire.maxTemplateEntries)"))
                            }
                            let t = types.compactMap { $0.uint64Value }.map { AttributeType(rawValue: UInt($0)) }
                            return .success({
                                try token.getAttributes(
                                    caller: caller, settings: settings(), session: id, rw: rw, handle: h, types: t)
                            })
                        }
                    }) { (results: [AttributeResult]) in
                        [.array(elementSignature: "(ttay)", results.map(Self.encodeAttribute))]
                    }
                },
                "SetAttributes": { call in
                    let a = call.arguments
                    work(call, {
                        handle(a[0]).flatMap { h in
                            Wire.template(a[1]).map { template in
                                {
                                    try token.mutateObjects(caller: caller, settings: settings(), session: id, rw: rw) { s in
                                        let backend = try token.resolve(h, s, caller: caller, function: "C_SetAttributeValue")
                                        let created = token.objectTable.locators[h]?.creatingSession
                                        try token.module.setAttributes(s, backend, template)
                                        // The identity may have changed (label, id): register it afresh.
                                        token.forgetObject(h)
                                        _ = try token.register(s, backend, caller: caller, createdIn: created)
                                    }
                                }
                            }
                        }
                    }) { _ in [] }
                },
                "CreateObject": { call in
                    let a = call.arguments
                    work(call, {
                        Wire.template(a[0]).map { template in
                            {
                                try token.mutateObjects(caller: caller, settings: settings(), session: id, rw: rw) { s in
                                    try token.registerCreated(s, try token.module.createObject(s, template), caller: caller, session: id)
                                }
                            }
                        }
                    }) { (handle: UInt64) in [.uint64(handle)] }
                },
                "CopyObject": { call in
                    let a = call.arguments
                    work(call, {
                        handle(a[0]).flatMap { h in
                            Wire.template(a[1]).map { template in
                                {
                                    try token.mutateObjects(caller: caller, settings: settings(), session: id, rw: rw) { s in
                                        let backend = try token.resolve(h, s, caller: caller, function: "C_CopyObject")
                                        return try token.registerCreated(
                                            s, try token.module.copyObject(s, backend, template), caller: caller, session: id)
                                    }
                                }
                            }
                        }
                    }) { (handle: UInt64) in [.uint64(handle)] }
                },
                "DestroyObject": { call in
                    let a = call.arguments
                    work(call, {
                        handle(a[0]).map { h in
                            {
                                try token.mutateObjects(caller: caller, settings: settings(), session: id, rw: rw) { s in
                                    let backend = try token.resolve(h, s, caller: caller, function: "C_DestroyObject")
                                    try token.module.destroyObject(s, backend)
                                    token.forgetObject(h)
                                }
                            }
                        }
                    }) { _ in [] }
                },
                "GenerateKey": { call in
                    let a = call.arguments
                    work(call, {
                        Wire.mechanism(a[0]).flatMap { m in
                            Wire.template(a[1]).map { template in
                                {
                                    try token.mutateObjects(caller: caller, settings: settings(), session: id, rw: rw) { s in
                                        try token.registerCreated(
                                            s, try token.module.generateKey(s, mechanism: m, template: template),
                                            caller: caller, session: id)
                                    }
                                }
                            }
                        }
                    }) { (handle: UInt64) in [.uint64(handle)] }
                },
                "GenerateKeyPair": { call in
                    let a = call.arguments
                    work(call, {
                        Wire.mechanism(a[0]).flatMap { m in
                            Wire.template(a[1]).flatMap { pub in
                                Wire.template(a[2]).map { priv in
                                    {
                                        try token.mutateObjects(caller: caller, settings: settings(), session: id, rw: rw) { s in
                                            let pair = try token.module.generateKeyPair(
                                                s, mechanism: m, publicTemplate: pub, privateTemplate: priv)
                                            return (
                                                try token.registerCreated(s, pair.public, caller: caller, session: id),
                                                try token.registerCreated(s, pair.private, caller: caller, session: id)
                                            )
                                        }
                                    }
                                }
                            }
                        }
                    }) { (pair: (UInt64, UInt64)) in [.uint64(pair.0), .uint64(pair.1)] }
                },
                "Sign": { call in crypto(call, .sign) },
                "Verify": { call in crypto(call, nil) },
                "Encrypt": { call in crypto(call, .encrypt) },
                "Decrypt": { call in crypto(call, .decrypt) },
                "Digest": { call in
                    let a = call.arguments
                    work(call, {
                        Wire.mechanism(a[0]).flatMap { m in
                            Wire.data(a[1]).map { data in
                                { try token.publicOperation(caller: caller, session: id, rw: rw) { s in
                                    try token.module.digest(s, mechanism: m, data: data) } }
                            }
                        }
                    }) { (bytes: [UInt8]) in [.bytes(bytes)] }
                },
                "GenerateRandom": { call in
                    let n = call.arguments.first?.uint64Value ?? 0
                    work(call, {
                        guard n <= UInt64(Wire.maxRandomBytes) else {
                            return .failure(Wire.invalid("at most \(Wire.maxRandomBytes) random bytes"))
                        }
                        return .success({ try token.publicOperation(caller: caller, session: id, rw: rw) { s in
                            try token.module.generateRandom(s, count: Int(n)) } })
                    }) { (bytes: [UInt8]) in [.bytes(bytes)] }
                },
                "SeedRandom": { call in
                    let a = call.arguments
                    work(call, {
                        Wire.data(a[0], "seed").map { seed in
                            { try token.publicOperation(caller: caller, session: id, rw: rw) { s in
                                try token.module.seedRandom(s, seed) } }
                        }
                    }) { _ in [] }
                },
                "InitPIN": { [weak self] call in
                    guard let self else { return }
                    switch self.readPIN(call, at: 0) {
                    case .failure(let e): call.reply(error: e)
                    case .success(let pin):
                        self.onWorker(token, call, caller: caller, { try token.initPIN(caller: caller, pin: pin) }) { _ in [] }
                    }
                },
                "SetPIN": { [weak self] call in
                    guard let self else { return }
                    switch (self.readPIN(call, at: 0), self.readPIN(call, at: 1)) {
                    case (.failure(let e), _), (_, .failure(let e)): call.reply(error: e)
                    case (.success(let old), .success(let new)):
                        self.authorized(.login, call, self.details(token, info, "set-pin", keyID: nil)) {
                            self.onWorker(token, call, caller: caller, {
                                try token.setPIN(caller: caller, settings: settings(), session: id, rw: rw, old: old, new: new)
                            }) { _ in [] }
                        }
                    }
                },
            ])
    }
}
