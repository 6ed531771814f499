import CPKCS11
import Foundation
import Glibc
import Testing

@testable import PincacheProxy
@testable import PincacheService

/// What a C host does, through the proxy's CK_FUNCTION_LIST: every call below crosses the
/// proxy's entry points, the wire and the daemon's dispatcher in this process.
struct Host {
    let f: CK_FUNCTION_LIST

    func initialize() -> CK_RV { f.C_Initialize!(nil) }
    func finalize() -> CK_RV { f.C_Finalize!(nil) }

    func slot(labelled label: String) throws -> CK_SLOT_ID {
        var count: CK_ULONG = 0
        try check(f.C_GetSlotList!(CK_BBOOL(CK_TRUE), nil, &count))
        var slots = [CK_SLOT_ID](repeating: 0, count: Int(count))
        try check(f.C_GetSlotList!(CK_BBOOL(CK_TRUE), &slots, &count))
        for slot in slots.prefix(Int(count)) {
            var info = CK_TOKEN_INFO()
            try check(f.C_GetTokenInfo!(slot, &info))
            let raw = withUnsafeBytes(of: info.label) { Array($0) }
            if String(decoding: raw, as: UTF8.self).trimmingCharacters(in: .whitespaces) == label { return slot }
        }
        throw LoopbackError("no token labelled \(label)")
    }

    func openSession(_ slot: CK_SLOT_ID) throws -> CK_SESSION_HANDLE {
        var session: CK_SESSION_HANDLE = 0
        try check(f.C_OpenSession!(slot, CK_FLAGS(CKF_SERIAL_SESSION | CKF_RW_SESSION), nil, nil, &session))
        return session
    }

    func login(_ session: CK_SESSION_HANDLE, _ pin: String) -> CK_RV {
        var bytes = Array(pin.utf8)
        return f.C_Login!(session, CK_USER_TYPE(CKU_USER), &bytes, CK_ULONG(bytes.count))
    }

    func find(_ session: CK_SESSION_HANDLE, class objectClass: CK_OBJECT_CLASS, id: UInt8) throws -> CK_OBJECT_HANDLE {
        let cls = UnsafeMutablePointer<CK_OBJECT_CLASS>.allocate(capacity: 1)
        let keyID = UnsafeMutablePointer<UInt8>.allocate(capacity: 1)
        defer {
            cls.deallocate()
            keyID.deallocate()
        }
        cls.pointee = objectClass
        keyID.pointee = id
        var template = [
            CK_ATTRIBUTE(type: CK_ATTRIBUTE_TYPE(CKA_CLASS), pValue: cls, ulValueLen: CK_ULONG(MemoryLayout<CK_OBJECT_CLASS>.size)),
            CK_ATTRIBUTE(type: CK_ATTRIBUTE_TYPE(CKA_ID), pValue: keyID, ulValueLen: 1),
        ]
        try check(f.C_FindObjectsInit!(session, &template, CK_ULONG(template.count)))
        var handle: CK_OBJECT_HANDLE = 0
        var found: CK_ULONG = 0
        let rv = f.C_FindObjects!(session, &handle, 1, &found)
        _ = f.C_FindObjectsFinal!(session)
        try check(rv)
        guard found == 1 else { throw LoopbackError("object \(id) of class \(objectClass) not found") }
        return handle
    }

    /// C_SignInit + C_Sign with ECDSA over a 32-byte digest: the rv and the signature.
    func sign(_ session: CK_SESSION_HANDLE, _ key: CK_OBJECT_HANDLE, _ digest: [UInt8]) -> (CK_RV, [UInt8]) {
        var mechanism = CK_MECHANISM(mechanism: CK_MECHANISM_TYPE(CKM_ECDSA), pParameter: nil, ulParameterLen: 0)
        let initRV = f.C_SignInit!(session, &mechanism, key)
        guard initRV == CKR_OK else { return (initRV, []) }
        var data = digest
        var signature = [UInt8](repeating: 0, count: 256)
        var length = CK_ULONG(signature.count)
        let rv = f.C_Sign!(session, &data, CK_ULONG(data.count), &signature, &length)
        return (rv, rv == CKR_OK ? Array(signature.prefix(Int(length))) : [])
    }

    func verify(_ session: CK_SESSION_HANDLE, _ key: CK_OBJECT_HANDLE, _ digest: [UInt8], _ signature: [UInt8]) -> CK_RV {
        var mechanism = CK_MECHANISM(mechanism: CK_MECHANISM_TYPE(CKM_ECDSA), pParameter: nil, ulParameterLen: 0)
        let initRV = f.C_VerifyInit!(session, &mechanism, key)
        guard initRV == CKR_OK else { return initRV }
        var data = digest
        var sig = signature
        return f.C_Verify!(session, &data, CK_ULONG(data.count), &sig, CK_ULONG(sig.count))
    }

    func check(_ rv: CK_RV, sourceLocation: SourceLocation = #_sourceLocation) throws {
        guard rv == CKR_OK else { throw LoopbackError("CK_RV 0x\(String(rv, radix: 16))") }
    }
}

private let digest = [UInt8](repeating: 0x5a, count: 32)

/// Host set-up shared by the tests: initialised, a session on the loopback token, logged in.
private func loggedIn(_ host: Host) throws -> (CK_SLOT_ID, CK_SESSION_HANDLE) {
    let slot = try host.slot(labelled: Loopback.tokenLabel)
    let session = try host.openSession(slot)
    try host.check(host.login(session, Loopback.pin))
    return (slot, session)
}

@Suite(.serialized, .enabled(if: Loopback.enabled, "needs a process of its own: PINCACHE_LOOPBACK_TESTS=1 swift test --filter ProxyLoopbackTests"))
struct LoopbackTests {
    @Test(arguments: [false, true])
    func signsAndVerifiesThroughTheDispatcher(caching: Bool) throws {
        let loop = try Loopback.get()
        loop.service.reload(try Loopback.configuration(caching: caching))
        let host = Host(f: loop.functions)
        #expect(host.initialize() == CKR_OK)
        defer { #expect(host.finalize() == CKR_OK) }
        let (_, session) = try loggedIn(host)
        let key = try host.find(session, class: CK_OBJECT_CLASS(CKO_PRIVATE_KEY), id: 1)
        let publicKey = try host.find(session, class: CK_OBJECT_CLASS(CKO_PUBLIC_KEY), id: 1)
        for _ in 0..<3 {
            let (rv, signature) = host.sign(session, key, digest)
            #expect(rv == CKR_OK)
            #expect(signature.count == 64)
            #expect(host.verify(session, publicKey, digest, signature) == CKR_OK)
            var tampered = signature
            tampered[0] ^= 1
            #expect(host.verify(session, publicKey, digest, tampered) == CKR_SIGNATURE_INVALID)
        }
        // After C_Logout the daemon refuses the private key, in either mode.
        #expect(host.f.C_Logout!(session) == CKR_OK)
        #expect(host.sign(session, key, digest).0 == CKR_USER_NOT_LOGGED_IN)
    }

    @Test func wrongPINAndBadArgumentsGetPreciseErrors() throws {
        let loop = try Loopback.get()
        let host = Host(f: loop.functions)
        #expect(host.initialize() == CKR_OK)
        defer { #expect(host.finalize() == CKR_OK) }
        let slot = try host.slot(labelled: Loopback.tokenLabel)
        let session = try host.openSession(slot)
        #expect(host.login(session, "000000") == CKR_PIN_INCORRECT)
        #expect(host.f.C_Login!(session, CK_USER_TYPE(CKU_USER), nil, 6) == CKR_ARGUMENTS_BAD)
        #expect(host.f.C_OpenSession!(slot, CK_FLAGS(CKF_SERIAL_SESSION), nil, nil, nil) == CKR_ARGUMENTS_BAD)
        #expect(host.f.C_GetSessionInfo!(session, nil) == CKR_ARGUMENTS_BAD)
        var info = CK_SESSION_INFO()
        #expect(host.f.C_GetSessionInfo!(session &+ 1000, &info) == CKR_SESSION_HANDLE_INVALID)
        #expect(host.login(session, Loopback.pin) == CKR_OK)
        let key = try host.find(session, class: CK_OBJECT_CLASS(CKO_PRIVATE_KEY), id: 1)
        var mechanism = CK_MECHANISM(mechanism: CK_MECHANISM_TYPE(CKM_ECDSA), pParameter: nil, ulParameterLen: 0)
        #expect(host.f.C_SignInit!(session, &mechanism, key) == CKR_OK)
        var data = digest
        #expect(host.f.C_Sign!(session, &data, CK_ULONG(data.count), nil, nil) == CKR_ARGUMENTS_BAD)
    }

    /// A reply broken on its way back: the call that was waiting gets a PKCS#11 error at once
    /// (no crash, no wait for the 30 s timeout), the broken link's sessions are gone, and the
    /// next session works on a new socket.
    @Test(arguments: [
        (Relay.Fault.shortFrame, CKR_DEVICE_ERROR), (.wrongCallID, CKR_DEVICE_ERROR), (.oversizeLength, CKR_DEVICE_ERROR),
        (.peerGone, CKR_DEVICE_REMOVED),
    ])
    func brokenTransportGivesAnErrorNotACrash(fault: Relay.Fault, expected: CK_RV) throws {
        let loop = try Loopback.get()
        loop.service.reload(try Loopback.configuration(caching: false))
        let host = Host(f: loop.functions)
        #expect(host.initialize() == CKR_OK)
        defer { #expect(host.finalize() == CKR_OK) }
        let (slot, session) = try loggedIn(host)
        let key = try host.find(session, class: CK_OBJECT_CLASS(CKO_PRIVATE_KEY), id: 1)
        // One good signature first: the proxy has asked for the mechanism list, so the fault
        // lands on the Sign call itself.
        #expect(host.sign(session, key, digest).0 == CKR_OK)

        loop.relay.arm(fault)
        let started = Date()
        let (rv, _) = host.sign(session, key, digest)
        #expect(rv == expected)
        #expect(Date().timeIntervalSince(started) < 10, "answered by the fault, not by the call's timeout")
        loop.relay.arm(.none)

        var info = CK_SESSION_INFO()
        #expect(host.f.C_GetSessionInfo!(session, &info) == CKR_SESSION_HANDLE_INVALID)
        let again = try host.openSession(slot)
        #expect(host.login(again, Loopback.pin) == CKR_OK)
        let key2 = try host.find(again, class: CK_OBJECT_CLASS(CKO_PRIVATE_KEY), id: 1)
        #expect(host.sign(again, key2, digest).0 == CKR_OK)
    }

    /// The daemon's side of a socket the proxy dropped: its environment (and the login in it)
    /// ends, so a new C_Initialize starts logged out.
    @Test func finalizeEndsTheEnvironment() throws {
        let loop = try Loopback.get()
        loop.service.reload(try Loopback.configuration(caching: true))
        let host = Host(f: loop.functions)
        #expect(host.initialize() == CKR_OK)
        _ = try loggedIn(host)
        #expect(host.finalize() == CKR_OK)

        #expect(host.initialize() == CKR_OK)
        defer { #expect(host.finalize() == CKR_OK) }
        let slot = try host.slot(labelled: Loopback.tokenLabel)
        let session = try host.openSession(slot)
        var info = CK_SESSION_INFO()
        #expect(host.f.C_GetSessionInfo!(session, &info) == CKR_OK)
        #expect(info.state == CK_STATE(CKS_RW_PUBLIC_SESSION))
    }
}
