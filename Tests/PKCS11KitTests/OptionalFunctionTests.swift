import Foundation
@testable import PKCS11Kit
import Testing

/// The functions PKCS#11 lets a module leave out: asking which a module has, and the
/// recovering operations, against SoftHSM (which has none) and the FaultShim with
/// `optional_functions` (which adds them on top of SoftHSM).
extension ModuleTests {
    @Test func optionalFunctionsAreWhatTheModuleHas() throws {
        defer { try? f.setControl("optional_functions", nil) }
        let ask = { () throws -> PKCS11Module.OptionalFunctions in
            let s = try m.openSession(f.slot)
            defer { try? m.closeSession(s) }
            return m.optionalFunctions(s)
        }
        // SoftHSM: none, and one operation at a time.
        #expect(try ask() == [])
        try f.setControl("optional_functions", "")
        #expect(
            try ask() == [
                .signRecover, .verifyRecover, .digestEncrypt, .decryptDigest, .signEncrypt, .decryptVerify,
                .getOperationState, .setOperationState, .concurrentOperations,
            ])
        // The probe started nothing: the session's next search and digest go ahead.
        try f.setControl("optional_functions", nil)
        let s = try m.openSession(f.slot)
        defer { try? m.closeSession(s) }
        _ = m.optionalFunctions(s)
        #expect(try m.findObjects(s, matching: []).isEmpty == false)
        #expect(try m.digest(s, mechanism: Mechanism(.sha256), data: [1]).count == 32)
    }

    @Test func recoveredDataIsWhatWasSigned() throws {
        defer { try? f.setControl("optional_functions", nil) }
        try f.withUserSession { s in
            let key = try f.object(s, .privateKey, id: 2)
            let pub = try f.object(s, .publicKey, id: 2)
            let message = Array("recover me".utf8)
            let rsa = Mechanism(.rsaPKCS)
            // SoftHSM's own answer comes through as it is.
            #expect(throws: PKCS11Error(rv: .functionNotSupported, function: "C_SignRecoverInit")) {
                try m.signRecover(s, mechanism: rsa, key: key, data: message)
            }
            try f.setControl("optional_functions", "")
            let signature = try m.signRecover(s, mechanism: rsa, key: key, data: message)
            // PKCS #1 v1.5 with recovery signs as C_Sign does.
            #expect(signature == (try m.sign(s, mechanism: rsa, key: key, data: message)))
            #expect(try m.verifyRecover(s, mechanism: rsa, key: pub, signature: signature) == message)
            var tampered = signature
            tampered[10] ^= 1
            #expect(throws: PKCS11Error(rv: .signatureInvalid, function: "C_VerifyRecover")) {
                try m.verifyRecover(s, mechanism: rsa, key: pub, signature: tampered)
            }
        }
    }
}

/// PKCS#11 3.0's interface is looked up where a module exports C_GetInterface (OpenSC) and
/// not otherwise (SoftHSM 2.6); the 3.0 functions are called through it.
@Suite struct InterfaceTests {
    static let openSC = "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so"

    @Test func theVersion3InterfaceIsFoundWhereTheModuleHasOne() throws {
        #expect(try Fixture.get().module.functions3 == nil)
        guard FileManager.default.fileExists(atPath: Self.openSC) else {
            // CI installs OpenSC (scripts/install-deps.sh); a developer machine may lack it.
            #expect(ProcessInfo.processInfo.environment["CI"] != "true", "OpenSC missing under CI")
            return
        }
        let m = try PKCS11Module(path: Self.openSC)
        defer { m.finalize() }
        let v3 = try #require(m.functions3?.pointee)
        #expect(v3.v2.version.major == 3 && v3.v2.version.minor == 0)
        #expect(v3.C_SessionCancel != nil && v3.C_LoginUser != nil)
    }
}
