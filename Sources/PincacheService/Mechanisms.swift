import PKCS11Kit

/// The mechanism names of DESIGN §2, each with the PKCS#11 mechanism (and parameters) it stands for.
/// A table, so adding a name is one line and the list in the docs can be generated from it.
enum NamedMechanism {
    enum Use { case sign, decrypt }

    struct Entry {
        let name: String
        let use: Use
        let mechanism: Mechanism
    }

    static let table: [Entry] = [
        Entry(name: "ECDSA", use: .sign, mechanism: Mechanism(.ecdsa)),
        Entry(name: "ECDSA-SHA256", use: .sign, mechanism: Mechanism(.ecdsaSHA256)),
        Entry(name: "ECDSA-SHA384", use: .sign, mechanism: Mechanism(.ecdsaSHA384)),
        Entry(name: "ECDSA-SHA512", use: .sign, mechanism: Mechanism(.ecdsaSHA512)),
        Entry(name: "RSA-PKCS", use: .sign, mechanism: Mechanism(.rsaPKCS)),
        Entry(name: "SHA256-RSA-PKCS", use: .sign, mechanism: Mechanism(.sha256RSAPKCS)),
        Entry(name: "SHA384-RSA-PKCS", use: .sign, mechanism: Mechanism(.sha384RSAPKCS)),
        Entry(name: "SHA512-RSA-PKCS", use: .sign, mechanism: Mechanism(.sha512RSAPKCS)),
        Entry(name: "RSA-PSS-SHA256", use: .sign, mechanism: pss(.sha256RSAPKCSPSS, .sha256, .sha256, 32)),
        Entry(name: "RSA-PSS-SHA384", use: .sign, mechanism: pss(.sha384RSAPKCSPSS, .sha384, .sha384, 48)),
        Entry(name: "RSA-PSS-SHA512", use: .sign, mechanism: pss(.sha512RSAPKCSPSS, .sha512, .sha512, 64)),
        Entry(
            name: "RSA-OAEP-SHA256", use: .decrypt,
            mechanism: Mechanism(.rsaPKCSOAEP, parameter: .oaep(hash: .sha256, mgf: .sha256, sourceData: []))),
        // Beyond DESIGN §2 (names are only ever added): SoftHSM 2.6 and many cards do OAEP with SHA-1 only.
        Entry(
            name: "RSA-OAEP-SHA1", use: .decrypt,
            mechanism: Mechanism(.rsaPKCSOAEP, parameter: .oaep(hash: .sha1, mgf: .sha1, sourceData: []))),
        Entry(name: "RSA-PKCS", use: .decrypt, mechanism: Mechanism(.rsaPKCS)),
    ]

    private static func pss(_ t: MechanismType, _ h: MechanismType, _ mgf: MGF, _ salt: UInt) -> Mechanism {
        Mechanism(t, parameter: .pss(hash: h, mgf: mgf, saltLength: salt))
    }

    /// The mechanism for `name` if it exists for `use`; MechanismInvalid otherwise.
    static func lookup(_ name: String, for use: Use) -> Result<Mechanism, ServiceError> {
        guard let entry = table.first(where: { $0.name == name && $0.use == use }) else {
            let names = table.filter { $0.use == use }.map(\.name).joined(separator: ", ")
            let shown = name.count > 64 ? String(name.prefix(64)) + "…" : name
            return .failure(ServiceError(.mechanismInvalid, "unknown mechanism '\(shown)'; expected one of: \(names) (CKR_MECHANISM_INVALID (0x70))"))
        }
        return .success(entry.mechanism)
    }
}
