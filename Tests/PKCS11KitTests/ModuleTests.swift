import Dispatch
import Foundation
import PKCS11Kit
import Testing

/// Real SoftHSM, through the FaultShim (pass-through unless a test writes a control file).
/// Serialized: the token's login state is shared by every session of the process.
@Suite(.serialized) struct ModuleTests {
    let f: Fixture
    var m: PKCS11Module { f.module }

    init() throws {
        f = try Fixture.get()
        // A previous test that failed half-way must not leak a fault into this one.
        for name in ["reject_pin", "token_flags_add", "delay_ms", "optional_functions"] { try f.setControl(name, nil) }
    }

    @Test func moduleInfo() throws {
        let info = try m.info()
        #expect(info.cryptokiVersion.major == 2)
        #expect(info.manufacturer == "SoftHSM")
        #expect(!info.libraryDescription.isEmpty)
        #expect(!info.libraryDescription.hasSuffix(" "))
    }

    @Test func slotsAndTokens() throws {
        let present = try m.slotList(tokenPresent: true)
        let all = try m.slotList(tokenPresent: false)
        #expect(present.count >= 2, "token T plus SoftHSM's spare uninitialised token")
        #expect(Set(present).isSubset(of: Set(all)))
        #expect(present.contains(f.slot))

        let slotInfo = try m.slotInfo(f.slot)
        #expect(slotInfo.tokenPresent)
        #expect(!slotInfo.removableDevice)
        #expect(!slotInfo.description.isEmpty && !slotInfo.description.hasSuffix(" "))
        #expect(slotInfo.manufacturer == "SoftHSM project")

        let token = try m.tokenInfo(f.slot)
        #expect(token.label == "T")
        #expect(token.model == "SoftHSM v2")
        #expect(!token.serialNumber.isEmpty && !token.serialNumber.contains(" "))
        #expect(token.tokenInitialized && token.userPinInitialized && token.loginRequired)
        #expect(!token.protectedAuthenticationPath && !token.userPinCountLow && !token.userPinLocked)
        #expect(token.minPinLength >= 4 && token.maxPinLength >= token.minPinLength)

        // The fixture found the spare uninitialised; initTokenAndPINs may have used it since.
        #expect(present.contains(f.spareSlot) && f.spareSlot != f.slot)
    }

    @Test func invalidSlot() throws {
        #expect(throws: PKCS11Error(rv: .slotIDInvalid, function: "C_GetTokenInfo")) {
            try m.tokenInfo(SlotID(rawValue: 0xdead_beef))
        }
    }

    @Test func mechanisms() throws {
        let list = try m.mechanismList(f.slot)
        // SoftHSM 2.6 offers raw ECDSA only (no CKM_ECDSA_SHA256): callers must hash themselves.
        for needed: MechanismType in [.ecdsa, .rsaPKCS, .sha256RSAPKCS, .rsaPKCSPSS, .sha256RSAPKCSPSS, .rsaPKCSOAEP] {
            #expect(list.contains(needed), "\(needed)")
        }
        let rsa = try m.mechanismInfo(f.slot, .rsaPKCS)
        #expect(rsa.maxKeySize >= 2048)
        #expect(rsa.flags & 0x800 != 0)  // CKF_SIGN
        #expect(throws: PKCS11Error(rv: .mechanismInvalid, function: "C_GetMechanismInfo")) {
            try m.mechanismInfo(f.slot, MechanismType(rawValue: 0x8000_1234))
        }
    }

    @Test func slotEventsWithoutBlocking() throws {
        // Nothing was inserted or removed: CKR_NO_EVENT comes back as nil, not as an error.
        #expect(try m.waitForSlotEvent(dontBlock: true) == nil)
    }

    @Test func sessionLifecycle() throws {
        let s = try m.openSession(f.slot)
        let info = try m.sessionInfo(s)
        #expect(info.slot == f.slot)
        #expect(!info.readWrite && !info.userLoggedIn)
        #expect(info.flags & 0x4 != 0)  // CKF_SERIAL_SESSION
        let rw = try m.openSession(f.slot, readWrite: true)
        #expect(try m.sessionInfo(rw).readWrite)
        try m.closeSession(s)
        #expect(throws: PKCS11Error(rv: .sessionHandleInvalid, function: "C_GetSessionInfo")) {
            try m.sessionInfo(s)
        }
        try m.closeAllSessions(f.slot)
        #expect(throws: PKCS11Error(rv: .sessionHandleInvalid, function: "C_GetSessionInfo")) {
            try m.sessionInfo(rw)
        }
    }

    @Test func wrongPIN() throws {
        let s = try m.openSession(f.slot)
        defer { try? m.closeSession(s) }
        #expect(throws: PKCS11Error(rv: .pinIncorrect, function: "C_Login")) {
            try f.login(s, pin: "0000")
        }
        #expect(!(try m.sessionInfo(s).userLoggedIn))
    }

    @Test func loginStateAndPrivateObjects() throws {
        let s = try m.openSession(f.slot)
        defer { try? m.closeSession(s) }
        // Private keys are invisible before login.
        #expect(try m.findObjects(s, matching: [.objectClass(.privateKey)]).isEmpty)
        try f.login(s)
        #expect(try m.sessionInfo(s).userLoggedIn)
        #expect(throws: PKCS11Error(rv: .userAlreadyLoggedIn, function: "C_Login")) { try f.login(s) }
        #expect(try m.findObjects(s, matching: [.objectClass(.privateKey)]).count == 2)
        #expect(try m.findObjects(s, matching: [.objectClass(.privateKey)], limit: 1).count == 1)
        #expect(try m.findObjects(s, matching: [Attribute(.id, [0x77])]).isEmpty)
        // After a failed search the session is still free for the next one.
        #expect(try m.findObjects(s, matching: [.string(.label, "ec")]).count == 2)
        try m.logout(s)
        #expect(!(try m.sessionInfo(s).userLoggedIn))
    }

    @Test func ecdsaSignVerify() throws {
        try f.withUserSession { s in
            let key = try f.object(s, .privateKey, id: 1)
            let pub = try f.object(s, .publicKey, id: 1)
            // Raw ECDSA over a SHA-256-sized digest (SoftHSM 2.6 has no CKM_ECDSA_SHA256).
            let digest = [UInt8](repeating: 0xab, count: 32)
            let sig = try m.sign(s, mechanism: Mechanism(.ecdsa), key: key, data: digest)
            #expect(sig.count == 64)
            #expect(try m.verify(s, mechanism: Mechanism(.ecdsa), key: pub, data: digest, signature: sig))
            var bad = sig
            bad[10] ^= 1
            #expect(try m.verify(s, mechanism: Mechanism(.ecdsa), key: pub, data: digest, signature: bad) == false)

            // Init and sign as separate steps (a context-specific login goes between them).
            try m.signInit(s, mechanism: Mechanism(.ecdsa), key: key)
            let split = try m.signAfterInit(s, data: digest)
            #expect(try m.verify(s, mechanism: Mechanism(.ecdsa), key: pub, data: digest, signature: split))

            // A key that does not exist: the error names C_SignInit, not C_Sign.
            let e = #expect(throws: PKCS11Error.self) {
                try m.sign(s, mechanism: Mechanism(.ecdsa), key: ObjectHandle(rawValue: 0xffff_fff0), data: digest)
            }
            #expect(e?.function == "C_SignInit")
            #expect(e?.rv == .keyHandleInvalid || e?.rv == .objectHandleInvalid)
        }
    }

    @Test func rsaSignVerify() throws {
        try f.withUserSession { s in
            let key = try f.object(s, .privateKey, id: 2)
            let pub = try f.object(s, .publicKey, id: 2)
            let data = Array("to be signed".utf8)

            let pkcs1 = try m.sign(s, mechanism: Mechanism(.sha256RSAPKCS), key: key, data: data)
            #expect(pkcs1.count == 256)
            #expect(try m.verify(s, mechanism: Mechanism(.sha256RSAPKCS), key: pub, data: data, signature: pkcs1))
            #expect(try !m.verify(s, mechanism: Mechanism(.sha256RSAPKCS), key: pub, data: data + [0], signature: pkcs1))

            let pss = Mechanism(.sha256RSAPKCSPSS, parameter: .pss(hash: .sha256, mgf: .sha256, saltLength: 32))
            let a = try m.sign(s, mechanism: pss, key: key, data: data)
            let b = try m.sign(s, mechanism: pss, key: key, data: data)
            #expect(a.count == 256 && a != b, "PSS is randomised")
            #expect(try m.verify(s, mechanism: pss, key: pub, data: data, signature: a))

            // Multi-part form of the same signature scheme.
            try m.signInit(s, mechanism: Mechanism(.sha256RSAPKCS), key: key)
            try m.signUpdate(s, data: Array(data.prefix(5)))
            try m.signUpdate(s, data: Array(data.dropFirst(5)))
            #expect(try m.signFinal(s) == pkcs1, "PKCS#1 v1.5 is deterministic")

            // A parameter of the wrong size (SoftHSM says CKR_ARGUMENTS_BAD, others MECHANISM_PARAM_INVALID).
            let e = #expect(throws: PKCS11Error.self) {
                try m.sign(s, mechanism: Mechanism(.rsaPKCSPSS, parameter: .raw([1, 2, 3])), key: key, data: data)
            }
            #expect(e?.function == "C_SignInit")
        }
    }

    /// SoftHSM 2.6 accepts only SHA-1 OAEP without a label (SHA-256 or a label give
    /// CKR_ARGUMENTS_BAD from C_EncryptInit).
    @Test func oaepRoundTrip() throws {
        try f.withUserSession { s in
            let key = try f.object(s, .privateKey, id: 2)
            let pub = try f.object(s, .publicKey, id: 2)
            let oaep = Mechanism(.rsaPKCSOAEP, parameter: .oaep(hash: .sha1, mgf: .sha1, sourceData: []))
            let secret = Array("session key bytes".utf8)
            let encrypted = try m.encrypt(s, mechanism: oaep, key: pub, data: secret)
            #expect(encrypted.count == 256)
            #expect(try m.decrypt(s, mechanism: oaep, key: key, data: encrypted) == secret)
            try m.decryptInit(s, mechanism: oaep, key: key)
            #expect(try m.decryptAfterInit(s, data: encrypted) == secret)
        }
    }

    @Test func attributes() throws {
        try f.withUserSession { s in
            let key = try f.object(s, .privateKey, id: 1)
            let bogus = AttributeType(rawValue: 0x7fff_1234)
            let attrs = try m.getAttributes(s, key, [.id, .label, .keyType, .sign, .value, bogus, .modulus, .ecParams])
            #expect(attrs[.id] == [1])
            #expect(attrs[.label] == Array("ec".utf8))
            #expect(attrs[.keyType]?.pkcs11ULong == KeyType.ec.rawValue)
            #expect(attrs[.sign]?.pkcs11Bool == true)
            #expect(attrs[.ecParams]?.first == 0x06, "DER OID of the curve")
            #expect(attrs[.value] == nil, "sensitive")
            #expect(attrs[bogus] == nil, "invalid type")
            #expect(attrs[.modulus] == nil, "not an RSA key")
            #expect(attrs.count == 5)

            let pub = try f.object(s, .publicKey, id: 2)
            let rsa = try m.getAttributes(s, pub, [.modulus, .publicExponent, .modulusBits, .class])
            #expect(rsa[.modulus]?.count == 256)
            #expect(rsa[.publicExponent] == [1, 0, 1])
            #expect(rsa[.modulusBits]?.pkcs11ULong == 2048)
            #expect(rsa[.class]?.pkcs11ULong == ObjectClass.publicKey.rawValue)

            #expect(try m.getAttributes(s, key, []).isEmpty)
            #expect(try m.getAttributes(s, key, [bogus]).isEmpty)
            #expect(throws: PKCS11Error(rv: .objectHandleInvalid, function: "C_GetAttributeValue")) {
                try m.getAttributes(s, ObjectHandle(rawValue: 0xffff_fff0), [.id])
            }
        }
    }

    @Test func random() throws {
        let s = try m.openSession(f.slot)
        defer { try? m.closeSession(s) }
        let a = try m.generateRandom(s, count: 32)
        let b = try m.generateRandom(s, count: 32)
        #expect(a.count == 32 && a != b)
        #expect(try m.generateRandom(s, count: 0).isEmpty)
        #expect(throws: PKCS11Error(rv: .argumentsBad, function: "C_GenerateRandom")) {
            try m.generateRandom(s, count: -1)
        }
    }

    // MARK: FaultShim

    @Test func shimRejectsPINAndLogsLogins() throws {
        let s = try m.openSession(f.slot)
        defer { try? m.closeSession(s) }
        let before = try f.loginLog().count

        try f.setControl("reject_pin", Fixture.userPIN + "\n")
        #expect(throws: PKCS11Error(rv: .pinIncorrect, function: "C_Login")) { try f.login(s) }
        #expect(!(try m.sessionInfo(s).userLoggedIn), "the rejected PIN never reached SoftHSM")
        // Only that PIN is rejected: others still reach the token.
        #expect(throws: PKCS11Error(rv: .pinIncorrect, function: "C_Login")) { try f.login(s, pin: "9999") }

        try f.setControl("reject_pin", nil)
        try f.login(s)
        try m.logout(s)

        let log = try f.loginLog()
        #expect(Array(log.dropFirst(before)) == ["1 0xa0", "1 0xa0", "1 0x0"])
        let text = try String(contentsOf: f.controlDirectory.appendingPathComponent("logins.log"), encoding: .utf8)
        #expect(!text.contains(Fixture.userPIN) && !text.contains("9999"))
    }

    @Test func shimLogLinesStayWholeUnderConcurrency() throws {
        try f.setControl("reject_pin", "4321")
        defer { try? f.setControl("reject_pin", nil) }
        let before = try f.loginLog().count
        let sessions = try (0..<8).map { _ in try m.openSession(f.slot) }
        defer { for s in sessions { try? m.closeSession(s) } }
        let module = m
        DispatchQueue.concurrentPerform(iterations: 8 * 25) { i in
            let pin = Array("4321".utf8)
            _ = try? pin.withUnsafeBytes { try module.login(sessions[i % 8], userType: .user, pin: $0) }
        }
        let added = try Array(f.loginLog().dropFirst(before))
        #expect(added.count == 200)
        #expect(added.allSatisfy { $0 == "1 0xa0" })
    }

    @Test func shimAddsTokenFlags() throws {
        #expect(try !m.tokenInfo(f.slot).userPinCountLow)
        try f.setControl("token_flags_add", "0x10000\n")
        let low = try m.tokenInfo(f.slot)
        #expect(low.userPinCountLow && !low.userPinFinalTry && low.tokenInitialized)
        try f.setControl("token_flags_add", "\(0x20000 | 0x40000)")  // decimal too
        let locked = try m.tokenInfo(f.slot)
        #expect(locked.userPinFinalTry && locked.userPinLocked && !locked.userPinCountLow)
        try f.setControl("token_flags_add", nil)
        #expect(try !m.tokenInfo(f.slot).userPinFinalTry)
    }

    @Test func shimDelaysSigning() throws {
        try f.withUserSession { s in
            let key = try f.object(s, .privateKey, id: 1)
            try f.setControl("delay_ms", "150")
            defer { try? f.setControl("delay_ms", nil) }
            let clock = ContinuousClock()
            let start = clock.now
            _ = try m.sign(s, mechanism: Mechanism(.ecdsa), key: key, data: [UInt8](repeating: 1, count: 32))
            // C_SignInit and C_Sign each sleep (one C_Sign: the first buffer is big enough, so
            // there is no length query).
            #expect(clock.now - start >= .milliseconds(300))
        }
    }

    // MARK: Loading

    @Test func loadErrors() throws {
        #expect(throws: ModuleLoadError.self) { try PKCS11Module(path: "/nonexistent/module.so") }
        do {
            _ = try PKCS11Module(path: "libz.so.1")
            Issue.record("libz is not a PKCS#11 module")
        } catch let e as ModuleLoadError {
            #expect(e.reason == "no C_GetFunctionList symbol")
            #expect(e.description.hasPrefix("cannot load PKCS#11 module libz.so.1"))
        }
    }
}
