// Validators for the names and signatures libdbus would otherwise check itself: its
// checks abort the process by default, so every string reaches libdbus pre-validated.

/// D-Bus name and signature rules (D-Bus specification, "Valid Names", "Signatures").
public enum DBusNames {
    static let maxNameLength = 255
    static let maxSignatureLength = 255
    /// Nesting limits of the specification: 32 arrays and 32 structs (dict entries count as structs).
    static let maxArrayDepth = 32
    static let maxStructDepth = 32

    /// `org.example.Interface1`: two or more elements of `[A-Za-z_][A-Za-z0-9_]*`.
    public static func isValidInterface(_ name: String) -> Bool {
        let bytes = Array(name.utf8)
        guard !bytes.isEmpty, bytes.count <= maxNameLength else { return false }
        let parts = bytes.split(separator: UInt8(ascii: "."), omittingEmptySubsequences: false)
        return parts.count >= 2 && parts.allSatisfy { isIdentifier($0, allowDash: false) }
    }

    /// Error names follow the interface-name rules.
    public static func isValidErrorName(_ name: String) -> Bool { isValidInterface(name) }

    /// `Member`: `[A-Za-z_][A-Za-z0-9_]*`, at most 255 bytes.
    public static func isValidMember(_ name: String) -> Bool {
        let bytes = Array(name.utf8)
        return bytes.count <= maxNameLength && isIdentifier(bytes[...], allowDash: false)
    }

    /// A unique (`:1.42`) or well-known (`org.pincache.Daemon`) bus name.
    public static func isValidBusName(_ name: String) -> Bool {
        var bytes = Array(name.utf8)[...]
        guard !bytes.isEmpty, bytes.count <= maxNameLength else { return false }
        let unique = bytes.first == UInt8(ascii: ":")
        if unique { bytes = bytes.dropFirst() }
        let parts = bytes.split(separator: UInt8(ascii: "."), omittingEmptySubsequences: false)
        guard parts.count >= 2 else { return false }
        return parts.allSatisfy { part in
            guard let first = part.first else { return false }
            // Elements of unique names may start with a digit; well-known ones may not.
            if !unique && first >= 0x30 && first <= 0x39 { return false }
            return part.allSatisfy { isAlphanumeric($0) || $0 == UInt8(ascii: "_") || $0 == UInt8(ascii: "-") }
        }
    }

    /// A whole signature: zero or more single complete types, at most 255 bytes, within
    /// the nesting limits.
    public static func isValidSignature(_ signature: String) -> Bool {
        splitSignature(signature) != nil
    }

    /// Exactly one complete type, e.g. `a{sv}`.
    public static func isSingleCompleteType(_ signature: String) -> Bool {
        splitSignature(signature)?.count == 1
    }

    /// Splits a signature into its complete types (`"sa{sv}(ii)"` → `["s", "a{sv}", "(ii)"]`);
    /// nil if the signature is invalid.
    public static func splitSignature(_ signature: String) -> [String]? {
        let bytes = Array(signature.utf8)
        guard bytes.count <= maxSignatureLength else { return nil }
        var result: [String] = []
        var index = 0
        while index < bytes.count {
            let start = index
            guard parseCompleteType(bytes, &index, arrayDepth: 0, structDepth: 0) else { return nil }
            result.append(String(decoding: bytes[start..<index], as: UTF8.self))
        }
        return result
    }

    static let basicTypeCodes: Set<UInt8> = Set("ybnqiuxtdsogh".utf8)

    /// True for a single basic type code (valid dict-entry keys).
    static func isBasicType(_ signature: String) -> Bool {
        let bytes = Array(signature.utf8)
        return bytes.count == 1 && basicTypeCodes.contains(bytes[0])
    }

    private static func parseCompleteType(_ s: [UInt8], _ i: inout Int, arrayDepth: Int, structDepth: Int) -> Bool {
        guard i < s.count else { return false }
        let c = s[i]
        i += 1
        if basicTypeCodes.contains(c) || c == UInt8(ascii: "v") { return true }
        switch c {
        case UInt8(ascii: "a"):
            guard arrayDepth < maxArrayDepth, i < s.count else { return false }
            if s[i] == UInt8(ascii: "{") {
                // A dict entry is only legal directly inside an array, with a basic key.
                guard structDepth < maxStructDepth else { return false }
                i += 1
                guard i < s.count, basicTypeCodes.contains(s[i]) else { return false }
                i += 1
                guard parseCompleteType(s, &i, arrayDepth: arrayDepth + 1, structDepth: structDepth + 1),
                      i < s.count, s[i] == UInt8(ascii: "}") else { return false }
                i += 1
                return true
            }
            return parseCompleteType(s, &i, arrayDepth: arrayDepth + 1, structDepth: structDepth)
        case UInt8(ascii: "("):
            guard structDepth < maxStructDepth, i < s.count, s[i] != UInt8(ascii: ")") else { return false }
            while i < s.count && s[i] != UInt8(ascii: ")") {
                guard parseCompleteType(s, &i, arrayDepth: arrayDepth, structDepth: structDepth + 1) else { return false }
            }
            guard i < s.count else { return false }
            i += 1
            return true
        default:
            return false
        }
    }

    private static func isIdentifier(_ part: ArraySlice<UInt8>, allowDash: Bool) -> Bool {
        guard let first = part.first, !(first >= 0x30 && first <= 0x39) else { return false }
        return part.allSatisfy { isAlphanumeric($0) || $0 == UInt8(ascii: "_") || (allowDash && $0 == UInt8(ascii: "-")) }
    }
}
