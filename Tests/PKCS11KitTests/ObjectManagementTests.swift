import Foundation
import PKCS11Kit
import Testing

/// Token initialisation, PIN management, object and key management, raw verification and
/// per-attribute results, against real SoftHSM. An extension of `ModuleTests` so these run
/// serialised with the rest (the login state and the FaultShim's login log are shared).
/// Objects made on token T are session objects: they vanish with the session, so the
/// object counts the other tests expect stay true.
extension ModuleTests {
    /// DER of the OID prime256v1 (1.2.840.10045.3.1.7), SoftHSM's `CKA_EC_PARAMS` form.
    static let prime256v1: [UInt8] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]

    /// A read-write session on token T with the user logged in.
    func withReadWriteUserSession<R>(_ body: (SessionHandle) throws -> R) throws -> R {
        let s = try m.openSession(f.slot, readWrite: true)
        defer { try? m.closeSession(s) }
        try f.login(s)
        defer { try? m.logout(s) }
        return try body(s)
    }

    func login(_ s: SessionHandle, _ pin: String, as userType: UserType = .user) throws {
        try Array(pin.utf8).withUnsafeBytes { try m.login(s, userType: userType, pin: $0) }
    }

    @Test func tokenInfoCountersVersionsAndClock() throws {
        let t = try m.tokenInfo(f.slot)
        // SoftHSM 2.6 reports no session counts or memory, and no session limit.
        let unavailable = UInt.max
        #expect(t.sessionCount == unavailable && t.rwSessionCount == unavailable)
        #expect(t.maxSessionCount == 0 && t.maxRwSessionCount == 0, "CK_EFFECTIVELY_INFINITE")
        #expect(t.totalPublicMemory == unavailable && t.freePublicMemory == unavailable)
        #expect(t.totalPrivateMemory == unavailable && t.freePrivateMemory == unavailable)
        // SoftHSM reports its own version as both.
        #expect(t.hardwareVersion.major == 2 && t.hardwareVersion == t.firmwareVersion)

        // SoftHSM fills utcTime (YYYYMMDDhhmmss00, UTC, close to now) without claiming
        // CKF_CLOCK_ON_TOKEN: the field is passed on as given, not gated on the flag.
        #expect(!t.clockOnToken)
        #expect(t.utcTime.count == 16 && t.utcTime.allSatisfy(\.isASCII) && t.utcTime.allSatisfy(\.isNumber))
        let format = DateFormatter()
        format.locale = Locale(identifier: "en_US_POSIX")
        format.timeZone = TimeZone(identifier: "UTC")
        format.dateFormat = "yyyyMMddHHmmss"
        let when = try #require(format.date(from: String(t.utcTime.prefix(14))), "\(t.utcTime)")
        #expect(abs(when.timeIntervalSinceNow) < 300, "\(t.utcTime)")
    }

    @Test func initTokenAndPINs() throws {
        let spare = f.spareSlot
        #expect(try !m.tokenInfo(spare).tokenInitialized)
        let soPIN = Array("87654321".utf8)

        // 33 bytes: refused before the module sees it.
        #expect(throws: PKCS11Error(rv: .argumentsBad, function: "C_InitToken")) {
            try soPIN.withUnsafeBytes { try m.initToken(spare, soPIN: $0, label: String(repeating: "x", count: 33)) }
        }
        #expect(try !m.tokenInfo(spare).tokenInitialized)

        // Exactly 32 bytes (with a two-byte character) needs no padding and must fit.
        let label32 = "pkcs11b-ä" + String(repeating: "y", count: 22)
        #expect(label32.utf8.count == 32)
        try soPIN.withUnsafeBytes { try m.initToken(spare, soPIN: $0, label: label32) }
        #expect(try m.tokenInfo(spare).label == label32)
        // Re-initialising with the right SO PIN and a short label: blank-padded, read back trimmed.
        try soPIN.withUnsafeBytes { try m.initToken(spare, soPIN: $0, label: "X") }
        let fresh = try m.tokenInfo(spare)
        #expect(fresh.label == "X" && fresh.tokenInitialized && !fresh.userPinInitialized)
        #expect(throws: PKCS11Error(rv: .pinIncorrect, function: "C_InitToken")) {
            try Array("00000000".utf8).withUnsafeBytes { try m.initToken(spare, soPIN: $0, label: "Y") }
        }
        #expect(try m.tokenInfo(spare).label == "X")

        // The SO sets the first user PIN.
        do {
            let s = try m.openSession(spare, readWrite: true)
            defer { try? m.closeSession(s) }
            try login(s, "87654321", as: .so)
            try Array("1111".utf8).withUnsafeBytes { try m.initPIN(s, pin: $0) }
            try m.logout(s)
        }
        #expect(try m.tokenInfo(spare).userPinInitialized)

        // The user changes it.
        let s = try m.openSession(spare, readWrite: true)
        defer { try? m.closeSession(s) }
        try login(s, "1111")
        #expect(throws: PKCS11Error(rv: .pinIncorrect, function: "C_SetPIN")) {
            try Array("9999".utf8).withUnsafeBytes { old in
                try Array("3333".utf8).withUnsafeBytes { try m.setPIN(s, old: old, new: $0) }
            }
        }
        try Array("1111".utf8).withUnsafeBytes { old in
            try Array("2222".utf8).withUnsafeBytes { try m.setPIN(s, old: old, new: $0) }
        }
        try m.logout(s)
        #expect(throws: PKCS11Error(rv: .pinIncorrect, function: "C_Login")) { try login(s, "1111") }
        try login(s, "2222")
        #expect(try m.sessionInfo(s).userLoggedIn)
        try m.logout(s)
    }

    @Test func dataObjectLifecycle() throws {
        try f.withUserSession { s in
            let payload: [UInt8] = [0xde, 0xad, 0xbe, 0xef]
            let original = try m.createObject(s, [
                .objectClass(.data), .bool(.token, false), .bool(.private, false),
                .string(.label, "d1"), .string(.application, "pkcs11b"), Attribute(.value, payload),
            ])
            let copy = try m.copyObject(s, original, [.string(.label, "d2")])
            #expect(copy != original)
            #expect(try m.getAttributes(s, copy, [.label, .value, .application]) == [
                .label: Array("d2".utf8), .value: payload, .application: Array("pkcs11b".utf8),
            ])
            #expect(try m.findObjects(s, matching: [.string(.application, "pkcs11b")]).count == 2)

            try m.setAttributes(s, original, [.string(.label, "renamed")])
            #expect(try m.getAttributes(s, original, [.label])[.label] == Array("renamed".utf8))
            #expect(try m.getAttributes(s, copy, [.label])[.label] == Array("d2".utf8), "the copy is its own object")
            // CKA_CLASS cannot change after creation.
            let e = #expect(throws: PKCS11Error.self) { try m.setAttributes(s, original, [.objectClass(.certificate)]) }
            #expect(e?.function == "C_SetAttributeValue")
            #expect(e?.rv == .attributeReadOnly)

            try m.destroyObject(s, original)
            #expect(throws: PKCS11Error(rv: .objectHandleInvalid, function: "C_GetAttributeValue")) {
                try m.getAttributes(s, original, [.label])
            }
            #expect(throws: PKCS11Error(rv: .objectHandleInvalid, function: "C_DestroyObject")) {
                try m.destroyObject(s, original)
            }
            #expect(try m.findObjects(s, matching: [.string(.application, "pkcs11b")]) == [copy])
            try m.destroyObject(s, copy)
            #expect(try m.findObjects(s, matching: [.string(.application, "pkcs11b")]).isEmpty)

            // Values longer than getAttributes' first guess take the long way, and arrive whole.
            let long = [UInt8](repeating: 0x5a, count: 3000)
            let big = try m.createObject(s, [
                .objectClass(.data), .bool(.token, false), .bool(.private, false), .string(.label, "big"), Attribute(.value, long),
            ])
            let read = try m.getAttributes(s, big, [.label, .value, .class])
            #expect(read[.value] == long && read[.label] == Array("big".utf8))
            #expect(read[.class]?.pkcs11ULong == ObjectClass.data.rawValue)
            try m.destroyObject(s, big)

            // An incomplete template: the error names C_CreateObject.
            #expect(throws: PKCS11Error(rv: .templateIncomplete, function: "C_CreateObject")) {
                try m.createObject(s, [.bool(.token, false)])
            }
        }
    }

    @Test func generatedECKeyPairSignsAndVerifiesRaw() throws {
        try f.withUserSession { s in
            let keys = try m.generateKeyPair(
                s, mechanism: Mechanism(.ecKeyPairGen),
                publicTemplate: [.bool(.token, false), .bool(.verify, true), Attribute(.ecParams, Self.prime256v1)],
                privateTemplate: [
                    .bool(.token, false), .bool(.private, true), .bool(.sensitive, true), .bool(.sign, true),
                    Attribute(.id, [0x42]),
                ])
            defer {
                try? m.destroyObject(s, keys.private)
                try? m.destroyObject(s, keys.public)
            }
            #expect(keys.public != keys.private)
            let point = try m.getAttributes(s, keys.public, [.ecPoint])[.ecPoint]
            #expect(point?.count == 67, "DER OCTET STRING of an uncompressed P-256 point")

            let digest = [UInt8](repeating: 0x5a, count: 32)
            let sig = try m.sign(s, mechanism: Mechanism(.ecdsa), key: keys.private, data: digest)
            #expect(sig.count == 64)
            try m.verifyRaw(s, mechanism: Mechanism(.ecdsa), key: keys.public, data: digest, signature: sig)
            var flipped = sig
            flipped[20] ^= 0x80
            #expect(throws: PKCS11Error(rv: .signatureInvalid, function: "C_Verify")) {
                try m.verifyRaw(s, mechanism: Mechanism(.ecdsa), key: keys.public, data: digest, signature: flipped)
            }
            #expect(throws: PKCS11Error(rv: .signatureLenRange, function: "C_Verify")) {
                try m.verifyRaw(
                    s, mechanism: Mechanism(.ecdsa), key: keys.public, data: digest, signature: Array(sig.prefix(63)))
            }
            // verify keeps its Bool for an invalid signature, and throws for the length.
            #expect(
                try !m.verify(s, mechanism: Mechanism(.ecdsa), key: keys.public, data: digest, signature: flipped))
            #expect(throws: PKCS11Error(rv: .signatureLenRange, function: "C_Verify")) {
                try m.verify(
                    s, mechanism: Mechanism(.ecdsa), key: keys.public, data: digest, signature: Array(sig.prefix(63)))
            }
            // A failure in the init names C_VerifyInit.
            let e = #expect(throws: PKCS11Error.self) {
                try m.verifyRaw(
                    s, mechanism: Mechanism(.ecdsa), key: ObjectHandle(rawValue: 0xffff_fff0), data: digest, signature: sig)
            }
            #expect(e?.function == "C_VerifyInit")

            // Per-attribute verdicts, in the order asked.
            let bogus = AttributeType(rawValue: 0x7fff_1234)
            let results = try m.attributeValues(s, keys.private, [.id, .value, bogus, .ecParams, .sign, .modulus])
            #expect(results == [
                AttributeResult(type: .id, status: .ok, value: [0x42]),
                AttributeResult(type: .value, status: .attributeSensitive, value: []),
                AttributeResult(type: bogus, status: .attributeTypeInvalid, value: []),
                AttributeResult(type: .ecParams, status: .ok, value: Self.prime256v1),
                AttributeResult(type: .sign, status: .ok, value: [1]),
                AttributeResult(type: .modulus, status: .attributeTypeInvalid, value: []),
            ])
            #expect(try m.attributeValues(s, keys.private, [.value]) == [
                AttributeResult(type: .value, status: .attributeSensitive, value: [])
            ])
            #expect(try m.attributeValues(s, keys.private, [bogus, .value]).map(\.status) == [
                .attributeTypeInvalid, .attributeSensitive,
            ])
            #expect(try m.attributeValues(s, keys.public, [.ecParams, .verify]) == [
                AttributeResult(type: .ecParams, status: .ok, value: Self.prime256v1),
                AttributeResult(type: .verify, status: .ok, value: [1]),
            ])
            #expect(try m.attributeValues(s, keys.public, []).isEmpty)
            #expect(throws: PKCS11Error(rv: .objectHandleInvalid, function: "C_GetAttributeValue")) {
                try m.attributeValues(s, ObjectHandle(rawValue: 0xffff_fff0), [.id, .value])
            }
        }
    }

    @Test func generatedAESKey() throws {
        try f.withUserSession { s in
            let key = try m.generateKey(
                s, mechanism: Mechanism(.aesKeyGen),
                template: [
                    .bool(.token, false), .ulong(.valueLen, 32), .bool(.encrypt, true), .bool(.sensitive, false),
                    .bool(.extractable, true), .string(.label, "aes"),
                ])
            defer { try? m.destroyObject(s, key) }
            let attrs = try m.attributeValues(s, key, [.class, .keyType, .valueLen, .value, .local])
            #expect(attrs.allSatisfy { $0.status == .ok }, "\(attrs)")
            #expect(attrs[0].value.pkcs11ULong == ObjectClass.secretKey.rawValue)
            #expect(attrs[1].value.pkcs11ULong == KeyType.aes.rawValue)
            #expect(attrs[2].value.pkcs11ULong == 32)
            #expect(attrs[3].value.count == 32 && attrs[3].value != [UInt8](repeating: 0, count: 32))
            #expect(attrs[4].value.pkcs11Bool == true, "generated on the token")

            // A sensitive one hides its value.
            let hidden = try m.generateKey(
                s, mechanism: Mechanism(.aesKeyGen),
                template: [.bool(.token, false), .ulong(.valueLen, 16), .bool(.sensitive, true)])
            defer { try? m.destroyObject(s, hidden) }
            #expect(try m.attributeValues(s, hidden, [.valueLen, .value]) == [
                AttributeResult(type: .valueLen, status: .ok, value: Attribute.ulong(.valueLen, 16).value),
                AttributeResult(type: .value, status: .attributeSensitive, value: []),
            ])
            // An impossible AES length.
            let e = #expect(throws: PKCS11Error.self) {
                try m.generateKey(
                    s, mechanism: Mechanism(.aesKeyGen), template: [.bool(.token, false), .ulong(.valueLen, 7)])
            }
            #expect(e?.function == "C_GenerateKey")
        }
    }

    @Test func pssWithRawParameterBytes() throws {
        try f.withUserSession { s in
            let key = try f.object(s, .privateKey, id: 2)
            let pub = try f.object(s, .publicKey, id: 2)
            let data = Array("raw PSS parameters".utf8)
            // The bytes of CK_RSA_PKCS_PSS_PARAMS { hashAlg, mgf, sLen } as a client would send them.
            let rawParams = [MechanismType.sha256.rawValue, MGF.sha256.rawValue, UInt(32)]
                .flatMap { v in withUnsafeBytes(of: v) { Array($0) } }
            let raw = Mechanism(.sha256RSAPKCSPSS, parameter: .raw(rawParams))
            let typed = Mechanism(.sha256RSAPKCSPSS, parameter: .pss(hash: .sha256, mgf: .sha256, saltLength: 32))

            let signedRaw = try m.sign(s, mechanism: raw, key: key, data: data)
            #expect(signedRaw.count == 256)
            try m.verifyRaw(s, mechanism: typed, key: pub, data: data, signature: signedRaw)
            let signedTyped = try m.sign(s, mechanism: typed, key: key, data: data)
            try m.verifyRaw(s, mechanism: raw, key: pub, data: data, signature: signedTyped)
            #expect(throws: PKCS11Error(rv: .signatureInvalid, function: "C_Verify")) {
                try m.verifyRaw(s, mechanism: raw, key: pub, data: data + [0], signature: signedTyped)
            }
            // A different salt length in the raw bytes really reaches the module.
            let salt20 = Array(rawParams.prefix(16)) + withUnsafeBytes(of: UInt(20)) { Array($0) }
            #expect(throws: PKCS11Error(rv: .signatureInvalid, function: "C_Verify")) {
                try m.verifyRaw(
                    s, mechanism: Mechanism(.sha256RSAPKCSPSS, parameter: .raw(salt20)), key: pub, data: data,
                    signature: signedTyped)
            }
        }
    }

    @Test func seedRandom() throws {
        let s = try m.openSession(f.slot)
        defer { try? m.closeSession(s) }
        try m.seedRandom(s, Array("more entropy".utf8))
        try m.seedRandom(s, [])
        #expect(try m.generateRandom(s, count: 16).count == 16)
        #expect(throws: PKCS11Error(rv: .sessionHandleInvalid, function: "C_SeedRandom")) {
            try m.seedRandom(SessionHandle(rawValue: 0xffff_fff0), [1])
        }
    }
}

/// Array attributes travel flattened (NestedTemplate) and become C arrays only for a call.
extension ModuleTests {
    @Test func arrayAttributesGoInAndComeBackFlattened() throws {
        let wrapTemplate = AttributeType(rawValue: 0x4000_0211)  // CKA_WRAP_TEMPLATE
        let inner: [Attribute] = [.ulong(.keyType, 0x10 /* CKK_GENERIC_SECRET */), .bool(.extractable, true)]
        try f.withUserSession { s in
            let key = try m.createObject(
                s,
                [
                    .objectClass(.secretKey), .keyType(.aes), .bool(.token, false), .bool(.wrap, true),
                    Attribute(.value, [UInt8](repeating: 7, count: 16)),
                    Attribute(wrapTemplate, NestedTemplate.flatten(inner)),
                ])
            defer { try? m.destroyObject(s, key) }
            // Both readers, an array attribute among plain ones, in the order asked.
            let results = try m.attributeValues(s, key, [.label, wrapTemplate, .keyType])
            #expect(results.map(\.status) == [.ok, .ok, .ok])
            #expect(NestedTemplate.parse(results[1].value) == inner)
            #expect(results[2].value.pkcs11ULong == KeyType.aes.rawValue)
            #expect(try m.getAttributes(s, key, [wrapTemplate, .class])[wrapTemplate].flatMap(NestedTemplate.parse) == inner)
            // An object without one: the module's verdict for that attribute alone.
            let plain = try m.createObject(
                s, [.objectClass(.data), .bool(.token, false), .string(.label, "no array here")])
            defer { try? m.destroyObject(s, plain) }
            #expect(try m.attributeValues(s, plain, [wrapTemplate, .label]).map(\.status) == [.attributeTypeInvalid, .ok])
        }
    }

    @Test func nestedTemplatesRefuseWhatTheyCannotCarry() {
        let entry = NestedTemplate.flatten([.bool(.sign, true)])
        #expect(entry.count == 17)
        #expect(NestedTemplate.parse(entry) == [.bool(.sign, true)])
        #expect(NestedTemplate.parse([]) == [])
        #expect(NestedTemplate.parse(Array(entry.dropLast())) == nil, "cut short")
        #expect(NestedTemplate.parse(NestedTemplate.flatten([Attribute(AttributeType(rawValue: 0x4000_0212), [])])) == nil,
                "an array within an array")
        let tooMany = [Attribute](repeating: .bool(.sign, true), count: NestedTemplate.maxEntries + 1)
        #expect(NestedTemplate.parse(NestedTemplate.flatten(tooMany)) == nil)
    }
}

/// Multi-part encryption as an application calls it: the module's verdicts and output as given.
extension ModuleTests {
    @Test func streamedPartsAnswerAsTheModuleDoes() throws {
        try f.withUserSession { s in
            let key = try m.createObject(
                s,
                [
                    .objectClass(.secretKey), .keyType(.aes), .bool(.token, false), .bool(.encrypt, true),
                    .bool(.decrypt, true), Attribute(.value, [UInt8](repeating: 9, count: 16)),
                ])
            defer { try? m.destroyObject(s, key) }
            let cbcPad = Mechanism(MechanismType(rawValue: 0x1085), parameter: .raw([UInt8](repeating: 0, count: 16)))
            try m.streamInit(s, .encrypt, mechanism: cbcPad, key: key)
            let data = [UInt8](repeating: 0x33, count: 20)
            // A length query consumes nothing; a buffer too small neither.
            #expect(try m.streamUpdate(s, .encrypt, data: data, output: .lengthQuery).rv == .ok)
            #expect(try m.streamUpdate(s, .encrypt, data: data, output: .buffer(capacity: 1)).rv == .bufferTooSmall)
            let first = try m.streamUpdate(s, .encrypt, data: data, output: .buffer(capacity: 64))
            #expect(first.rv == .ok && first.length == 16 && first.output.count == 16)
            let final = try m.streamFinal(s, .encrypt, signature: [], output: .buffer(capacity: 64))
            #expect(final.rv == .ok && final.output.count == 16)
            // Whole, it is what single-part encryption gives.
            #expect(first.output + final.output == (try m.encrypt(s, mechanism: cbcPad, key: key, data: data)))
            // The operation ended with its final call.
            #expect(throws: PKCS11Error.self) { try m.streamUpdate(s, .encrypt, data: data, output: .lengthQuery) }

            // A digest in parts, and its length query, are the single-part digest's.
            try m.streamInit(s, .digest, mechanism: Mechanism(.sha256), key: nil)
            _ = try m.streamUpdate(s, .digest, data: Array("ab".utf8), output: .noLength)
            _ = try m.streamUpdate(s, .digest, data: Array("c".utf8), output: .noLength)
            #expect(try m.streamFinal(s, .digest, signature: [], output: .lengthQuery) == .init(rv: .ok, length: 32, output: []))
            let digest = try m.streamFinal(s, .digest, signature: [], output: .buffer(capacity: 32))
            #expect(digest.output == (try m.digest(s, mechanism: Mechanism(.sha256), data: Array("abc".utf8))))
        }
    }
}
