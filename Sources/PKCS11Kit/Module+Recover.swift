import CPKCS11

/// The functions PKCS#11 lets a module leave out (sign/verify with recovery, the dual-function
/// updates, operation state), and the recovering operations themselves. A proxy asks which a
/// module implements so it says CKR_FUNCTION_NOT_SUPPORTED exactly where the module does.
extension PKCS11Module {
    public struct OptionalFunctions: OptionSet, Sendable, Hashable {
        public let rawValue: UInt64
        public init(rawValue: UInt64) { self.rawValue = rawValue }

        public static let signRecover = Self(rawValue: 1 << 0)
        public static let verifyRecover = Self(rawValue: 1 << 1)
        public static let digestEncrypt = Self(rawValue: 1 << 2)
        public static let decryptDigest = Self(rawValue: 1 << 3)
        public static let signEncrypt = Self(rawValue: 1 << 4)
        public static let decryptVerify = Self(rawValue: 1 << 5)
        public static let getOperationState = Self(rawValue: 1 << 6)
        public static let setOperationState = Self(rawValue: 1 << 7)
        /// Not a function: a session may have operations of different kinds active at once
        /// (OpenSC's may; SoftHSM's answer CKR_OPERATION_ACTIVE to any second one).
        public static let concurrentOperations = Self(rawValue: 1 << 8)
        /// PKCS#11 3.0's C_LoginUser and C_SessionCancel, in the module's 3.0 interface.
        public static let loginUser = Self(rawValue: 1 << 9)
        public static let sessionCancel = Self(rawValue: 1 << 10)
    }

    /// Which optional functions the module implements, asked in `s`, a session of its own
    /// with no operation active (the caller closes it after). Each is called with arguments
    /// that cannot start anything (no key, no operation to continue, a length query), so any
    /// answer but CKR_FUNCTION_NOT_SUPPORTED (or a NULL entry) means the function is there.
    /// The arguments are valid pointers: a module that trusts its caller must not fault.
    public func optionalFunctions(_ s: SessionHandle) -> OptionalFunctions {
        var found: OptionalFunctions = []
        func ask<F>(
            _ bit: OptionalFunctions, _ member: KeyPath<CK_FUNCTION_LIST, F?>, _ body: (F) -> CK_RV
        ) {
            do {
                try call("probe", member) { body($0) }
                found.insert(bit)
            } catch let e as PKCS11Error where e.rv == .functionNotSupported {
            } catch {
                found.insert(bit)
            }
        }
        var mechanism = CK_MECHANISM(
            mechanism: CK_MECHANISM_TYPE(CKM_RSA_PKCS), pParameter: nil, ulParameterLen: 0)
        var buffer = [CK_BYTE](repeating: 0, count: 16)
        var length = CK_ULONG(buffer.count)
        let invalidKey = CK_OBJECT_HANDLE(CK_INVALID_HANDLE)
        // SAFETY: every pointer passed below points at a local that outlives the call.
        buffer.withUnsafeMutableBufferPointer { b in
            let p = b.baseAddress
            ask(.signRecover, \.C_SignRecoverInit) { $0(s.rawValue, &mechanism, invalidKey) }
            ask(.verifyRecover, \.C_VerifyRecoverInit) { $0(s.rawValue, &mechanism, invalidKey) }
            length = 16
            ask(.digestEncrypt, \.C_DigestEncryptUpdate) { $0(s.rawValue, p, 0, p, &length) }
            length = 16
            ask(.decryptDigest, \.C_DecryptDigestUpdate) { $0(s.rawValue, p, 0, p, &length) }
            length = 16
            ask(.signEncrypt, \.C_SignEncryptUpdate) { $0(s.rawValue, p, 0, p, &length) }
            length = 16
            ask(.decryptVerify, \.C_DecryptVerifyUpdate) { $0(s.rawValue, p, 0, p, &length) }
            ask(.getOperationState, \.C_GetOperationState) { $0(s.rawValue, nil, &length) }
            ask(.setOperationState, \.C_SetOperationState) { $0(s.rawValue, p, 0, 0, 0) }
        }
        if concurrentOperations(s) { found.insert(.concurrentOperations) }
        if let v3 = functions3?.pointee {
            // An undefined user type and an empty PIN: refused before any PIN is tried.
            var none: [CK_UTF8CHAR] = [0]
            let undefinedUser = CK_USER_TYPE(0x7fff_ffff)
            if let loginUser = v3.C_LoginUser, none.withUnsafeMutableBufferPointer({
                loginUser(s.rawValue, undefinedUser, $0.baseAddress, 0, $0.baseAddress, 0)
            }) != CKR_FUNCTION_NOT_SUPPORTED {
                found.insert(.loginUser)
            }
            // No flags: nothing to cancel.
            if let cancel = v3.C_SessionCancel, cancel(s.rawValue, 0) != CKR_FUNCTION_NOT_SUPPORTED {
                found.insert(.sessionCancel)
            }
        }
        return found
    }

    /// Whether a digest may start while a search is active in `s`: SoftHSM says
    /// CKR_OPERATION_ACTIVE. Without a digest to try, the answer is yes.
    private func concurrentOperations(_ s: SessionHandle) -> Bool {
        guard (try? call("C_FindObjectsInit", \.C_FindObjectsInit) { $0(s.rawValue, nil, 0) }) != nil
        else { return true }
        defer { _ = try? call("C_FindObjectsFinal", \.C_FindObjectsFinal) { $0(s.rawValue) } }
        for type in [CKM_SHA256, CKM_SHA_1] {
            var m = CK_MECHANISM(mechanism: CK_MECHANISM_TYPE(type), pParameter: nil, ulParameterLen: 0)
            do {
                try call("C_DigestInit", \.C_DigestInit) { $0(s.rawValue, &m) }
                return true
            } catch let e as PKCS11Error where e.rv == .operationActive {
                return false
            } catch {
                continue
            }
        }
        return true
    }

    /// `C_SignRecoverInit` then the two-call `C_SignRecover`.
    public func signRecover(
        _ s: SessionHandle, mechanism: Mechanism, key: ObjectHandle, data: [UInt8]
    ) throws -> [UInt8] {
        try signRecoverInit(s, mechanism: mechanism, key: key)
        return try signRecoverAfterInit(s, data: data)
    }

    /// `C_SignRecoverInit` alone, for when a `CKU_CONTEXT_SPECIFIC` login must come before the data.
    public func signRecoverInit(_ s: SessionHandle, mechanism: Mechanism, key: ObjectHandle) throws {
        try mechanism.withCMechanism { m in
            try call("C_SignRecoverInit", \.C_SignRecoverInit) { $0(s.rawValue, m, key.rawValue) }
        }
    }

    /// The two-call `C_SignRecover` of an operation started with `signRecoverInit`.
    public func signRecoverAfterInit(_ s: SessionHandle, data: [UInt8]) throws -> [UInt8] {
        try withInput(data) { input, length in
            try twoCall(
                "C_SignRecover", \.C_SignRecover, zero: UInt8(0), cap: Self.maxLength,
                guess: Self.outputGuess
            ) {
                f, out, outLength in f(s.rawValue, input, length, out, outLength)
            }
        }
    }

    /// `C_VerifyRecoverInit` then the two-call `C_VerifyRecover`: the data the signature
    /// carries; CKR_SIGNATURE_INVALID and every other failure throw.
    public func verifyRecover(
        _ s: SessionHandle, mechanism: Mechanism, key: ObjectHandle, signature: [UInt8]
    ) throws
        -> [UInt8]
    {
        try mechanism.withCMechanism { m in
            try call("C_VerifyRecoverInit", \.C_VerifyRecoverInit) { $0(s.rawValue, m, key.rawValue) }
        }
        return try withInput(signature) { input, length in
            try twoCall(
                "C_VerifyRecover", \.C_VerifyRecover, zero: UInt8(0), cap: Self.maxLength,
                guess: Self.outputGuess
            ) {
                f, out, outLength in f(s.rawValue, input, length, out, outLength)
            }
        }
    }
}
