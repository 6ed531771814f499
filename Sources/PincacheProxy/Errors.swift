import CPKCS11
import CryptokiWire

/// A PKCS#11 return value travelling as a Swift error inside the proxy. Entry points
/// (Entry.swift) catch it and return `rv`; it never crosses `@_cdecl`. The daemon's errors
/// arrive as numbers on the wire and become this as they are.
struct CKError: Error, Equatable {
    let rv: CK_RV
    init(_ rv: CK_RV) { self.rv = rv }

    static let argumentsBad = CKError(CKR_ARGUMENTS_BAD)
    static let sessionHandleInvalid = CKError(CKR_SESSION_HANDLE_INVALID)
    static let deviceRemoved = CKError(CKR_DEVICE_REMOVED)
    static let deviceError = CKError(CKR_DEVICE_ERROR)
    static let notInitialized = CKError(CKR_CRYPTOKI_NOT_INITIALIZED)
    static let slotIDInvalid = CKError(CKR_SLOT_ID_INVALID)
    static let operationNotInitialized = CKError(CKR_OPERATION_NOT_INITIALIZED)
    static let operationActive = CKError(CKR_OPERATION_ACTIVE)
    static let bufferTooSmall = CKError(CKR_BUFFER_TOO_SMALL)
}

extension CKError {
    /// What a failed exchange on the cryptoki socket means to the application.
    init(_ failure: WireClient.Failure) {
        switch failure {
        case .closed, .timedOut: self = .deviceRemoved
        case .malformed: self = .deviceError
        case .unencodable: self = .argumentsBad
        case .refused(let rv): self.init(CK_RV(truncatingIfNeeded: rv))
        }
    }
}
