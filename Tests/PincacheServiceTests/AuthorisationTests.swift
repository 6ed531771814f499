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
            (0x1087, [UInt8](repeating: 0x41, count: 40)),  // AES_GCM holds pointers
            (0x9, [UInt8](repeating: 0, count: 24)),  // OAEP with source 0
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
    }
}
