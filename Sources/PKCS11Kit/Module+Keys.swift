import CPKCS11

extension PKCS11Module {
    /// `C_WrapKey`, two-call: `key` encrypted under `wrappingKey`.
    public func wrapKey(_ s: SessionHandle, mechanism: Mechanism, wrappingKey: ObjectHandle, key: ObjectHandle) throws
        -> [UInt8]
    {
        try mechanism.withCMechanism { m in
            // A length query first: wrapping is one call with no operation left active, and
            // RSA-PKCS wrapping is randomised, so a guessed buffer gains nothing.
            try twoCall("C_WrapKey", \.C_WrapKey, zero: UInt8(0), cap: Self.maxLength) { f, out, outLength in
                f(s.rawValue, m, wrappingKey.rawValue, key.rawValue, out, outLength)
            }
        }
    }

    /// `C_UnwrapKey`: a new key object from `wrapped`, decrypted under `unwrappingKey`.
    public func unwrapKey(
        _ s: SessionHandle, mechanism: Mechanism, unwrappingKey: ObjectHandle, wrapped: [UInt8], template: [Attribute]
    ) throws -> ObjectHandle {
        var key: CK_OBJECT_HANDLE = 0
        try mechanism.withCMechanism { m in
            try withInput(wrapped) { input, length in
                try withTemplate(template) { p, n in
                    try call("C_UnwrapKey", \.C_UnwrapKey) { $0(s.rawValue, m, unwrappingKey.rawValue, input, length, p, n, &key) }
                }
            }
        }
        return ObjectHandle(rawValue: key)
    }

    /// `C_DeriveKey`: a new key object from `baseKey` (ECDH: the other party's point in the
    /// mechanism's parameter).
    public func deriveKey(_ s: SessionHandle, mechanism: Mechanism, baseKey: ObjectHandle, template: [Attribute]) throws
        -> ObjectHandle
    {
        var key: CK_OBJECT_HANDLE = 0
        try mechanism.withCMechanism { m in
            try withTemplate(template) { p, n in
                try call("C_DeriveKey", \.C_DeriveKey) { $0(s.rawValue, m, baseKey.rawValue, p, n, &key) }
            }
        }
        return ObjectHandle(rawValue: key)
    }
}
