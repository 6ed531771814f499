import CDBus
import Glibc
import Synchronization

/// One incoming method call, handed to a handler on the loop thread.
///
/// The handler may keep it and reply later from any thread. The first reply wins; a call
/// released without a reply is answered with `Failed("no reply")` so callers never hang.
public final class MethodCall: @unchecked Sendable {
    /// Unique bus name of the caller.
    public let sender: String
    public let path: ObjectPath
    /// The interface the call was dispatched to, resolved if the message named none.
    public let interface: String
    public let member: String
    /// Decoded arguments; a sensitive argument appears as `.string("")` (or `.bytes([])`).
    /// Received `.unixFD` values belong to the handler, which must close them.
    public let arguments: [DBusValue]
    /// `dbus_message_get_allow_interactive_authorization`: the caller accepts a prompt.
    public let allowsInteractiveAuthorization: Bool
    /// The caller set NO_REPLY_EXPECTED; replies are then not sent.
    public let noReplyExpected: Bool

    private let message: OpaquePointer
    /// The connection the call came on.
    public let connection: DBusConnection
    private let method: DBusMethod
    private let sensitiveIndices: [Int]
    private let replied = Mutex(false)
    private let wiped = Atomic<Bool>(false)

    /// Takes a new reference on `message`.
    init(connection: DBusConnection, message: OpaquePointer, sender: String, path: ObjectPath,
         interface: String, method: DBusMethod, arguments: [DBusValue]) {
        self.connection = connection
        self.message = dbus_message_ref(message)
        self.sender = sender
        self.path = path
        self.interface = interface
        self.member = method.name
        self.method = method
        self.arguments = arguments
        self.sensitiveIndices = method.inArguments.indices.filter { method.inArguments[$0].sensitive }
        self.allowsInteractiveAuthorization = dbus_message_get_allow_interactive_authorization(message) != 0
        self.noReplyExpected = dbus_message_get_no_reply(message) != 0
    }

    deinit {
        wipeSensitiveArguments()
        if claimReply() {
            sendError(.failed("no reply"))
        }
        dbus_message_unref(message)
    }

    /// Lends the raw bytes of a sensitive `s` (without NUL) or `ay` argument, read in
    /// place from libdbus's message buffer: no Swift String or Array is made. The buffer
    /// is valid only inside `body` and is wiped once the call is replied to, so read it
    /// before replying. An index that holds neither type gives an empty buffer.
    public func withSensitiveArgument<R>(at index: Int, _ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        try Marshal.withArgumentBytes(message, at: index) { try body(UnsafeRawBufferPointer($0)) }
    }

    /// Replies with `values`. They must match the declared out signature; otherwise the
    /// caller gets `Failed` and the mismatch is logged. Later replies are ignored.
    public func reply(_ values: [DBusValue]) {
        guard claimReply() else { return }
        // Wiped before the reply goes out, so the secret is gone by the time the caller
        // can observe the outcome.
        wipeSensitiveArguments()
        let signature = values.signature
        guard signature == method.outSignature else {
            DBusLog.log("reply to \(interface).\(member): declared '\(method.outSignature)', handler gave '\(signature)'")
            sendError(.failed("internal error: reply does not match the declared signature"))
            return
        }
        guard !noReplyExpected else { return connection.sendReply(nil) }
        guard let reply = dbus_message_new_method_return(message) else { return }
        defer { dbus_message_unref(reply) }
        if let problem = Marshal.append(values, to: reply) {
            DBusLog.log("reply to \(interface).\(member): \(problem.message)")
            sendError(.failed("internal error: reply could not be marshalled"))
            return
        }
        connection.sendReply(reply)
    }

    /// Replies with an error. Later replies are ignored.
    public func reply(error: DBusError) {
        guard claimReply() else { return }
        wipeSensitiveArguments()
        sendError(error)
    }

    private func claimReply() -> Bool {
        replied.withLock { done in
            defer { done = true }
            return !done
        }
    }

    private func sendError(_ error: DBusError) {
        connection.sendError(error, replyingTo: message)
    }

    private func wipeSensitiveArguments() {
        guard !sensitiveIndices.isEmpty, !wiped.exchange(true, ordering: .acquiringAndReleasing) else { return }
        // The raw bytes also linger in libdbus's receive buffer, out of this message's reach.
        defer { connection.scrubReceiveBuffer() }
        for index in sensitiveIndices {
            Marshal.withArgumentBytes(message, at: index) { buffer in
                // SAFETY: the buffer is inside the message body this object holds a
                // reference to; only the secret's bytes are cleared, never the length.
                if let base = buffer.baseAddress { explicit_bzero(base, buffer.count) }
            }
        }
    }
}
