import PKCS11Kit
import PinPolicy

/// Shared brackets (issue 14 §1): a caching-mode bracket whose very next queued job is a
/// private operation of an environment holding the same cached PIN leaves the backend logged
/// in for it, instead of C_Logout followed by the same C_Login (PBKDF2 on SoftHSM, a VERIFY on
/// a card). The rule that keeps this safe is the worker's: a backend login left open is ended
/// before any job runs unless that job was submitted as shareable and its owner may join
/// (TokenPolicy.mayJoinSharedBracket), and after the last queued job. So the backend is only
/// ever logged in with a shared login while the worker runs a private operation of an
/// environment that would have made the very same login itself.
///
/// On a software token the login may also linger, idle, for a short while after the last
/// queued job (`LoginLinger`), so that a lone client's next operation rides it too: a program
/// signing in a loop then pays one C_Login per 32 signatures instead of one each. The same
/// rule decides who may ride; only the token's own state is kept longer. A token in a
/// hardware or removable slot never lingers: there the login is the card's, and the daemon
/// holds the card only while it works.
extension TokenContext {
    struct SharedLogin {
        var bracket: SharedBracket
        /// The session it was made in; PKCS#11 logins are the token's, so any session of ours
        /// may end it.
        let session: SessionHandle
    }

    func installSharedLoginHooks() {
        worker.setHooks(
            SerialWorker.Hooks(
                beforeJob: { [weak self] owner in self?.jobStarting(shareable: owner) },
                afterJob: { [weak self] morePending in morePending ? nil : self?.lastJobEnded() },
                idle: { [weak self] in self?.endSharedLogin() }))
    }

    /// How long an idle login may stay open on this token (nanoseconds): the configured
    /// `LoginLinger` for a software slot, 0 for a hardware or removable one.
    var lingerNanoseconds: UInt64 {
        let slot = snapshot
        guard !slot.hardware, !slot.removable else { return 0 }
        return loginLinger.load(ordering: .relaxed)
    }

    /// Worker, after the last queued job: ends an open login, or lets it linger within its
    /// bracket's time limit (the idle hook ends it then, unless a job came and rode it).
    private func lastJobEnded() -> UInt64? {
        guard let shared = sharedLogin else { return nil }
        let linger = lingerNanoseconds
        let elapsed = Self.now() &- shared.bracket.opened
        guard linger > 0, elapsed < SharedBracket.maximumNanoseconds else {
            endSharedLogin()
            return nil
        }
        return min(linger, SharedBracket.maximumNanoseconds - elapsed)
    }

    /// Worker, before every job.
    private func jobStarting(shareable owner: String?) {
        guard let shared = sharedLogin else { return }
        if let owner,
            policy.withLock({
                $0.mayJoinSharedBracket(CallerID(owner), pin: shared.bracket.pin, now: Self.now())
            })
        {
            return
        }
        endSharedLogin()
    }

    /// Ends an open shared login, if any (C_Logout through logoutBackend, which forgets it).
    func endSharedLogin() {
        guard let shared = sharedLogin else { return }
        logoutBackend(shared.session)
    }

    /// At a bracket's start: true if the backend is already logged in with a PIN identical to
    /// `pin` within the bracket's limits, and the operation is counted in it. Otherwise any
    /// open login is ended, and the caller logs in itself.
    func joinSharedLogin(_ pin: SecretPIN) -> Bool {
        guard var shared = sharedLogin else { return false }
        guard shared.bracket.admits(pin, now: Self.now()) else {
            endSharedLogin()
            return false
        }
        shared.bracket.serve()
        sharedLogin = shared
        loginCounts.withLock { $0.joined += 1 }
        return true
    }

    /// At a bracket's successful end, instead of C_Logout: true if the login stays open for the
    /// next queued job, which is a private operation of an environment that may join, or, with
    /// nothing queued, to linger (lastJobEnded).
    func keepLoginOpen(pin: SecretPIN, session s: SessionHandle, loggedInAt: UInt64) -> Bool {
        let bracket = sharedLogin?.bracket ?? SharedBracket(pin: pin, opened: loggedInAt)
        let now = Self.now()
        guard bracket.mayStayOpen(now: now) else { return false }
        if let next = worker.nextShareableOwner {
            guard policy.withLock({ $0.mayJoinSharedBracket(CallerID(next), pin: pin, now: now) }) else { return false }
        } else {
            guard worker.backlog == 0, lingerNanoseconds > 0 else { return false }
        }
        sharedLogin = SharedLogin(bracket: bracket, session: sharedLogin?.session ?? s)
        return true
    }
}

/// Backend logins, and operations that rode a shared one (Manager1.GetStatistics, for tests
/// and benchmarks: a run's cost in PIN verifications).
struct LoginCounts: Sendable {
    /// C_Login calls with the user's or SO's PIN (context-specific ones are not counted).
    var logins: UInt64 = 0
    /// Private operations served in a login another bracket opened.
    var joined: UInt64 = 0
}
