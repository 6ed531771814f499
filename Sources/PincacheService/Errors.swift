import DBusKit
import PKCS11Kit
import PinPolicy

/// Every error a pincache method can answer with, and the one place that turns policy,
/// backend and secret-memory failures into D-Bus errors (names binding, DESIGN §2).
public struct ServiceError: Error, Sendable, Equatable, CustomStringConvertible {
    public enum Kind: String, Sendable {
        case pinIncorrect = "PinIncorrect"
        case pinLocked = "PinLocked"
        case notLoggedIn = "NotLoggedIn"
        case pinRequired = "PinRequired"
        case tokenBusy = "TokenBusy"
        case tokenNotPresent = "TokenNotPresent"
        case notAuthorized = "NotAuthorized"
        case keyNotFound = "KeyNotFound"
        case mechanismInvalid = "MechanismInvalid"
        case tooManySessions = "TooManySessions"
        case alreadyLoggedIn = "AlreadyLoggedIn"
        case secureMemoryUnavailable = "SecureMemoryUnavailable"
        case backendError = "BackendError"
    }
    public static let prefix = "org.pincache.Error."

    public var kind: Kind
    public var message: String
    /// The PKCS#11 return value this error stands for, as a number: the proxy's wire carries
    /// it as is (nothing parses it back out of `message`, which says it for people).
    public var rv: UInt

    public init(_ kind: Kind, _ message: String, rv: UInt? = nil) {
        self.kind = kind
        self.message = message
        self.rv = rv ?? kind.defaultReturnValue
    }

    public var dbusName: String { Self.prefix + kind.rawValue }
    /// For errors that are D-Bus's own (InvalidArgs, AccessDenied, LimitsExceeded): the name
    /// the bus front end answers with instead of `dbusName`.
    public var busErrorName: String?
    public var dbusError: DBusError { DBusError(name: busErrorName ?? dbusName, message: message) }

    /// Malformed arguments: InvalidArgs on D-Bus, CKR_ARGUMENTS_BAD through the proxy.
    static func arguments(_ message: String) -> ServiceError {
        var e = ServiceError(.backendError, "\(message) (CKR_ARGUMENTS_BAD (0x7))", rv: 0x7)
        e.busErrorName = "org.freedesktop.DBus.Error.InvalidArgs"
        return e
    }

    /// A quota reached: LimitsExceeded on D-Bus, `rv` (CKR_HOST_MEMORY by default) through the proxy.
    static func limits(_ message: String, rv: UInt = 0x2) -> ServiceError {
        var e = ServiceError(.backendError, message, rv: rv)
        e.busErrorName = "org.freedesktop.DBus.Error.LimitsExceeded"
        return e
    }
    public var description: String { "\(dbusName): \(message)" }

    /// Backend errors keep the exact CK_RV text so the proxy can return the code unchanged.
    public init(_ error: PKCS11Error) {
        let kind: Kind
        switch error.rv {
        case .pinIncorrect: kind = .pinIncorrect
        case .pinLocked: kind = .pinLocked
        case .userNotLoggedIn: kind = .notLoggedIn
        case .userAlreadyLoggedIn: kind = .alreadyLoggedIn
        case .userAnotherAlreadyLoggedIn: kind = .tokenBusy
        case .tokenNotPresent, .deviceRemoved, .tokenNotRecognized: kind = .tokenNotPresent
        case .mechanismInvalid, .mechanismParamInvalid: kind = .mechanismInvalid
        case .keyHandleInvalid: kind = .keyNotFound
        default: kind = .backendError
        }
        self.init(kind, error.description, rv: error.rv.rawValue)
    }

    public init(_ error: PolicyError) {
        switch error {
        case .tokenBusy:
            self.init(.tokenBusy, "the token is held by another client (CKR_USER_ANOTHER_ALREADY_LOGGED_IN (0x104))", rv: 0x104)
        case .notLoggedIn:
            self.init(.notLoggedIn, "not logged in to this token (CKR_USER_NOT_LOGGED_IN (0x101))", rv: 0x101)
        case .pinRequired:
            self.init(
                .pinRequired,
                "this key requires the PIN for every signature: use SignWithPin (CKR_USER_NOT_LOGGED_IN (0x101))", rv: 0x101)
        case .alreadyLoggedIn:
            self.init(.alreadyLoggedIn, "already logged in to this token (CKR_USER_ALREADY_LOGGED_IN (0x100))", rv: 0x100)
        case .pinHeldBack:
            // Not logged in as far as a PKCS#11 program knows: it logs in again, which is the
            // way out (its PIN replaces the held one, and a success resets the token's counter).
            self.init(
                .notLoggedIn,
                "the cached PIN is held back: the token reports a wrong PIN since its last successful login; log in again (CKR_USER_NOT_LOGGED_IN (0x101))",
                rv: 0x101)
        }
    }

    static func invalidArgs(_ message: String) -> DBusError { .invalidArgs(message) }
}

extension ServiceError.Kind {
    /// The CK_RV an error of this kind carries unless it says otherwise.
    var defaultReturnValue: UInt {
        switch self {
        case .pinIncorrect: 0xa0
        case .pinLocked: 0xa4
        case .notLoggedIn, .pinRequired: 0x101
        case .tokenBusy: 0x104
        case .tokenNotPresent: 0xe0
        case .notAuthorized: 0x200  // CKR_FUNCTION_REJECTED
        case .keyNotFound: 0x60
        case .mechanismInvalid: 0x70
        case .tooManySessions: 0xb1
        case .alreadyLoggedIn: 0x100
        case .secureMemoryUnavailable: 0x31
        case .backendError: 0x6  // CKR_FUNCTION_FAILED
        }
    }
}

extension Result where Failure == ServiceError {
    /// Runs `body`, mapping the error types of the layers below into ServiceError.
    static func catching(_ body: () throws -> Success) -> Result<Success, ServiceError> {
        do {
            return .success(try body())
        } catch let e as ServiceError {
            return .failure(e)
        } catch let e as PKCS11Error {
            return .failure(ServiceError(e))
        } catch let e as PolicyError {
            return .failure(ServiceError(e))
        } catch {
            return .failure(ServiceError(.backendError, "\(error)"))
        }
    }
}

extension MethodCall {
    func reply<T>(_ result: Result<T, ServiceError>, _ encode: (T) -> [DBusValue]) {
        switch result {
        case .success(let value): reply(encode(value))
        case .failure(let error): reply(error: error.dbusError)
        }
    }
}
