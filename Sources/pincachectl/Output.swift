import DBusKit
import Foundation

/// Lower-case hex, the form key ids take on the command line too.
func hex(_ bytes: [UInt8]) -> String {
    bytes.map { String(format: "%02x", $0) }.joined()
}

/// Parses hex with optional ':' or ' ' separators and an optional 0x prefix; nil when malformed.
func parseHex(_ text: String) -> [UInt8]? {
    var s = Substring(text.filter { $0 != ":" && $0 != " " })
    if s.hasPrefix("0x") || s.hasPrefix("0X") { s = s.dropFirst(2) }
    guard !s.isEmpty, s.count % 2 == 0 else { return nil }
    var out: [UInt8] = []
    out.reserveCapacity(s.count / 2)
    var index = s.startIndex
    while index < s.endIndex {
        let next = s.index(index, offsetBy: 2)
        guard let byte = UInt8(s[index..<next], radix: 16) else { return nil }
        out.append(byte)
        index = next
    }
    return out
}

/// A D-Bus value as JSON: variants unwrapped, `ay` as hex, object paths as strings.
func jsonObject(_ value: DBusValue) -> Any {
    switch value {
    case .byte(let v): return Int(v)
    case .boolean(let v): return v
    case .int16(let v): return Int(v)
    case .uint16(let v): return Int(v)
    case .int32(let v): return Int(v)
    case .uint32(let v): return Int(v)
    case .int64(let v): return v
    case .uint64(let v): return v
    case .double(let v): return v
    case .string(let v), .signature(let v): return v
    case .objectPath(let v): return v.rawValue
    case .unixFD(let v): return Int(v)
    case .bytes(let v): return hex(v)
    case .array(_, let values): return values.map(jsonObject)
    case .dictionary(_, _, let entries):
        var dict: [String: Any] = [:]
        for entry in entries { dict[jsonKey(entry.key)] = jsonObject(entry.value) }
        return dict
    case .structure(let fields): return fields.map(jsonObject)
    case .variant(let inner): return jsonObject(inner)
    }
}

private func jsonKey(_ value: DBusValue) -> String {
    switch value {
    case .string(let s), .signature(let s): s
    case .objectPath(let p): p.rawValue
    default: "\(jsonObject(value))"
    }
}

func jsonDict(_ dict: [String: DBusValue]) -> [String: Any] {
    dict.mapValues(jsonObject)
}

/// Writes `object` as JSON on stdout; `pretty` for listings, one line per event for `watch`.
func printJSON(_ object: Any, pretty: Bool = true) {
    var options: JSONSerialization.WritingOptions = [.sortedKeys, .withoutEscapingSlashes]
    if pretty { options.insert(.prettyPrinted) }
    guard let data = try? JSONSerialization.data(withJSONObject: object, options: options) else {
        writeStderr("pincachectl: cannot encode JSON")
        return
    }
    FileHandle.standardOutput.write(data)
    FileHandle.standardOutput.write(Data("\n".utf8))
}

func writeStderr(_ line: String) {
    FileHandle.standardError.write(Data((line + "\n").utf8))
}

/// Left-aligned columns separated by two spaces; a header row and no trailing blanks.
func table(_ header: [String], _ rows: [[String]]) -> String {
    let all = [header] + rows
    var widths = [Int](repeating: 0, count: header.count)
    for row in all {
        for (i, cell) in row.enumerated() where i < widths.count { widths[i] = max(widths[i], cell.count) }
    }
    return all.map { row in
        row.enumerated().map { i, cell in
            i == row.count - 1 ? cell : cell.padding(toLength: widths[i], withPad: " ", startingAt: 0)
        }.joined(separator: "  ")
    }.joined(separator: "\n")
}

func yesNo(_ value: DBusValue?) -> String {
    switch value?.boolValue {
    case true?: "yes"
    case false?: "no"
    case nil: "-"
    }
}

/// The text form of a property value for tables and `watch`.
func display(_ value: DBusValue?) -> String {
    guard let value else { return "-" }
    switch value {
    case .boolean(let b): return b ? "yes" : "no"
    case .string(let s): return s.isEmpty ? "\"\"" : s
    case .objectPath(let p): return p.rawValue
    case .bytes(let b): return hex(b)
    case .variant(let v): return display(v)
    case .array(_, let values): return "[" + values.map { display($0) }.joined(separator: ", ") + "]"
    default:
        if let n = jsonObject(value) as? Int { return String(n) }
        return "\(jsonObject(value))"
    }
}

func tokenTable(_ tokens: [TokenInfo]) -> String {
    let rows = tokens.map { t -> [String] in
        let p = t.properties
        let module = (p["Module"]?.stringValue).map { ($0 as NSString).lastPathComponent } ?? "-"
        return [t.id, display(p["Label"]), display(p["Serial"]), display(p["Kind"]), yesNo(p["Present"]),
                yesNo(p["Recognized"]), module]
    }
    return table(["ID", "LABEL", "SERIAL", "KIND", "PRESENT", "RECOGNIZED", "MODULE"], rows)
}

/// Tokens for `--json`: their properties plus `Path` and `Id`.
func tokenJSON(_ tokens: [TokenInfo]) -> [[String: Any]] {
    tokens.map { t in
        var d = jsonDict(t.properties)
        d["Path"] = t.path.rawValue
        d["Id"] = t.id
        return d
    }
}

func keyTable(_ keys: [[String: DBusValue]]) -> String {
    let rows = keys.map { k -> [String] in
        let usage = k["KeyUsage"]?.uint32Value.map { "0x" + String($0, radix: 16) } ?? "-"
        let certificate = (k["Certificate"]?.bytesValue?.isEmpty == false) ? "yes" : "no"
        return [k["Id"]?.bytesValue.map(hex) ?? "-", display(k["Label"]), display(k["KeyType"]), display(k["Bits"]),
                yesNo(k["CanSign"]), yesNo(k["CanDecrypt"]), usage, yesNo(k["AlwaysAuthenticate"]), certificate]
    }
    return table(["ID", "LABEL", "TYPE", "BITS", "SIGN", "DECRYPT", "KEYUSAGE", "ALWAYSAUTH", "CERT"], rows)
}
