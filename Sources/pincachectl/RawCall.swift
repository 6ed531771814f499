import CDBus
import DBusKit
import Glibc

// The only file of pincachectl that calls libdbus directly. DBusKit takes arguments as
// `DBusValue`, whose `s` case is a Swift String; the PIN of SignOnce must not become one,
// and the calls that may prompt (polkit) need ALLOW_INTERACTIVE_AUTHORIZATION, which
// DBusKit's client calls do not set. So these calls build their message here.

// libdbus's type codes are character-literal macros, which Swift does not import.
private let DBUS_TYPE_ARRAY = Int32(UInt8(ascii: "a"))
private let DBUS_TYPE_BYTE = Int32(UInt8(ascii: "y"))
private let DBUS_TYPE_STRING = Int32(UInt8(ascii: "s"))

/// Writes arguments into a message; false when libdbus refuses one (out of memory, invalid UTF-8).
typealias ArgumentWriter = (UnsafeMutablePointer<DBusMessageIter>) -> Bool

/// A blocking method call on a private connection of its own, with
/// `dbus_message_set_allow_interactive_authorization` set so polkit may ask the user.
/// Returns the reply's first argument when it is `ay`, else an empty array.
/// With `askPassword` false (--no-ask-password) polkit is told not to ask, and no agent starts.
func interactiveCall(bus: BusAddress, busDescription: String, path: String, interface: String, member: String,
                     timeoutMilliseconds: Int32, askPassword: Bool = true,
                     arguments: ArgumentWriter) throws(CLIError) -> [UInt8] {
    var error = CDBus.DBusError()
    dbus_error_init(&error)
    defer { dbus_error_free(&error) }

    func takeError() -> DBusKit.DBusError {
        let name = error.name.map { String(cString: $0) } ?? "org.freedesktop.DBus.Error.Failed"
        let message = error.message.map { String(cString: $0) } ?? ""
        dbus_error_free(&error)
        dbus_error_init(&error)
        return DBusKit.DBusError(name: name, message: message)
    }

    guard dbus_threads_init_default() != 0 else { throw CLIError(.failure, "out of memory") }
    let opened: OpaquePointer?
    switch bus {
    case .system: opened = dbus_bus_get_private(DBUS_BUS_SYSTEM, &error)
    case .session: opened = dbus_bus_get_private(DBUS_BUS_SESSION, &error)
    case .address(let address):
        let raw = address.withCString { dbus_connection_open_private($0, &error) }
        if let raw, dbus_bus_register(raw, &error) == 0 {
            dbus_connection_close(raw)
            dbus_connection_unref(raw)
            opened = nil
        } else {
            opened = raw
        }
    }
    guard let connection = opened else {
        let e = takeError()
        throw CLIError(.daemonAbsent, "cannot connect to \(busDescription): \(e.message) [\(e.name)]")
    }
    dbus_connection_set_exit_on_disconnect(connection, 0)
    defer {
        dbus_connection_close(connection)
        dbus_connection_unref(connection)
    }

    guard let message = dbus_message_new_method_call(Pincache.busName, path, interface, member) else {
        throw CLIError(.failure, "cannot create the \(member) call (invalid path '\(path)'?)")
    }
    // libdbus frees its copy of the arguments (the PIN too) with the message, without
    // wiping it: the client-side exposure left is that heap block until it is reused.
    defer { dbus_message_unref(message) }
    dbus_message_set_allow_interactive_authorization(message, askPassword ? 1 : 0)
    let agent = PolkitAgent.start(askPassword: askPassword)
    defer { agent?.stop() }

    var iter = DBusMessageIter()
    dbus_message_iter_init_append(message, &iter)
    guard arguments(&iter) else { throw CLIError(.usage, "cannot encode the arguments of \(member)") }

    guard let reply = dbus_connection_send_with_reply_and_block(connection, message, timeoutMilliseconds, &error) else {
        throw CLIError(takeError(), doing: member)
    }
    defer { dbus_message_unref(reply) }

    var replyIter = DBusMessageIter()
    guard dbus_message_iter_init(reply, &replyIter) != 0 else { return [] }
    guard dbus_message_iter_get_arg_type(&replyIter) == DBUS_TYPE_ARRAY,
          dbus_message_iter_get_element_type(&replyIter) == DBUS_TYPE_BYTE else {
        throw CLIError(.failure, "unexpected reply to \(member): \(String(cString: dbus_message_get_signature(reply)))")
    }
    var bytesIter = DBusMessageIter()
    dbus_message_iter_recurse(&replyIter, &bytesIter)
    var start: UnsafeRawPointer? = nil
    var count: Int32 = 0
    // SAFETY: get_fixed_array points into the reply message, which lives until the deferred
    // unref; the bytes are copied out before that.
    withUnsafeMutablePointer(to: &start) { dbus_message_iter_get_fixed_array(&bytesIter, $0, &count) }
    guard let start, count > 0 else { return [] }
    return Array(UnsafeRawBufferPointer(start: start, count: Int(count)))
}

/// Appends `s` from a NUL-terminated C buffer, refusing what libdbus would reject
/// (invalid UTF-8) before it logs a warning or aborts.
func appendCString(_ iter: UnsafeMutablePointer<DBusMessageIter>, _ string: UnsafePointer<CChar>) -> Bool {
    guard dbus_validate_utf8(string, nil) != 0 else { return false }
    var pointer: UnsafePointer<CChar>? = string
    // SAFETY: append_basic reads the char* through the pointer to it and copies the string.
    return dbus_message_iter_append_basic(iter, DBUS_TYPE_STRING, &pointer) != 0
}

func appendString(_ iter: UnsafeMutablePointer<DBusMessageIter>, _ string: String) -> Bool {
    string.withCString { appendCString(iter, $0) }
}

func appendBytes(_ iter: UnsafeMutablePointer<DBusMessageIter>, _ bytes: [UInt8]) -> Bool {
    var sub = DBusMessageIter()
    guard dbus_message_iter_open_container(iter, DBUS_TYPE_ARRAY, "y", &sub) != 0 else { return false }
    let ok = bytes.withUnsafeBufferPointer { buffer -> Bool in
        // SAFETY: append_fixed_array copies `count` bytes from the address stored in `base`;
        // an empty array still needs a valid pointer, hence the stand-in.
        var stand_in: UInt8 = 0
        return withUnsafePointer(to: &stand_in) { fallback in
            var base: UnsafePointer<UInt8>? = buffer.baseAddress ?? fallback
            return dbus_message_iter_append_fixed_array(&sub, DBUS_TYPE_BYTE, &base, Int32(buffer.count)) != 0
        }
    }
    guard ok else {
        dbus_message_iter_abandon_container(iter, &sub)
        return false
    }
    return dbus_message_iter_close_container(iter, &sub) != 0
}
