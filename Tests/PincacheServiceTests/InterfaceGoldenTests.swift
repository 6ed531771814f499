import DBusKit
import Foundation
import PKCS11Kit
import PinPolicy
import Testing

@testable import PincacheService

/// dbus/*.xml is what distributions install and clients are written against: it must be exactly
/// what the declarations the daemon dispatches with produce.
@Suite struct InterfaceGoldenTests {
    static let repo = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent()

    @Test(arguments: PincacheInterfaces.all.map(\.name))
    func shippedXMLMatchesDeclaration(_ name: String) throws {
        let iface = try #require(PincacheInterfaces.all.first { $0.name == name })
        let file = Self.repo.appendingPathComponent("dbus/\(name).xml")
        let shipped = try String(contentsOf: file, encoding: .utf8)
        #expect(
            shipped == introspectionDocument(interfaces: [iface], children: []),
            "regenerate with: .build/debug/pincached --print-introspection dbus")
    }

    /// Issue 16 §6: introspection documents every member (org.gtk.GDBus.DocString), so
    /// busctl, d-spy and gdbus-codegen users read the contract where they look.
    @Test(arguments: PincacheInterfaces.all.map(\.name))
    func everyMemberIsDocumented(_ name: String) throws {
        let iface = try #require(PincacheInterfaces.all.first { $0.name == name })
        #expect(iface.undocumented.isEmpty, "\(name): \(iface.undocumented)")
        let xml = introspectionDocument(interfaces: [iface], children: [])
        let members = iface.methods.count + iface.signals.count + iface.properties.count + 1
        #expect(xml.components(separatedBy: "name=\"\(docAnnotation)\"").count - 1 == members)
        // One line per annotation: a newline inside an attribute value would be normalised away.
        #expect(!(iface.methods.map(\.doc) + iface.signals.map(\.doc) + iface.properties.map(\.doc)).contains { $0.contains("\n") })
    }

    @Test func sensitiveArgumentsAreThePINs() {
        for iface in PincacheInterfaces.all {
            for method in iface.methods {
                for arg in method.inArguments {
                    #expect(arg.sensitive == arg.name.hasSuffix("pin"), "\(iface.name).\(method.name)(\(arg.name))")
                }
            }
        }
    }
}

@Suite struct ServiceMappingTests {
    @Test func everyDesignMechanismNameResolves() throws {
        let sign = [
            "ECDSA", "ECDSA-SHA256", "ECDSA-SHA384", "ECDSA-SHA512", "RSA-PKCS", "SHA256-RSA-PKCS",
            "SHA384-RSA-PKCS", "SHA512-RSA-PKCS", "RSA-PSS-SHA256", "RSA-PSS-SHA384", "RSA-PSS-SHA512",
        ]
        for name in sign {
            #expect((try? NamedMechanism.lookup(name, for: .sign).get()) != nil, "\(name)")
            if name != "RSA-PKCS" {
                #expect((try? NamedMechanism.lookup(name, for: .decrypt).get()) == nil, "\(name) is not a decrypt mechanism")
            }
        }
        #expect((try? NamedMechanism.lookup("RSA-OAEP-SHA256", for: .sign).get()) == nil)
        let oaep = try NamedMechanism.lookup("RSA-OAEP-SHA256", for: .decrypt).get()
        #expect(oaep.type == .rsaPKCSOAEP)
        #expect(oaep.parameter == .oaep(hash: .sha256, mgf: .sha256, sourceData: []))
        let pss = try NamedMechanism.lookup("RSA-PSS-SHA384", for: .sign).get()
        #expect(pss.parameter == .pss(hash: .sha384, mgf: .sha384, saltLength: 48))
    }

    @Test func unknownMechanismIsMechanismInvalid() {
        guard case .failure(let e) = NamedMechanism.lookup(String(repeating: "X", count: 5000), for: .sign) else {
            Issue.record("expected failure")
            return
        }
        #expect(e.dbusName == "org.pincache.Error.MechanismInvalid")
        #expect(e.message.count < 400, "a hostile name is not echoed in full")
    }

    @Test func backendErrorsKeepTheExactCode() {
        let cases: [(ReturnValue, String)] = [
            (.pinIncorrect, "PinIncorrect"), (.pinLocked, "PinLocked"), (.userNotLoggedIn, "NotLoggedIn"),
            (.deviceRemoved, "TokenNotPresent"), (.tokenNotPresent, "TokenNotPresent"),
            (.mechanismInvalid, "MechanismInvalid"), (.userAnotherAlreadyLoggedIn, "TokenBusy"),
            (.keyHandleInvalid, "KeyNotFound"), (.dataLenRange, "BackendError"),
        ]
        for (rv, name) in cases {
            let e = ServiceError(PKCS11Error(rv: rv, function: "C_Sign"))
            #expect(e.dbusName == "org.pincache.Error." + name)
            #expect(e.message == "C_Sign: \(rv.description)")
            #expect(e.message.contains(rv.name))
        }
    }
}
