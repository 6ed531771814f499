import DBusKit
import Glibc
import SystemKit

/// Lower-case hex, the form key ids take on the command line too.
func hex(_ bytes: [UInt8]) -> String { hexString(bytes) }

/// A JSON value, written with sorted keys (stable output for scripts and diffs).
enum JSON: Sendable {
    case null
    case bool(Bool)
    case int(Int64)
    case uint(UInt64)
    case double(Double)
    case string(String)
    case array([JSON])
    case object([String: JSON])

    func rendered(pretty: Bool, indent: String = "") -> String {
        switch self {
        case .null: return "null"
        case .bool(let b): return b ? "true" : "false"
        case .int(let n): return String(n)
        case .uint(let n): return String(n)
        case .double(let d): return d.isFinite ? "\(d)" : "null"
        case .string(let s): return Self.quoted(s)
        case .array(let items):
            if items.isEmpty { return "[]" }
            let inner = indent + "  "
            let parts = items.map { $0.rendered(pretty: pretty, indent: inner) }
            return pretty ? "[\n" + parts.map { inner + $0 }.joined(separator: ",\n") + "\n" + indent + "]"
                : "[" + parts.joined(separator: ",") + "]"
        case .object(let members):
            if members.isEmpty { return "{}" }
            let inner = indent + "  "
            let parts = members.sorted { $0.key < $1.key }.map {
                Self.quoted($0.key) + (pretty ? " : " : ":") + $0.value.rendered(pretty: pretty, indent: inner)
            }
            return pretty ? "{\n" + parts.map { inner + $0 }.joined(separator: ",\n") + "\n" + indent + "}"
                : "{" + parts.joined(separator: ",") + "}"
        }
    }

    /// RFC 8259 string: quote, backslash and control characters escaped, the rest as UTF-8.
    static func quoted(_ s: String) -> String {
        var out = "\""
        for scalar in s.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case _ where scalar.value < 0x20:
                let digits = String(scalar.value, radix: 16)
                out += "\\u" + String(repeating: "0", count: 4 - digits.count) + digits
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out + "\""
    }
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
func jsonObject(_ value: DBusValue) -> JSON {
    switch value {
    case .byte(let v): return .int(Int64(v))
    case .boolean(let v): return .bool(v)
    case .int16(let v): return .int(Int64(v))
    case .uint16(let v): return .int(Int64(v))
    case .int32(let v): return .int(Int64(v))
    case .uint32(let v): return .int(Int64(v))
    case .int64(let v): return .int(v)
    case .uint64(let v): return .uint(v)
    case .double(let v): return .double(v)
    case .string(let v), .signature(let v): return .string(v)
    case .objectPath(let v): return .string(v.rawValue)
    case .unixFD(let v): return .int(Int64(v))
    case .bytes(let v): return .string(hex(v))
    case .array(_, let values): return .array(values.map(jsonObject))
    case .dictionary(_, _, let entries):
        var dict: [String: JSON] = [:]
        for entry in entries { dict[jsonKey(entry.key)] = jsonObject(entry.value) }
        return .object(dict)
    case .structure(let fields): return .array(fields.map(jsonObject))
    case .variant(let inner): return jsonObject(inner)
    }
}

private func jsonKey(_ value: DBusValue) -> String {
    switch value {
    case .string(let s), .signature(let s): s
    case .objectPath(let p): p.rawValue
    default: jsonObject(value).rendered(pretty: false)
    }
}

func jsonDict(_ dict: [String: DBusValue]) -> JSON {
    .object(dict.mapValues(jsonObject))
}

/// Writes `object` as JSON on stdout; `pretty` for listings, one line per event for `watch`.
func printJSON(_ object: JSON, pretty: Bool = true) {
    writeAll(STDOUT_FILENO, object.rendered(pretty: pretty) + "\n")
}

func writeStderr(_ line: String) {
    writeAll(STDERR_FILENO, line + "\n")
}

/// Left-aligned columns separated by two spaces; a header row (unless --no-legend) and no
/// trailing blanks.
func table(_ header: [String], _ rows: [[String]], legend: Bool = true) -> String {
    let all = (legend ? [header] : []) + rows
    var widths = [Int](repeating: 0, count: header.count)
    for row in all {
        for (i, cell) in row.enumerated() where i < widths.count { widths[i] = max(widths[i], cell.count) }
    }
    return all.map { row in
        row.enumerated().map { i, cell in
            i == row.count - 1 ? cell : padded(cell, widths[i])
        }.joined(separator: "  ")
    }.joined(separator: "\n")
}

/// `text` with spaces added up to `width` characters.
func padded(_ text: String, _ width: Int) -> String {
    text.count >= width ? text : text + String(repeating: " ", count: width - text.count)
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
        return jsonObject(value).rendered(pretty: false)
    }
}

func tokenTable(_ tokens: [TokenInfo], legend: Bool = true) -> String {
    let rows = tokens.map { t -> [String] in
        let p = t.properties
        let module = (p["Module"]?.stringValue).map(lastPathComponent) ?? "-"
        return [t.id, display(p["Label"]), display(p["Serial"]), display(p["Kind"]), yesNo(p["Present"]),
                yesNo(p["Recognized"]), module]
    }
    return table(["ID", "LABEL", "SERIAL", "KIND", "PRESENT", "RECOGNIZED", "MODULE"], rows, legend: legend)
}

/// Tokens for `--json`: their properties plus `Path` and `Id`.
func tokenJSON(_ tokens: [TokenInfo]) -> JSON {
    .array(tokens.map { t in
        var d = t.properties.mapValues(jsonObject)
        d["Path"] = .string(t.path.rawValue)
        d["Id"] = .string(t.id)
        d["Uri"] = .string(PKCS11URI.of(token: t))
        return .object(d)
    })
}

/// Keys for `--json`: their ListKeys fields plus `Uri`.
func keyJSON(_ keys: [[String: DBusValue]], on token: TokenInfo) -> JSON {
    .array(keys.map { k in
        var d = k.mapValues(jsonObject)
        d["Uri"] = .string(PKCS11URI.of(key: k, on: token))
        return .object(d)
    })
}

func keyTable(_ keys: [[String: DBusValue]], legend: Bool = true) -> String {
    let rows = keys.map { k -> [String] in
        let usage = k["KeyUsage"]?.uint32Value.map { "0x" + String($0, radix: 16) } ?? "-"
        let certificate = (k["Certificate"]?.bytesValue?.isEmpty == false) ? "yes" : "no"
        return [k["Id"]?.bytesValue.map(hex) ?? "-", display(k["Label"]), display(k["KeyType"]), display(k["Bits"]),
                yesNo(k["CanSign"]), yesNo(k["CanDecrypt"]), usage, yesNo(k["AlwaysAuthenticate"]), certificate]
    }
    return table(["ID", "LABEL", "TYPE", "BITS", "SIGN", "DECRYPT", "KEYUSAGE", "ALWAYSAUTH", "CERT"], rows, legend: legend)
}
