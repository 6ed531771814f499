import CryptokiWire
import Foundation
import PKCS11Kit
import Testing

@testable import PincacheService

/// The authorisation step's actions and the shipped polkit policy are the same set: an action
/// the code checks but polkit does not know is refused for everyone, and one the policy ships
/// but the code never checks protects nothing.
@Suite struct AuthorisationTests {
    static let policy = InterfaceGoldenTests.repo.appendingPathComponent("polkit/org.pincache.policy")

    @Test func everyActionTheCodeChecksIsShippedAndBack() throws {
        let xml = try String(contentsOf: Self.policy, encoding: .utf8)
        var shipped = Set<String>()
        var rest = Substring(xml)
        while let r = rest.range(of: "<action id=\"") {
            rest = rest[r.upperBound...]
            guard let end = rest.firstIndex(of: "\"") else { break }
            shipped.insert(String(rest[..<end]))
            rest = rest[end...]
        }
        let used = Set(PincacheService.allActions.map(\.rawValue))
        #expect(used == shipped)
        // Every Access that asks polkit maps to one of them (none and cachedPIN included).
        #expect(Set(["org.pincache.login", "org.pincache.use-cached-pin", "org.pincache.modify-token", "org.pincache.manage"]) == used)
    }

    @Test func errorsCarryTheirReturnValueAsANumber() {
        #expect(ServiceError(PKCS11Error(rv: .pinIncorrect, function: "C_Login")).rv == 0xa0)
        #expect(ServiceError(PKCS11Error(rv: .dataLenRange, function: "C_Sign")).rv == 0x21)
        #expect(ServiceError(.notAuthorized, "refused").rv == 0x200)
        #expect(ServiceError(.tokenNotPresent, "x", rv: 0xe1).rv == 0xe1)
        let bad = ServiceError.arguments("data too long")
        #expect(bad.rv == 0x7 && bad.dbusError.name == "org.freedesktop.DBus.Error.InvalidArgs")
    }

    @Test func mechanismParametersPassOnlyPointerFreeStructsOfTheirSize() {
        let pss = [UInt8](repeating: 0, count: 24)
        #expect((try? MechanismParameters.decode(type: 0x43, parameter: pss).get()) != nil)
        for (type, parameter): (UInt64, [UInt8]) in [
            (0x43, Array(pss.prefix(8))),  // cut short: the module would read past it
            (0x1087, [UInt8](repeating: 0x41, count: 40)),  // AES_GCM flattened, lengths past the end
            (0x1087, le([96, 128, 2, 0]) + [1, 2, 3]),  // a byte after the IV and AAD
            (0x1050, le([1, 0, 65]) + [4]),  // ECDH public data cut short
            (0x1054, [UInt8](repeating: 0, count: 40)),  // ECMQV holds pointers, not flattened
            (0x9, [UInt8](repeating: 0, count: 24)),  // OAEP with source 0
            (0x43, []),  // PSS without its parameter: a module may read one anyway
            (0x1087, []),  // GCM without one
            (0x1082, [UInt8](repeating: 0, count: 15)),  // a CBC IV too short
            (0x1104, le([4]) + [1, 2, 3]),  // a derivation string cut short
            (0x1104, [1, 2, 3, 4]),  // not even its length
            (0x1105, le([8, 2]) + [UInt8](repeating: 0, count: 10)),  // AES with a DES-sized IV
            (0x1103, le([8, 2]) + [UInt8](repeating: 0, count: 11)),  // a byte after the data
        ] {
            guard case .failure(let e) = MechanismParameters.decode(type: type, parameter: parameter) else {
                Issue.record("0x\(String(type, radix: 16)) accepted")
                continue
            }
            #expect(e.rv == 0x71)
        }
        var oaep = [UInt8](repeating: 0, count: 24) + [1, 2, 3]
        oaep[16] = 1  // CKZ_DATA_SPECIFIED
        #expect((try? MechanismParameters.decode(type: 0x9, parameter: oaep).get())?.type == .rsaPKCSOAEP)
        let gcm = try? MechanismParameters.decode(type: 0x1087, parameter: le([96, 128, 3, 2]) + [7, 7, 7, 0xAA, 0xBB]).get()
        #expect(gcm?.parameter == .gcm(iv: [7, 7, 7], ivBits: 96, aad: [0xAA, 0xBB], tagBits: 128))
        let ecdh = try? MechanismParameters.decode(type: 0x1050, parameter: le([1, 0, 3]) + [4, 1, 2]).get()
        #expect(ecdh?.parameter == .ecdh1(kdf: 1, sharedData: [], publicData: [4, 1, 2]))
        // AES key wrap's IV is optional; ECDSA has no parameter.
        #expect((try? MechanismParameters.decode(type: 0x2109, parameter: []).get()) == Mechanism(MechanismType(rawValue: 0x2109)))
        #expect((try? MechanismParameters.decode(type: 0x1041, parameter: []).get()) == Mechanism(.ecdsa))
        let string = try? MechanismParameters.decode(type: 0x1104, parameter: le([3]) + [9, 8, 7]).get()
        #expect(string?.parameter == .derivationString([9, 8, 7]))
        let iv = [UInt8](1...16)
        let cbc = try? MechanismParameters.decode(type: 0x1105, parameter: le([16, 2]) + iv + [5, 6]).get()
        #expect(cbc?.parameter == .cbcEncryptData(iv: iv, data: [5, 6]))
        let dh = try? MechanismParameters.decode(type: 0x21, parameter: [UInt8](repeating: 3, count: 128)).get()
        #expect(dh?.parameter == .raw([UInt8](repeating: 3, count: 128)))
    }

    /// The proxy flattens array attributes with CryptokiWire, the daemon's module binding
    /// reads them with PKCS11Kit: the same bytes either way.
    @Test func bothSidesFlattenNestedTemplatesAlike() {
        let entries: [Attribute] = [.ulong(.keyType, 0x10), .bool(.extractable, true), .string(.label, "")]
        let wire = NestedTemplates.flatten(entries.map { (UInt64($0.type.rawValue), $0.value) })
        #expect(wire == NestedTemplate.flatten(entries))
        #expect(NestedTemplate.parse(wire) == entries)
        #expect(NestedTemplates.parse(wire)?.map(\.value) == entries.map(\.value))
        let nested = NestedTemplate.flatten([Attribute(AttributeType(rawValue: 0x4000_0211), [])])
        #expect(NestedTemplates.parse(nested) == nil && NestedTemplate.parse(nested) == nil)
    }

    /// Little-endian u64s, as the proxy flattens a parameter's numbers.
    private func le(_ numbers: [UInt64]) -> [UInt8] {
        numbers.flatMap { n in (0..<8).map { UInt8(truncatingIfNeeded: n >> (8 * $0)) } }
    }
}

/// Mechanisms+KeyTypes: a key of another type never reaches the module (SoftHSM crashes on
/// CKM_DSA with a secret key); keys that fit, and mechanisms not listed, pass.
@Suite struct MechanismKeyTypeTests {
    @Test func mismatchedKeysAreRefusedBeforeTheModule() {
        let dsa = Mechanism(MechanismType(rawValue: 0x11))
        #expect(MechanismKeyTypes.refusal(dsa, keyType: 0x10, function: "C_SignInit")?.rv == .keyTypeInconsistent)
        #expect(MechanismKeyTypes.refusal(dsa, keyType: 1, function: "C_SignInit") == nil)
        #expect(MechanismKeyTypes.refusal(Mechanism(.ecdsa), keyType: 0, function: "C_SignInit") != nil)
        #expect(MechanismKeyTypes.refusal(Mechanism(.ecdsa), keyType: 3, function: "C_SignInit") == nil)
        #expect(MechanismKeyTypes.refusal(Mechanism(.sha256RSAPKCS), keyType: 0, function: "C_SignInit") == nil)
        let hmac = Mechanism(MechanismType(rawValue: 0x251))
        #expect(MechanismKeyTypes.refusal(hmac, keyType: 0x10, function: "C_SignInit") == nil)
        #expect(MechanismKeyTypes.refusal(hmac, keyType: 0x2B, function: "C_SignInit") == nil)
        #expect(MechanismKeyTypes.refusal(hmac, keyType: 0x1F, function: "C_SignInit") != nil)
        let ecdh = Mechanism(MechanismType(rawValue: 0x1050))
        #expect(MechanismKeyTypes.refusal(ecdh, keyType: 0x41, function: "C_DeriveKey") == nil)
        let wrap = Mechanism(MechanismType(rawValue: 0x2109))
        #expect(MechanismKeyTypes.refusal(wrap, keyType: 0, function: "C_WrapKey")?.rv == .wrappingKeyTypeInconsistent)
        #expect(MechanismKeyTypes.refusal(wrap, keyType: 0, function: "C_UnwrapKey")?.rv == .unwrappingKeyTypeInconsistent)
        // Unknown mechanisms and unknown key types are the module's to judge.
        #expect(MechanismKeyTypes.refusal(Mechanism(MechanismType(rawValue: 0x8000_0001)), keyType: 0, function: "C_SignInit") == nil)
        #expect(MechanismKeyTypes.refusal(dsa, keyType: nil, function: "C_SignInit") == nil)
        #expect(MechanismKeyTypes.keyType(named: "RSA") == 0 && MechanismKeyTypes.keyType(named: "0x40") == 0x40)
    }
}
