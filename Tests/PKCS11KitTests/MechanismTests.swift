import CPKCS11
import Testing

@testable import PKCS11Kit

/// The C structures `Mechanism` hands to a module, read back as the module would.
@Suite struct MechanismTests {
    /// `(mechanism, parameter bytes or nil for a NULL pointer, ulParameterLen)`.
    func cView(_ m: Mechanism) -> (UInt, [UInt8]?, UInt) {
        m.withCMechanism { p in
            let c = p.pointee
            // SAFETY: the parameter is valid for ulParameterLen bytes during the closure.
            let bytes = c.pParameter.map { Array(UnsafeRawBufferPointer(start: $0, count: Int(c.ulParameterLen))) }
            return (c.mechanism, bytes, c.ulParameterLen)
        }
    }

    @Test func noneIsNullAndZero() {
        let (type, bytes, length) = cView(Mechanism(.ecdsa))
        #expect(type == MechanismType.ecdsa.rawValue && bytes == nil && length == 0)
    }

    @Test func rawPassesTheBytesAsGiven() {
        let iv: [UInt8] = Array(0..<16)
        let (type, bytes, length) = cView(Mechanism(MechanismType(rawValue: 0x1082), parameter: .raw(iv)))
        #expect(type == 0x1082 && bytes == iv && length == 16)
        let (_, emptyBytes, emptyLength) = cView(Mechanism(.ecdsa, parameter: .raw([])))
        #expect(emptyBytes == nil && emptyLength == 0)
    }

    @Test func rawBytesOfAPSSStructEqualTheTypedParameter() {
        let typed = cView(Mechanism(.rsaPKCSPSS, parameter: .pss(hash: .sha384, mgf: .sha384, saltLength: 48)))
        #expect(typed.2 == UInt(MemoryLayout<CK_RSA_PKCS_PSS_PARAMS>.size))
        var params = CK_RSA_PKCS_PSS_PARAMS(hashAlg: CKM_SHA384, mgf: CKG_MGF1_SHA384, sLen: 48)
        let raw = withUnsafeBytes(of: &params) { Array($0) }
        #expect(cView(Mechanism(.rsaPKCSPSS, parameter: .raw(raw))) == (typed.0, typed.1, typed.2))
    }
}
