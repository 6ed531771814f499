import CPKCS11

/// Multi-part operations called part by part as an application calls them: the caller says
/// what output buffer it has, and gets the module's verdict and output as they are (a proxy
/// streams an application's parts this way).
extension PKCS11Module {
    public enum StreamKind: UInt64, Sendable, Hashable, CaseIterable {
        case encrypt = 0, decrypt, sign, verify, digest

        /// The PKCS#11 functions of this kind: Init, Update, Final.
        public var names: (initial: String, update: String, final: String) {
            switch self {
            case .encrypt: ("C_EncryptInit", "C_EncryptUpdate", "C_EncryptFinal")
            case .decrypt: ("C_DecryptInit", "C_DecryptUpdate", "C_DecryptFinal")
            case .sign: ("C_SignInit", "C_SignUpdate", "C_SignFinal")
            case .verify: ("C_VerifyInit", "C_VerifyUpdate", "C_VerifyFinal")
            case .digest: ("C_DigestInit", "C_DigestUpdate", "C_DigestFinal")
            }
        }
    }

    /// The output an application passed: no length pointer, a NULL buffer (a length query),
    /// or a buffer of `capacity` bytes.
    public enum OutputBuffer: Sendable, Equatable {
        case noLength, lengthQuery, buffer(capacity: Int)
    }

    /// What one part produced: `.ok` or `.bufferTooSmall`, the length the module wrote, and
    /// the output (empty for a length query, a buffer too small, or a part without output).
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

    /// `C_EncryptInit`, `C_DecryptInit`, `C_SignInit`, `C_VerifyInit` (with `key`) or
    /// `C_DigestInit`.
    public func streamInit(_ s: SessionHandle, _ kind: StreamKind, mechanism: Mechanism, key: ObjectHandle?) throws {
        let name = kind.names.initial
        let k = key?.rawValue ?? 0
        try mechanism.withCMechanism { m in
            switch kind {
            case .encrypt: try call(name, \.C_EncryptInit) { $0(s.rawValue, m, k) }
            case .decrypt: try call(name, \.C_DecryptInit) { $0(s.rawValue, m, k) }
            case .sign: try call(name, \.C_SignInit) { $0(s.rawValue, m, k) }
            case .verify: try call(name, \.C_VerifyInit) { $0(s.rawValue, m, k) }
            case .digest: try call(name, \.C_DigestInit) { $0(s.rawValue, m) }
            }
        }
    }

    /// An update with `data` (output only for encryption and decryption), or `C_DigestKey`
    /// with `digestKey`. CKR_BUFFER_TOO_SMALL is an answer; any other failure throws.
    public func streamUpdate(
        _ s: SessionHandle, _ kind: StreamKind, data: [UInt8], digestKey: ObjectHandle? = nil, output: OutputBuffer
    ) throws -> PartOutput {
        if let digestKey {
            try call("C_DigestKey", \.C_DigestKey) { $0(s.rawValue, digestKey.rawValue) }
            return PartOutput(rv: .ok, length: 0, output: [])
        }
        // An empty part still has a buffer: NULL would be a different call (CKR_ARGUMENTS_BAD).
        let input = data.isEmpty ? [0] : data
        let count = CK_ULONG(data.count)
        let name = kind.names.update
        return try input.withUnsafeBufferPointer { p throws -> PartOutput in
            let part = UnsafeMutablePointer(mutating: p.baseAddress)
            switch kind {
            case .encrypt, .decrypt:
                let member = kind == .encrypt ? \CK_FUNCTION_LIST.C_EncryptUpdate : \CK_FUNCTION_LIST.C_DecryptUpdate
                return try withOutput(name, output) { out, length in
                    try call(name, member, accepting: [.bufferTooSmall]) { $0(s.rawValue, part, count, out, length) }
                }
            case .sign: try call(name, \.C_SignUpdate) { $0(s.rawValue, part, count) }
            case .verify: try call(name, \.C_VerifyUpdate) { $0(s.rawValue, part, count) }
            case .digest: try call(name, \.C_DigestUpdate) { $0(s.rawValue, part, count) }
            }
            return PartOutput(rv: .ok, length: 0, output: [])
        }
    }

    /// The final call: `C_VerifyFinal` with `signature`, the others into `output`.
    public func streamFinal(_ s: SessionHandle, _ kind: StreamKind, signature: [UInt8], output: OutputBuffer) throws
        -> PartOutput
    {
        let name = kind.names.final
        if kind == .verify {
            let input = signature.isEmpty ? [0] : signature
            try input.withUnsafeBufferPointer { p in
                try call(name, \.C_VerifyFinal) { $0(s.rawValue, UnsafeMutablePointer(mutating: p.baseAddress), CK_ULONG(signature.count)) }
            }
            return PartOutput(rv: .ok, length: 0, output: [])
        }
        let member: KeyPath<CK_FUNCTION_LIST, CK_C_EncryptFinal?> =
            switch kind {
            case .encrypt: \.C_EncryptFinal
            case .decrypt: \.C_DecryptFinal
            case .sign: \.C_SignFinal
            default: \.C_DigestFinal
            }
        return try withOutput(name, output) { out, length in
            try call(name, member, accepting: [.bufferTooSmall]) { $0(s.rawValue, out, length) }
        }
    }

    /// Runs `body` with the application's output as C sees it, and reads back what it wrote.
    private func withOutput(
        _ name: String, _ output: OutputBuffer,
        _ body: (UnsafeMutablePointer<CK_BYTE>?, UnsafeMutablePointer<CK_ULONG>?) throws -> ReturnValue
    ) throws -> PartOutput {
        var capacity = 0
        if case .buffer(let n) = output {
            guard n >= 0, n <= Self.maxLength else { throw PKCS11Error(rv: .argumentsBad, function: name) }
            capacity = n
        }
        // SAFETY: the output buffer and the length outlive the call; the module writes at most
        // `capacity` bytes and the length.
        let buffer = UnsafeMutablePointer<CK_BYTE>.allocate(capacity: max(capacity, 1))
        defer { buffer.deallocate() }
        var length = CK_ULONG(capacity)
        let out: UnsafeMutablePointer<CK_BYTE>? = capacity > 0 || output == .buffer(capacity: 0) ? buffer : nil
        let rv =
            output == .noLength
            ? try body(out, nil) : try withUnsafeMutablePointer(to: &length) { try body(out, $0) }
        guard rv == .ok, out != nil else { return PartOutput(rv: rv, length: UInt(length), output: []) }
        guard length <= CK_ULONG(capacity) else { throw PKCS11Error(rv: .generalError, function: name) }
        return PartOutput(rv: rv, length: UInt(length), output: Array(UnsafeBufferPointer(start: buffer, count: Int(length))))
    }
}
