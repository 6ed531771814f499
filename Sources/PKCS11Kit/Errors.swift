import CPKCS11

/// A PKCS#11 function returned something other than `CKR_OK`.
///
/// Every `CK_RV` leaves this module through `PKCS11Error.check`, so an error always names
/// the function that produced it. A module that answers with an impossible length or count
/// (beyond the caps in `PKCS11Module`) is reported as `CKR_GENERAL_ERROR` from that function.
public struct PKCS11Error: Error, Sendable, Equatable, CustomStringConvertible {
    public let rv: ReturnValue
    /// The C function, e.g. `C_Login`.
    public let function: String

    public init(rv: ReturnValue, function: String) {
        self.rv = rv
        self.function = function
    }

    /// `C_Login: CKR_PIN_INCORRECT (0xa0)`
    public var description: String { "\(function): \(rv)" }

    /// The one place a `CK_RV` becomes a Swift error. Returns the value when it is `CKR_OK`
    /// or one of `accepting` (codes the caller turns into a result, e.g. `CKR_NO_EVENT`).
    @discardableResult
    static func check(_ rv: CK_RV, _ function: String, accepting: [ReturnValue] = []) throws -> ReturnValue {
        let value = ReturnValue(rawValue: rv)
        if value == .ok || accepting.contains(value) { return value }
        throw PKCS11Error(rv: value, function: function)
    }
}

/// The module file could not be loaded or is not a PKCS#11 module.
public struct ModuleLoadError: Error, Sendable, Equatable, CustomStringConvertible {
    public let path: String
    /// `dlerror()` text, or why the library is not usable as a module.
    public let reason: String

    public init(path: String, reason: String) {
        self.path = path
        self.reason = reason
    }

    public var description: String { "cannot load PKCS#11 module \(path): \(reason)" }
}
