import CPKCS11

/// Cryptography (the operations the daemon runs whole, Init to result, inside one bracket or
/// held login) and random numbers.
extension PKCS11Module {
    /// `C_SignInit` then the two-call `C_Sign`.
    public func sign(_ s: SessionHandle, mechanism: Mechanism, key: ObjectHandle, data: [UInt8]) throws -> [UInt8] {
        try signInit(s, mechanism: mechanism, key: key)
        return try signAfterInit(s, data: data)
    }

    /// `C_SignInit` alone, for when a `CKU_CONTEXT_SPECIFIC` login must come before the data.
    public func signInit(_ s: SessionHandle, mechanism: Mechanism, key: ObjectHandle) throws {
        try mechanism.withCMechanism { m in
            try call("C_SignInit", \.C_SignInit) { $0(s.rawValue, m, key.rawValue) }
        }
    }

    /// The two-call `C_Sign` of an operation started with `signInit`. A signature longer than
    /// 64 MiB is refused (the operation then stays active until the session closes).
    public func signAfterInit(_ s: SessionHandle, data: [UInt8]) throws -> [UInt8] {
        try withInput(data) { input, length in
            try twoCall("C_Sign", \.C_Sign, zero: UInt8(0), cap: Self.maxLength, guess: Self.outputGuess) { f, out, outLength in
                f(s.rawValue, input, length, out, outLength)
            }
        }
    }

    /// `C_SignUpdate` of a multi-part signature started with `signInit`.
    public func signUpdate(_ s: SessionHandle, data: [UInt8]) throws {
        try withInput(data) { input, length in
            try call("C_SignUpdate", \.C_SignUpdate) { $0(s.rawValue, input, length) }
        }
    }

    /// The two-call `C_SignFinal` of a multi-part signature.
    public func signFinal(_ s: SessionHandle) throws -> [UInt8] {
        try twoCall("C_SignFinal", \.C_SignFinal, zero: UInt8(0), cap: Self.maxLength, guess: Self.outputGuess) { f, out, outLength in
            f(s.rawValue, out, outLength)
        }
    }

    /// `C_VerifyInit` then `C_Verify`: false on `CKR_SIGNATURE_INVALID`, other failures throw.
    public func verify(_ s: SessionHandle, mechanism: Mechanism, key: ObjectHandle, data: [UInt8], signature: [UInt8])
        throws -> Bool
    {
        do {
            try verifyRaw(s, mechanism: mechanism, key: key, data: data, signature: signature)
            return true
        } catch let e as PKCS11Error where e.rv == .signatureInvalid && e.function == "C_Verify" {
            return false
        }
    }

    /// `C_VerifyInit` then `C_Verify`, every failure thrown, `CKR_SIGNATURE_INVALID` and
    /// `CKR_SIGNATURE_LEN_RANGE` included (the proxy must return the module's exact code).
    public func verifyRaw(
        _ s: SessionHandle, mechanism: Mechanism, key: ObjectHandle, data: [UInt8], signature: [UInt8]
    ) throws {
        try mechanism.withCMechanism { m in
            try call("C_VerifyInit", \.C_VerifyInit) { $0(s.rawValue, m, key.rawValue) }
        }
        try withInput(data) { input, length in
            try withInput(signature) { sig, sigLength in
                try call("C_Verify", \.C_Verify) { $0(s.rawValue, input, length, sig, sigLength) }
            }
        }
    }

    /// `C_DigestInit` then the two-call `C_Digest` (no login needed).
    public func digest(_ s: SessionHandle, mechanism: Mechanism, data: [UInt8]) throws -> [UInt8] {
        try mechanism.withCMechanism { m in
            try call("C_DigestInit", \.C_DigestInit) { $0(s.rawValue, m) }
        }
        return try withInput(data) { input, length in
            try twoCall("C_Digest", \.C_Digest, zero: UInt8(0), cap: Self.maxLength, guess: Self.outputGuess) { f, out, outLength in
                f(s.rawValue, input, length, out, outLength)
            }
        }
    }

    /// `C_EncryptInit` then the two-call `C_Encrypt`.
    public func encrypt(_ s: SessionHandle, mechanism: Mechanism, key: ObjectHandle, data: [UInt8]) throws -> [UInt8] {
        try mechanism.withCMechanism { m in
            try call("C_EncryptInit", \.C_EncryptInit) { $0(s.rawValue, m, key.rawValue) }
        }
        return try withInput(data) { input, length in
            try twoCall("C_Encrypt", \.C_Encrypt, zero: UInt8(0), cap: Self.maxLength, guess: Self.outputGuess(for: data)) { f, out, outLength in
                f(s.rawValue, input, length, out, outLength)
            }
        }
    }

    /// `C_DecryptInit` then the two-call `C_Decrypt`.
    public func decrypt(_ s: SessionHandle, mechanism: Mechanism, key: ObjectHandle, data: [UInt8]) throws -> [UInt8] {
        try decryptInit(s, mechanism: mechanism, key: key)
        return try decryptAfterInit(s, data: data)
    }

    /// `C_DecryptInit` alone, for when a `CKU_CONTEXT_SPECIFIC` login must come before the data.
    public func decryptInit(_ s: SessionHandle, mechanism: Mechanism, key: ObjectHandle) throws {
        try mechanism.withCMechanism { m in
            try call("C_DecryptInit", \.C_DecryptInit) { $0(s.rawValue, m, key.rawValue) }
        }
    }

    /// The two-call `C_Decrypt` of an operation started with `decryptInit`.
    public func decryptAfterInit(_ s: SessionHandle, data: [UInt8]) throws -> [UInt8] {
        try withInput(data) { input, length in
            try twoCall("C_Decrypt", \.C_Decrypt, zero: UInt8(0), cap: Self.maxLength, guess: Self.outputGuess(for: data)) { f, out, outLength in
                f(s.rawValue, input, length, out, outLength)
            }
        }
    }

    /// `C_GenerateRandom`; at most 64 MiB.
    public func generateRandom(_ s: SessionHandle, count: Int) throws -> [UInt8] {
        guard count >= 0, count <= Self.maxLength else {
            throw PKCS11Error(rv: .argumentsBad, function: "C_GenerateRandom")
        }
        var bytes = [UInt8](repeating: 0, count: max(count, 1))
        try call("C_GenerateRandom", \.C_GenerateRandom) { f in
            bytes.withUnsafeMutableBufferPointer { f(s.rawValue, $0.baseAddress, CK_ULONG(count)) }
        }
        return Array(bytes.prefix(count))
    }

    /// `C_SeedRandom`
    public func seedRandom(_ s: SessionHandle, _ seed: [UInt8]) throws {
        try withInput(seed) { input, length in
            try call("C_SeedRandom", \.C_SeedRandom) { $0(s.rawValue, input, length) }
        }
    }
}
