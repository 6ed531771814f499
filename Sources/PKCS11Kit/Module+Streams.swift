import CPKCS11

/// Multi-part encryption and decryption called part by part as an application calls them:
/// the caller says what output buffer it has, and gets the module's verdict and output as
/// they are (a proxy streams an application's parts this way).
extension PKCS11Module {
    public enum CipherDirection: Sendable {
        case encrypt, decrypt

        var names: (initial: String, update: String, final: String) {
            self == .encrypt
                ? ("C_EncryptInit", "C_EncryptUpdate", "C_EncryptFinal") : ("C_DecryptInit", "C_DecryptUpdate", "C_DecryptFinal")
        }
    }

    /// The output an application passed: no length pointer, a NULL buffer (a length query),
    /// or a buffer of `capacity` bytes.
    public enum OutputBuffer: Sendable, Equatable {
        case noLength, lengthQuery, buffer(capacity: Int)
    }

    /// What one part produced: `.ok` or `.bufferTooSmall`, the length the module wrote, and
    /// the output (empty for a length query or a buffer too small).
    public struct PartOutput: Sendable, Equatable {
        public var rv: ReturnValue
        public var length: UInt
        public var output: [UInt8]
        public init(rv: ReturnValue, length: UInt, output: [UInt8]) {
            self.rv = rv
            self.length = length
            self.output = output
        }
    }

    /// `C_EncryptInit` / `C_DecryptInit`.
    public func cipherInit(_ s: SessionHandle, _ direction: CipherDirection, mechanism: Mechanism, key: ObjectHandle) throws {
        let member = direction == .encrypt ? \CK_FUNCTION_LIST.C_EncryptInit : \CK_FUNCTION_LIST.C_DecryptInit
        try mechanism.withCMechanism { m in
            try call(direction.names.initial, member) { $0(s.rawValue, m, key.rawValue) }
        }
    }

    /// `C_EncryptUpdate` / `C_DecryptUpdate` with `data`, or the final call when `data` is nil.
    /// CKR_BUFFER_TOO_SMALL is an answer; any other failure throws (and, by PKCS#11, ended
    /// the operation).
    public func cipherPart(_ s: SessionHandle, _ direction: CipherDirection, data: [UInt8]?, output: OutputBuffer) throws
        -> PartOutput
    {
        var capacity = 0
        if case .buffer(let n) = output {
            guard n >= 0, n <= Self.maxLength else { throw PKCS11Error(rv: .argumentsBad, function: direction.names.update) }
            capacity = n
        }
        // SAFETY: the output buffer and the length outlive the call; the module writes at most
        // `capacity` bytes and the length.
        let buffer = UnsafeMutablePointer<CK_BYTE>.allocate(capacity: max(capacity, 1))
        defer { buffer.deallocate() }
        var length = CK_ULONG(capacity)
        let out: UnsafeMutablePointer<CK_BYTE>? = output == .lengthQuery || output == .noLength ? nil : buffer
        let rv: ReturnValue
        if let data {
            let member = direction == .encrypt ? \CK_FUNCTION_LIST.C_EncryptUpdate : \CK_FUNCTION_LIST.C_DecryptUpdate
            // An empty part still has a buffer: NULL would be a different call (CKR_ARGUMENTS_BAD).
            let input = data.isEmpty ? [0] : data
            rv = try input.withUnsafeBufferPointer { p in
                try withLength(output, &length) { lengthPointer in
                    try call(direction.names.update, member, accepting: [.bufferTooSmall]) {
                        $0(s.rawValue, UnsafeMutablePointer(mutating: p.baseAddress), CK_ULONG(data.count), out, lengthPointer)
                    }
                }
            }
        } else {
            let member = direction == .encrypt ? \CK_FUNCTION_LIST.C_EncryptFinal : \CK_FUNCTION_LIST.C_DecryptFinal
            rv = try withLength(output, &length) { lengthPointer in
                try call(direction.names.final, member, accepting: [.bufferTooSmall]) { $0(s.rawValue, out, lengthPointer) }
            }
        }
        guard rv == .ok, out != nil else { return PartOutput(rv: rv, length: UInt(length), output: []) }
        guard length <= CK_ULONG(capacity) else { throw PKCS11Error(rv: .generalError, function: direction.names.update) }
        return PartOutput(rv: rv, length: UInt(length), output: Array(UnsafeBufferPointer(start: buffer, count: Int(length))))
    }

    private func withLength<R>(_ output: OutputBuffer, _ length: inout CK_ULONG, _ body: (UnsafeMutablePointer<CK_ULONG>?) throws -> R)
        rethrows -> R
    {
        if output == .noLength { return try body(nil) }
        return try withUnsafeMutablePointer(to: &length) { try body($0) }
    }
}
