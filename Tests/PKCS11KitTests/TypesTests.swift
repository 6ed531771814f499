import Foundation
import PKCS11Kit
import Testing

@Suite struct TypesTests {
    @Test func returnValueNames() {
        #expect(ReturnValue.pinIncorrect.name == "CKR_PIN_INCORRECT")
        #expect(ReturnValue.pinIncorrect.description == "CKR_PIN_INCORRECT (0xa0)")
        #expect(ReturnValue.ok.description == "CKR_OK (0x0)")
        #expect(ReturnValue.cryptokiAlreadyInitialized.rawValue == 0x191)
        #expect(ReturnValue.userAnotherAlreadyLoggedIn.name == "CKR_USER_ANOTHER_ALREADY_LOGGED_IN")
        #expect(ReturnValue(rawValue: 0x8000_0000).name == "CKR_VENDOR_DEFINED")
        #expect(ReturnValue(rawValue: 0x8000_0042).name == "CKR_VENDOR_DEFINED+0x42")
        #expect(ReturnValue(rawValue: 0x999).description == "CKR_0x999 (0x999)")
    }

    @Test func errorNamesItsFunction() {
        let e = PKCS11Error(rv: .pinIncorrect, function: "C_Login")
        #expect(e.description == "C_Login: CKR_PIN_INCORRECT (0xa0)")
        #expect(e != PKCS11Error(rv: .pinIncorrect, function: "C_InitPIN"))
        #expect(e != PKCS11Error(rv: .pinLocked, function: "C_Login"))
    }

    @Test func mechanismAndAttributeNames() {
        #expect(MechanismType.ecdsaSHA256.name == "CKM_ECDSA_SHA256")
        #expect(MechanismType.rsaPKCSOAEP.name == "CKM_RSA_PKCS_OAEP")
        // Aliased values print under the current name.
        #expect(MechanismType.ecKeyPairGen.name == "CKM_EC_KEY_PAIR_GEN")
        #expect(AttributeType.ecParams.name == "CKA_EC_PARAMS")
        #expect(MechanismType(rawValue: 0x8000_0001).name == "CKM_VENDOR_DEFINED+0x1")
        #expect(AttributeType(rawValue: 0x7777).name == "CKA_0x7777")
    }

    @Test func attributeEncoding() {
        #expect(Attribute.bool(.sign, true).value == [1])
        #expect(Attribute.bool(.sign, false).value == [0])
        #expect(Attribute.objectClass(.privateKey).value.count == MemoryLayout<UInt>.size)
        #expect(Attribute.objectClass(.privateKey).value.pkcs11ULong == 3)
        #expect(Attribute.ulong(.modulusBits, 2048).value.pkcs11ULong == 2048)
        #expect([UInt8]([1]).pkcs11Bool == true)
        #expect([UInt8]([0]).pkcs11Bool == false)
        #expect([UInt8]([1, 0]).pkcs11Bool == nil)
        #expect([UInt8]([1, 2, 3]).pkcs11ULong == nil)
        #expect(Attribute.string(.label, "ec").value == Array("ec".utf8))
    }

    @Test func slotIDsOrder() {
        let slots = [SlotID(rawValue: 7), SlotID(rawValue: 2), SlotID(rawValue: 0x7fff_0000)]
        #expect(slots.sorted().map(\.rawValue) == [2, 7, 0x7fff_0000])
    }

    /// The generated name tables must agree with the header they were taken from.
    @Test(arguments: [("CKR", 90), ("CKM", 300), ("CKA", 90)])
    func nameTablesMatchHeader(prefix: String, atLeast: Int) throws {
        let header = try String(contentsOfFile: "/usr/include/p11-kit-1/p11-kit/pkcs11.h", encoding: .utf8)
        let pattern = try NSRegularExpression(
            pattern: "^#\\s*define\\s+(\(prefix)_[A-Z0-9_]+)\\s+\\(?(0x[0-9a-fA-F]+|[0-9]+)U?L?\\)?\\s*$",
            options: .anchorsMatchLines)
        var namesByValue: [UInt: Set<String>] = [:]
        let ns = header as NSString
        for m in pattern.matches(in: header, range: NSRange(location: 0, length: ns.length)) {
            let name = ns.substring(with: m.range(at: 1))
            let literal = ns.substring(with: m.range(at: 2))
            let value = literal.hasPrefix("0x") ? UInt(literal.dropFirst(2), radix: 16) : UInt(literal)
            namesByValue[try #require(value), default: []].insert(name)
        }
        #expect(namesByValue.count >= atLeast)
        for (value, names) in namesByValue {
            let tableName: String
            switch prefix {
            case "CKR": tableName = ReturnValue(rawValue: value).name
            case "CKM": tableName = MechanismType(rawValue: value).name
            default: tableName = AttributeType(rawValue: value).name
            }
            #expect(names.contains(tableName), "0x\(String(value, radix: 16)): \(tableName) not in \(names)")
        }
    }
}
