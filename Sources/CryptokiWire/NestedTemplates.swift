/// An array attribute's value on the wire (CKA_WRAP_TEMPLATE, …: CKF_ARRAY_ATTRIBUTE): the
/// template it holds, flattened — per entry its type and its value's length as little-endian
/// u64s, then the value — so no pointer crosses a process boundary. One level: an entry that
/// is an array attribute itself is malformed. The daemon's module binding reads and writes
/// the same bytes (PKCS11Kit's NestedTemplate; PincacheServiceTests checks they agree).
public enum NestedTemplates {
    /// Most entries a nested template may hold.
    public static let maxEntries = 64
    /// CKF_ARRAY_ATTRIBUTE.
    public static let arrayFlag: UInt64 = 0x4000_0000

    public static func flatten(_ entries: [(type: UInt64, value: [UInt8])]) -> [UInt8] {
        var out: [UInt8] = []
        for entry in entries {
            for n in [entry.type, UInt64(entry.value.count)] { withUnsafeBytes(of: n.littleEndian) { out += $0 } }
            out += entry.value
        }
        return out
    }

    /// The entries, or nil when the bytes are cut short, hold more than `maxEntries` entries
    /// or an array attribute.
    public static func parse(_ bytes: [UInt8]) -> [(type: UInt64, value: [UInt8])]? {
        var entries: [(type: UInt64, value: [UInt8])] = []
        var at = 0
        func u64() -> UInt64? {
            guard bytes.count - at >= 8 else { return nil }
            defer { at += 8 }
            return bytes[at..<at + 8].reversed().reduce(0) { $0 << 8 | UInt64($1) }
        }
        while at < bytes.count {
            guard entries.count < maxEntries, let type = u64(), type & arrayFlag == 0, let length = u64(),
                length <= UInt64(bytes.count - at)
            else { return nil }
            entries.append((type, Array(bytes[at..<at + Int(length)])))
            at += Int(length)
        }
        return entries
    }
}
