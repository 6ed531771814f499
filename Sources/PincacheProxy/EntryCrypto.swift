import CPKCS11
import CryptokiWire

// Entry points of the cryptographic operations: *Init and *Update stay in the proxy, the
// final call makes the one round trip (Session.swift); see Entry.swift for the pattern.

// MARK: encryption and decryption

@_cdecl("pincache_C_EncryptInit")
func pincacheEncryptInit(_ session: CK_SESSION_HANDLE, _ mechanism: UnsafeMutablePointer<CK_MECHANISM>?,
                         _ key: CK_OBJECT_HANDLE) -> CK_RV {
    entry { library throws(CKError) in try library.beginOperation(.encrypt, session: session, mechanism: mechanism, key: key) }
}

@_cdecl("pincache_C_Encrypt")
func pincacheEncrypt(_ session: CK_SESSION_HANDLE, _ data: UnsafeMutablePointer<CK_BYTE>?, _ length: CK_ULONG,
                     _ out: UnsafeMutablePointer<CK_BYTE>?, _ outLength: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
    entry { library throws(CKError) in
        try library.finishOperation(.encrypt, session: session, data: .single(UnsafePointer(data), length), output: out, outputLength: outLength)
    }
}

/// *Update of encrypt/decrypt: part by part on the token where the key allows (Streams.swift),
/// else gathered for the final call.
@_cdecl("pincache_C_EncryptUpdate")
func pincacheEncryptUpdate(_ session: CK_SESSION_HANDLE, _ part: UnsafeMutablePointer<CK_BYTE>?, _ length: CK_ULONG,
                           _ out: UnsafeMutablePointer<CK_BYTE>?, _ outLength: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
    entry { library throws(CKError) in
        try library.cipherUpdate(.encrypt, session: session, part: part, length: length, output: out, outputLength: outLength)
    }
}

@_cdecl("pincache_C_EncryptFinal")
func pincacheEncryptFinal(_ session: CK_SESSION_HANDLE, _ out: UnsafeMutablePointer<CK_BYTE>?,
                          _ outLength: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
    entry { library throws(CKError) in
        try library.finishOperation(.encrypt, session: session, data: .accumulated, output: out, outputLength: outLength)
    }
}

@_cdecl("pincache_C_DecryptInit")
func pincacheDecryptInit(_ session: CK_SESSION_HANDLE, _ mechanism: UnsafeMutablePointer<CK_MECHANISM>?,
                         _ key: CK_OBJECT_HANDLE) -> CK_RV {
    entry { library throws(CKError) in try library.beginOperation(.decrypt, session: session, mechanism: mechanism, key: key) }
}

@_cdecl("pincache_C_Decrypt")
func pincacheDecrypt(_ session: CK_SESSION_HANDLE, _ data: UnsafeMutablePointer<CK_BYTE>?, _ length: CK_ULONG,
                     _ out: UnsafeMutablePointer<CK_BYTE>?, _ outLength: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
    entry { library throws(CKError) in
        try library.finishOperation(.decrypt, session: session, data: .single(UnsafePointer(data), length), output: out, outputLength: outLength)
    }
}

@_cdecl("pincache_C_DecryptUpdate")
func pincacheDecryptUpdate(_ session: CK_SESSION_HANDLE, _ part: UnsafeMutablePointer<CK_BYTE>?, _ length: CK_ULONG,
                           _ out: UnsafeMutablePointer<CK_BYTE>?, _ outLength: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
    entry { library throws(CKError) in
        try library.cipherUpdate(.decrypt, session: session, part: part, length: length, output: out, outputLength: outLength)
    }
}

@_cdecl("pincache_C_DecryptFinal")
func pincacheDecryptFinal(_ session: CK_SESSION_HANDLE, _ out: UnsafeMutablePointer<CK_BYTE>?,
                          _ outLength: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
    entry { library throws(CKError) in
        try library.finishOperation(.decrypt, session: session, data: .accumulated, output: out, outputLength: outLength)
    }
}

// MARK: digest

@_cdecl("pincache_C_DigestInit")
func pincacheDigestInit(_ session: CK_SESSION_HANDLE, _ mechanism: UnsafeMutablePointer<CK_MECHANISM>?) -> CK_RV {
    entry { library throws(CKError) in try library.beginOperation(.digest, session: session, mechanism: mechanism, key: 0) }
}

@_cdecl("pincache_C_Digest")
func pincacheDigest(_ session: CK_SESSION_HANDLE, _ data: UnsafeMutablePointer<CK_BYTE>?, _ length: CK_ULONG,
                    _ out: UnsafeMutablePointer<CK_BYTE>?, _ outLength: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
    entry { library throws(CKError) in
        try library.finishOperation(.digest, session: session, data: .single(UnsafePointer(data), length), output: out, outputLength: outLength)
    }
}

@_cdecl("pincache_C_DigestUpdate")
func pincacheDigestUpdate(_ session: CK_SESSION_HANDLE, _ part: UnsafeMutablePointer<CK_BYTE>?, _ length: CK_ULONG) -> CK_RV {
    entry { library throws(CKError) in try library.updateOperation(.digest, session: session, part: part, length: length) }
}

@_cdecl("pincache_C_DigestKey")
func pincacheDigestKey(_ session: CK_SESSION_HANDLE, _ key: CK_OBJECT_HANDLE) -> CK_RV {
    entry { library throws(CKError) in try library.digestKey(session: session, key: key) }
}

@_cdecl("pincache_C_DigestFinal")
func pincacheDigestFinal(_ session: CK_SESSION_HANDLE, _ out: UnsafeMutablePointer<CK_BYTE>?,
                         _ outLength: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
    entry { library throws(CKError) in
        try library.finishOperation(.digest, session: session, data: .accumulated, output: out, outputLength: outLength)
    }
}

// MARK: signatures

@_cdecl("pincache_C_SignInit")
func pincacheSignInit(_ session: CK_SESSION_HANDLE, _ mechanism: UnsafeMutablePointer<CK_MECHANISM>?,
                      _ key: CK_OBJECT_HANDLE) -> CK_RV {
    entry { library throws(CKError) in try library.beginOperation(.sign, session: session, mechanism: mechanism, key: key) }
}

@_cdecl("pincache_C_Sign")
func pincacheSign(_ session: CK_SESSION_HANDLE, _ data: UnsafeMutablePointer<CK_BYTE>?, _ length: CK_ULONG,
                  _ signature: UnsafeMutablePointer<CK_BYTE>?, _ signatureLength: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
    entry { library throws(CKError) in
        try library.finishOperation(.sign, session: session, data: .single(UnsafePointer(data), length), output: signature,
                                    outputLength: signatureLength)
    }
}

@_cdecl("pincache_C_SignUpdate")
func pincacheSignUpdate(_ session: CK_SESSION_HANDLE, _ part: UnsafeMutablePointer<CK_BYTE>?, _ length: CK_ULONG) -> CK_RV {
    entry { library throws(CKError) in try library.updateOperation(.sign, session: session, part: part, length: length) }
}

@_cdecl("pincache_C_SignFinal")
func pincacheSignFinal(_ session: CK_SESSION_HANDLE, _ signature: UnsafeMutablePointer<CK_BYTE>?,
                       _ signatureLength: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
    entry { library throws(CKError) in
        try library.finishOperation(.sign, session: session, data: .accumulated, output: signature, outputLength: signatureLength)
    }
}

/// Sign and verify with recovery: where the token's module implements them (Optional.swift).
@_cdecl("pincache_C_SignRecoverInit")
func pincacheSignRecoverInit(_ session: CK_SESSION_HANDLE, _ mechanism: UnsafeMutablePointer<CK_MECHANISM>?,
                             _ key: CK_OBJECT_HANDLE) -> CK_RV {
    entry { library throws(CKError) in try library.beginOperation(.signRecover, session: session, mechanism: mechanism, key: key) }
}

@_cdecl("pincache_C_SignRecover")
func pincacheSignRecover(_ session: CK_SESSION_HANDLE, _ data: UnsafeMutablePointer<CK_BYTE>?, _ length: CK_ULONG,
                         _ signature: UnsafeMutablePointer<CK_BYTE>?, _ signatureLength: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
    entry { library throws(CKError) in
        try library.finishOperation(.signRecover, session: session, data: .single(UnsafePointer(data), length), output: signature,
                                    outputLength: signatureLength)
    }
}

@_cdecl("pincache_C_VerifyInit")
func pincacheVerifyInit(_ session: CK_SESSION_HANDLE, _ mechanism: UnsafeMutablePointer<CK_MECHANISM>?,
                        _ key: CK_OBJECT_HANDLE) -> CK_RV {
    entry { library throws(CKError) in try library.beginOperation(.verify, session: session, mechanism: mechanism, key: key) }
}

@_cdecl("pincache_C_Verify")
func pincacheVerify(_ session: CK_SESSION_HANDLE, _ data: UnsafeMutablePointer<CK_BYTE>?, _ length: CK_ULONG,
                    _ signature: UnsafeMutablePointer<CK_BYTE>?, _ signatureLength: CK_ULONG) -> CK_RV {
    entry { library throws(CKError) in
        try library.finishVerify(session: session, data: .single(UnsafePointer(data), length), signature: signature, signatureLength: signatureLength)
    }
}

@_cdecl("pincache_C_VerifyUpdate")
func pincacheVerifyUpdate(_ session: CK_SESSION_HANDLE, _ part: UnsafeMutablePointer<CK_BYTE>?, _ length: CK_ULONG) -> CK_RV {
    entry { library throws(CKError) in try library.updateOperation(.verify, session: session, part: part, length: length) }
}

@_cdecl("pincache_C_VerifyFinal")
func pincacheVerifyFinal(_ session: CK_SESSION_HANDLE, _ signature: UnsafeMutablePointer<CK_BYTE>?,
                         _ signatureLength: CK_ULONG) -> CK_RV {
    entry { library throws(CKError) in
        try library.finishVerify(session: session, data: .accumulated, signature: signature, signatureLength: signatureLength)
    }
}

@_cdecl("pincache_C_VerifyRecoverInit")
func pincacheVerifyRecoverInit(_ session: CK_SESSION_HANDLE, _ mechanism: UnsafeMutablePointer<CK_MECHANISM>?,
                               _ key: CK_OBJECT_HANDLE) -> CK_RV {
    entry { library throws(CKError) in try library.beginOperation(.verifyRecover, session: session, mechanism: mechanism, key: key) }
}

@_cdecl("pincache_C_VerifyRecover")
func pincacheVerifyRecover(_ session: CK_SESSION_HANDLE, _ signature: UnsafeMutablePointer<CK_BYTE>?, _ length: CK_ULONG,
                           _ data: UnsafeMutablePointer<CK_BYTE>?, _ dataLength: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
    entry { library throws(CKError) in
        try library.finishOperation(.verifyRecover, session: session, data: .single(UnsafePointer(signature), length), output: data,
                                    outputLength: dataLength)
    }
}

// MARK: dual-function operations (Optional.swift)

@_cdecl("pincache_C_DigestEncryptUpdate")
func pincacheDigestEncryptUpdate(_ session: CK_SESSION_HANDLE, _ part: UnsafeMutablePointer<CK_BYTE>?, _ length: CK_ULONG,
                                 _ out: UnsafeMutablePointer<CK_BYTE>?, _ outLength: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
    entry { library throws(CKError) in
        try library.dualUpdate(.digestEncrypt, session: session, part: part, length: length, output: out, outputLength: outLength)
    }
}

@_cdecl("pincache_C_DecryptDigestUpdate")
func pincacheDecryptDigestUpdate(_ session: CK_SESSION_HANDLE, _ part: UnsafeMutablePointer<CK_BYTE>?, _ length: CK_ULONG,
                                 _ out: UnsafeMutablePointer<CK_BYTE>?, _ outLength: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
    entry { library throws(CKError) in
        try library.dualUpdate(.decryptDigest, session: session, part: part, length: length, output: out, outputLength: outLength)
    }
}

@_cdecl("pincache_C_SignEncryptUpdate")
func pincacheSignEncryptUpdate(_ session: CK_SESSION_HANDLE, _ part: UnsafeMutablePointer<CK_BYTE>?, _ length: CK_ULONG,
                               _ out: UnsafeMutablePointer<CK_BYTE>?, _ outLength: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
    entry { library throws(CKError) in
        try library.dualUpdate(.signEncrypt, session: session, part: part, length: length, output: out, outputLength: outLength)
    }
}

@_cdecl("pincache_C_DecryptVerifyUpdate")
func pincacheDecryptVerifyUpdate(_ session: CK_SESSION_HANDLE, _ part: UnsafeMutablePointer<CK_BYTE>?, _ length: CK_ULONG,
                                 _ out: UnsafeMutablePointer<CK_BYTE>?, _ outLength: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
    entry { library throws(CKError) in
        try library.dualUpdate(.decryptVerify, session: session, part: part, length: length, output: out, outputLength: outLength)
    }
}
