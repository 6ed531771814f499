/// Reads the X.509 keyUsage extension, the input of `ForceLoginBeforeSignKeyUsage`.
public enum CertificateKeyUsage {
    /// The nonRepudiation (contentCommitment) bit in the seed's mask.
    public static let nonRepudiation: UInt32 = 0x40
    /// The digitalSignature bit.
    public static let digitalSignature: UInt32 = 0x80
    /// The keyEncipherment bit.
    public static let keyEncipherment: UInt32 = 0x20
    /// The decipherOnly bit (the ninth bit of the BIT STRING).
    public static let decipherOnly: UInt32 = 0x8000

    /// The keyUsage extension (2.5.29.15) of a DER certificate as the seed's mask: the first
    /// byte of the BIT STRING as is (0x80 digitalSignature, 0x40 nonRepudiation,
    /// 0x20 keyEncipherment, …), decipherOnly → 0x8000.
    ///
    /// Returns nil if the extension is absent or the DER is malformed. A strict, bounds-checked
    /// DER walker that descends only along Certificate → TBSCertificate → extensions, so
    /// hostile input can cost neither a trap nor deep recursion.
    public static func parse(certificateDER: [UInt8]) -> UInt32? {
        certificateDER.withUnsafeBufferPointer { buffer in
            var input = DERReader(buffer[...])
            guard var certificate = input.read(tag: 0x30), input.isAtEnd,
                  var tbs = certificate.read(tag: 0x30),
                  certificate.read(tag: 0x30) != nil,      // signatureAlgorithm
                  certificate.read(tag: 0x03) != nil,      // signatureValue
                  certificate.isAtEnd
            else { return nil }

            if tbs.peekTag == 0xA0 { guard tbs.read(tag: 0xA0) != nil else { return nil } }   // version
            guard tbs.read(tag: 0x02) != nil else { return nil }                                 // serialNumber
            for _ in 0..<5 {   // signature, issuer, validity, subject, subjectPublicKeyInfo
                guard tbs.read(tag: 0x30) != nil else { return nil }
            }
            for optionalTag: UInt8 in [0x81, 0xA1, 0x82, 0xA2] where tbs.peekTag == optionalTag {
                // issuerUniqueID / subjectUniqueID (primitive or, leniently, constructed)
                guard tbs.read(tag: optionalTag) != nil else { return nil }
            }
            guard !tbs.isAtEnd else { return nil }   // no extensions: no keyUsage
            guard var explicit = tbs.read(tag: 0xA3), tbs.isAtEnd,
                  var extensions = explicit.read(tag: 0x30), explicit.isAtEnd
            else { return nil }

            var found: UInt32?
            while !extensions.isAtEnd {
                guard var ext = extensions.read(tag: 0x30), let oid = ext.read(tag: 0x06) else { return nil }
                if ext.peekTag == 0x01 { guard ext.read(tag: 0x01) != nil else { return nil } }   // critical
                guard var value = ext.read(tag: 0x04), ext.isAtEnd else { return nil }
                guard oid.bytes.elementsEqual(keyUsageOID) else { continue }
                // RFC 5280 §4.2: a certificate must not carry an extension twice.
                guard found == nil, let bits = value.read(tag: 0x03), value.isAtEnd,
                      let mask = keyUsageMask(bits.bytes)
                else { return nil }
                found = mask
            }
            return found
        }
    }

    /// 2.5.29.15 in DER.
    private static let keyUsageOID: [UInt8] = [0x55, 0x1D, 0x0F]

    /// BIT STRING contents (unused-bit count, then bits) → mask. Strict DER: at most the two
    /// bytes keyUsage's nine bits need, unused bits zero.
    private static func keyUsageMask(_ content: Slice<UnsafeBufferPointer<UInt8>>) -> UInt32? {
        guard let unused = content.first, unused <= 7 else { return nil }
        let bits = content.dropFirst()
        guard bits.count <= 2 else { return nil }
        guard let last = bits.last else { return unused == 0 ? 0 : nil }
        guard last & UInt8((1 << Int(unused)) - 1) == 0 else { return nil }
        var mask = UInt32(bits[bits.startIndex])
        if bits.count == 2 { mask |= UInt32(bits[bits.startIndex + 1] & 0x80) << 8 }
        return mask
    }
}

/// A cursor over DER bytes. Every read checks bounds; a malformed element yields nil and
/// the caller gives up.
private struct DERReader {
    private(set) var bytes: Slice<UnsafeBufferPointer<UInt8>>

    init(_ bytes: Slice<UnsafeBufferPointer<UInt8>>) { self.bytes = bytes }

    var isAtEnd: Bool { bytes.isEmpty }
    var peekTag: UInt8? { bytes.first }

    /// Reads one element with exactly this (single-byte) tag and returns a reader over its
    /// contents; nil on a different tag, high-tag-number form, indefinite or non-minimal
    /// length, or a length past the end.
    mutating func read(tag expected: UInt8) -> DERReader? {
        var cursor = bytes.startIndex
        let end = bytes.endIndex
        guard cursor < end, bytes[cursor] == expected, expected & 0x1F != 0x1F else { return nil }
        cursor += 1
        guard cursor < end else { return nil }
        let first = bytes[cursor]
        cursor += 1
        var length: Int
        if first < 0x80 {
            length = Int(first)
        } else {
            let count = Int(first & 0x7F)
            // 0x80 is BER's indefinite form; more than 4 length bytes is more than any certificate.
            guard count >= 1, count <= 4, end - cursor >= count else { return nil }
            length = 0
            for _ in 0..<count {
                length = length << 8 | Int(bytes[cursor])
                cursor += 1
            }
            // DER: the shortest form, so no leading zero byte and no long form below 128.
            guard length >= 0x80, length >> (8 * (count - 1)) != 0 else { return nil }
        }
        guard length <= end - cursor else { return nil }
        let contents = DERReader(bytes[cursor..<(cursor + length)])
        bytes = bytes[(cursor + length)...]
        return contents
    }
}

extension Settings {
    /// Whether a signature with a key of this key usage needs the PIN again
    /// (`ForceLoginBeforeSignKeyUsage`): only the nonRepudiation bit is supported. `keyUsage`
    /// is nil when the key has no certificate or the certificate has no keyUsage.
    public func requiresFreshPIN(keyUsage: UInt32?) -> Bool {
        guard let keyUsage else { return false }
        return forceLoginKeyUsage & keyUsage & CertificateKeyUsage.nonRepudiation != 0
    }
}
