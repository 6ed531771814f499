import Foundation
import Testing
@testable import PinPolicy

/// Runs `openssl req -x509` for a fresh self-signed certificate and returns its DER.
/// A missing openssl fails the test: these checks must run on real certificates.
func makeCertificate(keyUsage: String?, key: String = "ec") throws -> [UInt8] {
    let directory = FileManager.default.temporaryDirectory.appendingPathComponent("pincache-cert-\(UUID())")
    try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(at: directory) }
    let output = directory.appendingPathComponent("cert.der")
    var arguments = ["req", "-x509", "-nodes", "-subj", "/CN=pincache test", "-days", "1",
                     "-keyout", directory.appendingPathComponent("key.pem").path,
                     "-outform", "DER", "-out", output.path]
    arguments += key == "ec" ? ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"] : ["-newkey", "rsa:2048"]
    if let keyUsage { arguments += ["-addext", "keyUsage=\(keyUsage)"] }
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/openssl")
    process.arguments = arguments
    let errors = Pipe()
    process.standardError = errors
    process.standardOutput = FileHandle.nullDevice
    try process.run()
    let message = errors.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    try #require(process.terminationStatus == 0, "openssl failed: \(String(decoding: message, as: UTF8.self))")
    return Array(try Data(contentsOf: output))
}

/// DER builder for hand-made certificates.
func tlv(_ tag: UInt8, _ content: [UInt8]) -> [UInt8] {
    var length: [UInt8]
    if content.count < 0x80 {
        length = [UInt8(content.count)]
    } else {
        var bytes: [UInt8] = []
        var n = content.count
        while n > 0 { bytes.insert(UInt8(n & 0xFF), at: 0); n >>= 8 }
        length = [0x80 | UInt8(bytes.count)] + bytes
    }
    return [tag] + length + content
}

func seq(_ parts: [UInt8]...) -> [UInt8] { tlv(0x30, parts.flatMap { $0 }) }

let keyUsageOID: [UInt8] = [0x06, 0x03, 0x55, 0x1D, 0x0F]

func keyUsageExtension(_ bitString: [UInt8], critical: Bool = false) -> [UInt8] {
    seq(keyUsageOID, critical ? [0x01, 0x01, 0xFF] : [], tlv(0x04, tlv(0x03, bitString)))
}

/// A structurally valid certificate with empty inner fields and the given extensions.
func handMadeCertificate(extensions: [[UInt8]]?, version: Bool = true) -> [UInt8] {
    var tbs: [UInt8] = version ? tlv(0xA0, [0x02, 0x01, 0x02]) : []
    tbs += [0x02, 0x01, 0x01]                          // serial
    tbs += seq() + seq() + seq() + seq() + seq()       // signature, issuer, validity, subject, spki
    if let extensions { tbs += tlv(0xA3, seq(extensions.flatMap { $0 })) }
    return seq(tlv(0x30, tbs), seq(), tlv(0x03, [0x00]))
}

@Suite struct CertificateKeyUsageTests {
    static let generated: [(String, UInt32)] = [
        ("digitalSignature", 0x80),
        ("nonRepudiation", 0x40),
        ("digitalSignature,nonRepudiation", 0xC0),
        ("critical,keyEncipherment", 0x20),
        ("dataEncipherment", 0x10),
        ("keyAgreement,encipherOnly", 0x09),
        ("critical,keyAgreement,decipherOnly", 0x8008),
        ("keyCertSign,cRLSign", 0x06),
        ("digitalSignature,nonRepudiation,keyEncipherment,dataEncipherment,keyAgreement,keyCertSign,cRLSign,encipherOnly,decipherOnly", 0x80FF),
    ]

    @Test(arguments: generated)
    func opensslCertificates(keyUsage: String, mask: UInt32) throws {
        let der = try makeCertificate(keyUsage: keyUsage)
        #expect(CertificateKeyUsage.parse(certificateDER: der) == mask)
    }

    @Test func rsaCertificateWithLongFormLengths() throws {
        let der = try makeCertificate(keyUsage: "critical,nonRepudiation", key: "rsa")
        #expect(der.count > 256)
        #expect(CertificateKeyUsage.parse(certificateDER: der) == CertificateKeyUsage.nonRepudiation)
    }

    @Test func certificateWithoutKeyUsage() throws {
        let der = try makeCertificate(keyUsage: nil)
        #expect(CertificateKeyUsage.parse(certificateDER: der) == nil)
    }

    @Test func handMadeShapes() {
        #expect(CertificateKeyUsage.parse(certificateDER: handMadeCertificate(extensions: [keyUsageExtension([0x06, 0x40])])) == 0x40)
        #expect(CertificateKeyUsage.parse(certificateDER: handMadeCertificate(extensions: [keyUsageExtension([0x00])])) == 0)
        #expect(CertificateKeyUsage.parse(certificateDER: handMadeCertificate(extensions: nil)) == nil)
        #expect(CertificateKeyUsage.parse(certificateDER: handMadeCertificate(extensions: nil, version: false)) == nil)
        #expect(CertificateKeyUsage.parse(certificateDER: handMadeCertificate(extensions: [keyUsageExtension([0x07, 0x80], critical: true)], version: false)) == 0x80)
        let other = seq([0x06, 0x03, 0x55, 0x1D, 0x13], tlv(0x04, seq()))   // basicConstraints
        #expect(CertificateKeyUsage.parse(certificateDER: handMadeCertificate(extensions: [other])) == nil)
        #expect(CertificateKeyUsage.parse(certificateDER: handMadeCertificate(extensions: [other, keyUsageExtension([0x05, 0xE0])])) == 0xE0)
    }

    static let malformed: [(String, [UInt8])] = [
        ("empty", []),
        ("one byte", [0x30]),
        ("wrong outer tag", [0x31] + Array(handMadeCertificate(extensions: [keyUsageExtension([0x06, 0x40])]).dropFirst())),
        ("trailing garbage", handMadeCertificate(extensions: [keyUsageExtension([0x06, 0x40])]) + [0x00]),
        ("indefinite length", [0x30, 0x80, 0x00, 0x00]),
        ("huge length", [0x30, 0x84, 0xFF, 0xFF, 0xFF, 0xFF, 0x30, 0x00]),
        ("eight length bytes", [0x30, 0x88, 0, 0, 0, 0, 0, 0, 0, 4, 0x30, 0x00, 0x30, 0x00]),
        ("non-minimal length", [0x30, 0x81, 0x05, 0x30, 0x00, 0x30, 0x00, 0x03, 0x01, 0x00]),
        ("high tag number", [0x3F, 0x01, 0x00]),
        ("duplicate keyUsage", handMadeCertificate(extensions: [keyUsageExtension([0x06, 0x40]), keyUsageExtension([0x07, 0x80])])),
        ("unused bits > 7", handMadeCertificate(extensions: [keyUsageExtension([0x08, 0x40])])),
        ("unused bits set", handMadeCertificate(extensions: [keyUsageExtension([0x07, 0xC0])])),
        ("unused bits without bytes", handMadeCertificate(extensions: [keyUsageExtension([0x03])])),
        ("three bytes of bits", handMadeCertificate(extensions: [keyUsageExtension([0x00, 0x80, 0x80, 0x80])])),
        ("empty BIT STRING", handMadeCertificate(extensions: [seq(keyUsageOID, tlv(0x04, [0x03, 0x00]))])),
        ("not a BIT STRING", handMadeCertificate(extensions: [seq(keyUsageOID, tlv(0x04, tlv(0x04, [0x06, 0x40])))])),
        ("extension without OCTET STRING", handMadeCertificate(extensions: [seq(keyUsageOID, tlv(0x03, [0x06, 0x40]))])),
        ("junk after extnValue", handMadeCertificate(extensions: [seq(keyUsageOID, tlv(0x04, tlv(0x03, [0x06, 0x40])), [0x05, 0x00])])),
        ("junk in extnValue", handMadeCertificate(extensions: [seq(keyUsageOID, tlv(0x04, tlv(0x03, [0x06, 0x40]) + [0x05, 0x00]))])),
        ("missing serial", seq(seq(seq(), seq()), seq(), tlv(0x03, [0x00]))),
        ("no signature", seq(seq([0x02, 0x01, 0x01], seq(), seq(), seq(), seq(), seq()))),
    ]

    @Test(arguments: malformed)
    func malformedInputGivesNil(name: String, der: [UInt8]) {
        #expect(CertificateKeyUsage.parse(certificateDER: der) == nil, "\(name)")
    }

    @Test func everyTruncationAndEveryByteFlipOfARealCertificate() throws {
        let der = try makeCertificate(keyUsage: "critical,digitalSignature,nonRepudiation")
        #expect(CertificateKeyUsage.parse(certificateDER: der) == 0xC0)
        for length in 0..<der.count {
            #expect(CertificateKeyUsage.parse(certificateDER: Array(der.prefix(length))) == nil)
        }
        // Flipped bytes must never trap; most give nil, a flip inside a signature or name still parses.
        var stillParsed = 0
        for index in der.indices {
            for flip: UInt8 in [0xFF, 0x80, 0x01] {
                var mutated = der
                mutated[index] ^= flip
                if CertificateKeyUsage.parse(certificateDER: mutated) != nil { stillParsed += 1 }
            }
        }
        #expect(stillParsed > 0 && stillParsed < der.count * 3)
    }

    @Test func requiresFreshPINTruthTable() {
        var settings = Settings()
        #expect(!settings.requiresFreshPIN(keyUsage: 0x40))
        #expect(!settings.requiresFreshPIN(keyUsage: nil))
        settings.forceLoginKeyUsage = 0x40
        #expect(settings.requiresFreshPIN(keyUsage: 0x40))
        #expect(settings.requiresFreshPIN(keyUsage: 0xC0))
        #expect(settings.requiresFreshPIN(keyUsage: 0x8040))
        #expect(!settings.requiresFreshPIN(keyUsage: 0x80))
        #expect(!settings.requiresFreshPIN(keyUsage: 0))
        #expect(!settings.requiresFreshPIN(keyUsage: nil))
        settings.forceLoginKeyUsage = 0x80   // cannot come from the parser; still only 0x40 counts
        #expect(!settings.requiresFreshPIN(keyUsage: 0x80))
    }
}
