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

    public init(_ kind: Kind, _ message: String) {
        self.kind = kind
        self.message = message
    }

    public var dbusName: String { Self.prefix + kind.rawValue }
    public var dbusError: DBusError { DBusError(name: dbusName, message: message) }
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
        self.init(kind, error.description)
    }

    public init(_ error: PolicyError) {
        switch error {
        case .tokenBusy:
            self.init(.tokenBusy, "the token is held by another client (CKR_USER_ANOTHER_ALREADY_LOGGED_IN (0x104))")
        case .notLoggedIn:
            self.init(.notLoggedIn, "not logged in to this token (CKR_USER_NOT_LOGGED_IN (0x101))")
        case .pinRequired:
            self.init(
                .pinRequired,
                "this key requires the PIN for every signature: use SignWithPin (CKR_USER_NOT_LOGGED_IN (0x101))")
        case .alreadyLoggedIn:
            self.init(.alreadyLoggedIn, "already logged in to this token (CKR_USER_ALREADY_LOGGED_IN (0x100))")
        }
    }

    static func invalidArgs(_ message: String) -> DBusError { .invalidArgs(message) }
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

/// Where an operation's answer goes: a D-Bus method call (bus or peer channel) or a fast-path
/// request. Either is answered exactly once; one dropped unanswered answers "no reply".
protocol CallReply: AnyObject, Sendable {
    func reply(_ values: [DBusValue])
    func reply(error: DBusError)
    /// True when the job may run on the current thread: a thread serving this caller alone
    /// (its peer channel's loop or its fast path), never the bus loop or a worker.
    func mayRunInline(besides bus: DBusConnection) -> Bool
}

extension CallReply {
    func reply<T>(_ result: Result<T, ServiceError>, _ encode: (T) -> [DBusValue]) {
        switch result {
        case .success(let value): reply(encode(value))
        case .failure(let error): reply(error: error.dbusError)
        }
    }
}

extension MethodCall: CallReply {
    func mayRunInline(besides bus: DBusConnection) -> Bool {
        connection !== bus && connection.isLoopThread
    }
}
