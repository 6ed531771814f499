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
            let (at, _) = t.admit(alice, now: now)
            slots.append(at)
            t.rejected(alice)
            now = at + 1 * ms  // the next attempt right after this one's answer
        }
        let gaps = zip(slots.dropFirst(), slots).map { ($0 - $1) / ms }
        #expect(gaps == [1, 100, 200, 400, 400])
        #expect(t.failures(alice) == 6)
    }

    /// Attempts are counted when admitted: a burst of parallel guesses gets the same spacing.
    @Test func parallelGuessesAreSpacedLikeSequentialOnes() {
        var t = GuessThrottle(rule: .init(freeTries: 2, delay: 100 * ms, maxDelay: 400 * ms))
        let slots = (0..<5).map { _ in t.admit(alice, now: 0).at / ms }
        #expect(slots == [0, 0, 100, 300, 700])
    }

    @Test func anAcceptedPINStartsAfresh() {
        var t = GuessThrottle(rule: .init(freeTries: 1, delay: 100 * ms, maxDelay: 400 * ms))
        _ = t.admit(alice, now: 0)
        t.rejected(alice)
        #expect(t.admit(alice, now: 0).at == 100 * ms)
        t.accepted(alice)
        #expect(t.failures(alice) == 0)
        #expect(t.admit(alice, now: 200 * ms) == (200 * ms, 0))
    }

    /// Per (uid, token): another user, or the same user on another token, is not slowed.
    @Test func othersAreNotSlowed() {
        var t = GuessThrottle(rule: .init(freeTries: 1, delay: 100 * ms, maxDelay: 400 * ms))
        #expect(t.admit(alice, now: 0).at == 0)
        #expect(t.admit(alice, now: 0).at == 100 * ms)
        #expect(t.admit(.init(uid: 1001, token: "t1"), now: 0).at == 0)
        #expect(t.admit(.init(uid: 1000, token: "t2"), now: 0).at == 0)
    }
}
