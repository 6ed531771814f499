import CPKCS11

/// One step of a multi-part digest: data for `C_DigestUpdate`, or a key for `C_DigestKey`.
public enum DigestPart: Sendable, Equatable {
    case data([UInt8])
    case key(ObjectHandle)
}

extension PKCS11Module {
    /// `C_DigestInit`, then `C_DigestUpdate` and `C_DigestKey` in the order given, then the
    /// two-call `C_DigestFinal`. A failed update or key ends the operation (PKCS#11 5.10),
    /// so nothing is left active in the session.
    public func digest(_ s: SessionHandle, mechanism: Mechanism, parts: [DigestPart]) throws -> [UInt8] {
        try mechanism.withCMechanism { m in
            try call("C_DigestInit", \.C_DigestInit) { $0(s.rawValue, m) }
        }
        for part in parts {
            switch part {
            case .data(let bytes):
                try withInput(bytes) { input, length in
                    try call("C_DigestUpdate", \.C_DigestUpdate) { $0(s.rawValue, input, length) }
                }
            case .key(let key):
                try call("C_DigestKey", \.C_DigestKey) { $0(s.rawValue, key.rawValue) }
            }
        }
        return try twoCall("C_DigestFinal", \.C_DigestFinal, zero: UInt8(0), cap: Self.maxLength, guess: Self.outputGuess) {
            f, out, outLength in f(s.rawValue, out, outLength)
        }
    }
}
