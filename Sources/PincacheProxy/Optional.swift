import CPKCS11
import CryptokiWire

/// Functions PKCS#11 lets a module leave out (issue 13 §11). Where the token's module leaves
/// one out (SoftHSM and OpenSC leave out all of them) the proxy answers
/// CKR_FUNCTION_NOT_SUPPORTED, at the call the module does. Where the module has one:
/// - sign/verify with recovery go to the token (Calls.signRecover, Calls.verifyRecover);
/// - a dual-function update is the two updates PKCS#11 defines it as, each on the token;
/// - operation state cannot be saved: an operation through the proxy lives partly here and
///   partly in the daemon, so C_GetOperationState says CKR_STATE_UNSAVEABLE, as PKCS#11
///   allows, and C_SetOperationState, given no state the proxy made, CKR_SAVED_STATE_INVALID.
struct OptionalFunctions: OptionSet {
    let rawValue: UInt64
    static let signRecover = Self(rawValue: 1 << 0)
    static let verifyRecover = Self(rawValue: 1 << 1)
    static let digestEncrypt = Self(rawValue: 1 << 2)
    static let decryptDigest = Self(rawValue: 1 << 3)
    static let signEncrypt = Self(rawValue: 1 << 4)
    static let decryptVerify = Self(rawValue: 1 << 5)
    static let getOperationState = Self(rawValue: 1 << 6)
    static let setOperationState = Self(rawValue: 1 << 7)
    /// The module lets a session have operations of different kinds (a search included)
    /// active at once; without it, the proxy refuses a second as the module would.
    static let concurrentOperations = Self(rawValue: 1 << 8)
    /// PKCS#11 3.0 (Calls.optionalFunctions).
    static let loginUser = Self(rawValue: 1 << 9)
    static let sessionCancel = Self(rawValue: 1 << 10)
}

extension OperationKind {
    /// The optional function whose Init this kind is, if any.
    var optionalFunction: OptionalFunctions? {
        switch self {
        case .signRecover: .signRecover
        case .verifyRecover: .verifyRecover
        default: nil
        }
    }
}

/// The dual-function updates: the cipher's part first (it carries the output and its length
/// query), then the other operation's, on the input (encrypting) or the output (decrypting).
enum DualFunction {
    case digestEncrypt, decryptDigest, signEncrypt, decryptVerify

    var bit: OptionalFunctions {
        switch self {
        case .digestEncrypt: .digestEncrypt
        case .decryptDigest: .decryptDigest
        case .signEncrypt: .signEncrypt
        case .decryptVerify: .decryptVerify
        }
    }

    var cipher: OperationKind {
        switch self {
        case .digestEncrypt, .signEncrypt: .encrypt
        case .decryptDigest, .decryptVerify: .decrypt
        }
    }

    var other: OperationKind {
        switch self {
        case .digestEncrypt, .decryptDigest: .digest
        case .signEncrypt: .sign
        case .decryptVerify: .verify
        }
    }
}

extension Library {
    /// What the session's token's module implements, asked once per slot.
    func optionalFunctions(_ session: Session) throws(CKError) -> OptionalFunctions {
        if let known = state.withLock({ $0.optionalFunctions[session.slot] }) { return known }
        guard let bits = try call(Calls.optionalFunctions, on: session, []).first?.ulongValue else {
            throw .deviceError
        }
        let found = OptionalFunctions(rawValue: bits)
        state.withLock { $0.optionalFunctions[session.slot] = found }
        return found
    }

    /// C_*Init and C_FindObjectsInit with the session's lock held: CKR_OPERATION_ACTIVE where
    /// the module runs one operation at a time (SoftHSM) and another is active. The proxy
    /// keeps each kind apart (a stream has a backend session of its own), so without this a
    /// program could do through the proxy what the token itself refuses.
    func checkOneAtATime(_ session: Session) throws(CKError) {
        guard !session.operations.isEmpty || session.found != nil else { return }
        guard try !optionalFunctions(session).contains(.concurrentOperations) else { return }
        throw .operationActive
    }

    /// Checks the session and that its module implements `function`.
    private func require(_ function: OptionalFunctions, _ handle: CK_SESSION_HANDLE) throws(CKError) {
        try withSession(handle) { session throws(CKError) in
            guard try optionalFunctions(session).contains(function) else {
                throw CKError(CKR_FUNCTION_NOT_SUPPORTED)
            }
        }
    }

    func dualUpdate(
        _ dual: DualFunction, session handle: CK_SESSION_HANDLE, part: UnsafePointer<CK_BYTE>?,
        length: CK_ULONG,
        output: UnsafeMutablePointer<CK_BYTE>?, outputLength: UnsafeMutablePointer<CK_ULONG>?
    ) throws(CKError) {
        try require(dual.bit, handle)
        let decrypting = dual.cipher == .decrypt
        try withSession(handle) { session throws(CKError) in
            guard session.operations[dual.cipher] != nil, session.operations[dual.other] != nil else {
                throw .operationNotInitialized
            }
            // A decryption whose parts are gathered gives its plaintext at C_DecryptFinal
            // only, so the digest or verification would never see it: such a key (a private
            // one in caching mode) cannot take part in a dual function.
            if decrypting, try !startStream(.decrypt, session: session) {
                throw CKError(CKR_FUNCTION_NOT_SUPPORTED)
            }
        }
        try cipherUpdate(
            dual.cipher, session: handle, part: part, length: length, output: output,
            outputLength: outputLength)
        // A length query (or a buffer too small, thrown above) consumed nothing.
        guard let output, let outputLength else { return }
        if decrypting {
            try updateOperation(
                dual.other, session: handle, part: UnsafePointer(output), length: outputLength.pointee)
        } else {
            try updateOperation(dual.other, session: handle, part: part, length: length)
        }
    }

    func getOperationState(
        session handle: CK_SESSION_HANDLE, state: UnsafeMutablePointer<CK_BYTE>?,
        length: UnsafeMutablePointer<CK_ULONG>?
    ) throws(CKError) {
        try require(.getOperationState, handle)
        try withSession(handle) { session throws(CKError) in
            guard length != nil else { throw .argumentsBad }
            throw CKError(CKR_STATE_UNSAVEABLE)
        }
    }

    func setOperationState(
        session handle: CK_SESSION_HANDLE, state: UnsafeMutablePointer<CK_BYTE>?,
        length: CK_ULONG
    ) throws(CKError) {
        try require(.setOperationState, handle)
        guard state != nil else { throw .argumentsBad }
        throw CKError(CKR_SAVED_STATE_INVALID)
    }

    /// C_SessionCancel (PKCS#11 3.0), where the module has it: the operations live here
    /// until their final call, so they end here; a streamed one's backend session ends too.
    func sessionCancel(session handle: CK_SESSION_HANDLE, flags: CK_FLAGS) throws(CKError) {
        try require(.sessionCancel, handle)
        try withSession(handle) { session throws(CKError) in
            let kinds: [(CK_ULONG, OperationKind)] = [
                (CKF_ENCRYPT, .encrypt), (CKF_DECRYPT, .decrypt), (CKF_DIGEST, .digest), (CKF_SIGN, .sign),
                (CKF_SIGN_RECOVER, .signRecover), (CKF_VERIFY, .verify), (CKF_VERIFY_RECOVER, .verifyRecover),
            ]
            var streamed: UInt64 = 0
            for (flag, kind) in kinds where flags & CK_FLAGS(flag) != 0 {
                if session.operations.removeValue(forKey: kind)?.streaming == true { streamed |= 1 << kind.streamKind }
            }
            if flags & CK_FLAGS(CKF_FIND_OBJECTS) != 0 { session.found = nil }
            if streamed != 0 { _ = try call(Calls.endStreams, on: session, [.ulong(streamed)]) }
        }
    }

    /// C_LoginUser (PKCS#11 3.0), where the module has it: without a user name it is
    /// C_Login. pincache keeps one login per caller and token, so a named user is refused as
    /// a token without user names refuses one (CKR_ARGUMENTS_BAD).
    func loginUser(
        session handle: CK_SESSION_HANDLE, userType: CK_USER_TYPE, pin: UnsafePointer<CK_UTF8CHAR>?, length: CK_ULONG,
        usernameLength: CK_ULONG
    ) throws(CKError) {
        try require(.loginUser, handle)
        guard usernameLength == 0 else { throw .argumentsBad }
        try login(session: handle, userType: userType, pin: pin, length: length)
    }
}
