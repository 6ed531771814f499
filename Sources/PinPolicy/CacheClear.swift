/// Why a caller's login on a token ended (its cached PIN wiped, or its held login released),
/// as `Manager1.CacheCleared` tells the caller (issue 15 §3).
public enum ClearReason: String, Sendable, Equatable, CaseIterable {
    /// The caller logged out, or closed its last session on the token.
    case logout
    /// Idle for its `PinCacheTimeout`.
    case timeout
    /// Used as many times as `PinCacheMaxUses` (or a key usage class's limit) allows.
    case uses
    /// The card left its reader.
    case removal
    /// The caller's desktop session was locked (logind).
    case lock
    /// The machine is going to sleep (logind).
    case suspend
    /// An administrator's `FlushCaches`.
    case flush
    /// The token rejected a cached PIN, or reports its PIN locked or changed.
    case stale
    /// A rule ended it: `P11_LogoutAfterSign`, or a reload that changed the caller's mode.
    case policy
}

/// One caller whose login on a token ended, and why.
public struct CacheClear: Sendable, Equatable {
    public let caller: CallerID
    public let reason: ClearReason

    public init(_ caller: CallerID, _ reason: ClearReason) {
        self.caller = caller
        self.reason = reason
    }
}

/// Limits on how often a cached PIN may be used (issue 15 §4): after `maxUses` private-key
/// operations in all, or `maxUsesByKeyUsage[bit]` operations with keys whose certificate has
/// that key usage bit, the PIN is wiped. 0 or absent: no limit.
public struct UseLimits: Sendable, Equatable {
    public var maxUses: UInt32 = 0
    public var maxUsesByKeyUsage: [UInt32: UInt32] = [:]

    public init(maxUses: UInt32 = 0, maxUsesByKeyUsage: [UInt32: UInt32] = [:]) {
        self.maxUses = maxUses
        self.maxUsesByKeyUsage = maxUsesByKeyUsage.filter { $0.value != 0 }
    }

    public var isUnlimited: Bool { maxUses == 0 && maxUsesByKeyUsage.isEmpty }
}
