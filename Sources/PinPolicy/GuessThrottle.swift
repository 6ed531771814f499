/// How fast one user may try PINs on one token (issue 12 §3): after `freeTries` wrong PINs in
/// a row, each further attempt waits a delay that doubles up to a ceiling, until a PIN is
/// accepted. Keyed by (uid, token) across all of that user's environments, so opening more
/// connections buys no speed.
///
/// Pure bookkeeping with a caller-supplied monotonic clock. The service admits an attempt
/// (learning when it may run), runs it off the token's thread once that time has come, and
/// reports every admitted attempt's verdict exactly once. At most `freeTries` (at least one)
/// attempts are unanswered at a time: a burst of parallel guesses is answered a few at a
/// time and so meets the delays their failures earn, while a burst of correct logins (a
/// session starting several programs) only queues, without any delay.
public struct GuessThrottle: Sendable {
    public struct Key: Hashable, Sendable {
        public let uid: UInt32
        public let token: String
        public init(uid: UInt32, token: String) {
            self.uid = uid
            self.token = token
        }
    }

    /// The configured rule (`PinFailureFreeTries`, `PinFailureDelay`, `PinFailureMaxDelay`).
    public struct Rule: Sendable, Equatable {
        /// Attempts allowed without delay after the last accepted PIN.
        public var freeTries: Int
        /// Delay before the first throttled attempt, in nanoseconds; 0 turns throttling off.
        public var delay: UInt64
        /// Ceiling of the doubling delay, in nanoseconds.
        public var maxDelay: UInt64

        public init(freeTries: Int = 3, delay: UInt64 = 1_000_000_000, maxDelay: UInt64 = 30_000_000_000) {
            self.freeTries = freeTries
            self.delay = delay
            self.maxDelay = max(maxDelay, delay)
        }

        /// The wait before an attempt that follows `attempts` unaccepted ones.
        public func wait(after attempts: Int) -> UInt64 {
            guard delay > 0, attempts >= freeTries else { return 0 }
            let doublings = attempts - freeTries
            // 2^doublings overflows long after the ceiling is reached.
            guard doublings < 40 else { return max(maxDelay, delay) }
            return min(delay << UInt64(doublings), max(maxDelay, delay))
        }
    }

    private struct Entry: Sendable {
        /// Consecutive wrong PINs reported since the last accepted PIN.
        var failures = 0
        /// Attempts admitted and not yet reported.
        var pending = 0
        /// When the last admitted attempt was allowed to run: the next waits from there.
        var lastSlot: UInt64 = 0
    }

    public var rule: Rule
    private var entries: [Key: Entry] = [:]

    public init(rule: Rule = Rule()) { self.rule = rule }

    /// Admits one attempt arriving at `now`: when it may run (`now` or later), or nil when as
    /// many attempts as `freeTries` are still unanswered (ask again once one is reported).
    public mutating func admit(_ key: Key, now: UInt64) -> UInt64? {
        var e = entries[key, default: Entry()]
        guard e.pending < max(rule.freeTries, 1) else { return nil }
        let wait = rule.wait(after: e.failures)
        let at = wait == 0 ? now : max(now, e.lastSlot &+ wait)
        e.lastSlot = at
        e.pending += 1
        entries[key] = e
        return at
    }

    /// How an admitted attempt ended.
    public enum Verdict: Sendable { case accepted, rejected, other }

    /// Reports an admitted attempt.
    /// - Returns: consecutive wrong PINs of this user on this token, this one included.
    @discardableResult
    public mutating func report(_ key: Key, _ verdict: Verdict) -> Int {
        var e = entries[key, default: Entry()]
        e.pending = max(e.pending - 1, 0)
        switch verdict {
        case .accepted:
            e.failures = 0
            e.lastSlot = 0
        case .rejected: e.failures += 1
        case .other: break
        }
        entries[key] = e.failures == 0 && e.pending == 0 ? nil : e
        return e.failures
    }

    /// Consecutive wrong PINs of `key` since its last accepted PIN.
    public func failures(_ key: Key) -> Int { entries[key]?.failures ?? 0 }
}
