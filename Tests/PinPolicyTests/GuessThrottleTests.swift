import Testing

@testable import PinPolicy

private let ms: UInt64 = 1_000_000
private let alice = GuessThrottle.Key(uid: 1000, token: "t1")

@Suite struct GuessThrottleTests {
    /// 3 free tries, then 100 ms doubling to 500 ms: the gaps a sequence of wrong PINs gets.
    @Test func delaysDoubleUpToTheCeilingAfterTheFreeTries() {
        let rule = GuessThrottle.Rule(freeTries: 3, delay: 100 * ms, maxDelay: 500 * ms)
        #expect((0..<8).map { rule.wait(after: $0) / ms } == [0, 0, 0, 100, 200, 400, 500, 500])
        #expect(rule.wait(after: 1000) == 500 * ms)
        #expect(GuessThrottle.Rule(freeTries: 0, delay: 0, maxDelay: 0).wait(after: 50) == 0)
        // A ceiling below the first delay is the first delay.
        #expect(GuessThrottle.Rule(freeTries: 0, delay: 100 * ms, maxDelay: 1).wait(after: 5) == 100 * ms)
    }

    @Test func sequentialWrongPINsAreSpacedOut() {
        var t = GuessThrottle(rule: .init(freeTries: 2, delay: 100 * ms, maxDelay: 400 * ms))
        var now: UInt64 = 1000 * ms
        var slots: [UInt64] = []
        for _ in 0..<6 {
            let at = t.admit(alice, now: now)!
            slots.append(at)
            t.report(alice, .rejected)
            now = at + 1 * ms  // the next attempt right after this one's answer
        }
        let gaps = zip(slots.dropFirst(), slots).map { ($0 - $1) / ms }
        #expect(gaps == [1, 100, 200, 400, 400])
        #expect(t.failures(alice) == 6)
    }

    /// At most freeTries attempts unanswered: parallel guesses wait for answers, and so meet
    /// the delays the wrong ones earn.
    @Test func parallelGuessesWaitForAnswers() {
        var t = GuessThrottle(rule: .init(freeTries: 2, delay: 100 * ms, maxDelay: 400 * ms))
        #expect(t.admit(alice, now: 0) == 0)
        #expect(t.admit(alice, now: 0) == 0)
        #expect(t.admit(alice, now: 0) == nil)
        t.report(alice, .rejected)
        t.report(alice, .rejected)
        // Two wrong: the next two are spaced by the first delay each, from the last attempt.
        #expect(t.admit(alice, now: 10 * ms) == 100 * ms)
        #expect(t.admit(alice, now: 10 * ms) == 200 * ms)
        #expect(t.admit(alice, now: 10 * ms) == nil)
    }

    /// A burst of correct logins only queues: no delay once they are answered.
    @Test func parallelCorrectLoginsAreNeverDelayed() {
        var t = GuessThrottle(rule: .init(freeTries: 3, delay: 100 * ms, maxDelay: 400 * ms))
        var admitted = 0
        for round in 0..<20 {
            let now = UInt64(round) * ms
            while let at = t.admit(alice, now: now) {
                #expect(at == now)
                admitted += 1
            }
            t.report(alice, .accepted)
        }
        #expect(admitted == 3 + 19)
        #expect(t.failures(alice) == 0)
    }

    @Test func anAcceptedPINStartsAfresh() {
        var t = GuessThrottle(rule: .init(freeTries: 1, delay: 100 * ms, maxDelay: 400 * ms))
        _ = t.admit(alice, now: 0)
        t.report(alice, .rejected)
        #expect(t.admit(alice, now: 0) == 100 * ms)
        t.report(alice, .accepted)
        #expect(t.failures(alice) == 0)
        #expect(t.admit(alice, now: 200 * ms) == 200 * ms)
        // Other failures (a session gone, a removed card) neither count nor reset.
        t.report(alice, .other)
        _ = t.admit(alice, now: 0)
        t.report(alice, .rejected)
        _ = t.admit(alice, now: 300 * ms)
        t.report(alice, .other)
        #expect(t.failures(alice) == 1)
    }

    /// Per (uid, token): another user, or the same user on another token, is not slowed.
    @Test func othersAreNotSlowed() {
        var t = GuessThrottle(rule: .init(freeTries: 1, delay: 100 * ms, maxDelay: 400 * ms))
        _ = t.admit(alice, now: 0)
        t.report(alice, .rejected)
        #expect(t.admit(alice, now: 0) == 100 * ms)
        #expect(t.admit(.init(uid: 1001, token: "t1"), now: 0) == 0)
        #expect(t.admit(.init(uid: 1000, token: "t2"), now: 0) == 0)
    }
}
