import CPKCS11
import CryptokiWire

/// Multi-part operations part by part (issue 13 §10): the daemon starts the token's operation
/// in a backend session of its own (Calls.streamBegin) — an encryption or decryption at its
/// first update, a signature, verification or digest once its parts pass 1 MiB — and each
/// part then goes to the token as the application made it, its output and its verdict coming
/// back as the token gives them. Where the key needs a login the caller does not hold (a
/// caching-mode private key: its login lasts one call) or signs with a private key, the daemon
/// declines and the parts are gathered here for the final call, as single-part calls are.
extension Library {
    /// C_EncryptUpdate / C_DecryptUpdate.
    func cipherUpdate(_ kind: OperationKind, session handle: CK_SESSION_HANDLE, part: UnsafePointer<CK_BYTE>?,
                      length: CK_ULONG, output: UnsafeMutablePointer<CK_BYTE>?,
                      outputLength: UnsafeMutablePointer<CK_ULONG>?) throws(CKError) {
        try withSession(handle) { session throws(CKError) in
            guard var operation = session.operations[kind] else { throw .operationNotInitialized }
            guard operation.result == nil else {
                session.operations[kind] = nil
                throw CKError.operationActive
            }
            // Bad pointers leave the operation as it was, as SoftHSM does.
            let data = try Codec.bytes(part, length)
            if try startStream(kind, session: session) {
                try streamPart(Calls.streamUpdate, kind, on: session, data: data, output: output, outputLength: outputLength)
                return
            }
            operation = session.operations[kind] ?? operation
            guard let outputLength else { throw CKError.argumentsBad }
            guard output != nil else {
                // A length query consumes nothing. Gathered parts give their output at the
                // final call, so what this part could give is bounded by all the input so far
                // and a block of padding; PKCS#11 lets the answer be somewhat larger.
                outputLength.pointee = CK_ULONG(operation.data.count + data.count + Self.largestBlock)
                return
            }
            guard operation.data.count + data.count <= Caps.data else {
                session.operations[kind] = nil
                throw CKError(CKR_DATA_LEN_RANGE)
            }
            operation.data += data
            operation.multipart = true
            session.operations[kind] = operation
            outputLength.pointee = 0
        }
    }

    /// Room for a cipher block of any mechanism SoftHSM or a card offers (AES: 16 bytes).
    static let largestBlock = 32

    /// An encryption's or decryption's first update asks the daemon to stream it; whether
    /// it streams, from then on. Called with the session's lock held.
    func startStream(_ kind: OperationKind, session: Session) throws(CKError) -> Bool {
        guard var operation = session.operations[kind] else { throw .operationNotInitialized }
        if operation.streaming == nil && !operation.multipart {
            do throws(CKError) {
                let reply = try call(Calls.streamBegin, on: session, [.ulong(kind.streamKind), operation.mechanism,
                                                                       .ulong(UInt64(operation.key))])
                operation.streaming = reply.first?.ulongValue == 1
            } catch {
                session.operations[kind] = nil
                throw error
            }
            operation.multipart = true
            session.operations[kind] = operation
        }
        return operation.streaming == true
    }

    /// Signing, verifying and digesting in parts: gathered up to `streamAfter` bytes (one round
    /// trip at the final call, the usual case), then streamed. Returns false when the
    /// operation is not streamed and `data` is for the caller to gather.
    func streamUpdate(_ kind: OperationKind, session: Session, data: [UInt8]) throws(CKError) -> Bool {
        guard var operation = session.operations[kind] else { throw .operationNotInitialized }
        if operation.streaming == nil, operation.digestKeys.isEmpty, operation.data.count + data.count > Self.streamAfter {
            let reply = try call(Calls.streamBegin, on: session, [.ulong(kind.streamKind), operation.mechanism,
                                                                   .ulong(UInt64(operation.key))])
            operation.streaming = reply.first?.ulongValue == 1
            if operation.streaming == true {
                let gathered = operation.data
                operation.data = []
                operation.multipart = true
                session.operations[kind] = operation
                if !gathered.isEmpty {
                    try streamPart(Calls.streamUpdate, kind, on: session, data: gathered, output: nil, outputLength: nil)
                }
            } else {
                session.operations[kind] = operation
            }
        }
        guard session.operations[kind]?.streaming == true else { return false }
        try streamPart(Calls.streamUpdate, kind, on: session, data: data, output: nil, outputLength: nil)
        return true
    }

    /// What a signature, verification or digest gathers before it streams.
    static let streamAfter = 1 << 20

    /// C_DigestKey in a streamed digest. Returns false when the digest is not streamed.
    func streamDigestKey(session: Session, key: CK_OBJECT_HANDLE) throws(CKError) -> Bool {
        guard session.operations[.digest]?.streaming == true else { return false }
        try streamPart(Calls.streamUpdate, .digest, on: session, data: [], key: UInt64(key), output: nil, outputLength: nil)
        return true
    }

    /// The final call of a streamed operation (`signature`: C_VerifyFinal's). Returns false
    /// when the operation was not streamed (the gathered parts go as before).
    func streamFinal(_ kind: OperationKind, session: Session, signature: [UInt8] = [], output: UnsafeMutablePointer<CK_BYTE>?,
                     outputLength: UnsafeMutablePointer<CK_ULONG>?) throws(CKError) -> Bool {
        guard session.operations[kind]?.streaming == true else { return false }
        try streamPart(Calls.streamFinal, kind, on: session, data: nil, signature: signature, output: output,
                       outputLength: outputLength)
        return true
    }

    /// One part, with the application's output buffer described as it is (no length
    /// pointer, a NULL buffer, or a buffer of its length), and the token's answer given back
    /// as the token gave it. The operation ends where the token's did: the daemon says.
    private func streamPart(_ which: Call, _ kind: OperationKind, on session: Session, data: [UInt8]?, key: UInt64 = 0,
                            signature: [UInt8] = [], output: UnsafeMutablePointer<CK_BYTE>?,
                            outputLength: UnsafeMutablePointer<CK_ULONG>?) throws(CKError) {
        let buffer: UInt64 = outputLength == nil ? 0 : output == nil ? 1 : 2
        // A buffer larger than any one reply can fill is as good as one of the cap's size.
        let capacity = UInt64(min(outputLength?.pointee ?? 0, CK_ULONG(Caps.data)))
        var arguments: [WireValue] = [.ulong(kind.streamKind)]
        if let data { arguments += [.bytes(data), .ulong(key)] } else { arguments.append(.bytes(signature)) }
        arguments += [.ulong(buffer), .ulong(buffer == 2 ? capacity : 0)]
        let reply: [WireValue]
        do throws(CKError) {
            reply = try call(which, on: session, arguments)
        } catch {
            session.operations[kind] = nil
            throw error
        }
        guard reply.count == 4, let status = reply[0].ulongValue, let length = reply[1].ulongValue,
              let produced = reply[2].bytesValue, let active = reply[3].ulongValue,
              status != UInt64(CKR_OK) || buffer != 2 || (produced.count == Int(length) && length <= capacity)
        else {
            session.operations[kind] = nil
            throw .deviceError
        }
        if active == 0 { session.operations[kind] = nil }
        guard status == UInt64(CKR_OK) || status == UInt64(CKR_BUFFER_TOO_SMALL) else { throw CKError(CK_RV(status)) }
        if let outputLength { outputLength.pointee = CK_ULONG(length) }
        if status == UInt64(CKR_BUFFER_TOO_SMALL) { throw .bufferTooSmall }
        guard let output else { return }
        // SAFETY: the application said `output` holds the capacity given, which bounds what
        // the token wrote (checked above).
        produced.withUnsafeBufferPointer { source in
            if let base = source.baseAddress { output.update(from: base, count: source.count) }
        }
    }
}

extension OperationKind {
    /// Calls.streamBegin's `kind`.
    var streamKind: UInt64 {
        switch self {
        case .encrypt: 0
        case .decrypt: 1
        case .sign: 2
        case .verify: 3
        case .digest: 4
        // Never streamed: single-part only. The daemon refuses this kind.
        case .signRecover, .verifyRecover: UInt64.max
        }
    }
}
