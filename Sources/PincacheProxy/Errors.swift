import CPKCS11
import DBusKit

/// A PKCS#11 return value travelling as a Swift error inside the proxy. Entry points
/// (Entry.swift) catch it and return `rv`; it never crosses `@_cdecl`.
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

/// What a failed call was aimed at; decides how bus-level errors without a code map.
enum CallTarget {
    /// The manager or something not tied to a slot or session.
    case general
    /// A slot (token object): a vanished object is an invalid slot.
    case slot
    /// A session: its daemon or object being gone means the handle is dead.
    case session
}

enum ErrorMapping {
    static let busErrorPrefix = "org.freedesktop.DBus.Error."

    /// The PKCS#11 return value for an error reply (cryptoki1.md "Errors"): the last
    /// `(0x<hex>)` in the message wins; otherwise the error name decides.
    static func returnValue(for error: DBusError, target: CallTarget) -> CK_RV {
        if let code = lastHexCode(in: error.message), code != CKR_OK { return code }
        guard error.name.hasPrefix(busErrorPrefix) else {
            return error.name == "org.pincache.Error.NotAuthorized" ? CKR_FUNCTION_REJECTED : CKR_FUNCTION_FAILED
        }
        switch error.name.dropFirst(busErrorPrefix.count) {
        case "ServiceUnknown", "NameHasNoOwner":
            // Session calls go to the unique name of the daemon that opened the session:
            // that name gone means the session is gone with it.
            return target == .session ? CKR_SESSION_HANDLE_INVALID : CKR_DEVICE_REMOVED
        case "NoReply", "Disconnected", "Timeout", "TimedOut":
            return CKR_DEVICE_REMOVED
        case "AccessDenied":
            return target == .session ? CKR_SESSION_HANDLE_INVALID : CKR_FUNCTION_FAILED
        case "UnknownObject":
            switch target {
            case .session: return CKR_SESSION_HANDLE_INVALID
            case .slot: return CKR_SLOT_ID_INVALID
            case .general: return CKR_FUNCTION_FAILED
            }
        case "InvalidArgs":
            return CKR_ARGUMENTS_BAD
        case "NoMemory":
            return CKR_HOST_MEMORY
        default:
            return CKR_FUNCTION_FAILED
        }
    }

    /// The value of the last `(0x<hex>)` in `message`, if any parses.
    static func lastHexCode(in message: String) -> CK_RV? {
        let bytes = Array(message.utf8)
        var end = bytes.count
        while end > 0 {
            guard let close = bytes[..<end].lastIndex(of: UInt8(ascii: ")")) else { return nil }
            end = close
            guard let open = bytes[..<close].lastIndex(of: UInt8(ascii: "(")) else { return nil }
            let inner = bytes[(open + 1)..<close]
            if inner.count > 2, inner.count <= 18, inner.first == UInt8(ascii: "0"),
               inner.dropFirst().first == UInt8(ascii: "x") || inner.dropFirst().first == UInt8(ascii: "X"),
               let value = CK_RV(String(decoding: inner.dropFirst(2), as: UTF8.self), radix: 16) {
                return value
            }
        }
        return nil
    }
}
