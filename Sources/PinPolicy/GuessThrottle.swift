/// How fast one user may try PINs on one token (issue 12 §3): a few attempts at once, then
/// each further attempt waits a delay that doubles up to a ceiling, until a PIN is accepted.
/// Keyed by (uid, token) across all of that user's environments, so opening more
/// connections buys no speed.
///
/// Pure bookkeeping with a caller-supplied monotonic clock. The service admits an attempt
/// (learning when it may run), runs it off the token's thread once that time has come, and
/// reports the verdict. Attempts are counted when admitted, not when they fail, so a burst of
/// parallel guesses is spaced out like a sequence of them.
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
        /// Attempts admitted since the last accepted PIN.
        var attempts = 0
        /// Consecutive wrong PINs reported since the last accepted PIN.
        var failures = 0
        /// When the last admitted attempt was allowed to run.
        var lastSlot: UInt64 = 0
    }

    public var rule: Rule
    private var entries: [Key: Entry] = [:]

    public init(rule: Rule = Rule()) { self.rule = rule }

    /// Admits one attempt arriving at `now`.
    /// - Returns: when it may run (`now` or later), and how many attempts came before it
    ///   since the last accepted PIN.
    public mutating func admit(_ key: Key, now: UInt64) -> (at: UInt64, previous: Int) {
        var e = entries[key, default: Entry()]
        let wait = rule.wait(after: e.attempts)
        // The first attempt has nothing to be spaced from.
        let at = wait == 0 || e.attempts == 0 ? now : max(now, e.lastSlot &+ wait)
        let previous = e.attempts
        e.attempts += 1
        e.lastSlot = at
        entries[key] = e
        return (at, previous)
    }

    /// The token accepted the PIN: this user starts afresh on this token.
    public mutating func accepted(_ key: Key) {
        entries[key] = nil
    }

    /// The token rejected the PIN.
    /// - Returns: consecutive wrong PINs of this user on this token, this one included.
    @discardableResult
    public mutating func rejected(_ key: Key) -> Int {
        var e = entries[key, default: Entry()]
        e.failures += 1
        entries[key] = e
        return e.failures
    }

    /// Consecutive wrong PINs of `key` since its last accepted PIN.
    public func failures(_ key: Key) -> Int { entries[key]?.failures ?? 0 }
}
