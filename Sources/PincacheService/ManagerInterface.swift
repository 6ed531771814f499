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

    func flushCaches(_ call: MethodCall) {
        let flush: @Sendable () -> Void = { [weak self] in
            guard let self else { return }
            let n = self.tokens.reduce(0) { sum, t in sum + t.flushAll(reason: "FlushCaches") }
            Log.notice("FlushCaches: \(n) cached PIN(s) wiped, exclusive logins ended")
            call.reply([])
        }
        withCaller(call) { [weak self] info in
            guard let self else { return }
            self.authorized([.manage], call, info, token: nil, operation: "flush", flush)
        }
    }

    /// Counts only, never whose: operators and the reliability tests read these.
    func statistics() -> DBusValue {
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

    func callerState(_ info: CallerInfo) -> DBusValue {
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
}
