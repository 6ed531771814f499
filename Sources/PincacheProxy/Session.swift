import CPKCS11
import CryptokiWire

/// The cryptographic operation kinds a session may have active at once.
enum OperationKind: Hashable {
    case sign, verify, encrypt, decrypt, digest
    /// C_SignRecoverInit / C_VerifyRecoverInit: single-part only, and only where the token's
    /// module implements them (Optional.swift).
    case signRecover, verifyRecover

    /// The kind an active operation of this kind excludes besides itself: a session signs
    /// one way at a time, and verifies one way at a time.
    var sibling: OperationKind? {
        switch self {
        case .sign: .signRecover
        case .signRecover: .sign
        case .verify: .verifyRecover
        case .verifyRecover: .verify
        default: nil
        }
    }

    /// The CKF_ mechanism flag the operation needs.
    var mechanismFlag: CK_FLAGS {
        switch self {
        case .sign: CK_FLAGS(CKF_SIGN)
        case .verify: CK_FLAGS(CKF_VERIFY)
        case .encrypt: CK_FLAGS(CKF_ENCRYPT)
        case .decrypt: CK_FLAGS(CKF_DECRYPT)
        case .digest: CK_FLAGS(CKF_DIGEST)
        case .signRecover: CK_FLAGS(CKF_SIGN_RECOVER)
        case .verifyRecover: CK_FLAGS(CKF_VERIFY_RECOVER)
        }
    }
}

/// The input of a single-part call, or the input *Update calls accumulated.
enum OperationInput {
    case single(UnsafePointer<CK_BYTE>?, CK_ULONG)
    case accumulated
}

/// An operation between its *Init and its final call, kept in the proxy: nothing goes
/// to the daemon until the final call (cryptoki1.md's one-round-trip rule).
struct PendingOperation {
    var mechanism: WireValue
    var key: CK_OBJECT_HANDLE
    /// Input accumulated by *Update calls.
    var data: [UInt8] = []
    var multipart = false
    /// C_DigestKey calls: the key, and how much of `data` came before it.
    var digestKeys: [(offset: Int, key: UInt64)] = []
    /// The daemon's answer for `resultInput`, kept for the call that follows a length
    /// query or CKR_BUFFER_TOO_SMALL.
    var result: [UInt8]?
    var resultInput: [UInt8]?
    /// Encryption and decryption: whether the token runs the parts as they come (Streams.swift),
    /// nil until the first update asks.
    var streaming: Bool?
}

/// A key as C_*Init checks it, in the order SoftHSM does (issue 13 §5).
struct KeyFacts {
    /// CKA_SIGN, CKA_VERIFY, CKA_ENCRYPT, CKA_DECRYPT: absent or unreadable is false.
    var permits: [OperationKind: Bool]

    init(_ results: [AttributeResult]) {
        func flag(_ type: CK_ATTRIBUTE_TYPE) -> Bool {
            results.first { $0.type == type && $0.status == CKR_OK }.map { $0.value.first.map { $0 != 0 } ?? false } ?? false
        }
        permits = [
            .sign: flag(CK_ATTRIBUTE_TYPE(CKA_SIGN)), .verify: flag(CK_ATTRIBUTE_TYPE(CKA_VERIFY)),
            .encrypt: flag(CK_ATTRIBUTE_TYPE(CKA_ENCRYPT)), .decrypt: flag(CK_ATTRIBUTE_TYPE(CKA_DECRYPT)),
            .signRecover: flag(CK_ATTRIBUTE_TYPE(CKA_SIGN_RECOVER)), .verifyRecover: flag(CK_ATTRIBUTE_TYPE(CKA_VERIFY_RECOVER)),
        ]
    }

    /// Calls.keyFacts's answer, in this order.
    static let types: [CK_ATTRIBUTE_TYPE] = [
        CKA_CLASS, CKA_KEY_TYPE, CKA_SIGN, CKA_VERIFY, CKA_ENCRYPT, CKA_DECRYPT, CKA_SIGN_RECOVER, CKA_VERIFY_RECOVER,
    ].map {
        CK_ATTRIBUTE_TYPE($0)
    }
}

/// One GetAttributes answer entry.
struct AttributeResult {
    var type: CK_ATTRIBUTE_TYPE
    var status: CK_RV
    var value: [UInt8]
}

/// A session as the proxy sees it: the daemon's session number plus local state.
final class Session: @unchecked Sendable {
    // @unchecked: the mutable state below is only touched inside `lock.locked`.
    let slot: CK_SLOT_ID
    /// The daemon's number for it, valid on `link`'s socket only.
    let number: UInt64
    let link: Link
    let flags: CK_FLAGS
    /// Serialises everything done on this session, round trips included: PKCS#11
    /// operations on one session are sequential anyway, other sessions are unaffected.
    let lock = Monitor()

    var operations: [OperationKind: PendingOperation] = [:]
    /// FindObjectsInit's answer, served by C_FindObjects.
    var found: [CK_OBJECT_HANDLE]?
    var foundPosition = 0
    /// The answer to a GetAttributeValue length query, for the call that follows it.
    var lastAttributes: (object: CK_OBJECT_HANDLE, types: [CK_ATTRIBUTE_TYPE], results: [AttributeResult])?

    init(slot: CK_SLOT_ID, number: UInt64, link: Link, flags: CK_FLAGS) {
        self.slot = slot
        self.number = number
        self.link = link
        self.flags = flags
    }
}

extension Library {
    /// Runs `body` on a session with its lock held. Any call but GetAttributeValue
    /// forgets a kept attribute answer, so it can never outlive a change.
    func withSession<R>(_ handle: CK_SESSION_HANDLE, keepAttributes: Bool = false,
                        _ body: (Session) throws(CKError) -> R) throws(CKError) -> R {
        let session = try self.session(handle)
        return try session.lock.locked { () throws(CKError) -> R in
            if !keepAttributes { session.lastAttributes = nil }
            return try body(session)
        }
    }

    /// Sends a session call: the session's number goes first, as the table declares.
    func call(_ call: Call, on session: Session, _ arguments: [WireValue]) throws(CKError) -> [WireValue] {
        try self.call(call, [.ulong(session.number)] + arguments, session: session)
    }

    /// A call that makes an object: its handle goes to the application's `out`.
    func callMakingObject(
        _ call: Call, on session: Session, _ arguments: [WireValue], into out: UnsafeMutablePointer<CK_OBJECT_HANDLE>
    ) throws(CKError) {
        guard let handle = try self.call(call, on: session, arguments).first?.ulongValue else { throw .deviceError }
        out.pointee = CK_OBJECT_HANDLE(handle)
    }

    // MARK: operations

    func forgetKeyFacts(slot: CK_SLOT_ID, _ object: CK_OBJECT_HANDLE) {
        _ = state.withLock { $0.keyFacts[slot]?.removeValue(forKey: object) }
    }

    /// *Init: records the operation after the checks that need no round trip.
    func beginOperation(_ kind: OperationKind, session handle: CK_SESSION_HANDLE,
                        mechanism pointer: UnsafePointer<CK_MECHANISM>?, key: CK_OBJECT_HANDLE) throws(CKError) {
        try withSession(handle) { session throws(CKError) in
            if let function = kind.optionalFunction, try !optionalFunctions(session).contains(function) {
                throw CKError(CKR_FUNCTION_NOT_SUPPORTED)
            }
            guard session.operations[kind] == nil, kind.sibling.map({ session.operations[$0] == nil }) ?? true else {
                throw .operationActive
            }
            try checkOneAtATime(session)
            let (type, mechanism) = try Codec.mechanism(pointer)
            // The key's verdict comes at Init, as the token gives it (issue 13 §5): a handle
            // that names no key, a key the caller cannot use, one whose usage flag forbids
            // the operation.
            // A key type that does not suit the mechanism is left to the final call, where
            // the token reports it (SoftHSM does; the differential suite holds us to it).
            if kind != .digest {
                let slot = session.slot
                let facts: KeyFacts
                if let known = state.withLock({ $0.keyFacts[slot]?[key] }) {
                    facts = known
                } else {
                    let reply = try call(Calls.keyFacts, on: session, [.ulong(UInt64(key))])
                    facts = KeyFacts(try Replies.attributes(reply, types: KeyFacts.types))
                    state.withLock { $0.keyFacts[slot, default: [:]][key] = facts }
                }
                if facts.permits[kind] != true { throw CKError(CKR_KEY_FUNCTION_NOT_PERMITTED) }
            }
            // The mechanism list is asked once per slot; a mechanism the token does not
            // offer for this operation fails here, as it would on the token itself.
            if let list = try? mechanisms(session.slot) {
                guard let entry = list.first(where: { $0.type == type }), entry.flags & kind.mechanismFlag != 0 else {
                    throw CKError(CKR_MECHANISM_INVALID)
                }
            }
            session.operations[kind] = PendingOperation(mechanism: mechanism, key: key)
        }
    }

    /// *Update: accumulates input.
    func updateOperation(_ kind: OperationKind, session handle: CK_SESSION_HANDLE,
                         part: UnsafePointer<CK_BYTE>?, length: CK_ULONG) throws(CKError) {
        try withSession(handle) { session throws(CKError) in
            guard var operation = session.operations[kind] else { throw .operationNotInitialized }
            do throws(CKError) {
                guard operation.result == nil else { throw CKError.operationActive }
                let bytes = try Codec.bytes(part, length)
                if try streamUpdate(kind, session: session, data: bytes) { return }
                operation = session.operations[kind] ?? operation
                guard operation.data.count + bytes.count <= Caps.data else { throw CKError(CKR_DATA_LEN_RANGE) }
                operation.data += bytes
                operation.multipart = true
                session.operations[kind] = operation
            } catch {
                session.operations[kind] = nil
                throw error
            }
        }
    }

    /// C_DigestKey: the key's value joins the digest at this point of the input, which the
    /// daemon replays in order at C_DigestFinal.
    func digestKey(session handle: CK_SESSION_HANDLE, key: CK_OBJECT_HANDLE) throws(CKError) {
        try withSession(handle) { session throws(CKError) in
            guard var operation = session.operations[.digest] else { throw .operationNotInitialized }
            guard operation.result == nil else { throw CKError.operationActive }
            if try streamDigestKey(session: session, key: key) { return }
            guard operation.digestKeys.count < Caps.digestParts / 2 else {
                session.operations[.digest] = nil
                throw CKError(CKR_DEVICE_MEMORY)
            }
            operation.digestKeys.append((operation.data.count, UInt64(key)))
            operation.multipart = true
            session.operations[.digest] = operation
        }
    }

    /// The single-part call (`data` given) or the final call (`data` nil: the
    /// accumulated input). Output follows PKCS#11's length-query convention; the
    /// operation stays active after a length query or CKR_BUFFER_TOO_SMALL only.
    func finishOperation(_ kind: OperationKind, session handle: CK_SESSION_HANDLE,
                         data: OperationInput,
                         output: UnsafeMutablePointer<CK_BYTE>?, outputLength: UnsafeMutablePointer<CK_ULONG>?) throws(CKError) {
        try withSession(handle) { session throws(CKError) in
            guard var operation = session.operations[kind] else { throw .operationNotInitialized }
            // Bad pointers leave the operation as it was (as SoftHSM does): the
            // application can retry with proper arguments.
            guard let outputLength else { throw .argumentsBad }
            if case .accumulated = data,
               try streamFinal(kind, session: session, output: output, outputLength: outputLength) { return }
            var single: [UInt8]?
            if case .single(let pointer, let length) = data {
                single = try Codec.bytes(pointer, length)
            }
            do throws(CKError) {
                let input: [UInt8]
                if let single {
                    guard !operation.multipart else { throw CKError.operationActive }
                    input = single
                } else {
                    input = operation.data
                }
                let result: [UInt8]
                if let kept = operation.result, operation.resultInput == input {
                    result = kept
                } else {
                    result = try perform(kind, operation, input: input, on: session)
                    operation.result = result
                    operation.resultInput = input
                }
                if try Codec.deliver(result, to: output, length: outputLength) {
                    session.operations[kind] = nil
                } else {
                    session.operations[kind] = operation
                }
            } catch {
                session.operations[kind] = error == .bufferTooSmall ? operation : nil
                throw error
            }
        }
    }

    /// C_Verify (`data` given) or C_VerifyFinal (accumulated input): ends the operation.
    func finishVerify(session handle: CK_SESSION_HANDLE, data: OperationInput,
                      signature: UnsafePointer<CK_BYTE>?, signatureLength: CK_ULONG) throws(CKError) {
        try withSession(handle) { session throws(CKError) in
            guard let operation = session.operations[.verify] else { throw .operationNotInitialized }
            if case .accumulated = data, operation.streaming == true {
                let signatureBytes = try Codec.bytes(signature, signatureLength, tooLong: CKError(CKR_SIGNATURE_LEN_RANGE))
                _ = try streamFinal(.verify, session: session, signature: signatureBytes, output: nil, outputLength: nil)
                return
            }
            session.operations[.verify] = nil
            let input: [UInt8]
            switch data {
            case .single(let pointer, let length):
                guard !operation.multipart else { throw CKError.operationActive }
                input = try Codec.bytes(pointer, length)
            case .accumulated:
                input = operation.data
            }
            let signatureBytes = try Codec.bytes(signature, signatureLength, tooLong: CKError(CKR_SIGNATURE_LEN_RANGE))
            _ = try call(Calls.verify, on: session, [operation.mechanism, .ulong(UInt64(operation.key)),
                                                      .bytes(input), .bytes(signatureBytes)])
        }
    }

    private func perform(_ kind: OperationKind, _ operation: PendingOperation, input: [UInt8],
                         on session: Session) throws(CKError) -> [UInt8] {
        let key = WireValue.ulong(UInt64(operation.key))
        let reply: [WireValue]
        switch kind {
        case .sign: reply = try call(Calls.sign, on: session, [operation.mechanism, key, .bytes(input)])
        case .signRecover: reply = try call(Calls.signRecover, on: session, [operation.mechanism, key, .bytes(input)])
        case .verifyRecover: reply = try call(Calls.verifyRecover, on: session, [operation.mechanism, key, .bytes(input)])
        case .encrypt: reply = try call(Calls.encrypt, on: session, [operation.mechanism, key, .bytes(input)])
        case .decrypt: reply = try call(Calls.decrypt, on: session, [operation.mechanism, key, .bytes(input)])
        case .digest where !operation.digestKeys.isEmpty:
            // Updates and keys in the order they were made (issue 13 §7).
            var parts: [WireValue] = []
            var start = 0
            for (offset, key) in operation.digestKeys {
                if offset > start { parts.append(.record([.ulong(0), .bytes(Array(input[start..<offset]))])) }
                parts.append(.record([.ulong(key), .bytes([])]))
                start = offset
            }
            if start < input.count { parts.append(.record([.ulong(0), .bytes(Array(input[start...]))])) }
            reply = try call(Calls.digestParts, on: session, [operation.mechanism, .array(parts)])
        case .digest: reply = try call(Calls.digest, on: session, [operation.mechanism, .bytes(input)])
        case .verify: throw CKError(CKR_GENERAL_ERROR)
        }
        guard let bytes = reply.first?.bytesValue else { throw .deviceError }
        return bytes
    }

    // MARK: attributes

    /// C_GetAttributeValue: the daemon answers per attribute; the PKCS#11 rules for
    /// lengths, NULL buffers and errors are applied here. A length query's answer is kept
    /// for the call that follows with buffers, so the usual pair costs one round trip.
    func getAttributes(session handle: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE,
                       template: UnsafeMutablePointer<CK_ATTRIBUTE>?, count: CK_ULONG) throws(CKError) {
        try withSession(handle, keepAttributes: true) { session throws(CKError) in
            let types = try Codec.types(template, count)
            let results: [AttributeResult]
            if let kept = session.lastAttributes, kept.object == object, kept.types == types {
                results = kept.results
            } else {
                let reply = try call(Calls.getAttributes, on: session,
                                     [.ulong(UInt64(object)), .array(types.map { .ulong(UInt64($0)) })])
                results = try Replies.attributes(reply, types: types)
            }
            session.lastAttributes = nil
            guard let template else { return }
            let outcome = Replies.deliver(results, into: template)
            if outcome.lengthQuery { session.lastAttributes = (object, types, results) }
            if let error = outcome.error { throw error }
        }
    }
}
