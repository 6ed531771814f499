/// The token's PIN state as its `CKF_USER_PIN_*` flags report it. Any of them means a cached
/// PIN may be stale and must not be presented (DESIGN §1 "A wrong PIN is never replayed").
public struct PinStatus: OptionSet, Sendable, Hashable {
    /// The `CK_TOKEN_INFO.flags` bits themselves.
    public let rawValue: UInt

    public init(rawValue: UInt) { self.rawValue = rawValue }

    /// `CKF_USER_PIN_COUNT_LOW`: a wrong PIN was entered since the last success.
    public static let countLow = PinStatus(rawValue: 0x0001_0000)
    /// `CKF_USER_PIN_FINAL_TRY`: one more wrong PIN locks the token.
    public static let finalTry = PinStatus(rawValue: 0x0002_0000)
    /// `CKF_USER_PIN_LOCKED`.
    public static let locked = PinStatus(rawValue: 0x0004_0000)

    /// A wrong PIN was entered since the last successful login (count low or final try): a
    /// cached PIN is held back until a login succeeds and the token clears the flags.
    public var wrongPINSinceLastLogin: Bool { !intersection([.countLow, .finalTry]).isEmpty }

    /// Keeps only the user-PIN bits of a token's `CK_TOKEN_INFO.flags`.
    public init(tokenFlags: UInt) {
        rawValue = tokenFlags & (Self.countLow.rawValue | Self.finalTry.rawValue | Self.locked.rawValue)
    }
}
