import DBusKit
import PKCS11Kit
import PinPolicy

/// Manager1 on /org/pincache: the token list, caches, the caller's own state, statistics,
/// and the way to the proxy's socket (OpenCryptoki).
extension PincacheService {
    func managerInterface() -> ExportedInterface {
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
                "GetStatistics": { [weak self] call in self?.getStatistics(call) },
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

    func flushCaches(_ call: MethodCall) {
        withCaller(call) { [weak self] info in
            guard let self else { return }
            let flush: @Sendable () -> Void = { [weak self] in
                guard let self else { return }
                let n = self.tokens.reduce(0) { sum, t in sum + t.flushAll(reason: "FlushCaches") }
                for token in self.tokens { self.announceLoggedIn(token) }
                Log.notice("FlushCaches: \(n) cached PIN(s) wiped, exclusive logins ended", event: .pinsWiped)
                Audit.record(.flush, caller: info, token: nil, operation: "flush", result: "ok", extra: [("PINCACHE_COUNT", "\(n)")])
                call.reply([])
            }
            self.authorise(
                [.manage], Requester(info: info, interactive: call.allowsInteractiveAuthorization), token: nil,
                operation: "flush",
                denied: { e in
                    Audit.record(.flush, caller: info, token: nil, operation: "flush", result: e.kind.rawValue)
                    call.reply(error: e.dbusError)
                }, flush)
        }
    }

    /// Issue 12 §8: on the system bus root and callers polkit grants `manage` (asked without
    /// interaction) see the daemon's figures; anyone else sees those of their own uid only.
    /// Asking registers no environment (the reliability tests count them).
    func getStatistics(_ call: MethodCall) {
        guard onSystemBus else { return call.reply([statistics(uid: nil)]) }
        connection.connectionCredentials(of: call.sender) { [weak self] result in
            guard let self else { return }
            guard case .success(let credentials) = result, let uid = credentials.uid else {
                return call.reply(error: ServiceError(.notAuthorized, "the caller's uid could not be read").dbusError)
            }
            if uid == 0 { return call.reply([self.statistics(uid: nil)]) }
            self.authorizer.check(.manage, subject: call.sender, interactive: false, details: ["operation": "statistics"]) {
                [weak self] verdict in
                guard let self else { return }
                call.reply([self.statistics(uid: (try? verdict.get()) != nil ? nil : uid)])
            }
        }
    }

    /// Counts only, never whose. `uid`: only that user's environments, sessions, cached PINs
    /// and locks, and none of the daemon-wide figures; nil: everything.
    func statistics(uid: UInt32?) -> DBusValue {
        var cached = 0
        var locked = 0
        let callers = registry.all.filter { uid == nil || $0.uid == uid }
        let ids = Set(callers.map(\.id))
        for token in tokens {
            token.policy.withLock { p in
                if uid == nil {
                    cached += p.cachedPINCount
                    if p.lockHolder != nil { locked += 1 }
                } else {
                    cached += ids.count { p.state(of: $0).cachedPIN }
                    if let holder = p.lockHolder, ids.contains(holder) { locked += 1 }
                }
            }
        }
        let mine: [String: DBusValue] = [
            "Scope": .string(uid.map { "uid \($0)" } ?? "all"),
            "Environments": .uint32(UInt32(callers.count)),
            "Sessions": .uint32(UInt32(uid == nil ? sessions.withLock { $0.count } : callers.reduce(0) { $0 + $1.sessions.count })),
            "CachedPINs": .uint32(UInt32(cached)),
            "LockedTokens": .uint32(UInt32(locked)),
            "Tokens": .uint32(UInt32(tokens.count)),
        ]
        guard uid == nil else { return .vardict(mine) }
        let replies = connection.replyStatistics
        let logins = tokens.reduce(into: LoginCounts()) { sum, token in
            let c = token.loginCounts.withLock { $0 }
            sum.logins += c.logins
            sum.joined += c.joined
        }
        return .vardict(mine.merging([
            "BackendLogins": .uint64(logins.logins),
            "SharedBracketOperations": .uint64(logins.joined),
            "LockedMemoryBytes": .uint64(UInt64(SecretArena.lockedBytes)),
            "PendingAuthorizations": .uint32(UInt32(authorizer.pendingCount)),
            "CallsServed": .uint64(replies.callsServed),
            "CryptokiSockets": .uint32(UInt32(cryptokiSockets.count)),
            "CryptokiCalls": .uint64(cryptokiSockets.callsServed),
            "CryptokiHeldBytes": .uint64(UInt64(max(cryptokiSockets.heldBytes, 0))),
            "Errors": .dictionary(
                keySignature: "s", valueSignature: "u",
                replies.errors.sorted { $0.key < $1.key }.map {
                    DBusDictEntry(key: .string($0.key), value: .uint32(UInt32(clamping: $0.value)))
                }),
        ]) { a, _ in a })
    }

    func callerState(_ info: CallerInfo) -> DBusValue {
        var loggedIn: [DBusValue] = []
        var cached: [DBusValue] = []
        var locked: [DBusValue] = []
        var expiry: [DBusDictEntry] = []
        var usesLeft: [DBusDictEntry] = []
        let now = TokenContext.now()
        for token in tokens {
            let s = token.policy.withLock { $0.state(of: info.id) }
            if s.loggedIn { loggedIn.append(.objectPath(token.path)) }
            if s.cachedPIN { cached.append(.objectPath(token.path)) }
            if s.holdsLogin { locked.append(.objectPath(token.path)) }
            if let at = s.expiresAt {
                // Whole seconds left, rounded up: 0 only once it has expired.
                let left = at > now ? (at - now + 999_999_999) / 1_000_000_000 : 0
                expiry.append(DBusDictEntry(key: .objectPath(token.path), value: .uint32(UInt32(clamping: left))))
            }
            if let n = s.usesLeft { usesLeft.append(DBusDictEntry(key: .objectPath(token.path), value: .uint32(n))) }
        }
        let current = registry.lookup(info.id.rawValue) ?? info
        return .vardict([
            "LoggedIn": .array(elementSignature: "o", loggedIn),
            "Cached": .array(elementSignature: "o", cached),
            "Locked": .array(elementSignature: "o", locked),
            "Expiry": .dictionary(keySignature: "o", valueSignature: "u", expiry),
            "UsesLeft": .dictionary(keySignature: "o", valueSignature: "u", usesLeft),
            "Sessions": .uint32(UInt32(current.sessions.count)),
            "Executable": .string(info.executable ?? ""),
            "CachingMode": .boolean(info.settings.enableCachePIN),
        ])
    }
}
