import CPKCS11

/// A mechanism and its parameter, as passed to `C_SignInit`, `C_DecryptInit`, …
///
/// Held as plain Swift values; the C structures (`CK_MECHANISM`,
/// `CK_RSA_PKCS_PSS_PARAMS`, `CK_RSA_PKCS_OAEP_PARAMS`) exist only for the duration of
/// one call, so no pointer into Swift memory outlives it.
public struct Mechanism: Sendable, Hashable {
    /// The mechanism parameter.
    public enum Parameter: Sendable, Hashable {
        case none
        /// Bytes passed as they are: `pParameter` points at them, `ulParameterLen` is their
        /// count (NULL and 0 when empty). For an IV, or the C bytes of a pointer-free
        /// parameter structure such as `CK_RSA_PKCS_PSS_PARAMS` as a client sent them.
        case raw([UInt8])
        /// `CK_RSA_PKCS_PSS_PARAMS`
        case pss(hash: MechanismType, mgf: MGF, saltLength: UInt)
        /// `CK_RSA_PKCS_OAEP_PARAMS`; `source` is `CKZ_DATA_SPECIFIED` with `sourceData` as the label.
        case oaep(hash: MechanismType, mgf: MGF, sourceData: [UInt8])
        /// `CK_GCM_PARAMS`: IV, its length in bits, additional authenticated data, tag bits.
        case gcm(iv: [UInt8], ivBits: UInt, aad: [UInt8], tagBits: UInt)
        /// `CK_ECDH1_DERIVE_PARAMS`: key derivation function, shared data, the other party's
        /// public value.
        case ecdh1(kdf: UInt, sharedData: [UInt8], publicData: [UInt8])
        /// `CK_KEY_DERIVATION_STRING_DATA` (`CKM_*_ECB_ENCRYPT_DATA`): the data to encrypt.
        case derivationString([UInt8])
        /// `CK_AES_CBC_ENCRYPT_DATA_PARAMS` (16-byte IV) or `CK_DES_CBC_ENCRYPT_DATA_PARAMS`
        /// (8-byte IV), by the IV's length (`CKM_*_CBC_ENCRYPT_DATA`).
        case cbcEncryptData(iv: [UInt8], data: [UInt8])
    }

    public var type: MechanismType
    public var parameter: Parameter

    public init(_ type: MechanismType, parameter: Parameter = .none) {
        self.type = type
        self.parameter = parameter
    }

    /// Builds the C structures on the stack and hands them to `body`.
    @discardableResult
    func withCMechanism<R>(_ body: (UnsafeMutablePointer<CK_MECHANISM>) throws -> R) rethrows -> R {
        switch parameter {
        case .none:
            var m = CK_MECHANISM(mechanism: type.rawValue, pParameter: nil, ulParameterLen: 0)
            return try body(&m)
        case .raw(let bytes):
            // SAFETY: the module only reads the parameter during the call; the pointer is
            // valid for the closure's duration and `mutating` only satisfies the C type.
            return try bytes.withUnsafeBytes { p in
                var m = CK_MECHANISM(
                    mechanism: type.rawValue, pParameter: p.isEmpty ? nil : UnsafeMutableRawPointer(mutating: p.baseAddress),
                    ulParameterLen: CK_ULONG(p.count))
                return try body(&m)
            }
        case .pss(let hash, let mgf, let saltLength):
            var params = CK_RSA_PKCS_PSS_PARAMS(hashAlg: hash.rawValue, mgf: mgf.rawValue, sLen: saltLength)
            // SAFETY: `params` lives on this frame for the whole call.
            return try withUnsafeMutablePointer(to: &params) { pp in
                var m = CK_MECHANISM(
                    mechanism: type.rawValue, pParameter: UnsafeMutableRawPointer(pp),
                    ulParameterLen: CK_ULONG(MemoryLayout<CK_RSA_PKCS_PSS_PARAMS>.size))
                return try body(&m)
            }
        case .oaep(let hash, let mgf, let sourceData):
            // SAFETY: both the label bytes and `params` stay valid for the whole call; the
            // module reads them only then.
            return try sourceData.withUnsafeBytes { label in
                var params = CK_RSA_PKCS_OAEP_PARAMS(
                    hashAlg: hash.rawValue, mgf: mgf.rawValue, source: CK_RSA_PKCS_OAEP_SOURCE_TYPE(CKZ_DATA_SPECIFIED),
                    pSourceData: label.isEmpty ? nil : UnsafeMutableRawPointer(mutating: label.baseAddress),
                    ulSourceDataLen: CK_ULONG(label.count))
                return try withUnsafeMutablePointer(to: &params) { pp in
                    var m = CK_MECHANISM(
                        mechanism: type.rawValue, pParameter: UnsafeMutableRawPointer(pp),
                        ulParameterLen: CK_ULONG(MemoryLayout<CK_RSA_PKCS_OAEP_PARAMS>.size))
                    return try body(&m)
                }
            }
        case .gcm(let iv, let ivBits, let aad, let tagBits):
            // SAFETY: the IV, the AAD and `params` stay valid for the whole call.
            return try iv.withUnsafeBytes { ivBytes in
                try aad.withUnsafeBytes { aadBytes in
                    var params = CK_GCM_PARAMS(
                        pIv: ivBytes.isEmpty ? nil : UnsafeMutablePointer(mutating: ivBytes.bindMemory(to: CK_BYTE.self).baseAddress),
                        ulIvLen: CK_ULONG(ivBytes.count), ulIvBits: ivBits,
                        pAAD: aadBytes.isEmpty ? nil : UnsafeMutablePointer(mutating: aadBytes.bindMemory(to: CK_BYTE.self).baseAddress),
                        ulAADLen: CK_ULONG(aadBytes.count), ulTagBits: tagBits)
                    return try withUnsafeMutablePointer(to: &params) { pp in
                        var m = CK_MECHANISM(
                            mechanism: type.rawValue, pParameter: UnsafeMutableRawPointer(pp),
                            ulParameterLen: CK_ULONG(MemoryLayout<CK_GCM_PARAMS>.size))
                        return try body(&m)
                    }
                }
            }
        case .ecdh1(let kdf, let sharedData, let publicData):
            // SAFETY: both byte strings and `params` stay valid for the whole call.
            return try sharedData.withUnsafeBytes { shared in
                try publicData.withUnsafeBytes { pub in
                    var params = CK_ECDH1_DERIVE_PARAMS(
                        kdf: kdf, ulSharedDataLen: CK_ULONG(shared.count),
                        pSharedData: shared.isEmpty ? nil : UnsafeMutablePointer(mutating: shared.bindMemory(to: CK_BYTE.self).baseAddress),
                        ulPublicDataLen: CK_ULONG(pub.count),
                        pPublicData: pub.isEmpty ? nil : UnsafeMutablePointer(mutating: pub.bindMemory(to: CK_BYTE.self).baseAddress))
                    return try withUnsafeMutablePointer(to: &params) { pp in
                        var m = CK_MECHANISM(
                            mechanism: type.rawValue, pParameter: UnsafeMutableRawPointer(pp),
                            ulParameterLen: CK_ULONG(MemoryLayout<CK_ECDH1_DERIVE_PARAMS>.size))
                        return try body(&m)
                    }
                }
            }
        case .derivationString(let data):
            // SAFETY: the data and `params` stay valid for the whole call.
            return try data.withUnsafeBytes { bytes in
                var params = CK_KEY_DERIVATION_STRING_DATA(
                    pData: bytes.isEmpty ? nil : UnsafeMutablePointer(mutating: bytes.bindMemory(to: CK_BYTE.self).baseAddress),
                    ulLen: CK_ULONG(bytes.count))
                return try withUnsafeMutablePointer(to: &params) { pp in
                    var m = CK_MECHANISM(
                        mechanism: type.rawValue, pParameter: UnsafeMutableRawPointer(pp),
                        ulParameterLen: CK_ULONG(MemoryLayout<CK_KEY_DERIVATION_STRING_DATA>.size))
                    return try body(&m)
                }
            }
        case .cbcEncryptData(let iv, let data):
            // SAFETY: the data and the parameter structure stay valid for the whole call.
            return try data.withUnsafeBytes { bytes in
                let pointer = bytes.isEmpty ? nil : UnsafeMutablePointer(mutating: bytes.bindMemory(to: CK_BYTE.self).baseAddress)
                func call<P>(_ params: inout P, iv field: WritableKeyPath<P, some Any>, data: WritableKeyPath<P, UnsafeMutablePointer<CK_BYTE>?>,
                             length: WritableKeyPath<P, CK_ULONG>) throws -> R {
                    withUnsafeMutableBytes(of: &params[keyPath: field]) { $0.copyBytes(from: iv.prefix($0.count)) }
                    params[keyPath: data] = pointer
                    params[keyPath: length] = CK_ULONG(bytes.count)
                    return try withUnsafeMutablePointer(to: &params) { pp in
                        var m = CK_MECHANISM(
                            mechanism: type.rawValue, pParameter: UnsafeMutableRawPointer(pp),
                            ulParameterLen: CK_ULONG(MemoryLayout<P>.size))
                        return try body(&m)
                    }
                }
                if iv.count == 8 {
                    var params = CK_DES_CBC_ENCRYPT_DATA_PARAMS()
                    return try call(&params, iv: \.iv, data: \.pData, length: \.length)
                }
                var params = CK_AES_CBC_ENCRYPT_DATA_PARAMS()
                return try call(&params, iv: \.iv, data: \.pData, length: \.length)
            }
        }
    }
}
