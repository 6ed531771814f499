import DBusKit

/// A PKCS#11 URI (RFC 7512) naming a token and, optionally, a key on it, as p11tool,
/// pkcs11-tool and OpenSSL's providers print them: `pkcs11:token=My%20Card;id=%01`.
/// Only path attributes are taken. Query attributes are refused: `pin-value` would put a PIN
/// on the command line, and `module-path` would name a module other than pincached's.
struct PKCS11URI {
    /// Path attributes, percent-decoded (`id` is bytes; the others are UTF-8 text).
    var attributes: [String: [UInt8]] = [:]

    /// Token attributes and the Token1 property each is compared with.
    static let tokenAttributes = ["token": "Label", "manufacturer": "Manufacturer", "model": "Model", "serial": "Serial"]
    static let objectAttributes: Set<String> = ["id", "object", "type"]
    /// Attributes that describe the module or the slot: every token pincached serves sits
    /// behind one module (the proxy), so these select nothing here and are accepted as given.
    static let contextAttributes: Set<String> = [
        "library-manufacturer", "library-description", "library-version",
        "slot-manufacturer", "slot-description", "slot-id",
    ]

    static func looksLikeOne(_ text: String) -> Bool { text.lowercased().hasPrefix("pkcs11:") }

    init(parsing text: String) throws(CLIError) {
        guard Self.looksLikeOne(text) else { throw CLIError(.usage, "'\(text)' is not a pkcs11: URI") }
        let body = text.dropFirst("pkcs11:".count)
        if body.contains("?") {
            throw CLIError(.usage, "\(text): query attributes (after '?', such as pin-value) are not taken; the PIN is asked for")
        }
        for part in body.split(separator: ";", omittingEmptySubsequences: true) {
            guard let equals = part.firstIndex(of: "=") else {
                throw CLIError(.usage, "\(text): '\(part)' is not name=value")
            }
            let name = part[..<equals].lowercased()
            guard Self.tokenAttributes[name] != nil || Self.objectAttributes.contains(name)
                || Self.contextAttributes.contains(name)
            else {
                throw CLIError(.usage, "\(text): unknown attribute '\(name)' (RFC 7512 path attributes only)")
            }
            guard attributes[name] == nil else { throw CLIError(.usage, "\(text): '\(name)' given twice") }
            guard let value = Self.percentDecoded(part[part.index(after: equals)...]) else {
                throw CLIError(.usage, "\(text): bad percent-encoding in '\(name)'")
            }
            attributes[name] = value
        }
        if let type = self.text(of: "type"), type != "private" {
            throw CLIError(.usage, "\(text): type=\(type): pincachectl works with private keys (type=private)")
        }
    }

    func text(of name: String) -> String? { attributes[name].map { String(decoding: $0, as: UTF8.self) } }
    var keyID: [UInt8]? { attributes["id"] }
    var objectLabel: String? { text(of: "object") }
    var namesAKey: Bool { keyID != nil || objectLabel != nil }

    /// Every token attribute the URI gives equals the token's (trailing blanks aside: token
    /// information is blank-padded).
    func matches(_ token: TokenInfo) -> Bool {
        for (name, property) in Self.tokenAttributes {
            guard let wanted = text(of: name) else { continue }
            let have = token.properties[property]?.stringValue ?? ""
            if trimmedRight(have) != trimmedRight(wanted) { return false }
        }
        return true
    }

    /// The key's CKA_ID and CKA_LABEL match what the URI gives.
    func matches(key: [String: DBusValue]) -> Bool {
        if let id = keyID, key["Id"]?.bytesValue != id { return false }
        if let label = objectLabel, key["Label"]?.stringValue != label { return false }
        return true
    }

    static func percentDecoded(_ text: Substring) -> [UInt8]? {
        var out: [UInt8] = []
        var bytes = Array(text.utf8)[...]
        while let b = bytes.popFirst() {
            if b == UInt8(ascii: "%") {
                guard bytes.count >= 2, let v = UInt8(String(decoding: bytes.prefix(2), as: UTF8.self), radix: 16) else {
                    return nil
                }
                out.append(v)
                bytes = bytes.dropFirst(2)
            } else {
                out.append(b)
            }
        }
        return out
    }

    /// Every byte but RFC 3986's unreserved characters percent-encoded (always valid);
    /// `everyByte` for ids, which p11tool also shows fully encoded.
    static func percentEncoded(_ bytes: some Sequence<UInt8>, everyByte: Bool = false) -> String {
        var out = ""
        for b in bytes {
            let c = Character(Unicode.Scalar(b))
            if !everyByte && b < 0x80 && (c.isLetter || c.isNumber || "-._~".contains(c)) {
                out.append(c)
            } else {
                out += "%" + (b < 16 ? "0" : "") + String(b, radix: 16, uppercase: true)
            }
        }
        return out
    }

    /// The URI of a token, in the attribute order p11tool prints.
    static func of(token: TokenInfo) -> String {
        let parts = [("model", "Model"), ("manufacturer", "Manufacturer"), ("serial", "Serial"), ("token", "Label")]
            .map { name, property in
                "\(name)=" + percentEncoded(trimmedRight(token.properties[property]?.stringValue ?? "").utf8)
            }
        return "pkcs11:" + parts.joined(separator: ";")
    }

    /// The URI of a private key on a token.
    static func of(key: [String: DBusValue], on token: TokenInfo) -> String {
        var uri = of(token: token)
        if let id = key["Id"]?.bytesValue { uri += ";id=" + percentEncoded(id, everyByte: true) }
        if let label = key["Label"]?.stringValue, !label.isEmpty { uri += ";object=" + percentEncoded(label.utf8) }
        return uri + ";type=private"
    }
}

private func trimmedRight(_ s: String) -> String {
    var s = Substring(s)
    while s.last == " " { s = s.dropLast() }
    return String(s)
}
