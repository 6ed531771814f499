/// One caller of the service: the unique bus name of its connection (e.g. `:1.42`).
///
/// Each caller owns one cache environment (DESIGN §1); the policy never interprets the
/// name, it only keys state by it, so tests may use any string.
public struct CallerID: Hashable, Sendable, Comparable, CustomStringConvertible {
    /// The unique bus name as the bus reported it.
    public let rawValue: String

    /// Wraps a unique bus name.
    public init(_ raw: String) { rawValue = raw }

    public var description: String { rawValue }

    public static func < (lhs: CallerID, rhs: CallerID) -> Bool { lhs.rawValue < rhs.rawValue }
}
