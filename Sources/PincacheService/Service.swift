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

/// A Session1 object: owned by one caller connection, bound to one token.
struct SessionRecord: Sendable {
    let id: UInt64
    let path: ObjectPath
    let owner: CallerID
    let token: TokenContext
    /// CKF_RW_SESSION for sessions opened through CryptokiSlot1 (Token1 sessions are read-only).
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
    private let cachedUseAllowed = Mutex<Set<String>>([])
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
    /// The peer channel server, when one listens (`startChannels`).
    private let channelServer = Mutex<DBusChannelServer?>(nil)
    let channelTickets = ChannelTickets()
    let fastPaths = FastPaths()
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
        connection.export(PincacheBus.managerPath, interfaces: [managerInterface(), cryptokiManagerInterface()])
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

    /// Listens for peer channels on `address` (a D-Bus server address), so proxy clients'
    /// calls skip the bus daemon's relay. Failing to listen is logged, not fatal: clients
    /// then stay on the bus.
    public func startChannels(listen address: String, maxChannels: Int = 512) {
        do {
            let server = try DBusChannelServer(
                listen: address, serving: connection, bindInterface: PincacheInterfaces.channelInterface,
                bindMember: PincacheInterfaces.channelBindMember, maxChannels: maxChannels
            ) { [channelTickets, registry] ticket, peer in
                guard let name = channelTickets.redeem(ticket, peer: peer), registry.lookup(name) != nil else { return nil }
                return name
            }
            channelServer.withLock { $0 = server }
            // Any local user may connect: the ticket, not the socket's mode, admits a client.
            if let path = Self.socketPath(in: server.address) { chmod(path, 0o666) }
            Log.info("peer channels on \(server.address)")
        } catch {
            Log.notice("no peer channels (\(address): \(error.message)); clients use the bus")
        }
    }

    var channelAddress: String? { channelServer.withLock { $0 }?.address }

    public static func socketPath(in address: String) -> String? {
        guard address.hasPrefix("unix:") else { return nil }
        for part in address.dropFirst(5).split(separator: ",") where part.hasPrefix("path=") {
            return String(part.dropFirst(5))
        }
        return nil
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
                self.connection.export(
                    token.path, interfaces: [self.tokenInterface(token), self.cryptokiSlotInterface(token)])
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
        channelServer.withLock { $0 }?.stop()
        fastPaths.closeAll()
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
        // A channel is bound to a caller already admitted; if it is not known any more it
        // has left (and `pendingCallers` belongs to the bus loop thread).
        guard call.connection === connection else {
            return call.reply(error: Self.credentialsUnreadable)
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
        authorizer.callerGone(name)
        channelTickets.forget(name: name)
        channelServer.withLock { $0 }?.closeChannels(boundTo: name)
        fastPaths.close(boundTo: name)
        cachedUseAllowed.withLock { set in set = set.filter { !$0.hasSuffix(" " + name) } }
        if let waiting = pendingCallers.removeValue(forKey: name) {
            for w in waiting { w(.failure(Self.credentialsUnreadable)) }
        }
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
            memoryLockFailureLogged.store(false, ordering: .relaxed)
            return .success(pin)
        } catch SecretError.tooLong(let max) {
            return .failure(.invalidArgs("PIN longer than \(max) bytes"))
        } catch {
            // One line per episode: every refused login logging again would bury the cause.
            if !memoryLockFailureLogged.exchange(true, ordering: .relaxed) {
                Log.error("cannot lock memory for PINs (\(Self.describe(error))); PIN logins are refused until it can. Raise RLIMIT_MEMLOCK (LimitMEMLOCK= in the systemd unit).")
            }
            return .failure(
                ServiceError(
                    .secureMemoryUnavailable, "the daemon cannot lock memory for PINs; caching refused (CKR_DEVICE_MEMORY (0x31))").dbusError)
        }
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
        _ token: TokenContext, _ call: any CallReply, caller: CallerID,
        _ job: @escaping @Sendable () throws -> T, reply encode: @escaping @Sendable (T) -> [DBusValue]
    ) {
        let work: @Sendable () -> Void = { [registry] in
            // Nobody to answer, nothing to do; the answer only releases a waiting fast path.
            guard registry.isAlive(caller) else { return call.reply(error: .failed("no reply")) }
            call.reply(Result<T, ServiceError>.catching(job), encode)
        }
        // A peer channel's loop or a fast path's thread may block on its caller's behalf: an
        // idle, fast token's operation runs right here (SerialWorker.runInline).
        if call.mayRunInline(besides: connection),
            token.worker.runInline(ifFasterThan: Limits.inlineJobNanoseconds, work)
        {
            return
        }
        token.worker.submit(work)
    }

    private func forgetCachedUse(_ key: String) {
        _ = cachedUseAllowed.withLock { $0.remove(key) }
    }

    /// Runs `body` once polkit allows `action`; otherwise replies NotAuthorized. Never called
    /// for a caller that left while the check was pending.
    func authorized(
        _ action: Authorizer.Action, _ call: MethodCall, _ details: [String: String],
        _ body: @escaping @Sendable () -> Void
    ) {
        authorizer.check(action, for: call, details: details) { verdict in
            switch verdict {
            case .success: body()
            case .failure(let e): call.reply(error: e.dbusError)
            }
        }
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
            let details = ["operation": "flush", "executable": info.executable ?? ""]
            self.authorizer.check(.manage, for: call, details: details) { verdict in
                switch verdict {
                case .success: flush()
                case .failure(let e): call.reply(error: e.dbusError)
                }
            }
        }
    }

    /// Counts only, never whose: operators and the reliability tests read these.
    private func statistics() -> DBusValue {
        var cached = 0
        var locked = 0
        var replies = connection.replyStatistics
        let channelReplies = channelServer.withLock { $0 }?.replyStatistics ?? ReplyStatistics()
        replies.add(channelReplies)
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
            "Channels": .uint32(UInt32(channelServer.withLock { $0 }?.count ?? 0)),
            "CallsServed": .uint64(replies.callsServed),
            "ChannelCalls": .uint64(channelReplies.callsServed),
            "FastPaths": .uint32(UInt32(fastPaths.count)),
            "FastPathCalls": .uint64(fastPaths.callsServed),
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
                            let details = self.details(token, info, "sign-once", keyID: keyID)
                            self.authorized(.login, call, details) {
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

    func openSession(_ call: MethodCall, _ info: CallerInfo, _ token: TokenContext, readWrite: Bool = false) {
        guard token.snapshot.recognized else {
            return call.reply(error: ServiceError(.tokenNotPresent, "no usable token in this slot (CKR_TOKEN_NOT_PRESENT (0xe0))").dbusError)
        }
        let id = nextSessionID.wrappingAdd(1, ordering: .relaxed).oldValue
        guard registry.reserveSession(info.id.rawValue, id: id, max: configuration.maxSessionsPerClient) else {
            return call.reply(
                error: ServiceError(
                    .tooManySessions, "at most \(configuration.maxSessionsPerClient) sessions per client (MaxSessionsPerClient; CKR_SESSION_COUNT (0xb1))"
                ).dbusError)
        }
        let path = PincacheBus.sessionPrefix.appending(String(id))!
        let record = SessionRecord(id: id, path: path, owner: info.id, token: token, readWrite: readWrite)
        sessions.withLock { $0[id] = record }
        token.sessionOpened(caller: info.id)
        let owner = info.id.rawValue
        connection.export(
            path, interfaces: [sessionInterface(record, info), cryptokiSessionInterface(record, info)],
            accessCheck: { $0 == owner })
        call.reply([.objectPath(path)])
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
                let details = self.details(token, info, opName, keyID: keyID)
                if pin != nil {
                    // A PIN submitted for one operation is a login as far as polkit is concerned.
                    return authorized(.login, call, details, run)
                }
                let useKey = "\(token.id) \(caller.rawValue)"
                let usesCache = token.policy.withLock { $0.state(of: caller).cachedPIN }
                guard usesCache, !cachedUseAllowed.withLock({ $0.contains(useKey) }) else { return run() }
                authorized(.useCachedPIN, call, details) { [weak self] in
                    self?.cachedUseAllowed.withLock { _ = $0.insert(useKey) }
                    run()
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
                        let useKey = "\(token.id) \(caller.rawValue)"
                        self.authorized(.login, call, self.details(token, info, "login", keyID: nil)) { [weak self] in
                            guard let self else { return }
                            self.onWorker(token, call, caller: caller, {
                                try token.login(caller: caller, settings: settings(), pin: pin) { registry.isAlive(caller) }
                                // A new login asks polkit again before its cached PIN is first used.
                                self.forgetCachedUse(useKey)
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
        guard sessions.withLock({ $0.removeValue(forKey: record.id) }) != nil else {
            return call.reply(error: .unknownObject("session already closed"))
        }
        connection.unexport(record.path)
        registry.releaseSession(record.owner.rawValue, id: record.id)
        // Through the worker, so operations queued before Close still see the session's login.
        record.token.worker.submit {
            record.token.sessionClosed(caller: record.owner)
            record.token.closeRawSession(record.id)
            call.reply([])
        }
    }
}

func isPincacheProxy(_ path: String) -> Bool {
    let base = (path as NSString).lastPathComponent
    let resolved = ((try? FileManager.default.destinationOfSymbolicLink(atPath: path)) as NSString?)?.lastPathComponent
    return base.hasPrefix("libpincache-pkcs11") || resolved?.hasPrefix("libpincache-pkcs11") == true
}
