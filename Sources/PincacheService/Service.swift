import Glibc
import Dispatch
import DBusKit
import SystemKit
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
    /// Sessions of all of one uid's environments together (each may hold a backend session).
    static let sessionsPerUID = 1024
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
    /// Exported Session1 objects and the LoggedIn value last announced for each.
    let busSessions = Mutex<[UInt64: (record: SessionRecord, last: Bool)]>([:])
    /// PIN attempts per (uid, token): PinAttempts.swift.
    let guesses: Mutex<GuessThrottle>
    private let tokenTable = Mutex<[TokenContext]>([])
    /// Every slot currently exported; readers come and go (rescan()).
    var tokens: [TokenContext] { tokenTable.withLock { $0 } }
    /// Set once in start(), read-only afterwards.
    private var backends: [Backend] = []
    /// Set once started; the poller and shutdown read it from their own threads.
    private let readerWatcher = Mutex<ReaderWatcher?>(nil)
    let sessions = Mutex<[UInt64: SessionRecord]>([:])
    let nextSessionID = Atomic<UInt64>(1)
    /// Calls waiting for their caller's credentials; touched only on the bus loop thread.
    private var pendingCallers: [String: [@Sendable (Result<CallerInfo, DBusError>) -> Void]] = [:]
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
        self.guesses = Mutex(GuessThrottle(rule: configuration.guessRule))
        // Off the system bus nobody reads the journal for us: audit records go to stderr.
    }

    // MARK: - Start-up

    /// Loads the backends, exports every object, then takes the well-known name.
    public func start(modules: [String]) throws {
        let descriptors = DescriptorBudget.raiseSoftLimit()
        Log.info("file descriptor limit: \(descriptors)")
        for path in modules {
            if isPincacheProxy(path) {
                Log.error("refusing to load \(path) as a backend: it is pincache's own PKCS#11 proxy and would call this daemon", event: .moduleFailed)
                continue
            }
            do {
                backends.append(Backend(index: backends.count, path: path, module: try PKCS11Module(path: path)))
                Log.info("loaded PKCS#11 module \(path)", event: .moduleLoaded)
            } catch {
                Log.error("cannot load PKCS#11 module \(path): \(error)", event: .moduleFailed)
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
        watchLogind()
        try connection.requestName(PincacheBus.serviceName)
        startPoller()
        let watcher = ReaderWatcher(
            onCard: { [weak self] reader, present in self?.cardEvent(reader: reader, present: present) },
            onChange: { [weak self] in self?.rescan() }, log: { Log.notice($0, event: .pcscUnavailable) })
        watcher.start()
        readerWatcher.withLock { $0 = watcher }
        Log.info("ready on the bus as \(PincacheBus.serviceName) (\(connection.uniqueName)); \(tokens.count) slot(s)", event: .started)
    }

    /// Re-reads every module's slot list and every token's state (PC/SC event, poll tick).
    /// `periodic`: the poller's tick, which leaves alone the modules whose slots are all
    /// card readers while PC/SC reports their every change (issue 15 §1): an idle daemon sends
    /// the cards nothing.
    func rescan(periodic: Bool = false) {
        let pcscWatches = periodic && readerWatcher.withLock({ $0 })?.isConnected == true
        let all = tokens
        for backend in backends where backend.worker.backlog == 0 {
            if pcscWatches {
                let own = all.filter { $0.backend === backend }
                if !own.isEmpty && own.allSatisfy({ $0.snapshot.removable }) { continue }
            }
            backend.worker.submit { [weak self] in self?.rescanSlots(backend, announce: true) }
        }
    }

    /// Backend worker: adds slots that appeared (a reader plugged in), removes those that went,
    /// and queues a refresh of the others on their own workers.
    @discardableResult
    func rescanSlots(_ backend: Backend, announce: Bool) -> [TokenContext] {
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
            token.loginLinger.store(
                UInt64(configuration.loginLingerMilliseconds) * 1_000_000, ordering: .relaxed)
            token.policy.onCleared { [weak self, weak token] clears in
                guard let self, let token else { return }
                self.cacheCleared(token, clears)
            }
            // In the table at once, so the next rescan does not make a second one for this slot.
            tokenTable.withLock { $0.append(token) }
            token.worker.submit { [weak self] in
                guard let self else { return }
                token.refresh()
                self.connection.export(token.path, interfaces: [self.tokenInterface(token)])
                token.published.store(true, ordering: .releasing)
                if announce {
                    Log.info("slot \(token.id) appeared: \(token.snapshot.slotDescription)", event: .slotAdded)
                    if token.snapshot.present { self.emitPresence(token, present: true) }
                }
            }
            added.append(token)
        }
        return added
    }

    /// A slot that vanished (reader unplugged): every PIN and lock on it ends with it.
    func removeToken(_ token: TokenContext) {
        tokenTable.withLock { $0.removeAll { $0 === token } }
        token.published.store(false, ordering: .releasing)
        token.policy.withLock { $0.tokenRemoved() }
        connection.unexport(token.path)
        if token.snapshot.present { emitPresence(token, present: false) }
        Log.info("slot \(token.id) went away", event: .slotRemoved)
        token.shutdown()
    }

    func emitPresence(_ token: TokenContext, present: Bool) {
        connection.emitSignal(
            path: PincacheBus.managerPath, interface: PincacheInterfaces.manager.name,
            name: present ? "TokenInserted" : "TokenRemoved", arguments: [.objectPath(token.path)])
    }

    /// Wipes every PIN and closes the backend sessions before the process exits; waits for
    /// the token workers (a few seconds at most, as a card may hang) and leaves them parked.
    public func shutdown() {
        stopping.store(true, ordering: .relaxed)
        cryptokiSockets.closeAll()
        readerWatcher.withLock { $0 }?.stop()
        let deadline = DispatchTime.now() + .seconds(5)
        for token in tokens {
            _ = token.policy.withLock { $0.flushCachedPINs() }
            if !token.finishForExit(deadline: deadline) {
                Log.warning("slot \(token.id): the module did not finish in time; exiting anyway")
            }
        }
        Audit.writer.drain()
    }

    /// Modules without slot events are polled (DESIGN §5); card events proper come with PC/SC.
    func startPoller() {
        let interval = Double(configuration.slotPollIntervalMilliseconds) / 1000
        startThread(name: "pincache-poller") { [weak self] in
            while let self, !self.stopping.load(ordering: .relaxed) {
                sleep(seconds: interval)
                self.rescan(periodic: true)
                self.expireIdlePINs()
                self.cryptokiSockets.reapEnded()
            }
        }
    }

    func expireIdlePINs() {
        let now = TokenContext.now()
        for token in tokens {
            let (n, lockIdle) = token.policy.withLock { p in
                (p.expireIdle(now: now), p.lockHolder != nil && p.nextExpiry.map { $0 <= now } == true)
            }
            if n > 0 { Log.info("token \(token.id): \(n) cached PIN(s) expired (PinCacheTimeout)", event: .pinsWiped) }
            if lockIdle {
                token.expireIdleLock()
                token.worker.submit { [weak self] in self?.announceLockedBy(token) }
            }
            announceLoggedIn(token)
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
        guesses.withLock { $0.rule = new.guessRule }
        for token in tokens {
            token.loginLinger.store(UInt64(new.loginLingerMilliseconds) * 1_000_000, ordering: .relaxed)
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
            Log.notice("reload: caching mode changed; \(n) cached PIN(s) wiped", event: .pinsWiped)
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
        Log.notice("configuration reloaded", event: .reloaded)
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

    func admit(sender: String, credentials: PeerCredentials) -> Result<CallerInfo, DBusError> {
        let exe = credentials.pid.flatMap { executablePath(pid: $0, uid: credentials.uid) }
        let settings = configuration.settings(forExecutable: exe)
        let info = CallerInfo(
            id: CallerID(sender), uid: credentials.uid, pid: credentials.pid, executable: exe, settings: settings)
        if let admitted = registry.add(info, maxPerUID: Limits.environmentsPerUID) { return .success(admitted) }
        // A caller that already left gets nothing; one over its uid's quota is told so, in
        // words that do not send its user looking for a polkit or credentials problem.
        guard !registry.hasDeparted(sender) else { return .failure(Self.credentialsUnreadable) }
        let uid = credentials.uid.map(String.init) ?? "?"
        Log.warning("uid \(uid) reached \(Limits.environmentsPerUID) environments; \(sender) refused", event: .limitReached)
        return .failure(
            DBusError(
                name: "org.freedesktop.DBus.Error.LimitsExceeded",
                message: "uid \(uid) already has \(Limits.environmentsPerUID) cache environments (bus connections) in use; close some (CKR_HOST_MEMORY (0x2))"))
    }

    func peerDisconnected(_ name: String) {
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
            _ = busSessions.withLock { $0.removeValue(forKey: record.id) }
            connection.unexport(record.path)
            record.token.worker.submit { record.token.closeRawSession(record.id) }
        }
        for token in tokens {
            token.callerGone(info.id)
            token.worker.submit { [weak self] in self?.announceLockedBy(token) }
        }
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
            Log.error("cannot lock memory for PINs (\(Self.describe(error))); PIN logins are refused until it can. Raise RLIMIT_MEMLOCK (LimitMEMLOCK= in the systemd unit).", event: .memoryLockFailed)
        }
        return ServiceError(
            .secureMemoryUnavailable, "the daemon cannot lock memory for PINs; caching refused (CKR_DEVICE_MEMORY (0x31))",
            rv: 0x31)
    }

    static func describe(_ error: Error) -> String {
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

    /// Runs `job` on the token's worker unless the caller left before it started, then replies.
    func onWorker<T: Sendable>(
        _ token: TokenContext, _ call: MethodCall, caller: CallerID, shareable: Bool = false,
        _ job: @escaping @Sendable () throws -> T, reply encode: @escaping @Sendable (T) -> [DBusValue]
    ) {
        onWorker(token, caller: caller, inline: false, shareable: shareable, job) { call.reply($0, encode) }
    }

    /// The token step of both front ends: `job` on the token's worker (the only thread that
    /// calls its module), then `done` with its result. Nothing runs for a caller that left
    /// meanwhile. `inline`: the calling thread serves this caller alone (its cryptoki socket),
    /// so an idle, fast token's job runs right here, without two thread hand-offs
    /// (SerialWorker.runInline); a slow token (a card) keeps its jobs on the worker.
    /// `shareable`: a private operation (or a logged-in caller's search or read) that may run
    /// in a login another environment with the same cached PIN left open (Token+SharedLogin).
    func onWorker<T: Sendable>(
        _ token: TokenContext, caller: CallerID, inline: Bool, shareable: Bool = false,
        _ job: @escaping @Sendable () throws -> T,
        _ done: @escaping @Sendable (Result<T, ServiceError>) -> Void
    ) {
        let work: @Sendable () -> Void = { [registry, weak self] in
            guard registry.isAlive(caller) else {
                return done(.failure(ServiceError(.backendError, "the caller has left (CKR_DEVICE_REMOVED (0x32))", rv: 0x32)))
            }
            let result = Result<T, ServiceError>.catching(job)
            // A job may have logged the caller in or out (Login, Logout, logout-after-sign).
            // Told before the reply, so a client that reads Token1.LockedBy once its Login
            // returned sees the lock it took.
            if let self, self.busSessions.withLock({ !$0.isEmpty }) { self.announceLoggedIn(token, caller: caller) }
            self?.announceLockedBy(token)
            done(result)
        }
        if inline,
            token.worker.runInline(ifFasterThan: Limits.inlineJobNanoseconds, owner: caller.rawValue, shareable: shareable, work)
        {
            return
        }
        token.worker.submit(owner: caller.rawValue, shareable: shareable, work)
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

}

func isPincacheProxy(_ path: String) -> Bool {
    let base = lastPathComponent(path)
    let resolved = readLink(path).map(lastPathComponent)
    return base.hasPrefix("libpincache-pkcs11") || resolved?.hasPrefix("libpincache-pkcs11") == true
}
