/// A D-Bus object path, valid by construction.
///
/// Validation follows the D-Bus specification ("Valid Object Paths"): `/` alone, or `/`
/// followed by non-empty elements of `[A-Za-z0-9_]` separated by single slashes, with
/// no trailing slash. Because every `ObjectPath` is valid, libdbus's argument checks
/// (which abort the process by default) can never fire on one.
public struct ObjectPath: Hashable, Sendable, CustomStringConvertible, Comparable {
    /// The path as text, e.g. `/org/pincache/token/1`.
    public let rawValue: String

    /// Validates `string`; nil if it is not a valid object path.
    public init?(_ string: String) {
        guard ObjectPath.isValid(string) else { return nil }
        rawValue = string
    }

    private init(unchecked: String) { rawValue = unchecked }

    /// `/`.
    public static let root = ObjectPath(unchecked: "/")

    /// This path with one more element; nil if `element` is not `[A-Za-z0-9_]+`.
    public func appending(_ element: String) -> ObjectPath? {
        guard ObjectPath.isValidElement(element.utf8) else { return nil }
        return ObjectPath(unchecked: self == .root ? "/" + element : rawValue + "/" + element)
    }

    /// True if this path lies strictly below `other` (`/a/b` is a descendant of `/a` and
    /// of `/`, but not of itself nor of `/ab`).
    public func isDescendant(of other: ObjectPath) -> Bool {
        if other == .root { return self != .root }
        return rawValue.hasPrefix(other.rawValue + "/")
    }

    /// The path elements, e.g. `["org", "pincache"]`; empty for `/`.
    public var elements: [Substring] {
        rawValue.split(separator: "/")
    }

    /// The path one element up; nil for `/`.
    public var parent: ObjectPath? {
        guard self != .root, let slash = rawValue.lastIndex(of: "/") else { return nil }
        return slash == rawValue.startIndex ? .root : ObjectPath(unchecked: String(rawValue[..<slash]))
    }

    public var description: String { rawValue }

    public static func < (lhs: ObjectPath, rhs: ObjectPath) -> Bool { lhs.rawValue < rhs.rawValue }

    static func isValid(_ string: String) -> Bool {
        let bytes = Array(string.utf8)
        guard bytes.first == UInt8(ascii: "/") else { return false }
        if bytes.count == 1 { return true }
        guard bytes.last != UInt8(ascii: "/") else { return false }
        return bytes.dropFirst().split(separator: UInt8(ascii: "/"), omittingEmptySubsequences: false)
            .allSatisfy { isValidElement($0) }
    }

    static func isValidElement<C: Collection<UInt8>>(_ element: C) -> Bool {
        !element.isEmpty && element.allSatisfy { isAlphanumeric($0) || $0 == UInt8(ascii: "_") }
    }
}

func isAlphanumeric(_ c: UInt8) -> Bool {
    (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5A) || (c >= 0x61 && c <= 0x7A)
}
