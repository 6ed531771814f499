/// Why the policy refuses a request; the service maps each to `org.pincache.Error.<Name>`.
public enum PolicyError: Error, Sendable, Equatable {
    /// Another caller holds the token (non-caching mode or protected authentication path).
    case tokenBusy
    /// The caller has neither a cached PIN nor a held login on this token (any more).
    case notLoggedIn
    /// The key needs a PIN for this signature (force login / context-specific) and none came.
    case pinRequired
    /// The caller is already logged in to this token.
    case alreadyLoggedIn
    /// The caller's cached PIN is kept but not presented: the token reports a wrong PIN since
    /// its last successful login (someone's typo, or a guess). A successful login, by anyone,
    /// releases it.
    case pinHeldBack
}

/// What a private operation does with the token.
public enum OperationKind: Sendable, Equatable {
    /// A signature: the kind `P11_LogoutAfterSign` reacts to.
    case sign
    /// A decryption.
    case decrypt
    /// Finding or reading private objects.
    case readPrivate
}

/// How the service performs a login the policy allowed.
public enum LoginPlan: Sendable, Equatable {
    /// Caching mode: backend `C_Login`, `C_Logout` at once, then
    /// ``TokenPolicy/loginSucceeded(for:plan:settings:pin:now:)`` with the PIN.
    case verifyThenCache
    /// Non-caching mode or protected authentication path: backend `C_Login`, kept; after
    /// `loginSucceeded` the caller holds the token exclusively.
    case holdLogin
}

/// How the service performs a private operation the policy allowed.
public enum OperationPlan: @unchecked Sendable {
    /// Caching mode: `C_Login(cached PIN)` → operation → `C_Logout`, as one atomic bracket on
    /// the token. The plan holds its own reference, so a flush meanwhile cannot zero the PIN
    /// under the bracket; the memory is wiped when the last reference goes.
    case bracket(SecretPIN)
    /// The caller holds the backend login: just run the operation.
    case heldLogin
    /// Force-login key or context-specific key: use the PIN the caller supplied for this one
    /// operation, never cache it. If ``TokenPolicy/state(of:)`` shows `holdsLogin` the backend
    /// is already logged in (only the context-specific login is needed, no `C_Logout` after);
    /// otherwise bracket it: `C_Login(fresh PIN)` → operation → `C_Logout`.
    case freshPIN
}

/// What happened to a planned operation, as the service reports it back.
public enum OperationOutcome: Sendable, Equatable {
    /// The operation ran.
    case success
    /// The backend refused the cached PIN (`CKR_PIN_INCORRECT` or `CKR_PIN_LOCKED`).
    case cachedPINRejected
    /// Any other failure; the cache is unaffected.
    case failed
}

/// What the service must do on the backend after a policy call.
public enum BackendAction: Sendable, Equatable {
    /// Nothing.
    case none
    /// `C_Logout` the held login (the token lock has ended).
    case logout
}

/// One caller's view of one token.
public struct CallerTokenState: Sendable, Equatable {
    /// Open sessions of the caller on this token.
    public var sessions: Int
    /// The caller has a cached PIN here (caching mode).
    public var cachedPIN: Bool
    /// The caller holds the backend login and so the token lock (non-caching mode).
    public var holdsLogin: Bool
    /// What `C_GetSessionInfo` and `Session1.LoggedIn` report.
    public var loggedIn: Bool { cachedPIN || holdsLogin }
    /// When the cached PIN (or held login) expires if left idle (monotonic nanoseconds); nil
    /// without a `PinCacheTimeout` or a login.
    public var expiresAt: UInt64?
    /// Uses the cached PIN has left before the tightest limit that applies to any key wipes
    /// it; nil without a limit or a cached PIN.
    public var usesLeft: UInt32?

    /// Creates a state value (mostly for comparisons in tests).
    public init(sessions: Int, cachedPIN: Bool, holdsLogin: Bool, expiresAt: UInt64? = nil, usesLeft: UInt32? = nil) {
        self.sessions = sessions
        self.cachedPIN = cachedPIN
        self.holdsLogin = holdsLogin
        self.expiresAt = expiresAt
        self.usesLeft = usesLeft
    }
}

/// All callers' cache environments for ONE token (slot plus token identity), and its lock.
///
/// Pure bookkeeping: the service asks it what to do, does the PKCS#11 work, and reports what
/// happened. Not thread-safe; the service wraps each in a `Mutex`, and runs
/// `planLogin` → backend `C_Login` → `loginSucceeded` within one turn of the token's serial
/// executor so no other login can slip in between.
///
/// Dropping a PIN means dropping the policy's reference: ``SecretPIN``'s deinit wipes it when the
/// last reference goes. The policy never calls `wipe()` itself, because a bracket in flight
/// holds the same PIN and must never see it zeroed in the middle of `C_Login`; a flush
/// therefore completes, in memory, when the last in-flight bracket ends, which is bounded.
public struct TokenPolicy: Sendable {
    private struct CachedPIN: Sendable {
        let pin: SecretPIN
        var lastUsed: UInt64
        /// Nanoseconds of idleness allowed; 0 = forever. Taken from the settings at login.
        let timeout: UInt64
        /// Taken from the settings at login, as the timeout.
        let limits: UseLimits
        var uses: UInt32 = 0
        var usesByKeyUsage: [UInt32: UInt32] = [:]

        /// Counts one use of a key with `keyUsage`; true when a limit is reached.
        mutating func count(keyUsage: UInt32) -> Bool {
            uses += 1
            var reached = limits.maxUses != 0 && uses >= limits.maxUses
            for (bit, limit) in limits.maxUsesByKeyUsage where keyUsage & bit != 0 {
                usesByKeyUsage[bit, default: 0] += 1
                if usesByKeyUsage[bit]! >= limit { reached = true }
            }
            return reached
        }

        /// The fewest uses left under any limit.
        var usesLeft: UInt32? {
            var left: [UInt32] = limits.maxUses != 0 ? [limits.maxUses - min(uses, limits.maxUses)] : []
            for (bit, limit) in limits.maxUsesByKeyUsage {
                left.append(limit - min(usesByKeyUsage[bit] ?? 0, limit))
            }
            return left.min()
        }

        func isExpired(at now: UInt64) -> Bool {
            // `now < lastUsed` cannot happen with a monotonic clock; treat it as not idle.
            timeout != 0 && now >= lastUsed && now - lastUsed >= timeout
        }
    }

    private struct Environment: Sendable {
        var sessions = 0
        var cached: CachedPIN?
        var isEmpty: Bool { sessions == 0 && cached == nil }
    }

    private var environments: [CallerID: Environment] = [:]
    /// The caller holding the backend login, if any: the token is locked to it.
    private var holder: CallerID?
    /// When the holder last used its login, and how long it may stay idle (0: forever), from
    /// its `PinCacheTimeout`: an idle lock ends like an idle cached PIN.
    private var holderLastUsed: UInt64 = 0
    private var holderTimeout: UInt64 = 0
    /// Logins ended since the service last asked (`takeCleared`), for `CacheCleared`.
    private var cleared: [CacheClear] = []

    /// A token nobody uses yet.
    public init() {}

    // MARK: Sessions

    /// The caller opened a session on this token (creates its environment here).
    public mutating func sessionOpened(by caller: CallerID) {
        environments[caller, default: Environment()].sessions += 1
    }

    /// The caller closed a session. On its last session on this token its cached PIN is
    /// dropped and its held login released (→ `.logout`). Unknown callers are ignored.
    public mutating func sessionClosed(by caller: CallerID) -> BackendAction {
        guard var environment = environments[caller], environment.sessions > 0 else { return .none }
        environment.sessions -= 1
        guard environment.sessions == 0 else {
            environments[caller] = environment
            return .none
        }
        if environment.cached != nil { cleared.append(CacheClear(caller, .logout)) }
        environment.cached = nil
        store(environment, for: caller)
        return releaseLock(of: caller, reason: .logout)
    }

    // MARK: Login and logout

    /// Decides how to log the caller in.
    /// - Throws: `.tokenBusy` if another caller holds the token, `.alreadyLoggedIn` if this
    ///   caller is logged in (cached or held) — except that a caller whose cached PIN is held
    ///   back (`pinStatus` reports a wrong PIN since the last login) may log in again: the PIN
    ///   it types replaces the cached one.
    public mutating func planLogin(for caller: CallerID, settings: Settings, protectedAuthenticationPath: Bool,
                                   pinStatus: PinStatus = []) throws(PolicyError) -> LoginPlan {
        try checkAvailable(for: caller)
        let heldBack = holder != caller && environments[caller]?.cached != nil && pinStatus.wrongPINSinceLastLogin
        if state(of: caller).loggedIn && !heldBack { throw .alreadyLoggedIn }
        // A PIN pad never gives the daemon a PIN to cache, so its login can only be held.
        return settings.enableCachePIN && !protectedAuthenticationPath ? .verifyThenCache : .holdLogin
    }

    /// Records a login the backend accepted. `pin` is required for `.verifyThenCache` (the
    /// policy keeps the reference; the service must not wipe it) and ignored for `.holdLogin`.
    /// A `.verifyThenCache` without a PIN records nothing: the caller stays logged out.
    /// `now` is monotonic nanoseconds.
    public mutating func loginSucceeded(for caller: CallerID, plan: LoginPlan, settings: Settings,
                                        pin: SecretPIN?, now: UInt64) {
        switch plan {
        case .verifyThenCache:
            guard let pin else { return }
            let timeout = UInt64(settings.pinCacheTimeout) * 1_000_000_000
            environments[caller, default: Environment()].cached = CachedPIN(
                pin: pin, lastUsed: now, timeout: timeout, limits: settings.useLimits)
        case .holdLogin:
            if environments[caller] == nil { environments[caller] = Environment() }
            holder = caller
            holderLastUsed = now
            holderTimeout = UInt64(settings.pinCacheTimeout) * 1_000_000_000
        }
    }

    /// The caller logs out: its cached PIN is dropped, or its held login released (→ `.logout`).
    /// - Throws: `.notLoggedIn` if it was neither.
    public mutating func logout(for caller: CallerID) throws(PolicyError) -> BackendAction {
        if holder == caller { return releaseLock(of: caller, reason: .logout) }
        guard var environment = environments[caller], environment.cached != nil else { throw .notLoggedIn }
        environment.cached = nil
        store(environment, for: caller)
        cleared.append(CacheClear(caller, .logout))
        return .none
    }

    // MARK: Operations

    /// Decides how to run a private operation for the caller.
    ///
    /// - Throws: `.tokenBusy` if another caller holds the token; `.notLoggedIn` if the caller
    ///   is not logged in, its cached PIN has expired (`PinCacheTimeout`; it is dropped), or the
    ///   token reports its PIN locked (then EVERY caller's cached PIN here is dropped);
    ///   `.pinHeldBack` while the token reports a wrong PIN since its last successful login
    ///   (count low, final try): a cached PIN is never presented to a token that counts
    ///   failures, but it is kept, for when a login has reset the counter; `.pinRequired` if
    ///   `requiresFreshPIN` and no PIN was supplied.
    /// - Returns: `.freshPIN` whenever the caller is logged in and supplied a PIN (the cache is
    ///   neither used nor touched), `.heldLogin` for the lock holder, else `.bracket` with the
    ///   cached PIN (its idle clock restarts at `now`).
    public mutating func planOperation(for caller: CallerID, settings: Settings, kind: OperationKind,
                                       requiresFreshPIN: Bool, freshPINSupplied: Bool,
                                       pinStatus: PinStatus, now: UInt64) throws(PolicyError) -> OperationPlan {
        try checkAvailable(for: caller)
        if holder == caller {
            holderLastUsed = now
            if freshPINSupplied { return .freshPIN }
            if requiresFreshPIN { throw .pinRequired }
            return .heldLogin
        }
        guard var environment = environments[caller], let cached = environment.cached else { throw .notLoggedIn }
        if cached.isExpired(at: now) {
            environment.cached = nil
            store(environment, for: caller)
            cleared.append(CacheClear(caller, .timeout))
            throw .notLoggedIn
        }
        // The PIN the user just typed is verified by the backend itself: no cached PIN is
        // presented, so the PIN status flags do not matter here.
        if freshPINSupplied { return .freshPIN }
        if requiresFreshPIN { throw .pinRequired }
        if pinStatus.contains(.locked) {
            // Only the SO can unlock it, by setting a new PIN: every cached one is stale then.
            dropAllCachedPINs(reason: .stale)
            throw .notLoggedIn
        }
        if pinStatus.wrongPINSinceLastLogin { throw .pinHeldBack }
        environment.cached!.lastUsed = now
        environments[caller] = environment
        return .bracket(cached.pin)
    }

    /// Records how a planned operation ended.
    ///
    /// `.cachedPINRejected` drops every environment's cached PIN for this token (a wrong PIN is
    /// never replayed). A successful `.sign` with `settings.logoutAfterSign` drops the caller's
    /// cached PIN, or releases its held login (→ `.logout`). A successful signature or
    /// decryption counts against the cached PIN's use limits (`keyUsage`: the key's
    /// certificate key usage bits, 0 when unknown); the use that reaches one wipes it.
    public mutating func operationFinished(for caller: CallerID, settings: Settings, kind: OperationKind,
                                           outcome: OperationOutcome, keyUsage: UInt32 = 0) -> BackendAction {
        switch outcome {
        case .cachedPINRejected:
            dropAllCachedPINs(reason: .stale)
            return .none
        case .failed:
            return .none
        case .success:
            if kind == .sign, settings.logoutAfterSign {
                if holder == caller { return releaseLock(of: caller, reason: .policy) }
                if var environment = environments[caller], environment.cached != nil {
                    environment.cached = nil
                    store(environment, for: caller)
                    cleared.append(CacheClear(caller, .policy))
                }
                return .none
            }
            guard kind != .readPrivate, holder != caller, var environment = environments[caller],
                environment.cached != nil
            else { return .none }
            if environment.cached!.count(keyUsage: keyUsage) {
                environment.cached = nil
                cleared.append(CacheClear(caller, .uses))
            }
            store(environment, for: caller)
            return .none
        }
    }

    /// For operations that need no login (public objects, token info, `C_Login` itself):
    /// - Throws: `.tokenBusy` if another caller holds the token.
    public func checkAvailable(for caller: CallerID) throws(PolicyError) {
        if let holder, holder != caller { throw .tokenBusy }
    }

    // MARK: Clearing triggers

    /// The caller's connection left the bus: everything of it here is forgotten; a held login
    /// is released (→ `.logout`).
    public mutating func callerGone(_ caller: CallerID) -> BackendAction {
        environments[caller] = nil
        return releaseLock(of: caller)
    }

    /// The token left its reader: every cached PIN is dropped and the lock ends (no backend
    /// action: the token is gone). Session counts are kept: the sessions still exist until
    /// their owners close them.
    public mutating func tokenRemoved() {
        dropAllCachedPINs(reason: .removal)
        if let holder {
            cleared.append(CacheClear(holder, .removal))
            self.holder = nil
        }
    }

    /// Drops every cached PIN; held logins are untouched (a reload that changed caching
    /// modes: `.policy`; C_SetPIN: `.stale`).
    /// - Returns: how many were dropped.
    @discardableResult
    public mutating func flushCachedPINs(reason: ClearReason = .policy) -> Int {
        dropAllCachedPINs(reason: reason)
    }

    /// Administrator's `FlushCaches`: every cached PIN and the lock (→ `.logout` if there was
    /// one). The holder stays with its sessions, logged out.
    public mutating func flushAll() -> (dropped: Int, action: BackendAction) {
        let dropped = dropAllCachedPINs(reason: .flush)
        guard let holder else { return (dropped, .none) }
        return (dropped, releaseLock(of: holder, reason: .flush))
    }

    /// Ends the logins of `callers` here: their cached PINs, and (`endingLock`) the lock if one
    /// of them holds it (→ `.logout`). Sessions stay. For a locked or suspending desktop
    /// session (logind). The service ends a lock on the token's worker, with its C_Logout.
    /// - Returns: how many logins ended, and the backend action.
    public mutating func flush(callers: Set<CallerID>, reason: ClearReason, endingLock: Bool = true)
        -> (ended: Int, action: BackendAction)
    {
        var ended = 0
        for caller in callers {
            guard var environment = environments[caller], environment.cached != nil else { continue }
            environment.cached = nil
            store(environment, for: caller)
            cleared.append(CacheClear(caller, reason))
            ended += 1
        }
        guard endingLock, let holder, callers.contains(holder) else { return (ended, .none) }
        return (ended + 1, releaseLock(of: holder, reason: reason))
    }

    /// Ends the lock if its holder has not used it for its `PinCacheTimeout` at `now`.
    /// - Returns: the former holder (the service logs the backend out), or nil.
    public mutating func expireIdleLock(now: UInt64) -> CallerID? {
        guard let holder, holderTimeout != 0, now >= holderLastUsed, now - holderLastUsed >= holderTimeout else {
            return nil
        }
        _ = releaseLock(of: holder, reason: .timeout)
        return holder
    }

    /// Drops cached PINs idle for their `PinCacheTimeout` at `now` (monotonic nanoseconds).
    /// - Returns: how many were dropped.
    @discardableResult
    public mutating func expireIdle(now: UInt64) -> Int {
        var dropped = 0
        for (caller, var environment) in environments {
            guard let cached = environment.cached, cached.isExpired(at: now) else { continue }
            environment.cached = nil
            store(environment, for: caller)
            cleared.append(CacheClear(caller, .timeout))
            dropped += 1
        }
        return dropped
    }

    // MARK: Queries

    /// Whether `caller` may have its private operations served in a shared bracket opened
    /// with `pin` (issue 14 §1): nobody holds the token, and the caller holds an unexpired
    /// cached PIN identical to `pin`. Anything else (no PIN, an expired or different one, a
    /// held login anywhere) ends the shared login before the caller's job runs.
    public func mayJoinSharedBracket(_ caller: CallerID, pin: SecretPIN, now: UInt64) -> Bool {
        guard holder == nil, let cached = environments[caller]?.cached, !cached.isExpired(at: now) else { return false }
        return cached.pin.constantTimeEquals(pin)
    }

    /// The caller's sessions and login state on this token.
    public func state(of caller: CallerID) -> CallerTokenState {
        let environment = environments[caller]
        let cached = environment?.cached
        var expiresAt: UInt64?
        if let cached, cached.timeout != 0 { expiresAt = cached.lastUsed &+ cached.timeout }
        if holder == caller, holderTimeout != 0 { expiresAt = holderLastUsed &+ holderTimeout }
        return CallerTokenState(sessions: environment?.sessions ?? 0,
                                cachedPIN: cached != nil,
                                holdsLogin: holder == caller,
                                expiresAt: expiresAt,
                                usesLeft: cached?.usesLeft)
    }

    /// The logins ended since the last call, oldest first; the list is emptied.
    public mutating func takeCleared() -> [CacheClear] {
        guard !cleared.isEmpty else { return [] }
        defer { cleared.removeAll() }
        return cleared
    }

    /// The caller the token is locked to, if any.
    public var lockHolder: CallerID? { holder }

    /// Cached PINs held for this token, over all callers.
    public var cachedPINCount: Int { environments.values.count { $0.cached != nil } }

    /// Callers with any state here (sessions, a cached PIN or the lock), sorted.
    public var callers: [CallerID] {
        var result = Set(environments.keys)
        if let holder { result.insert(holder) }
        return result.sorted()
    }

    /// The earliest monotonic time at which a cached PIN here expires, for the reaper's timer.
    public var nextExpiry: UInt64? {
        let lock: UInt64? = holder != nil && holderTimeout != 0 ? holderLastUsed &+ holderTimeout : nil
        return (environments.values.compactMap { entry in
            entry.cached.flatMap { $0.timeout == 0 ? nil : $0.lastUsed &+ $0.timeout }
        } + [lock].compactMap { $0 }).min()
    }

    // MARK: Private

    @discardableResult
    private mutating func dropAllCachedPINs(reason: ClearReason) -> Int {
        var dropped = 0
        for (caller, var environment) in environments where environment.cached != nil {
            environment.cached = nil
            store(environment, for: caller)
            cleared.append(CacheClear(caller, reason))
            dropped += 1
        }
        return dropped
    }

    /// Ends `caller`'s lock; `reason` nil when nobody is to be told (the caller left).
    private mutating func releaseLock(of caller: CallerID, reason: ClearReason? = nil) -> BackendAction {
        guard holder == caller else { return .none }
        holder = nil
        if let reason { cleared.append(CacheClear(caller, reason)) }
        if environments[caller]?.isEmpty == true { environments[caller] = nil }
        return .logout
    }

    /// Writes back an environment, forgetting it once nothing is left in it (the holder's is
    /// kept while it holds the lock).
    private mutating func store(_ environment: Environment, for caller: CallerID) {
        environments[caller] = environment.isEmpty && holder != caller ? nil : environment
    }
}
