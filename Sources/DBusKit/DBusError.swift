import CDBus

/// A D-Bus error: an error name (`org.freedesktop.DBus.Error.InvalidArgs`) and a message.
///
/// Used both for errors this process replies with and for errors it receives. This file
/// is the only place a libdbus `DBusError` struct is turned into a Swift error.
public struct DBusError: Error, Sendable, Equatable, CustomStringConvertible {
    public var name: String
    public var message: String

    public init(name: String, message: String) {
        self.name = name
        self.message = message
    }

    public var description: String { "\(name): \(message)" }

    static let standardPrefix = "org.freedesktop.DBus.Error."

    /// `org.freedesktop.DBus.Error.InvalidArgs`
    public static func invalidArgs(_ m: String) -> DBusError { .init(name: standardPrefix + "InvalidArgs", message: m) }
    /// `org.freedesktop.DBus.Error.AccessDenied`
    public static func accessDenied(_ m: String) -> DBusError { .init(name: standardPrefix + "AccessDenied", message: m) }
    /// `org.freedesktop.DBus.Error.UnknownObject`
    public static func unknownObject(_ m: String) -> DBusError { .init(name: standardPrefix + "UnknownObject", message: m) }
    /// `org.freedesktop.DBus.Error.UnknownInterface`
    public static func unknownInterface(_ m: String) -> DBusError { .init(name: standardPrefix + "UnknownInterface", message: m) }
    /// `org.freedesktop.DBus.Error.UnknownMethod`
    public static func unknownMethod(_ m: String) -> DBusError { .init(name: standardPrefix + "UnknownMethod", message: m) }
    /// `org.freedesktop.DBus.Error.UnknownProperty`
    public static func unknownProperty(_ m: String) -> DBusError { .init(name: standardPrefix + "UnknownProperty", message: m) }
    /// `org.freedesktop.DBus.Error.PropertyReadOnly`
    public static func propertyReadOnly(_ m: String) -> DBusError { .init(name: standardPrefix + "PropertyReadOnly", message: m) }
    /// `org.freedesktop.DBus.Error.Failed`
    public static func failed(_ m: String) -> DBusError { .init(name: standardPrefix + "Failed", message: m) }
    /// `org.freedesktop.DBus.Error.NoReply` (also what libdbus reports for a call that timed out)
    public static func noReply(_ m: String) -> DBusError { .init(name: standardPrefix + "NoReply", message: m) }
    /// `org.freedesktop.DBus.Error.Disconnected`
    public static func disconnected(_ m: String) -> DBusError { .init(name: standardPrefix + "Disconnected", message: m) }
    /// `org.freedesktop.DBus.Error.NoMemory`
    public static func noMemory(_ m: String) -> DBusError { .init(name: standardPrefix + "NoMemory", message: m) }

    /// The name to put on the wire: libdbus aborts on an invalid error name, so an
    /// invalid one is replaced by `Failed` rather than passed on.
    var wireName: String {
        DBusNames.isValidErrorName(name) ? name : DBusError.standardPrefix + "Failed"
    }
}

extension DBusError {
    /// Takes the contents of a set libdbus error and frees it (nil if it is not set).
    static func take(_ error: inout CDBus.DBusError) -> DBusError? {
        guard dbus_error_is_set(&error) != 0 else { return nil }
        defer { dbus_error_free(&error) }
        return DBusError(name: error.name.map { String(cString: $0) } ?? standardPrefix + "Failed",
                         message: error.message.map { String(cString: $0) } ?? "")
    }

    /// Runs `body` with a fresh libdbus error and throws it if `body` set it.
    static func check<R>(_ body: (UnsafeMutablePointer<CDBus.DBusError>) -> R) throws(DBusError) -> R {
        var error = CDBus.DBusError()
        dbus_error_init(&error)
        let result = body(&error)
        if let e = take(&error) { throw e }
        return result
    }

    /// The error carried by an error reply message.
    static func fromErrorReply(_ message: OpaquePointer) -> DBusError {
        var error = CDBus.DBusError()
        dbus_error_init(&error)
        _ = dbus_set_error_from_message(&error, message)
        return take(&error) ?? .failed("error reply without error name")
    }
}
