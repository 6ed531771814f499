import DBusKit
import PinPolicy

/// The desktop session (issue 15 §2): logind's `Session.Lock` ends the logins of the callers in
/// that session, `Manager.PrepareForSleep(true)` ends everyone's, as `FlushCacheOnLock` and
/// `FlushCacheOnSuspend` say (both on by default). The signals are logind's own
/// (org.freedesktop.login1 on the system bus); where nothing owns that name nothing arrives.
/// A caller's session is asked of logind (`GetSessionByPID`) only when a Lock comes, for the
/// callers that are logged in somewhere: nothing on the hot path.
extension PincacheService {
    static let logindName = "org.freedesktop.login1"
    static let logindPath = ObjectPath("/org/freedesktop/login1")!

    func watchLogind() {
        do {
            _ = try connection.addSignalHandler(
                sender: Self.logindName, interface: "org.freedesktop.login1.Session", member: "Lock"
            ) { [weak self] signal in
                guard let self, self.configuration.flushOnLock else { return }
                self.sessionLocked(signal.path)
            }
            _ = try connection.addSignalHandler(
                sender: Self.logindName, path: Self.logindPath, interface: "org.freedesktop.login1.Manager",
                member: "PrepareForSleep"
            ) { [weak self] signal in
                guard let self, self.configuration.flushOnSuspend, signal.arguments.first?.boolValue == true else { return }
                let everyone = Set(self.registry.all.map(\.id))
                let ended = self.endLogins(of: everyone, reason: .suspend)
                Log.notice("the machine is going to sleep: \(ended) login(s) ended", event: .pinsWiped)
            }
        } catch {
            Log.warning("cannot watch logind (screen lock, suspend): \(error)")
        }
    }

    /// Ends the logins of the callers whose process logind places in `session`.
    func sessionLocked(_ session: ObjectPath) {
        let loggedIn = registry.all.filter { info in tokens.contains { $0.policy.withLock { $0.state(of: info.id).loggedIn } } }
        for info in loggedIn {
            guard let pid = info.pid else { continue }
            connection.call(
                destination: Self.logindName, path: Self.logindPath, interface: "org.freedesktop.login1.Manager",
                member: "GetSessionByPID", arguments: [.uint32(pid)]
            ) { [weak self] result in
                // A process logind puts in no session (a service, a cron job) is in no locked session.
                guard let self, case .success(let reply) = result, reply.first?.objectPathValue == session,
                    self.registry.isAlive(info.id)
                else { return }
                let ended = self.endLogins(of: [info.id], reason: .lock)
                if ended > 0 {
                    Log.notice("session \(session.rawValue) locked: \(ended) login(s) of \(info.id.rawValue) ended", event: .pinsWiped)
                }
            }
        }
    }

    /// Every token: the callers' cached PINs at once, their exclusive logins on the token's
    /// worker (with its C_Logout). Returns how many logins ended (locks counted when queued).
    @discardableResult
    func endLogins(of callers: Set<CallerID>, reason: ClearReason) -> Int {
        var ended = 0
        for token in tokens {
            ended += token.policy.withLock { $0.flush(callers: callers, reason: reason, endingLock: false).ended }
            guard let holder = token.policy.withLock({ $0.lockHolder }), callers.contains(holder) else { continue }
            ended += 1
            token.worker.submit {
                if token.policy.withLock({ $0.flush(callers: callers, reason: reason).action }) == .logout {
                    token.backendLogout()
                }
            }
        }
        return ended
    }
}
