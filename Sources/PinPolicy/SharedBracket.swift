/// One backend login serving the waiting private operations of several environments (issue 14
/// §1). PKCS#11 logins belong to the token, not to a session, so whoever runs while the
/// backend is logged in rides that login: a shared bracket may therefore only ever serve
/// environments that hold a cached PIN identical to the one that opened it — exactly what
/// each of them would have presented in a bracket of its own.
///
/// The bracket never reorders work: it stays open only while the very next queued job is a
/// private operation of such an environment, so callers with other PINs, or no PIN, wait no
/// longer than they would without sharing. The limits bound how long one login stays open
/// and how much one PIN verification vouches for.
public struct SharedBracket: @unchecked Sendable {
    /// Private operations one login may serve, the first included.
    public static let maximumOperations = 32
    /// How long one login may stay open, from its C_Login (nanoseconds): long enough for a few
    /// operations of a slow card (a signature there takes 100–500 ms), short enough that one
    /// PIN verification never vouches for long.
    public static let maximumNanoseconds: UInt64 = 2_000_000_000

    /// The PIN the backend was logged in with (the opening environment's cached PIN, by
    /// reference: never copied out of locked memory).
    public let pin: SecretPIN
    /// When the backend login was made (monotonic nanoseconds).
    public let opened: UInt64
    /// Operations served so far under this login.
    public private(set) var served: Int

    public init(pin: SecretPIN, opened: UInt64) {
        self.pin = pin
        self.opened = opened
        self.served = 1
    }

    /// Whether an operation planned with `pin` may run in this login: the PINs are identical
    /// (compared in constant time) and the limits are not reached.
    public func admits(_ pin: SecretPIN, now: UInt64) -> Bool {
        // Both comparisons run whatever the limits say, so timing tells nothing about the PIN.
        let same = self.pin.constantTimeEquals(pin)
        return same && withinLimits(now: now, adding: 1)
    }

    public mutating func serve() { served += 1 }

    /// Whether the login may stay open after the operation that just ran, for a next one.
    public func mayStayOpen(now: UInt64) -> Bool { withinLimits(now: now, adding: 1) }

    private func withinLimits(now: UInt64, adding: Int) -> Bool {
        served + adding <= Self.maximumOperations && now &- opened < Self.maximumNanoseconds
    }
}

extension SecretPIN {
    /// Equality of two PINs in time that depends on neither's contents nor length: every one
    /// of the slots' bytes is compared.
    public func constantTimeEquals(_ other: SecretPIN) -> Bool {
        if self === other { return count > 0 }
        return withBytes { a in
            other.withBytes { b in
                var diff = UInt(bitPattern: a.count ^ b.count)
                let n = Swift.max(a.count, b.count)
                // The slots are zero beyond each PIN's length, but the buffers handed out stop
                // at it: read past either end as 0, which costs the same every time.
                for i in 0..<SecretPIN.maximumLength {
                    let x: UInt8 = i < a.count ? a[i] : 0
                    let y: UInt8 = i < b.count ? b[i] : 0
                    diff |= UInt(x ^ y)
                }
                return diff == 0 && n > 0
            }
        }
    }
}
