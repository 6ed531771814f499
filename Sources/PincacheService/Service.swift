import DBusKit
import Foundation
import PCSCKit
import PKCS11Kit
import PinPolicy
import Synchronization

/// Size limits on arguments (DESIGN §1 "Quotas"): anything larger is InvalidArgs before any work.
enum Limits {
    static let keyIDBytes = 256
    static let dataBytes = 1 << 20
    static let pendingCallsPerUnidentifiedCaller = 64
    static let environmentsPerUID = 256
    /// Tokens whose operations average longer than this are never run inline (smart cards).
    static let inlineJobNanoseconds: UInt64 = 5_000_000
}

/// A session: owned by one caller connection, bound to one token. Sessions opened through
/// Token1 are Session1 objects on the bus; those of the proxy's wire are numbers on its socket.
struct SessionRecord: Sendable {
    let id: UInt64
    let path: ObjectPath
    let owner: CallerID
    let token: TokenContext
    /// CKF_RW_SESSION for sessions opened through the proxy's wire (Token1 sessions are read-only).
    let readWrite: Bool
}

/// The pincache service: the D-Bus objects of DESIGN §2 over the token contexts, the caller
/// registry and the policy core. Method handlers run on the bus loop thread and only decode,
/// validate and route; everything that touches a backend runs on the token's worker.
public final class PincacheService: @unchecked Sendable {
    public let connection: DBusConnection
    private let configurationState: Mutex<Configuration>
    public var configuration: Configuration { configurationState.withLock { $0 } }
    /// Authorisation is only meaningful on the system bus (DESIGN §3); elsewhere it is off.
    let onSystemBus: Bool

    let registry = CallerRegistry()
    let authorizer: Authorizer
    /// "token-id caller" pairs whose use of their cached PIN polkit already allowed since their
    /// last login (DESIGN §3: remembered per environment and token, never shared).
    let cachedUseAllowed = Mutex<Set<String>>([])
    private let tokenTable = Mutex<[TokenContext]>([])
    /// Every slot currently exported; readers come and go (rescan()).
    var tokens: [TokenContext] { tokenTable.withLock { $0 } }
    /// Set once in start(), read-only afterwards.
    private var backends: [Backend] = []
    private var readerWatcher: ReaderWatcher?
    let sessions = Mutex<[UInt64: SessionRecord]>([:])
    private let nextSessionID = Atomic<UInt64>(1)
    /// Calls waiting for their caller's credentials; touched only on the bus loop thread.
    private var pendingCallers: [String: [@Sendable (Result<CallerInfo, DBusError>) -> Void]] = [:]
    private var poller: Thread?
    /// The proxy's sockets (CryptokiSockets.swift).
    let cryptokiSockets = CryptokiSockets()
    private let stopping = Atomic<Bool>(false)
    /// The failure to lock memory for a PIN was logged and no PIN was locked since.
    private let memoryLockFailureLogged = Atomic<Bool>(false)

    public init(connection: DBusConnection, configuration: Configuration, onSystemBus: Bool) {
        self.connection = connection
        self.configurationState = Mutex(configuration)
        self.onSystemBus = onSystemBus
        self.authorizer = Authorizer(connection: connection, enabled: onSystemBus)
    }

    // MARK: - Start-up

    /// Loads the backends, exports every object, then takes the well-known name.
    public func start(modules: [String]) throws {
        for path in modules {
            if isPincacheProxy(path) {
                Log.error("refusing to load \(path) as a backend: it is pincache's own PKCS#11 proxy and would call this daemon")
                continue
            }
            do {
                backends.append(Backend(index: backends.count, path: path, module: try PKCS11Module(path: path)))
                Log.info("loaded PKCS#11 module \(path)")
            } catch {
                Log.error("cannot load PKCS#11 module \(path): \(error)")
            }
        }
        connection.setObjectManager(at: PincacheBus.managerPath)
        connection.setDeniedSubtree(PincacheBus.sessionPrefix)
        connection.onPeerDisconnected { [weak self] name in self?.peerDisconnected(name) }
        connection.export(PincacheBus.managerPath, interfaces: [managerInterface()])
        // The first scan completes before the name is taken: clients never see a half-filled list.
        let group = DispatchGroup()
        for backend in backends {
            group.enter()
            backend.worker.submit { [self] in
                // Each new token's first refresh and export are queued on its own worker.
                let added = rescanSlots(backend, announce: false)
                let all = DispatchGroup()
                for token in added {
                    all.enter()
                    token.worker.submit { all.leave() }
                }
                all.wait()
                group.leave()
            }
        }
        group.wait()
        for token in tokens {
            let s = token.snapshot
            Log.info("token \(token.id): \(s.slotDescription) present=\(s.present) recognized=\(s.recognized) label=\(s.info?.label ?? "-")")
        }
        try connection.requestName(PincacheBus.serviceName)
        startPoller()
        let watcher = ReaderWatcher(onChange: { [weak self] in self?.rescan() }, log: { Log.notice($0) })
        watcher.start()
        readerWatcher = watcher
        Log.info("ready on the bus as \(PincacheBus.serviceName) (\(connection.uniqueName)); \(tokens.count) slot(s)")
    }

    /// Re-reads every module's slot list and every token's state (PC/SC event, poll tick).
    func rescan() {
        for backend in backends where backend.worker.backlog == 0 {
            backend.worker.submit { [weak self] in self?.rescanSlots(backend, announce: true) }
        }
    }

    /// Backend worker: adds slots that appeared (a reader plugged in), removes those that went,
    /// and queues a refresh of the others on their own workers.
    @discardableResult
    private func rescanSlots(_ backend: Backend, announce: Bool) -> [TokenContext] {
        let slots: [SlotID]
        do {
            slots = try backend.module.slotList(tokenPresent: false)
        } catch {
            Log.warning("\(backend.path): C_GetSlotList failed: \(error)")
            return []
        }
        let current = Set(slots)
        let existing = tokens.filter { $0.backend === backend }
        for token in existing where !current.contains(token.slot) { removeToken(token) }
        for token in existing where current.contains(token.slot) && token.worker.backlog == 0 {
            token.worker.submit { token.refresh() }
        }
        let known = Set(existing.map(\.slot))
        var added: [TokenContext] = []
        for slot in slots where !known.contains(slot) {
            let token = TokenContext(backend: backend, slot: slot) { [weak self] t, old, new in
                self?.tokenChanged(t, old, new)
            }
            // In the table at once, so the next rescan does not make a second one for this slot.
            tokenTable.withLock { $0.append(token) }
            token.worker.submit { [weak self] in
                guard let self else { return }
                token.refresh()
                self.connection.export(token.path, interfaces: [self.tokenInterface(token)])
                token.published.store(true, ordering: .releasing)
                if announce {
                    Log.info("slot \(token.id) appeared: \(token.snapshot.slotDescription)")
                    if token.snapshot.present { self.emitPresence(token, present: true) }
                }
            }
            added.append(token)
        }
        return added
    }

    /// A slot that vanished (reader unplugged): every PIN and lock on it ends with it.
    private func removeToken(_ token: TokenContext) {
        tokenTable.withLock { $0.removeAll { $0 === token } }
        token.published.store(false, ordering: .releasing)
        token.policy.withLock { $0.tokenRemoved() }
        connection.unexport(token.path)
        if token.snapshot.present { emitPresence(token, present: false) }
        Log.info("slot \(token.id) went away")
        token.shutdown()
    }

    private func emitPresence(_ token: TokenContext, present: Bool) {
        connection.emitSignal(
            path: PincacheBus.managerPath, interface: PincacheInterfaces.manager.name,
            name: present ? "TokenInserted" : "TokenRemoved", arguments: [.objectPath(token.path)])
    }

    /// Wipes every PIN and closes the backend sessions before the process exits; waits for
    /// the token workers (a few seconds at most, as a card may hang) and leaves them parked.
    public func shutdown() {
        stopping.store(true, ordering: .relaxed)
        cryptokiSockets.closeAll()
        readerWatcher?.stop()
        let deadline = DispatchTime.now() + .seconds(5)
        for token in tokens {
            _ = token.policy.withLock { $0.flushCachedPINs() }
            if !token.finishForExit(deadline: deadline) {
                Log.warning("slot \(token.id): the module did not finish in time; exiting anyway")
            }
        }
    }

    /// Modules without slot events are polled (DESIGN §5); card events proper come with PC/SC.
    private func startPoller() {
        let interval = Double(configuration.slotPollIntervalMilliseconds) / 1000
        let thread = Thread { [weak self] in
            while let self, !self.stopping.load(ordering: .relaxed) {
                Thread.sleep(forTimeInterval: interval)
                self.rescan()
                self.expireIdlePINs()
            }
        }
        thread.name = "pincache-poller"
        poller = thread
        thread.start()
    }

    private func expireIdlePINs() {
        let now = TokenContext.now()
        for token in tokens {
            let n = token.policy.withLock { $0.expireIdle(now: now) }
            if n > 0 { Log.info("token \(token.id): \(n) cached PIN(s) expired (PinCacheTimeout)") }
        }
    }

    /// SIGHUP (DESIGN §7): new settings for every caller. A change of any caller's caching mode
    /// flushes every cache, since PINs cached under one mode must not survive into the other.
    /// Modules and the poll interval need a restart; a change there is logged.
    public func reload(_ new: Configuration) {
        let old = configurationState.withLock { c -> Configuration in
            let old = c
            c = new
            return old
        }
        if old.modules != new.modules || old.slotPollIntervalMilliseconds != new.slotPollIntervalMilliseconds {
            Log.notice("reload: Module= and SlotPollInterval changes take effect at the next restart")
        }
        var modeChanged = old.defaults.enableCachePIN != new.defaults.enableCachePIN
        for caller in registry.all {
            let settings = new.settings(forExecutable: caller.executable)
            if settings.enableCachePIN != caller.settings.enableCachePIN { modeChanged = true }
            registry.update(caller.id.rawValue) { $0.settings = settings }
        }
        if modeChanged {
            let n = tokens.reduce(0) { sum, t in sum + t.policy.withLock { $0.flushCachedPINs() } }
            Log.notice("reload: caching mode changed; \(n) cached PIN(s) wiped")
        }
        var changed: [String: DBusValue] = [:]
        if old.defaults.enableCachePIN != new.defaults.enableCachePIN {
            changed["CachingMode"] = .boolean(new.defaults.enableCachePIN)
        }
        if old.defaults.logoutAfterSign != new.defaults.logoutAfterSign {
            changed["LogoutAfterSign"] = .boolean(new.defaults.logoutAfterSign)
        }
        if old.defaults.forceLoginKeyUsage != new.defaults.forceLoginKeyUsage {
            changed["ForceLoginBeforeSignKeyUsage"] = .uint32(new.defaults.forceLoginKeyUsage)
        }
        if !changed.isEmpty {
            connection.emitPropertiesChanged(
                path: PincacheBus.managerPath, interface: PincacheInterfaces.manager.name, changed: changed)
        }
        Log.notice("configuration reloaded")
    }

    // MARK: - Callers

    /// Runs `body` with the caller's environment, creating it on the first call. Credentials
    /// are fetched from the bus asynchronously; calls arriving meanwhile wait in order.
    func withCaller(_ call: MethodCall, _ body: @escaping @Sendable (CallerInfo) -> Void) {
        let sender = call.sender
        if let info = registry.lookup(sender) {
            body(info)
            return
        }
        let run: @Sendable (Result<CallerInfo, DBusError>) -> Void = { admitted in
            switch admitted {
            case .success(let info): body(info)
            case .failure(let error): call.reply(error: error)
            }
        }
        if pendingCallers[sender] != nil {
            guard pendingCallers[sender]!.count < Limits.pendingCallsPerUnidentifiedCaller else {
                call.reply(error: DBusError(name: "org.freedesktop.DBus.Error.LimitsExceeded", message: "too many calls in flight"))
                return
            }
            pendingCallers[sender]!.append(run)
            return
        }
        pendingCallers[sender] = [run]
        connection.connectionCredentials(of: sender) { [weak self] result in
            guard let self else { return }
            let waiting = self.pendingCallers.removeValue(forKey: sender) ?? []
            let admitted: Result<CallerInfo, DBusError>
            switch result {
            case .success(let creds): admitted = self.admit(sender: sender, credentials: creds)
            case .failure: admitted = .failure(Self.credentialsUnreadable)
            }
            for w in waiting { w(admitted) }
        }
    }

    private static let credentialsUnreadable = ServiceError(
        .notAuthorized, "the caller's credentials could not be read (CKR_FUNCTION_REJECTED (0x200))"
    ).dbusError

    private func admit(sender: String, credentials: PeerCredentials) -> Result<CallerInfo, DBusError> {
        let exe = credentials.pid.flatMap { executablePath(pid: $0, uid: credentials.uid) }
        let settings = configuration.settings(forExecutable: exe)
        let info = CallerInfo(
            id: CallerID(sender), uid: credentials.uid, pid: credentials.pid, executable: exe, settings: settings)
        if let admitted = registry.add(info, maxPerUID: Limits.environmentsPerUID) { return .success(admitted) }
        // A caller that already left gets nothing; one over its uid's quota is told so, in
        // words that do not send its user looking for a polkit or credentials problem.
        guard !registry.hasDeparted(sender) else { return .failure(Self.credentialsUnreadable) }
        let uid = credentials.uid.map(String.init) ?? "?"
        Log.warning("uid \(uid) reached \(Limits.environmentsPerUID) environments; \(sender) refused")
        return .failure(
            DBusError(
                name: "org.freedesktop.DBus.Error.LimitsExceeded",
                message: "uid \(uid) already has \(Limits.environmentsPerUID) cache environments (bus connections) in use; close some (CKR_HOST_MEMORY (0x2))"))
    }

    private func peerDisconnected(_ name: String) {
        if let waiting = pendingCallers.removeValue(forKey: name) {
            for w in waiting { w(.failure(Self.credentialsUnreadable)) }
        }
        cryptokiSockets.close(boundTo: name)
        endEnvironment(name)
    }

    /// The caller's environment ends (it left the bus, or closed its cryptoki socket): its
    /// polkit checks are cancelled, its sessions closed, its PINs wiped, its locks released.
    /// Any thread.
    func endEnvironment(_ name: String) {
        authorizer.callerGone(name)
        cachedUseAllowed.withLock { set in set = set.filter { !$0.hasSuffix(" " + name) } }
        guard let info = registry.depart(name) else { return }
        let dropped = sessions.withLock { s in info.sessions.compactMap { s.removeValue(forKey: $0) } }
        for record in dropped {
            connection.unexport(record.path)
            record.token.worker.submit { record.token.closeRawSession(record.id) }
        }
        for token in tokens { token.callerGone(info.id) }
        Log.debug("caller \(name) left: environment destroyed, \(dropped.count) session(s) closed")
    }

    // MARK: - Argument helpers

    func readPIN(_ call: MethodCall, at index: Int) -> Result<SecretPIN, DBusError> {
        do {
            let pin = try call.withSensitiveArgument(at: index) { try SecretPIN(copying: $0) }
            pinMemoryAvailable()
            return .success(pin)
        } catch {
            return .failure(pinMemoryError(error).dbusError)
        }
    }

    func pinMemoryAvailable() { memoryLockFailureLogged.store(false, ordering: .relaxed) }

    /// Why a PIN could not be taken into locked memory, for either front end.
    func pinMemoryError(_ error: Error) -> ServiceError {
        if case SecretError.tooLong(let max) = error {
            return .arguments("PIN longer than \(max) bytes")
        }
        // One line per episode: every refused login logging again would bury the cause.
        if !memoryLockFailureLogged.exchange(true, ordering: .relaxed) {
            Log.error("cannot lock memory for PINs (\(Self.describe(error))); PIN logins are refused until it can. Raise RLIMIT_MEMLOCK (LimitMEMLOCK= in the systemd unit).")
        }
        return ServiceError(
            .secureMemoryUnavailable, "the daemon cannot lock memory for PINs; caching refused (CKR_DEVICE_MEMORY (0x31))",
            rv: 0x31)
    }

    private static func describe(_ error: Error) -> String {
        guard case SecretError.cannotLockMemory(let code) = error else { return "\(error)" }
        var limit = rlimit()
        let current = getrlimit(__rlimit_resource_t(__RLIMIT_MEMLOCK.rawValue), &limit) == 0 ? ", RLIMIT_MEMLOCK \(limit.rlim_cur) bytes" : ""
        return "mlock: \(String(cString: strerror(code)))\(current)"
    }

    func bytesArgument(_ v: DBusValue, name: String, max: Int) -> Result<[UInt8], DBusError> {
        guard let bytes = v.bytesValue else { return .failure(.invalidArgs("\(name): expected ay")) }
        guard bytes.count <= max else { return .failure(.invalidArgs("\(name) longer than \(max) bytes")) }
        return .success(bytes)
    }

    /// Decodes (key_id ay, mechanism s, data ay) starting at `first`.
    private func operationArguments(_ call: MethodCall, first: Int, use: NamedMechanism.Use)
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

    /// Runs `job` on the token's worker unless the caller left before it started, then replies.
    func onWorker<T: Sendable>(
        _ token: TokenContext, _ call: MethodCall, caller: CallerID,
        _ job: @escaping @Sendable () throws -> T, reply encode: @escaping @Sendable (T) -> [DBusValue]
    ) {
        onWorker(token, caller: caller, inline: false, job) { call.reply($0, encode) }
    }

    /// The token step of both front ends: `job` on the token's worker (the only thread that
    /// calls its module), then `done` with its result. Nothing runs for a caller that left
    /// meanwhile. `inline`: the calling thread serves this caller alone (its cryptoki socket),
    /// so an idle, fast token's job runs right here, without two thread hand-offs
    /// (SerialWorker.runInline); a slow token (a card) keeps its jobs on the worker.
    func onWorker<T: Sendable>(
        _ token: TokenContext, caller: CallerID, inline: Bool, _ job: @escaping @Sendable () throws -> T,
        _ done: @escaping @Sendable (Result<T, ServiceError>) -> Void
    ) {
        let work: @Sendable () -> Void = { [registry] in
            guard registry.isAlive(caller) else {
                return done(.failure(ServiceError(.backendError, "the caller has left (CKR_DEVICE_REMOVED (0x32))", rv: 0x32)))
            }
            done(Result<T, ServiceError>.catching(job))
        }
        if inline, token.worker.runInline(ifFasterThan: Limits.inlineJobNanoseconds, work) { return }
        token.worker.submit(work)
    }

    /// Session1's and Token1's way into the one authorisation step (Authorisation.swift).
    func authorized(
        _ needs: [Access], _ call: MethodCall, _ info: CallerInfo, token: TokenContext?, operation: String,
        keyID: [UInt8]? = nil, _ body: @escaping @Sendable () -> Void
    ) {
        authorise(
            needs, Requester(info: info, interactive: call.allowsInteractiveAuthorization), token: token,
            operation: operation, keyID: keyID, denied: { call.reply(error: $0.dbusError) }, body)
    }

    /// What polkit rules can act on (DESIGN §3 / polkit/rules.d examples).
    func details(_ token: TokenContext, _ info: CallerInfo, _ operation: String, keyID: [UInt8]?)
        -> [String: String]
    {
        let snap = token.snapshot
        var d = [
            "token_label": snap.info?.label ?? "",
            "token_serial": snap.info?.serialNumber ?? "",
            "operation": operation,
            "executable": info.executable ?? "",
        ]
        if let keyID {
            d["key_id"] = hex(keyID)
            if let usage = token.knownKeyUsage(keyID) { d["key_usage"] = "0x" + String(usage, radix: 16) }
        }
        return d
    }

    // MARK: - Manager1

    private func managerInterface() -> ExportedInterface {
        ExportedInterface(
            PincacheInterfaces.manager,
            methods: [
                "GetTokens": { [weak self] call in
                    guard let self else { return }
                    let published = self.tokens.filter { $0.published.load(ordering: .acquiring) }
                    call.reply([.array(elementSignature: "o", published.map { .objectPath($0.path) })])
                },
                "FlushCaches": { [weak self] call in self?.flushCaches(call) },
                "GetCallerState": { [weak self] call in
                    guard let self else { return }
                    self.withCaller(call) { info in call.reply([self.callerState(info)]) }
                },
                "GetStatistics": { [weak self] call in
                    guard let self else { return }
                    call.reply([self.statistics()])
                },
                "OpenCryptoki": { [weak self] call in
                    guard let self else { return }
                    self.withCaller(call) { info in self.openCryptoki(call, info) }
                },
            ],
            properties: { [weak self] name -> DBusValue? in
                guard let defaults = self?.configuration.defaults else { return nil }
                switch name {
                case "Version": return .string(PincacheBus.version)
                case "CachingMode": return .boolean(defaults.enableCachePIN)
                case "LogoutAfterSign": return .boolean(defaults.logoutAfterSign)
                case "ForceLoginBeforeSignKeyUsage": return .uint32(defaults.forceLoginKeyUsage)
                default: return nil
                }
            })
    }

    private func flushCaches(_ call: MethodCall) {
        let flush: @Sendable () -> Void = { [weak self] in
            guard let self else { return }
            let n = self.tokens.reduce(0) { sum, t in sum + t.policy.withLock { $0.flushCachedPINs() } }
            Log.notice("FlushCaches: \(n) cached PIN(s) wiped")
            call.reply([])
        }
        withCaller(call) { [weak self] info in
            guard let self else { return }
            self.authorized([.manage], call, info, token: nil, operation: "flush", flush)
        }
    }

    /// Counts only, never whose: operators and the reliability tests read these.
    private func statistics() -> DBusValue {
        var cached = 0
        var locked = 0
        let replies = connection.replyStatistics
        for token in tokens {
            token.policy.withLock { p in
                cached += p.cachedPINCount
                if p.lockHolder != nil { locked += 1 }
            }
        }
        return .vardict([
            "Environments": .uint32(UInt32(registry.count)),
            "Sessions": .uint32(UInt32(sessions.withLock { $0.count })),
            "CachedPINs": .uint32(UInt32(cached)),
            "LockedTokens": .uint32(UInt32(locked)),
            "Tokens": .uint32(UInt32(tokens.count)),
            "LockedMemoryBytes": .uint64(UInt64(SecretArena.lockedBytes)),
            "PendingAuthorizations": .uint32(UInt32(authorizer.pendingCount)),
            "CallsServed": .uint64(replies.callsServed),
            "CryptokiSockets": .uint32(UInt32(cryptokiSockets.count)),
            "CryptokiCalls": .uint64(cryptokiSockets.callsServed),
            "Errors": .dictionary(
                keySignature: "s", valueSignature: "u",
                replies.errors.sorted { $0.key < $1.key }.map {
                    DBusDictEntry(key: .string($0.key), value: .uint32(UInt32(clamping: $0.value)))
                }),
        ])
    }

    private func callerState(_ info: CallerInfo) -> DBusValue {
        var loggedIn: [DBusValue] = []
        var cached: [DBusValue] = []
        var locked: [DBusValue] = []
        for token in tokens {
            let s = token.policy.withLock { $0.state(of: info.id) }
            if s.loggedIn { loggedIn.append(.objectPath(token.path)) }
            if s.cachedPIN { cached.append(.objectPath(token.path)) }
            if s.holdsLogin { locked.append(.objectPath(token.path)) }
        }
        let current = registry.lookup(info.id.rawValue) ?? info
        return .vardict([
            "LoggedIn": .array(elementSignature: "o", loggedIn),
            "Cached": .array(elementSignature: "o", cached),
            "Locked": .array(elementSignature: "o", locked),
            "Sessions": .uint32(UInt32(current.sessions.count)),
            "Executable": .string(info.executable ?? ""),
            "CachingMode": .boolean(info.settings.enableCachePIN),
        ])
    }

    // MARK: - Token1

    private func tokenInterface(_ token: TokenContext) -> ExportedInterface {
        ExportedInterface(
            PincacheInterfaces.token,
            methods: [
                "OpenSession": { [weak self] call in
                    guard let self else { return }
                    self.withCaller(call) { info in self.openSession(call, info, token) }
                },
                "ListKeys": { [weak self] call in
                    guard let self else { return }
                    self.withCaller(call) { info in
                        self.onWorker(token, call, caller: info.id, { try token.listKeys() }) { keys in
                            let settings = self.registry.lookup(info.id.rawValue)?.settings ?? info.settings
                            return [.array(elementSignature: "a{sv}", keys.map { self.encodeKey($0, settings: settings) })]
                        }
                    }
                },
                "SignOnce": { [weak self] call in
                    guard let self else { return }
                    let pin: SecretPIN
                    switch self.readPIN(call, at: 0) {
                    case .success(let p): pin = p
                    case .failure(let e): return call.reply(error: e)
                    }
                    switch self.operationArguments(call, first: 1, use: .sign) {
                    case .failure(let e): call.reply(error: e)
                    case .success(let (keyID, mechanism, data)):
                        self.withCaller(call) { info in
                            self.authorized([.login], call, info, token: token, operation: "sign-once", keyID: keyID) {
                                self.onWorker(token, call, caller: info.id, {
                                    try token.signOnce(
                                        caller: info.id, keyID: keyID, mechanism: mechanism, data: data, pin: pin)
                                }) { [.bytes($0)] }
                            }
                        }
                    }
                },
            ],
            properties: { name in Self.tokenProperty(name, token.snapshot, token) })
    }

    /// A Token1 property as seen in `s` (the current snapshot, or an old one for change detection).
    private static func tokenProperty(_ name: String, _ s: TokenSnapshot, _ token: TokenContext) -> DBusValue? {
        let info = s.info
        switch name {
        case "Label": return .string(info?.label ?? "")
        case "Manufacturer": return .string(info?.manufacturer ?? "")
        case "Model": return .string(info?.model ?? "")
        case "Serial": return .string(info?.serialNumber ?? "")
        case "SlotDescription": return .string(s.slotDescription)
        case "Present": return .boolean(s.present)
        case "Recognized": return .boolean(s.recognized)
        case "Kind": return .string(s.removable ? "smartcard" : "software")
        case "Module": return .string(token.backend.path)
        case "ProtectedAuthenticationPath": return .boolean(info?.protectedAuthenticationPath ?? false)
        case "PinMinLength": return .uint32(UInt32(clamping: info?.minPinLength ?? 0))
        case "PinMaxLength": return .uint32(UInt32(clamping: info?.maxPinLength ?? 0))
        case "UserPinCountLow": return .boolean(info?.userPinCountLow ?? false)
        case "UserPinFinalTry": return .boolean(info?.userPinFinalTry ?? false)
        case "UserPinLocked": return .boolean(info?.userPinLocked ?? false)
        default: return nil
        }
    }

    private func encodeKey(_ k: KeyRecord, settings: Settings) -> DBusValue {
        let always = k.backendAlwaysAuthenticate || (k.canSign && settings.requiresFreshPIN(keyUsage: k.keyUsage))
        return .vardict([
            "Id": .bytes(k.id),
            "Label": .string(k.label),
            "KeyType": .string(k.keyType),
            "Bits": .uint32(k.bits),
            "CanSign": .boolean(k.canSign),
            "CanDecrypt": .boolean(k.canDecrypt),
            "KeyUsage": .uint32(k.keyUsage ?? 0),
            "AlwaysAuthenticate": .boolean(always),
            "Certificate": .bytes(k.certificate),
        ])
    }

    /// Emits what a refresh changed: PropertiesChanged, and Inserted/Removed on presence flips.
    private func tokenChanged(_ token: TokenContext, _ old: TokenSnapshot, _ new: TokenSnapshot) {
        var changed: [String: DBusValue] = [:]
        for property in PincacheInterfaces.token.properties where property.emitsChanged == .emits {
            let before = Self.tokenProperty(property.name, old, token)
            let after = Self.tokenProperty(property.name, new, token)
            if before != after, let after { changed[property.name] = after }
        }
        // A slot not yet exported announces itself when it is (rescanSlots).
        guard !changed.isEmpty, token.published.load(ordering: .acquiring) else { return }
        connection.emitPropertiesChanged(path: token.path, interface: PincacheInterfaces.token.name, changed: changed)
        if old.present != new.present {
            emitPresence(token, present: new.present)
            Log.info("token \(token.id): card \(new.present ? "inserted" : "removed") (\(new.slotDescription))")
        }
    }

    // MARK: - Sessions

    /// Token1.OpenSession: a session that is also a Session1 object, callable by its owner only.
    func openSession(_ call: MethodCall, _ info: CallerInfo, _ token: TokenContext) {
        switch openSessionRecord(info, token, readWrite: false) {
        case .failure(let e): call.reply(error: e.dbusError)
        case .success(let record):
            let owner = info.id.rawValue
            connection.export(record.path, interfaces: [sessionInterface(record, info)], accessCheck: { $0 == owner })
            call.reply([.objectPath(record.path)])
        }
    }

    /// A new session of `info` on `token`, within the caller's quota (both front ends).
    func openSessionRecord(_ info: CallerInfo, _ token: TokenContext, readWrite: Bool) -> Result<SessionRecord, ServiceError> {
        guard token.snapshot.recognized else {
            return .failure(ServiceError(.tokenNotPresent, "no usable token in this slot (CKR_TOKEN_NOT_PRESENT (0xe0))"))
        }
        let id = nextSessionID.wrappingAdd(1, ordering: .relaxed).oldValue
        guard registry.reserveSession(info.id.rawValue, id: id, max: configuration.maxSessionsPerClient) else {
            return .failure(
                ServiceError(
                    .tooManySessions, "at most \(configuration.maxSessionsPerClient) sessions per client (MaxSessionsPerClient; CKR_SESSION_COUNT (0xb1))"
                ))
        }
        let path = PincacheBus.sessionPrefix.appending(String(id))!
        let record = SessionRecord(id: id, path: path, owner: info.id, token: token, readWrite: readWrite)
        sessions.withLock { $0[id] = record }
        token.sessionOpened(caller: info.id)
        return .success(record)
    }

    private func sessionInterface(_ record: SessionRecord, _ info: CallerInfo) -> ExportedInterface {
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
                let run: @Sendable () -> Void = { [weak self] in
                    self?.onWorker(token, call, caller: caller, {
                        try token.perform(
                            caller: caller, settings: settings(), keyID: keyID, operation: operation, freshPIN: pin)
                    }) { [.bytes($0)] }
                }
                let opName = use == .sign ? (pin == nil ? "sign" : "sign-with-pin") : "decrypt"
                // A PIN submitted for one operation is a login as far as polkit is concerned.
                authorized(pin == nil ? [.cachedPIN] : [.login], call, info, token: token, operation: opName, keyID: keyID, run)
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
                        self.authorized([.login], call, info, token: token, operation: "login") { [weak self] in
                            guard let self else { return }
                            self.onWorker(token, call, caller: caller, {
                                try token.login(caller: caller, settings: settings(), pin: pin) { registry.isAlive(caller) }
                                // A new login asks polkit again before its cached PIN is first used.
                                self.forgetCachedUse(token, caller)
                            }) { _ in [] }
                        }
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

    private func closeSession(_ call: MethodCall, _ record: SessionRecord) {
        guard closeSessionRecord(record, then: { call.reply([]) }) else {
            return call.reply(error: .unknownObject("session already closed"))
        }
    }

    /// Closes a session (both front ends); false if it was closed already.
    func closeSessionRecord(_ record: SessionRecord, then done: @escaping @Sendable () -> Void) -> Bool {
        guard sessions.withLock({ $0.removeValue(forKey: record.id) }) != nil else { return false }
        connection.unexport(record.path)
        registry.releaseSession(record.owner.rawValue, id: record.id)
        // Through the worker, so operations queued before Close still see the session's login.
        record.token.worker.submit {
            record.token.sessionClosed(caller: record.owner)
            record.token.closeRawSession(record.id)
            done()
        }
        return true
    }
}

func isPincacheProxy(_ path: String) -> Bool {
    let base = (path as NSString).lastPathComponent
    let resolved = ((try? FileManager.default.destinationOfSymbolicLink(atPath: path)) as NSString?)?.lastPathComponent
    return base.hasPrefix("libpincache-pkcs11") || resolved?.hasPrefix("libpincache-pkcs11") == true
}
