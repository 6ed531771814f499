import Testing
@testable import PinPolicy

private let alice = CallerID(":1.10")
private let bob = CallerID(":1.11")
private let carol = CallerID(":1.12")
private let second: UInt64 = 1_000_000_000

private func settings(cache: Bool = true, logoutAfterSign: Bool = false, forceLogin: UInt32 = 0,
                      timeout: UInt32 = 0) -> Settings {
    var settings = Settings()
    settings.enableCachePIN = cache
    settings.logoutAfterSign = logoutAfterSign
    settings.forceLoginKeyUsage = forceLogin
    settings.pinCacheTimeout = timeout
    return settings
}

private let caching = settings()
private let cachingLogoutAfterSign = settings(logoutAfterSign: true)
private let nonCaching = settings(cache: false)
private let nonCachingLogoutAfterSign = settings(cache: false, logoutAfterSign: true)

/// Lets a test see whether the policy still holds a PIN without holding it itself.
private final class PINWatch {
    weak var pin: SecretPIN?
    var isDropped: Bool { pin == nil }
}

/// A plan as text, since OperationPlan carries a class and is not Equatable.
private func describe(_ plan: OperationPlan) -> String {
    switch plan {
    case .bracket(let pin): "bracket:" + text(of: pin)
    case .heldLogin: "held"
    case .freshPIN: "fresh"
    }
}

extension TokenPolicy {
    /// The service's login sequence: plan, (backend login), report success.
    @discardableResult
    fileprivate mutating func login(_ caller: CallerID, _ settings: Settings, pin: String = "1234",
                                    protectedAuthenticationPath: Bool = false, now: UInt64 = 0) throws -> PINWatch {
        let watch = PINWatch()
        let plan = try planLogin(for: caller, settings: settings, protectedAuthenticationPath: protectedAuthenticationPath)
        let secret = try makePIN(pin)
        watch.pin = secret
        loginSucceeded(for: caller, plan: plan, settings: settings, pin: secret, now: now)
        return watch
    }

    fileprivate mutating func plan(_ caller: CallerID, _ settings: Settings, _ kind: OperationKind = .sign,
                                   requiresFreshPIN: Bool = false, freshPINSupplied: Bool = false,
                                   pinStatus: PinStatus = [], now: UInt64 = 0) throws(PolicyError) -> String {
        describe(try planOperation(for: caller, settings: settings, kind: kind, requiresFreshPIN: requiresFreshPIN,
                                   freshPINSupplied: freshPINSupplied, pinStatus: pinStatus, now: now))
    }

    /// Plan, run (successfully) and report one operation; returns the plan and the backend action.
    fileprivate mutating func perform(_ caller: CallerID, _ settings: Settings, _ kind: OperationKind = .sign,
                                      now: UInt64 = 0) throws(PolicyError) -> (String, BackendAction) {
        let plan = try plan(caller, settings, kind, now: now)
        return (plan, operationFinished(for: caller, settings: settings, kind: kind, outcome: .success))
    }

    fileprivate static func withSessions(_ callers: CallerID...) -> TokenPolicy {
        var policy = TokenPolicy()
        for caller in callers { policy.sessionOpened(by: caller) }
        return policy
    }
}

// MARK: - The seed's PKCS#11 table: P11_EnableCachePIN × P11_LogoutAfterSign

@Suite struct SeedTableTests {
    @Test func cachingWithoutLogoutAfterSign() throws {
        var policy = TokenPolicy.withSessions(alice, bob)
        #expect(try policy.planLogin(for: alice, settings: caching, protectedAuthenticationPath: false) == .verifyThenCache)
        try policy.login(alice, caching, pin: "1111")
        #expect(policy.state(of: alice) == CallerTokenState(sessions: 1, cachedPIN: true, holdsLogin: false))
        #expect(policy.state(of: alice).loggedIn)
        // "The token is internally released after every private operation": nobody is locked out.
        #expect(policy.lockHolder == nil)
        #expect(throws: Never.self) { try policy.checkAvailable(for: bob) }

        for kind in [OperationKind.sign, .decrypt, .readPrivate, .sign] {
            let (plan, action) = try policy.perform(alice, caching, kind)
            #expect(plan == "bracket:1111")
            #expect(action == .none)
        }
        #expect(policy.state(of: alice).cachedPIN)
        // Another application can log in meanwhile: "accessible from other applications even if logged in".
        try policy.login(bob, caching, pin: "1111")
        #expect(policy.cachedPINCount == 2)
    }

    @Test func cachingWithLogoutAfterSign() throws {
        var policy = TokenPolicy.withSessions(alice, bob)
        let watch = try policy.login(alice, cachingLogoutAfterSign)
        #expect(try policy.perform(alice, cachingLogoutAfterSign, .decrypt) == ("bracket:1234", .none))
        #expect(try policy.perform(alice, cachingLogoutAfterSign, .readPrivate) == ("bracket:1234", .none))
        #expect(policy.state(of: alice).cachedPIN)

        #expect(try policy.perform(alice, cachingLogoutAfterSign, .sign) == ("bracket:1234", .none))
        #expect(!policy.state(of: alice).loggedIn)
        #expect(watch.isDropped)
        #expect(throws: PolicyError.notLoggedIn) { try policy.plan(alice, cachingLogoutAfterSign) }
        #expect(policy.lockHolder == nil)
        #expect(throws: Never.self) { try policy.checkAvailable(for: bob) }
        // The user types the PIN again: works as before.
        try policy.login(alice, cachingLogoutAfterSign, pin: "1234")
        #expect(try policy.plan(alice, cachingLogoutAfterSign) == "bracket:1234")
    }

    @Test func nonCachingWithoutLogoutAfterSign() throws {
        var policy = TokenPolicy.withSessions(alice, bob)
        #expect(try policy.planLogin(for: alice, settings: nonCaching, protectedAuthenticationPath: false) == .holdLogin)
        try policy.login(alice, nonCaching)
        #expect(policy.state(of: alice) == CallerTokenState(sessions: 1, cachedPIN: false, holdsLogin: true))
        #expect(policy.lockHolder == alice)
        #expect(policy.cachedPINCount == 0)
        for kind in [OperationKind.sign, .decrypt, .readPrivate, .sign] {
            #expect(try policy.perform(alice, nonCaching, kind) == ("held", .none))
        }
        #expect(policy.lockHolder == alice)
        // "A card will not be accessible from other applications as long as it is in logged in state."
        #expect(throws: PolicyError.tokenBusy) { try policy.checkAvailable(for: bob) }
        #expect(throws: PolicyError.tokenBusy) { try policy.planLogin(for: bob, settings: nonCaching, protectedAuthenticationPath: false) }
        #expect(throws: PolicyError.tokenBusy) { try policy.planLogin(for: bob, settings: caching, protectedAuthenticationPath: false) }
        #expect(throws: PolicyError.tokenBusy) { try policy.plan(bob, nonCaching) }
        #expect(throws: Never.self) { try policy.checkAvailable(for: alice) }
    }

    @Test func nonCachingWithLogoutAfterSign() throws {
        var policy = TokenPolicy.withSessions(alice, bob)
        try policy.login(alice, nonCachingLogoutAfterSign)
        #expect(try policy.perform(alice, nonCachingLogoutAfterSign, .decrypt) == ("held", .none))
        #expect(policy.lockHolder == alice)
        #expect(throws: PolicyError.tokenBusy) { try policy.checkAvailable(for: bob) }

        #expect(try policy.perform(alice, nonCachingLogoutAfterSign, .sign) == ("held", .logout))
        #expect(policy.lockHolder == nil)
        #expect(!policy.state(of: alice).loggedIn)
        #expect(policy.state(of: alice).sessions == 1)
        #expect(throws: PolicyError.notLoggedIn) { try policy.plan(alice, nonCachingLogoutAfterSign) }
        #expect(throws: Never.self) { try policy.checkAvailable(for: bob) }
        try policy.login(bob, nonCachingLogoutAfterSign)
        #expect(policy.lockHolder == bob)
    }

    @Test func failedSignDoesNotTriggerLogoutAfterSign() throws {
        var policy = TokenPolicy.withSessions(alice, bob)
        try policy.login(alice, cachingLogoutAfterSign)
        _ = try policy.plan(alice, cachingLogoutAfterSign)
        #expect(policy.operationFinished(for: alice, settings: cachingLogoutAfterSign, kind: .sign, outcome: .failed) == .none)
        #expect(policy.state(of: alice).cachedPIN)

        try policy.login(bob, nonCachingLogoutAfterSign)
        #expect(policy.operationFinished(for: bob, settings: nonCachingLogoutAfterSign, kind: .sign, outcome: .failed) == .none)
        #expect(policy.lockHolder == bob)
    }

    @Test func protectedAuthenticationPathHoldsTheLoginEvenInCachingMode() throws {
        var policy = TokenPolicy.withSessions(alice, bob)
        #expect(try policy.planLogin(for: alice, settings: caching, protectedAuthenticationPath: true) == .holdLogin)
        policy.loginSucceeded(for: alice, plan: .holdLogin, settings: caching, pin: nil, now: 0)
        #expect(policy.lockHolder == alice)
        #expect(policy.cachedPINCount == 0)
        #expect(try policy.plan(alice, caching) == "held")
        #expect(throws: PolicyError.tokenBusy) { try policy.plan(bob, caching) }
        #expect(try policy.logout(for: alice) == .logout)
        #expect(policy.lockHolder == nil)
    }

    @Test func aHoldLoginKeepsNoPIN() throws {
        var policy = TokenPolicy.withSessions(alice)
        let watch = try policy.login(alice, nonCaching)
        #expect(watch.isDropped)
        #expect(policy.cachedPINCount == 0)
    }

    @Test func verifyThenCacheWithoutAPINRecordsNothing() throws {
        var policy = TokenPolicy.withSessions(alice)
        policy.loginSucceeded(for: alice, plan: .verifyThenCache, settings: caching, pin: nil, now: 0)
        #expect(!policy.state(of: alice).loggedIn)
    }

    @Test func loggingInTwiceIsRefused() throws {
        var policy = TokenPolicy.withSessions(alice, bob)
        try policy.login(alice, caching)
        #expect(throws: PolicyError.alreadyLoggedIn) { try policy.planLogin(for: alice, settings: caching, protectedAuthenticationPath: false) }
        #expect(throws: PolicyError.alreadyLoggedIn) { try policy.planLogin(for: alice, settings: nonCaching, protectedAuthenticationPath: false) }
        try policy.login(bob, nonCaching)
        #expect(throws: PolicyError.alreadyLoggedIn) { try policy.planLogin(for: bob, settings: nonCaching, protectedAuthenticationPath: false) }
    }
}

// MARK: - Every clearing trigger of DESIGN §1

@Suite struct ClearingTriggerTests {
    @Test func logout() throws {
        var policy = TokenPolicy.withSessions(alice, bob)
        let watch = try policy.login(alice, caching)
        #expect(try policy.logout(for: alice) == .none)
        #expect(watch.isDropped)
        #expect(!policy.state(of: alice).loggedIn)
        #expect(policy.state(of: alice).sessions == 1)
        #expect(throws: PolicyError.notLoggedIn) { try policy.logout(for: alice) }
        #expect(throws: PolicyError.notLoggedIn) { try policy.plan(alice, caching) }
        #expect(throws: PolicyError.notLoggedIn) { try policy.logout(for: carol) }

        try policy.login(bob, nonCaching)
        #expect(try policy.logout(for: bob) == .logout)
        #expect(policy.lockHolder == nil)
        #expect(throws: PolicyError.notLoggedIn) { try policy.logout(for: bob) }
    }

    @Test func lastSessionClosed() throws {
        var policy = TokenPolicy.withSessions(alice, alice, bob)
        let watch = try policy.login(alice, caching)
        #expect(policy.sessionClosed(by: alice) == .none)
        #expect(policy.state(of: alice) == CallerTokenState(sessions: 1, cachedPIN: true, holdsLogin: false))
        #expect(!watch.isDropped)
        #expect(policy.sessionClosed(by: alice) == .none)
        #expect(watch.isDropped)
        #expect(policy.state(of: alice) == CallerTokenState(sessions: 0, cachedPIN: false, holdsLogin: false))
        #expect(policy.callers == [bob])
        // Closing more than were opened is harmless.
        #expect(policy.sessionClosed(by: alice) == .none)
        #expect(policy.sessionClosed(by: carol) == .none)
        #expect(policy.state(of: alice).sessions == 0)
    }

    @Test func lastSessionClosedEndsTheLock() throws {
        var policy = TokenPolicy.withSessions(alice, alice, bob)
        try policy.login(alice, nonCaching)
        #expect(policy.sessionClosed(by: alice) == .none)
        #expect(policy.lockHolder == alice)
        #expect(policy.sessionClosed(by: alice) == .logout)
        #expect(policy.lockHolder == nil)
        #expect(throws: Never.self) { try policy.checkAvailable(for: bob) }
        #expect(policy.callers == [bob])
    }

    @Test func tokenRemoved() throws {
        var policy = TokenPolicy.withSessions(alice, bob, carol, carol)
        let a = try policy.login(alice, caching)
        let b = try policy.login(bob, caching)
        #expect(policy.cachedPINCount == 2)
        policy.tokenRemoved()
        #expect(a.isDropped && b.isDropped)
        #expect(policy.cachedPINCount == 0)
        #expect(policy.state(of: alice) == CallerTokenState(sessions: 1, cachedPIN: false, holdsLogin: false))
        #expect(policy.state(of: carol).sessions == 2)

        try policy.login(carol, nonCaching)
        policy.tokenRemoved()
        #expect(policy.lockHolder == nil)
        #expect(!policy.state(of: carol).loggedIn)
        #expect(policy.state(of: carol).sessions == 2)
        #expect(throws: Never.self) { try policy.checkAvailable(for: alice) }
    }

    @Test func callerGone() throws {
        var policy = TokenPolicy.withSessions(alice, alice, bob)
        let a = try policy.login(alice, caching)
        try policy.login(bob, caching)
        #expect(policy.callerGone(alice) == .none)
        #expect(a.isDropped)
        #expect(policy.state(of: alice) == CallerTokenState(sessions: 0, cachedPIN: false, holdsLogin: false))
        #expect(policy.callers == [bob])
        #expect(policy.state(of: bob).cachedPIN)

        #expect(try policy.logout(for: bob) == .none)
        try policy.login(bob, nonCaching)
        #expect(policy.callerGone(bob) == .logout)
        #expect(policy.lockHolder == nil)
        #expect(policy.callers.isEmpty)
        #expect(policy.callerGone(carol) == .none)
    }

    @Test func logoutAfterSignOnlyDropsTheSigner() throws {
        var policy = TokenPolicy.withSessions(alice, bob)
        let a = try policy.login(alice, cachingLogoutAfterSign)
        let b = try policy.login(bob, cachingLogoutAfterSign)
        _ = try policy.perform(alice, cachingLogoutAfterSign, .sign)
        #expect(a.isDropped)
        #expect(!b.isDropped)
        #expect(policy.state(of: bob).cachedPIN)
    }

    @Test func flushDropsEveryCachedPINButNoHeldLogin() throws {
        var policy = TokenPolicy.withSessions(alice, bob, carol)
        let a = try policy.login(alice, caching, pin: "1")
        let b = try policy.login(bob, caching, pin: "2")
        #expect(policy.flushCachedPINs() == 2)
        #expect(a.isDropped && b.isDropped)
        #expect(policy.flushCachedPINs() == 0)

        try policy.login(alice, caching)
        try policy.login(carol, nonCaching)
        #expect(policy.flushCachedPINs() == 1)
        #expect(policy.lockHolder == carol)
        #expect(policy.state(of: carol).holdsLogin)
        #expect(policy.state(of: alice).sessions == 1)
    }

    @Test func flushDuringABracketLeavesThatBracketItsPIN() throws {
        var policy = TokenPolicy.withSessions(alice)
        let watch = try policy.login(alice, caching, pin: "424242")
        let plan = try policy.planOperation(for: alice, settings: caching, kind: .sign, requiresFreshPIN: false,
                                            freshPINSupplied: false, pinStatus: [], now: 0)
        #expect(policy.flushCachedPINs() == 1)
        #expect(!policy.state(of: alice).loggedIn)
        // The bracket in flight still presents the intact PIN to C_Login...
        guard case .bracket(let inFlight) = plan else { Issue.record("expected a bracket"); return }
        #expect(text(of: inFlight) == "424242")
        #expect(!watch.isDropped)
        // ...and once it ends, the last reference goes and deinit wipes the memory.
        _ = consume plan
        _ = consume inFlight
        #expect(watch.isDropped)
    }

    @Test func idleTimeout() throws {
        var policy = TokenPolicy.withSessions(alice, bob, carol)
        let timed = settings(timeout: 10)
        let a = try policy.login(alice, timed, now: 0)
        let b = try policy.login(bob, timed, now: 5 * second)
        try policy.login(carol, caching, now: 0)   // no time-out
        #expect(policy.nextExpiry == 10 * second)

        // Use restarts the idle clock.
        #expect(try policy.plan(alice, timed, now: 9 * second) == "bracket:1234")
        #expect(policy.nextExpiry == 15 * second)
        #expect(policy.expireIdle(now: 14 * second) == 0)
        #expect(policy.expireIdle(now: 15 * second) == 1)
        #expect(b.isDropped && !a.isDropped)
        #expect(policy.expireIdle(now: 19 * second - 1) == 0)
        #expect(policy.expireIdle(now: 1_000_000 * second) == 1)
        #expect(a.isDropped)
        #expect(policy.state(of: carol).cachedPIN)
        #expect(policy.nextExpiry == nil)
        #expect(policy.state(of: alice).sessions == 1)
    }

    @Test func expiredPINIsDroppedWhenUsed() throws {
        var policy = TokenPolicy.withSessions(alice)
        let timed = settings(timeout: 30)
        let watch = try policy.login(alice, timed, now: 100 * second)
        #expect(throws: PolicyError.notLoggedIn) { try policy.plan(alice, timed, now: 130 * second) }
        #expect(watch.isDropped)
        #expect(!policy.state(of: alice).loggedIn)
    }

    @Test func cachedPINExpiryLeavesAHeldLogin() throws {
        var policy = TokenPolicy.withSessions(alice)
        try policy.login(alice, settings(cache: false, timeout: 1))
        #expect(policy.expireIdle(now: UInt64.max) == 0)
        #expect(policy.lockHolder == alice)
    }

    /// Issue 12 §5: an exclusive login idle for its holder's PinCacheTimeout ends.
    @Test func idleLockEndsAtItsTimeout() throws {
        var policy = TokenPolicy.withSessions(alice, bob)
        try policy.login(alice, settings(cache: false, timeout: 10), now: 0)
        #expect(policy.nextExpiry == 10 * second)
        // Use restarts the clock.
        #expect(try policy.plan(alice, nonCaching, now: 6 * second) == "held")
        #expect(policy.expireIdleLock(now: 15 * second) == nil)
        #expect(policy.nextExpiry == 16 * second)
        #expect(policy.expireIdleLock(now: 16 * second) == alice)
        #expect(policy.lockHolder == nil)
        #expect(!policy.state(of: alice).loggedIn)
        #expect(policy.state(of: alice).sessions == 1)
        #expect(throws: PolicyError.notLoggedIn) { try policy.plan(alice, nonCaching, now: 16 * second) }
        // The token is free for another caller.
        try policy.login(bob, nonCaching, now: 17 * second)
        #expect(policy.lockHolder == bob)
    }

    @Test func lockWithoutTimeoutNeverExpires() throws {
        var policy = TokenPolicy.withSessions(alice)
        try policy.login(alice, nonCaching)
        #expect(policy.nextExpiry == nil)
        #expect(policy.expireIdleLock(now: UInt64.max) == nil)
        #expect(policy.lockHolder == alice)
    }

    /// Issue 12 §5: FlushCaches ends the lock as well as every cached PIN.
    @Test func flushAllEndsTheLockToo() throws {
        var policy = TokenPolicy.withSessions(alice, bob)
        let b = try policy.login(bob, caching)
        try policy.login(alice, nonCaching)
        let (dropped, action) = policy.flushAll()
        #expect(dropped == 1 && action == .logout)
        #expect(b.isDropped)
        #expect(policy.lockHolder == nil)
        #expect(policy.state(of: alice).sessions == 1)
        #expect(policy.flushAll() == (0, .none))
    }

    /// Issue 12 §4: while the token reports a wrong PIN since its last successful login, no
    /// cached PIN is presented, and none is destroyed either.
    @Test(arguments: [PinStatus.countLow, .finalTry, [.countLow, .finalTry]])
    func wrongPINFlagsHoldCachedPINsBack(status: PinStatus) throws {
        var policy = TokenPolicy.withSessions(alice, bob, carol)
        let a = try policy.login(alice, caching, pin: "1111")
        let b = try policy.login(bob, caching, pin: "1111")
        #expect(throws: PolicyError.pinHeldBack) { try policy.plan(alice, caching, pinStatus: status) }
        #expect(throws: PolicyError.pinHeldBack) { try policy.plan(bob, caching, pinStatus: status) }
        #expect(!a.isDropped && !b.isDropped)
        #expect(policy.cachedPINCount == 2)
        #expect(policy.state(of: alice).cachedPIN)
        // Carol has nothing cached: not logged in, as before.
        #expect(throws: PolicyError.notLoggedIn) { try policy.plan(carol, caching, pinStatus: status) }
        // A successful login (anyone's) clears the flags: the same PINs work again, untouched.
        #expect(try policy.plan(alice, caching) == "bracket:1111")
        #expect(try policy.plan(bob, caching) == "bracket:1111")
    }

    @Test func aHeldBackCallerMayLogInAgain() throws {
        var policy = TokenPolicy.withSessions(alice)
        let old = try policy.login(alice, caching, pin: "1111")
        // Logged in, and not held back: a second login is refused as before.
        #expect(throws: PolicyError.alreadyLoggedIn) {
            try policy.planLogin(for: alice, settings: caching, protectedAuthenticationPath: false)
        }
        #expect(throws: PolicyError.alreadyLoggedIn) {
            try policy.planLogin(for: alice, settings: caching, protectedAuthenticationPath: false, pinStatus: .locked)
        }
        let plan = try policy.planLogin(for: alice, settings: caching, protectedAuthenticationPath: false, pinStatus: .countLow)
        #expect(plan == .verifyThenCache)
        policy.loginSucceeded(for: alice, plan: plan, settings: caching, pin: try makePIN("2222"), now: 0)
        #expect(old.isDropped)
        #expect(try policy.plan(alice, caching) == "bracket:2222")
    }

    @Test func lockedPINPurgesEveryEnvironment() throws {
        var policy = TokenPolicy.withSessions(alice, bob, carol)
        let a = try policy.login(alice, caching)
        let b = try policy.login(bob, caching)
        #expect(throws: PolicyError.notLoggedIn) { try policy.plan(alice, caching, pinStatus: .locked) }
        #expect(a.isDropped && b.isDropped)
        #expect(policy.cachedPINCount == 0)
        #expect(throws: PolicyError.notLoggedIn) { try policy.plan(bob, caching) }
    }

    @Test func pinStatusDoesNotConcernAHeldLogin() throws {
        var policy = TokenPolicy.withSessions(alice)
        try policy.login(alice, nonCaching)
        #expect(try policy.plan(alice, nonCaching, pinStatus: .countLow) == "held")
    }

    @Test func pinStatusFromTokenFlags() {
        #expect(PinStatus(tokenFlags: 0x0000_0400 | 0x0000_0004) == [])   // CKF_TOKEN_INITIALIZED | CKF_LOGIN_REQUIRED
        #expect(PinStatus(tokenFlags: 0x0001_0000) == .countLow)
        #expect(PinStatus(tokenFlags: 0x0002_0000 | 0x0400) == .finalTry)
        #expect(PinStatus(tokenFlags: 0x0004_0000) == .locked)
        #expect(PinStatus(tokenFlags: 0x0008_0000) == [])   // CKF_USER_PIN_TO_BE_CHANGED is not a retry state
    }

    @Test func cachedPINRejectedPurgesEveryEnvironment() throws {
        var policy = TokenPolicy.withSessions(alice, bob, carol)
        let a = try policy.login(alice, caching, pin: "old")
        let b = try policy.login(bob, caching, pin: "old")
        #expect(try policy.plan(alice, caching) == "bracket:old")
        #expect(policy.operationFinished(for: alice, settings: caching, kind: .sign, outcome: .cachedPINRejected) == .none)
        #expect(a.isDropped && b.isDropped)
        #expect(policy.cachedPINCount == 0)
        // Neither presents the stale PIN again: the card's counter drops by at most one.
        #expect(throws: PolicyError.notLoggedIn) { try policy.plan(alice, caching) }
        #expect(throws: PolicyError.notLoggedIn) { try policy.plan(bob, caching) }
        #expect(policy.state(of: carol).sessions == 1)
    }

    @Test func cachedPINRejectedLeavesAHeldLogin() throws {
        var policy = TokenPolicy.withSessions(alice, bob)
        try policy.login(alice, caching)
        _ = try policy.plan(alice, caching)
        try policy.login(bob, nonCaching)   // the token was free between brackets
        #expect(policy.operationFinished(for: alice, settings: caching, kind: .decrypt, outcome: .cachedPINRejected) == .none)
        #expect(policy.lockHolder == bob)
    }

    @Test func otherFailuresKeepTheCache() throws {
        var policy = TokenPolicy.withSessions(alice)
        try policy.login(alice, caching)
        for kind in [OperationKind.sign, .decrypt, .readPrivate] {
            _ = try policy.plan(alice, caching, kind)
            #expect(policy.operationFinished(for: alice, settings: caching, kind: kind, outcome: .failed) == .none)
        }
        #expect(policy.state(of: alice).cachedPIN)
    }
}

// MARK: - Force login, isolation, mixed modes

@Suite struct ForceLoginTests {
    private let forcing = settings(forceLogin: 0x40)

    @Test func cachingModeNeedsAFreshPIN() throws {
        var policy = TokenPolicy.withSessions(alice)
        let watch = try policy.login(alice, forcing, now: 0)
        #expect(throws: PolicyError.pinRequired) { try policy.plan(alice, forcing, requiresFreshPIN: true) }
        #expect(try policy.plan(alice, forcing, requiresFreshPIN: true, freshPINSupplied: true) == "fresh")
        // The cache is neither used nor changed; ordinary keys still use it.
        #expect(!watch.isDropped)
        #expect(try policy.plan(alice, forcing, requiresFreshPIN: false) == "bracket:1234")
    }

    @Test func freshPINDoesNotRestartTheIdleClock() throws {
        var policy = TokenPolicy.withSessions(alice)
        let timed = settings(forceLogin: 0x40, timeout: 10)
        try policy.login(alice, timed, now: 0)
        #expect(try policy.plan(alice, timed, requiresFreshPIN: true, freshPINSupplied: true, now: 9 * second) == "fresh")
        #expect(policy.expireIdle(now: 10 * second) == 1)
    }

    @Test func freshPINIgnoresPinStatusAndKeepsTheCache() throws {
        var policy = TokenPolicy.withSessions(alice, bob)
        try policy.login(alice, forcing)
        try policy.login(bob, forcing)
        #expect(try policy.plan(alice, forcing, requiresFreshPIN: true, freshPINSupplied: true, pinStatus: .countLow) == "fresh")
        #expect(policy.cachedPINCount == 2)
    }

    @Test func freshPINNeedsALogin() throws {
        var policy = TokenPolicy.withSessions(alice)
        #expect(throws: PolicyError.notLoggedIn) { try policy.plan(alice, forcing, requiresFreshPIN: true, freshPINSupplied: true) }
        #expect(throws: PolicyError.notLoggedIn) { try policy.plan(alice, forcing, requiresFreshPIN: true) }
    }

    @Test func suppliedPINWithoutForceLoginIsFreshToo() throws {
        var policy = TokenPolicy.withSessions(alice)
        try policy.login(alice, caching)
        #expect(try policy.plan(alice, caching, freshPINSupplied: true) == "fresh")
    }

    @Test func heldLoginNeedsAFreshPINToo() throws {
        var policy = TokenPolicy.withSessions(alice)
        let held = settings(cache: false, forceLogin: 0x40)
        try policy.login(alice, held)
        #expect(throws: PolicyError.pinRequired) { try policy.plan(alice, held, requiresFreshPIN: true) }
        #expect(try policy.plan(alice, held, requiresFreshPIN: true, freshPINSupplied: true) == "fresh")
        #expect(policy.state(of: alice).holdsLogin)
    }

    @Test func freshSignWithLogoutAfterSignClearsTheCache() throws {
        var policy = TokenPolicy.withSessions(alice)
        let strict = settings(logoutAfterSign: true, forceLogin: 0x40)
        let watch = try policy.login(alice, strict)
        #expect(try policy.plan(alice, strict, requiresFreshPIN: true, freshPINSupplied: true) == "fresh")
        #expect(policy.operationFinished(for: alice, settings: strict, kind: .sign, outcome: .success) == .none)
        #expect(watch.isDropped)
    }

    @Test func busyBeforePinRequired() throws {
        var policy = TokenPolicy.withSessions(alice, bob)
        try policy.login(alice, caching)
        try policy.login(bob, nonCaching)
        #expect(throws: PolicyError.tokenBusy) { try policy.plan(alice, forcing, requiresFreshPIN: true) }
    }
}

@Suite struct IsolationTests {
    @Test func twoCallersKeepTheirOwnPINs() throws {
        var policy = TokenPolicy.withSessions(alice, bob, carol)
        try policy.login(alice, caching, pin: "alice-pin")
        try policy.login(bob, caching, pin: "bob-pin")
        #expect(try policy.plan(alice, caching) == "bracket:alice-pin")
        #expect(try policy.plan(bob, caching) == "bracket:bob-pin")
        #expect(throws: PolicyError.notLoggedIn) { try policy.plan(carol, caching) }
        #expect(!policy.state(of: carol).loggedIn)

        #expect(try policy.logout(for: alice) == .none)
        #expect(try policy.plan(bob, caching) == "bracket:bob-pin")
        #expect(policy.sessionClosed(by: bob) == .none)
        #expect(policy.state(of: alice).sessions == 1)
        #expect(policy.callers == [alice, carol])
    }

    @Test func settingsAreTheCallersOwn() throws {
        var policy = TokenPolicy.withSessions(alice, bob)
        try policy.login(alice, cachingLogoutAfterSign)
        try policy.login(bob, caching)
        _ = try policy.perform(bob, caching, .sign)
        _ = try policy.perform(alice, cachingLogoutAfterSign, .sign)
        #expect(!policy.state(of: alice).loggedIn)
        #expect(policy.state(of: bob).loggedIn)
    }

    @Test func callersListsEveryoneWithState() throws {
        var policy = TokenPolicy()
        #expect(policy.callers.isEmpty)
        policy.sessionOpened(by: carol)
        policy.sessionOpened(by: alice)
        #expect(policy.callers == [alice, carol])
        #expect(policy.state(of: bob) == CallerTokenState(sessions: 0, cachedPIN: false, holdsLogin: false))
    }
}

@Suite struct MixedModeTests {
    @Test func aHolderBlocksCachingCallersUntilReleased() throws {
        var policy = TokenPolicy.withSessions(alice, bob)
        try policy.login(alice, caching, pin: "cached")
        // The token is free between brackets, so a non-caching caller may take it.
        try policy.login(bob, nonCaching)
        #expect(policy.lockHolder == bob)
        #expect(throws: PolicyError.tokenBusy) { try policy.plan(alice, caching) }
        #expect(throws: PolicyError.tokenBusy) { try policy.checkAvailable(for: alice) }
        // Alice's cache survives the wait.
        #expect(policy.state(of: alice).cachedPIN)
        #expect(try policy.logout(for: bob) == .logout)
        #expect(try policy.plan(alice, caching) == "bracket:cached")
    }

    @Test(arguments: ["logout", "lastSession", "callerGone", "tokenRemoved", "logoutAfterSign"])
    func everyWayTheLockEnds(way: String) throws {
        var policy = TokenPolicy.withSessions(alice, bob)
        let holdSettings = way == "logoutAfterSign" ? nonCachingLogoutAfterSign : nonCaching
        try policy.login(alice, holdSettings)
        #expect(throws: PolicyError.tokenBusy) { try policy.checkAvailable(for: bob) }
        let action: BackendAction
        switch way {
        case "logout": action = try policy.logout(for: alice)
        case "lastSession": action = policy.sessionClosed(by: alice)
        case "callerGone": action = policy.callerGone(alice)
        case "tokenRemoved": policy.tokenRemoved(); action = .none   // the token is gone: nothing to log out
        default: action = try policy.perform(alice, holdSettings, .sign).1
        }
        #expect(action == (way == "tokenRemoved" ? .none : .logout))
        #expect(policy.lockHolder == nil)
        #expect(throws: Never.self) { try policy.checkAvailable(for: bob) }
        try policy.login(bob, caching)
        #expect(try policy.plan(bob, caching) == "bracket:1234")
    }

    @Test func theLockSurvivesWhatDoesNotEndIt() throws {
        var policy = TokenPolicy.withSessions(alice, alice, bob)
        try policy.login(alice, nonCachingLogoutAfterSign)
        #expect(policy.sessionClosed(by: alice) == .none)
        #expect(policy.flushCachedPINs() == 0)
        #expect(policy.expireIdle(now: .max) == 0)
        #expect(policy.callerGone(bob) == .none)
        #expect(try policy.perform(alice, nonCachingLogoutAfterSign, .decrypt) == ("held", .none))
        #expect(policy.operationFinished(for: alice, settings: nonCachingLogoutAfterSign, kind: .sign, outcome: .failed) == .none)
        #expect(policy.lockHolder == alice)
    }

    @Test func aCachingCallerDoesNotBlockAHolder() throws {
        var policy = TokenPolicy.withSessions(alice, bob)
        try policy.login(bob, caching)
        #expect(try policy.planLogin(for: alice, settings: nonCaching, protectedAuthenticationPath: false) == .holdLogin)
    }
}

// MARK: - Issue 15 §3 and §4: why a login ended, and use limits

@Suite struct CacheClearedTests {
    @Test func logoutTimeoutFlushAndRemovalAreToldToEachCaller() throws {
        var policy = TokenPolicy.withSessions(alice, bob, carol)
        try policy.login(alice, caching)
        try policy.login(bob, settings(timeout: 10))
        try policy.login(carol, nonCaching)
        #expect(policy.takeCleared().isEmpty)
        _ = try policy.logout(for: alice)
        #expect(policy.takeCleared() == [CacheClear(alice, .logout)])
        #expect(policy.takeCleared().isEmpty)
        policy.expireIdle(now: 11 * second)
        #expect(policy.takeCleared() == [CacheClear(bob, .timeout)])
        #expect(policy.flushAll().action == .logout)
        #expect(policy.takeCleared() == [CacheClear(carol, .flush)])
        try policy.login(alice, caching)
        try policy.login(bob, nonCaching)
        policy.tokenRemoved()
        let removed = policy.takeCleared()
        #expect(Set(removed.map(\.caller)) == [alice, bob] && removed.allSatisfy { $0.reason == .removal })
    }

    @Test func aLeavingCallerIsNotTold() throws {
        var policy = TokenPolicy.withSessions(alice)
        try policy.login(alice, nonCaching)
        #expect(policy.callerGone(alice) == .logout)
        #expect(policy.takeCleared().isEmpty)
    }

    @Test func lastSessionClosedAndLogoutAfterSignAndRejectedPIN() throws {
        var policy = TokenPolicy.withSessions(alice, bob)
        try policy.login(alice, caching)
        _ = policy.sessionClosed(by: alice)
        #expect(policy.takeCleared() == [CacheClear(alice, .logout)])
        try policy.login(bob, cachingLogoutAfterSign)
        _ = try policy.perform(bob, cachingLogoutAfterSign)
        #expect(policy.takeCleared() == [CacheClear(bob, .policy)])
        try policy.login(bob, caching)
        _ = try policy.plan(bob, caching)
        _ = policy.operationFinished(for: bob, settings: caching, kind: .sign, outcome: .cachedPINRejected)
        #expect(policy.takeCleared() == [CacheClear(bob, .stale)])
    }

    @Test func aSessionLockEndsOnlyItsCallersLogins() throws {
        var policy = TokenPolicy.withSessions(alice, bob, carol)
        try policy.login(alice, caching)
        try policy.login(bob, caching)
        try policy.login(carol, nonCaching)
        let (ended, action) = policy.flush(callers: [alice, carol], reason: .lock)
        #expect(ended == 2 && action == .logout)
        #expect(Set(policy.takeCleared()) == [CacheClear(alice, .lock), CacheClear(carol, .lock)])
        #expect(policy.state(of: bob).cachedPIN && !policy.state(of: alice).loggedIn && policy.lockHolder == nil)
        #expect(policy.state(of: alice).sessions == 1)
    }
}

extension CacheClear: Hashable {
    public func hash(into hasher: inout Hasher) {
        hasher.combine(caller)
        hasher.combine(reason)
    }
}

@Suite struct UseLimitTests {
    private func limited(_ maxUses: UInt32, byKeyUsage: [UInt32: UInt32] = [:]) -> Settings {
        var s = settings()
        s.useLimits = UseLimits(maxUses: maxUses, maxUsesByKeyUsage: byKeyUsage)
        return s
    }

    @Test func theUseThatReachesTheLimitWipesThePIN() throws {
        let s = limited(2)
        var policy = TokenPolicy.withSessions(alice)
        let watch = try policy.login(alice, s)
        #expect(policy.state(of: alice).usesLeft == 2)
        _ = try policy.perform(alice, s)
        #expect(policy.state(of: alice).usesLeft == 1 && policy.takeCleared().isEmpty)
        _ = try policy.perform(alice, s, .decrypt)
        #expect(policy.takeCleared() == [CacheClear(alice, .uses)])
        #expect(watch.isDropped)
        #expect(throws: PolicyError.notLoggedIn) { try policy.plan(alice, s) }
    }

    @Test func aKeyUsageClassCountsOnlyItsKeys() throws {
        let s = limited(0, byKeyUsage: [CertificateKeyUsage.nonRepudiation: 1])
        var policy = TokenPolicy.withSessions(alice)
        try policy.login(alice, s)
        for _ in 0..<3 {
            _ = try policy.plan(alice, s)
            _ = policy.operationFinished(for: alice, settings: s, kind: .sign, outcome: .success,
                                         keyUsage: CertificateKeyUsage.digitalSignature)
        }
        #expect(policy.state(of: alice).cachedPIN && policy.state(of: alice).usesLeft == 1)
        _ = try policy.plan(alice, s)
        _ = policy.operationFinished(for: alice, settings: s, kind: .sign, outcome: .success,
                                     keyUsage: CertificateKeyUsage.nonRepudiation | CertificateKeyUsage.digitalSignature)
        #expect(policy.takeCleared() == [CacheClear(alice, .uses)])
    }

    @Test func failuresReadsAndHeldLoginsDoNotCount() throws {
        let s = limited(1)
        var policy = TokenPolicy.withSessions(alice, bob)
        try policy.login(alice, s)
        _ = try policy.plan(alice, s)
        _ = policy.operationFinished(for: alice, settings: s, kind: .sign, outcome: .failed)
        _ = try policy.perform(alice, s, .readPrivate)
        #expect(policy.state(of: alice).usesLeft == 1)
        var held = limited(1)
        held.enableCachePIN = false
        try policy.login(bob, held)
        #expect(throws: PolicyError.tokenBusy) { try policy.perform(alice, s) }
        _ = try policy.perform(bob, held)
        _ = try policy.perform(bob, held)
        #expect(policy.state(of: bob).holdsLogin && policy.state(of: bob).usesLeft == nil)
    }

    @Test func expiryIsReported() throws {
        var policy = TokenPolicy.withSessions(alice)
        try policy.login(alice, settings(timeout: 30), now: 5 * second)
        #expect(policy.state(of: alice).expiresAt == 35 * second)
        _ = try policy.perform(alice, settings(timeout: 30), now: 10 * second)
        #expect(policy.state(of: alice).expiresAt == 40 * second)
    }
}
