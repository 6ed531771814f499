import Testing

@testable import PinPolicy

private let alice = CallerID(":1.20")
private let bob = CallerID(":1.21")
private let carol = CallerID(":1.22")
private let millisecond: UInt64 = 1_000_000

private func caching(timeout: UInt32 = 0) -> Settings {
    var s = Settings()
    s.enableCachePIN = true
    s.pinCacheTimeout = timeout
    return s
}

private func loggedIn(
    _ policy: inout TokenPolicy, _ caller: CallerID, _ settings: Settings, pin: String,
    now: UInt64 = 0
)
    throws -> SecretPIN
{
    let plan = try policy.planLogin(
        for: caller, settings: settings, protectedAuthenticationPath: false)
    let secret = try makePIN(pin)
    policy.loginSucceeded(for: caller, plan: plan, settings: settings, pin: secret, now: now)
    return secret
}

@Suite struct SharedBracketTests {
    @Test func pinsCompareByContentNotIdentity() throws {
        let a = try makePIN("123456")
        #expect(a.constantTimeEquals(try makePIN("123456")))
        #expect(a.constantTimeEquals(a))
        #expect(!a.constantTimeEquals(try makePIN("123457")))
        #expect(!a.constantTimeEquals(try makePIN("1234567")))
        #expect(!a.constantTimeEquals(try makePIN("12345")))
        // A PIN that is a prefix padded with zero bytes is still another PIN.
        #expect(!a.constantTimeEquals(try makePIN("123456\0")))
    }

    @Test func aWipedPINMatchesNothing() throws {
        let a = try makePIN("123456")
        let b = try makePIN("123456")
        a.wipe()
        #expect(!a.constantTimeEquals(b))
        #expect(!a.constantTimeEquals(a))
        #expect(!a.constantTimeEquals(try makePIN("")))
    }

    @Test func onlyEnvironmentsHoldingTheSamePINMayJoin() throws {
        var policy = TokenPolicy()
        let opener = try loggedIn(&policy, alice, caching(), pin: "123456")
        _ = try loggedIn(&policy, bob, caching(), pin: "123456")
        _ = try loggedIn(&policy, carol, caching(), pin: "654321")
        #expect(policy.mayJoinSharedBracket(alice, pin: opener, now: 0))
        #expect(policy.mayJoinSharedBracket(bob, pin: opener, now: 0))
        #expect(!policy.mayJoinSharedBracket(carol, pin: opener, now: 0))
        #expect(!policy.mayJoinSharedBracket(CallerID(":1.99"), pin: opener, now: 0))
        // Logged out: its PIN is gone, so it may not ride anyone's login.
        _ = try policy.logout(for: bob)
        #expect(!policy.mayJoinSharedBracket(bob, pin: opener, now: 0))
    }

    @Test func anExpiredPINMayNotJoin() throws {
        var policy = TokenPolicy()
        let opener = try loggedIn(&policy, alice, caching(), pin: "123456")
        _ = try loggedIn(&policy, bob, caching(timeout: 1), pin: "123456")
        #expect(policy.mayJoinSharedBracket(bob, pin: opener, now: 999 * millisecond))
        #expect(!policy.mayJoinSharedBracket(bob, pin: opener, now: 1_000 * millisecond))
    }

    @Test func aHeldLoginClosesSharing() throws {
        var policy = TokenPolicy()
        let opener = try loggedIn(&policy, alice, caching(), pin: "123456")
        var nonCaching = Settings()
        nonCaching.enableCachePIN = false
        _ = try loggedIn(&policy, bob, nonCaching, pin: "123456")
        #expect(policy.lockHolder == bob)
        #expect(!policy.mayJoinSharedBracket(alice, pin: opener, now: 0))
        #expect(!policy.mayJoinSharedBracket(bob, pin: opener, now: 0))
    }

    @Test func aBracketIsBoundedInOperationsAndTime() throws {
        let pin = try makePIN("123456")
        var bracket = SharedBracket(pin: pin, opened: 1_000)
        #expect(bracket.served == 1)
        while bracket.admits(pin, now: 1_000) { bracket.serve() }
        #expect(bracket.served == SharedBracket.maximumOperations)
        #expect(!bracket.mayStayOpen(now: 1_000))

        let fresh = SharedBracket(pin: pin, opened: 1_000)
        #expect(fresh.admits(pin, now: 1_000 + SharedBracket.maximumNanoseconds - 1))
        #expect(!fresh.admits(pin, now: 1_000 + SharedBracket.maximumNanoseconds))
        #expect(!fresh.mayStayOpen(now: 1_000 + SharedBracket.maximumNanoseconds))
        #expect(!fresh.admits(try makePIN("654321"), now: 1_000))
    }
}
