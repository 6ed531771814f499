import CDBus
import CShims
import Dispatch
import Glibc
import Synchronization
import SystemKit

/// Which bus to connect to.
public enum BusAddress: Sendable, Equatable {
    case system, session
    /// A D-Bus address such as `unix:path=/run/dbus/system_bus_socket`.
    case address(String)

    /// `"system"`, `"session"`, or otherwise a D-Bus address.
    public init(parsing string: String) {
        switch string {
        case "system": self = .system
        case "session": self = .session
        default: self = .address(string)
        }
    }
}

/// What the bus knows about a connection (`GetConnectionCredentials`).
public struct PeerCredentials: Sendable, Equatable {
    public var uid: UInt32?
    public var pid: UInt32?
    public var groups: [UInt32]

    public init(uid: UInt32? = nil, pid: UInt32? = nil, groups: [UInt32] = []) {
        self.uid = uid
        self.pid = pid
        self.groups = groups
    }
}

/// What a connection answered to the method calls it received.
public struct ReplyStatistics: Sendable, Equatable {
    /// Calls answered, by a return or an error.
    public var callsServed: UInt64 = 0
    /// Error replies by error name.
    public var errors: [String: UInt64] = [:]

    public init() {}

    public mutating func add(_ other: ReplyStatistics) {
        callsServed &+= other.callsServed
        for (name, n) in other.errors { errors[name, default: 0] &+= n }
    }
}

/// A received signal.
public struct DBusSignalMessage: Sendable {
    public var sender: String
    public var path: ObjectPath
    public var interface: String
    public var member: String
    public var arguments: [DBusValue]
}

/// Identifies a handler added with `DBusConnection.addSignalHandler`.
public struct SignalHandlerToken: Sendable, Hashable {
    let id: UInt64
}

struct SignalSubscription: Sendable {
    var sender: String?
    var path: ObjectPath?
    var interface: String?
    var member: String?
    var handler: @Sendable (DBusSignalMessage) -> Void

    var matchRule: String {
        var rule = "type='signal'"
        if let sender { rule += ",sender='\(sender)'" }
        if let path { rule += ",path='\(path.rawValue)'" }
        if let interface { rule += ",interface='\(interface)'" }
        if let member { rule += ",member='\(member)'" }
        return rule
    }

    func matches(sender s: String, path p: ObjectPath, interface i: String, member m: String) -> Bool {
        // Signals carry the sender's unique name, so a well-known sender name can only be
        // matched by the bus (the bus driver itself sends as org.freedesktop.DBus).
        if let sender, sender.hasPrefix(":") || sender == DBusConnection.busName, sender != s { return false }
        if let path, path != p { return false }
        if let interface, interface != i { return false }
        if let member, member != m { return false }
        return true
    }
}

struct SignalState {
    var nextID: UInt64 = 1
    var subscriptions: [UInt64: SignalSubscription] = [:]
    var disconnectHandlers: [@Sendable () -> Void] = []
}

/// A private libdbus connection to a bus, with its own poll() loop.
///
/// Every public method may be called from any thread. Method handlers, signal handlers
/// and `call` replies run on the loop thread (`run()` or `startLoopThread()`) and must not
/// block it.
public final class DBusConnection: @unchecked Sendable {
    static let busName = "org.freedesktop.DBus"
    static let busPath = ObjectPath("/org/freedesktop/DBus")!

    let connection: OpaquePointer
    let loop = MainLoop()
    let objects: ObjectStore
    let signalState = Mutex(SignalState())
    private let closed = Mutex(false)
    /// When the last receive-buffer scrub went out, and whether a later one is scheduled.
    private let scrubState = Mutex<(lastSent: UInt64, scheduled: Bool)>((0, false))
    private let replies = Mutex(ReplyStatistics())

    /// The connection's unique name on the bus, e.g. `:1.42`.
    public let uniqueName: String

    /// Connects privately to `bus` (`dbus_bus_get_private`, or `dbus_connection_open_private`
    /// and `dbus_bus_register`) with exit-on-disconnect off.
    public init(bus: BusAddress) throws(DBusError) {
        guard dbus_threads_init_default() != 0 else { throw .noMemory("dbus_threads_init_default failed") }
        let opened: OpaquePointer?
        switch bus {
        case .system: opened = try DBusError.check { dbus_bus_get_private(DBUS_BUS_SYSTEM, $0) }
        case .session: opened = try DBusError.check { dbus_bus_get_private(DBUS_BUS_SESSION, $0) }
        case .address(let address):
            let raw = try DBusError.check { e in address.withCString { dbus_connection_open_private($0, e) } }
            guard let raw else { throw .failed("cannot connect to \(address)") }
            do {
                _ = try DBusError.check { dbus_bus_register(raw, $0) }
            } catch {
                dbus_connection_close(raw)
                dbus_connection_unref(raw)
                throw error
            }
            opened = raw
        }
        guard let opened else { throw .failed("cannot connect to the bus") }
        dbus_connection_set_exit_on_disconnect(opened, 0)
        connection = opened
        objects = ObjectStore()
        uniqueName = dbus_bus_get_unique_name(opened).map { String(cString: $0) } ?? ""
        loop.install(on: opened)
        dbus_connection_add_filter(opened, DBusConnection.filter, Unmanaged.passUnretained(self).toOpaque(), nil)
    }

    deinit {
        dbus_connection_remove_filter(connection, DBusConnection.filter, Unmanaged.passUnretained(self).toOpaque())
        if !closed.withLock({ $0 }) { dbus_connection_close(connection) }
        loop.uninstall(from: connection)
        dbus_connection_unref(connection)
    }

    private static let filter: DBusHandleMessageFunction = { _, message, data in
        guard let message, let data else { return DBUS_HANDLER_RESULT_NOT_YET_HANDLED }
        return Unmanaged<DBusConnection>.fromOpaque(data).takeUnretainedValue().handle(message)
    }

    private func handle(_ message: OpaquePointer) -> DBusHandlerResult {
        switch dbus_message_get_type(message) {
        case DBUS_MESSAGE_TYPE_METHOD_CALL:
            dispatchMethodCall(message)
            return DBUS_HANDLER_RESULT_HANDLED
        case DBUS_MESSAGE_TYPE_SIGNAL:
            handleSignal(message)
            return DBUS_HANDLER_RESULT_NOT_YET_HANDLED
        default:
            return DBUS_HANDLER_RESULT_NOT_YET_HANDLED
        }
    }

    // MARK: loop

    /// Runs the main loop on the calling thread until `stop()`.
    public func run() { loop.run(connection: connection) }

    /// Runs the main loop on a new dedicated thread; returns once it is running.
    public func startLoopThread() {
        let started = DispatchSemaphore(value: 0)
        // A bare pthread rather than Foundation's Thread: DBusKit is linked into the
        // PKCS#11 proxy, where a static Foundation would drag ICU into every host process.
        let body = LoopThreadBody { [self] in
            loop.perform { started.signal() }
            run()
        }
        var attributes = pthread_attr_t()
        pthread_attr_init(&attributes)
        defer { pthread_attr_destroy(&attributes) }
        pthread_attr_setdetachstate(&attributes, Int32(PTHREAD_CREATE_DETACHED))
        var thread = pthread_t()
        let context = Unmanaged.passRetained(body).toOpaque()
        let created = pthread_create(&thread, &attributes, { context in
            // Before any Swift runtime work: a host's fork waits for this thread's (CShims).
            pincache_fork_gate_enter()
            defer { pincache_fork_gate_leave() }
            // SAFETY: `context` is the retained LoopThreadBody passed below; this thread
            // takes over that reference.
            guard let context else { return nil }
            let body = Unmanaged<LoopThreadBody>.fromOpaque(context).takeRetainedValue()
            setThreadName("DBusKit loop")
            body.run()
            return nil
        }, context)
        guard created == 0 else {
            Unmanaged<LoopThreadBody>.fromOpaque(context).release()
            DBusLog.log("cannot start the loop thread (pthread_create: \(created))")
            return
        }
        // The new thread enters the fork gate before it runs: a fork waiting at the gate would
        // keep it out while this thread, inside, waited for it.
        let gate = pincache_fork_gate_suspend()
        started.wait()
        pincache_fork_gate_resume(gate)
    }

    /// Makes `run()` return after its current iteration. Thread-safe.
    public func stop() { loop.stop() }

    /// Closes the connection (`dbus_connection_close`) and stops the loop. Peers see this
    /// connection leave the bus. Thread-safe; later calls do nothing.
    public func close() {
        let doClose: @Sendable () -> Void = { [self] in
            let first = closed.withLock { c in
                defer { c = true }
                return !c
            }
            if first { dbus_connection_close(connection) }
        }
        // Closing frees libdbus's watches, so it happens on the loop thread, which is the
        // one that uses them.
        if loop.isRunning && !loop.isLoopThread {
            let done = DispatchSemaphore(value: 0)
            loop.perform {
                doClose()
                done.signal()
            }
            let gate = pincache_fork_gate_suspend()
            _ = done.wait(timeout: .now() + .seconds(5))
            pincache_fork_gate_resume(gate)
        } else {
            doClose()
        }
        loop.stop()
    }

    /// True on the thread running this connection's loop.
    public var isLoopThread: Bool { loop.isLoopThread }

    /// True until the connection is closed or the bus goes away.
    public var isConnected: Bool { dbus_connection_get_is_connected(connection) != 0 }

    /// Called on the loop thread when the bus connection is lost.
    public func onDisconnected(_ handler: @escaping @Sendable () -> Void) {
        signalState.withLock { $0.disconnectHandlers.append(handler) }
    }

    // MARK: scrubbing received secrets

    /// Bytes of padding in a scrub message: more than libdbus's receive buffer keeps beyond
    /// its live data (it compacts to at most 2 KiB of slack after each message it parses).
    static let scrubBytes = 16 * 1024

    /// Overwrites what libdbus's receive buffer still holds of messages already parsed.
    ///
    /// libdbus reads the socket into one buffer per connection, copies each complete message
    /// out of it and moves the remaining bytes down, but never clears the bytes it leaves
    /// behind: the raw bytes of a message carrying a PIN stay there, in ordinary heap memory,
    /// until later traffic happens to cover them. Wiping the parsed message (`MethodCall`)
    /// does not reach that copy, and libdbus offers no access to its buffer. New bytes are
    /// always written where the live data ends, so a message larger than the slack,
    /// sent to ourselves, lands on top of every stale byte. `Peer.Ping` with no reply
    /// wanted is consumed inside libdbus and allowed by any bus policy that lets clients
    /// ping the daemon.
    ///
    /// Sent at once, before the reply to the call that asked for it, so the copy is gone by
    /// the time the caller can ask anything else. Under a flood at most one scrub per 50 ms
    /// goes out; a request meanwhile is served by one scheduled scrub sent after it.
    func scrubReceiveBuffer() {
        guard !uniqueName.isEmpty else { return }
        let interval: UInt64 = 50_000_000
        let now = DispatchTime.now().uptimeNanoseconds
        let delay: UInt64? = scrubState.withLock { state in
            if state.scheduled { return nil }
            if now &- state.lastSent >= interval {
                state.lastSent = now
                return 0
            }
            state.scheduled = true
            return state.lastSent &+ interval &- now
        }
        switch delay {
        case nil: return
        case 0: sendScrub()
        case let wait?:
            DispatchQueue.global().asyncAfter(deadline: .now() + .nanoseconds(Int(wait))) { [weak self] in
                guard let self else { return }
                self.scrubState.withLock { state in
                    state.scheduled = false
                    state.lastSent = DispatchTime.now().uptimeNanoseconds
                }
                self.sendScrub()
            }
        }
    }

    private func sendScrub() {
        guard isConnected else { return }
        let message = uniqueName.withCString { dbus_message_new_method_call($0, "/", "org.freedesktop.DBus.Peer", "Ping") }
        guard let message else { return }
        defer { dbus_message_unref(message) }
        dbus_message_set_no_reply(message, 1)
        guard Marshal.append([.bytes([UInt8](repeating: 0, count: Self.scrubBytes))], to: message) == nil else { return }
        send(message)
    }

    // MARK: sending

    func send(_ message: OpaquePointer) {
        // libdbus writes at once from the sending thread when it can; what it could not
        // write waits for the loop's POLLOUT.
        if dbus_connection_send(connection, message, nil) == 0 {
            DBusLog.log("out of memory sending a message")
        }
    }

    /// Counts of the method calls this connection answered, since it was opened.
    public var replyStatistics: ReplyStatistics { replies.withLock { $0 } }

    /// Every answer to a method call, success or error, is counted here and only here; a call
    /// whose caller asked for no reply counts as answered all the same.
    func countAnswer(error: String?) {
        replies.withLock { r in
            r.callsServed &+= 1
            if let error { r.errors[error, default: 0] &+= 1 }
        }
    }

    /// Sends a method return (built by MethodCall) and counts it.
    func sendReply(_ reply: OpaquePointer?) {
        countAnswer(error: nil)
        if let reply { send(reply) }
    }

    func sendError(_ error: DBusError, replyingTo message: OpaquePointer) {
        countAnswer(error: error.wireName)
        guard dbus_message_get_no_reply(message) == 0 else { return }
        let reply = error.wireName.withCString { name in
            error.message.withCString { dbus_message_new_error(message, name, $0) }
        }
        guard let reply else { return }
        send(reply)
        dbus_message_unref(reply)
    }

    /// Emits a signal. Invalid names or arguments are logged, never sent.
    /// `destination`: a unicast signal, delivered to that connection only (a Session1's
    /// state is its owner's business); nil broadcasts.
    public func emitSignal(path: ObjectPath, interface: String, name: String, arguments: [DBusValue], destination: String? = nil) {
        guard DBusNames.isValidInterface(interface), DBusNames.isValidMember(name) else {
            DBusLog.log("not emitting signal with invalid name '\(interface)'.'\(name)'")
            return
        }
        let message = path.rawValue.withCString { p in
            interface.withCString { i in name.withCString { dbus_message_new_signal(p, i, $0) } }
        }
        guard let message else { return }
        defer { dbus_message_unref(message) }
        if let destination {
            guard DBusNames.isValidBusName(destination) else { return }
            _ = destination.withCString { dbus_message_set_destination(message, $0) }
        }
        if let problem = Marshal.append(arguments, to: message) {
            DBusLog.log("not emitting \(interface).\(name): \(problem.message)")
            return
        }
        send(message)
    }

    /// Emits `org.freedesktop.DBus.Properties.PropertiesChanged`.
    public func emitPropertiesChanged(path: ObjectPath, interface: String, changed: [String: DBusValue],
                                      invalidated: [String] = [], destination: String? = nil) {
        emitSignal(path: path, interface: StandardInterfaces.properties.name, name: "PropertiesChanged",
                   arguments: [.string(interface), .vardict(changed),
                               .array(elementSignature: "s", invalidated.sorted().map { .string($0) })],
                   destination: destination)
    }

    // MARK: calls

    private func makeCall(destination: String, path: ObjectPath, interface: String, member: String,
                          arguments: [DBusValue]) -> Result<OpaquePointer, DBusError> {
        guard DBusNames.isValidBusName(destination) else { return .failure(.invalidArgs("invalid bus name '\(destination)'")) }
        guard DBusNames.isValidInterface(interface) else { return .failure(.invalidArgs("invalid interface '\(interface)'")) }
        guard DBusNames.isValidMember(member) else { return .failure(.invalidArgs("invalid member '\(member)'")) }
        let message = destination.withCString { d in
            path.rawValue.withCString { p in
                interface.withCString { i in member.withCString { dbus_message_new_method_call(d, p, i, $0) } }
            }
        }
        guard let message else { return .failure(.noMemory("cannot create message")) }
        if let problem = Marshal.append(arguments, to: message) {
            dbus_message_unref(message)
            return .failure(problem)
        }
        return .success(message)
    }

    static func result(of reply: OpaquePointer) -> Result<[DBusValue], DBusError> {
        if dbus_message_get_type(reply) == DBUS_MESSAGE_TYPE_ERROR {
            return .failure(.fromErrorReply(reply))
        }
        return Marshal.decode(reply)
    }

    private final class PendingReply: @unchecked Sendable {
        let handler: @Sendable (Result<[DBusValue], DBusError>) -> Void
        let done = Mutex(false)
        init(_ handler: @escaping @Sendable (Result<[DBusValue], DBusError>) -> Void) { self.handler = handler }

        func complete(_ pending: OpaquePointer) {
            guard done.withLock({ d in defer { d = true }; return !d }) else { return }
            guard let reply = dbus_pending_call_steal_reply(pending) else {
                handler(.failure(.noReply("no reply")))
                return
            }
            defer { dbus_message_unref(reply) }
            handler(DBusConnection.result(of: reply))
        }
    }

    private static let pendingNotify: DBusPendingCallNotifyFunction = { pending, data in
        guard let pending, let data else { return }
        Unmanaged<PendingReply>.fromOpaque(data).takeUnretainedValue().complete(pending)
    }

    private func deliver(_ result: Result<[DBusValue], DBusError>,
                         to reply: @escaping @Sendable (Result<[DBusValue], DBusError>) -> Void) {
        if loop.isRunning { loop.perform { reply(result) } } else { reply(result) }
    }

    /// Calls a method asynchronously; `reply` runs on the loop thread (at once on the
    /// calling thread if the arguments are invalid and no loop runs). Timeouts arrive as
    /// `org.freedesktop.DBus.Error.NoReply`.
    public func call(destination: String, path: ObjectPath, interface: String, member: String, arguments: [DBusValue],
                     timeoutMilliseconds: Int32 = 25_000,
                     reply: @escaping @Sendable (Result<[DBusValue], DBusError>) -> Void) {
        let message: OpaquePointer
        switch makeCall(destination: destination, path: path, interface: interface, member: member, arguments: arguments) {
        case .failure(let error): return deliver(.failure(error), to: reply)
        case .success(let m): message = m
        }
        var pending: OpaquePointer? = nil
        let sent = dbus_connection_send_with_reply(connection, message, &pending, timeoutMilliseconds)
        dbus_message_unref(message)
        guard sent != 0, let pending else {
            return deliver(.failure(.disconnected("not connected to the bus")), to: reply)
        }
        let box = PendingReply(reply)
        let registered = dbus_pending_call_set_notify(pending, DBusConnection.pendingNotify,
                                                      Unmanaged.passRetained(box).toOpaque(),
                                                      { data in data.map { Unmanaged<PendingReply>.fromOpaque($0).release() } })
        // libdbus never calls a notify set after the reply came in; whichever of the two
        // paths gets there first completes the call.
        if registered == 0 || dbus_pending_call_get_completed(pending) != 0 {
            let retained = dbus_pending_call_ref(pending)
            let pendingBox = UncheckedPointer(retained)
            let finish: @Sendable () -> Void = {
                if let p = pendingBox.pointer {
                    if dbus_pending_call_get_completed(p) != 0 { box.complete(p) }
                    dbus_pending_call_unref(p)
                }
            }
            if loop.isRunning && registered != 0 { loop.perform(finish) } else { finish() }
        }
        dbus_pending_call_unref(pending)
    }

    /// Calls a method and waits for the reply. Must not be called on the loop thread
    /// (throws `Failed` there rather than deadlocking).
    public func callBlocking(destination: String, path: ObjectPath, interface: String, member: String,
                             arguments: [DBusValue], timeoutMilliseconds: Int32 = 25_000) throws(DBusError) -> [DBusValue] {
        if loop.isLoopThread { throw .failed("callBlocking on the loop thread would deadlock") }
        // The calling thread reads the reply itself (libdbus lets one thread at a time own the
        // socket, and the loop thread's poll only ever borrows it): no hop through the loop
        // thread, which is most of a round trip's cost on a busy machine.
        let message: OpaquePointer
        switch makeCall(destination: destination, path: path, interface: interface, member: member, arguments: arguments) {
        case .failure(let error): throw error
        case .success(let m): message = m
        }
        defer { dbus_message_unref(message) }
        let reply = try DBusError.check { dbus_connection_send_with_reply_and_block(connection, message, timeoutMilliseconds, $0) }
        guard let reply else { throw .noReply("no reply") }
        defer { dbus_message_unref(reply) }
        return try DBusConnection.result(of: reply).get()
    }

    private func callBus(_ member: String, _ arguments: [DBusValue]) throws(DBusError) -> [DBusValue] {
        try callBlocking(destination: DBusConnection.busName, path: DBusConnection.busPath,
                         interface: DBusConnection.busName, member: member, arguments: arguments)
    }

    /// Requests `name` with DBUS_NAME_FLAG_DO_NOT_QUEUE; throws unless this connection is
    /// then its primary owner. Blocks: not on the loop thread.
    public func requestName(_ name: String) throws(DBusError) {
        guard DBusNames.isValidBusName(name), !name.hasPrefix(":") else { throw .invalidArgs("invalid bus name '\(name)'") }
        let doNotQueue: UInt32 = 4
        let reply = try callBus("RequestName", [.string(name), .uint32(doNotQueue)])
        // 1 = became primary owner, 4 = already was.
        guard let code = reply.first?.uint32Value, code == 1 || code == 4 else {
            throw .failed("cannot own \(name): it has another owner")
        }
    }

    /// Asks the bus for a connection's credentials (`GetConnectionCredentials`);
    /// `completion` runs on the loop thread.
    public func connectionCredentials(of busName: String,
                                      _ completion: @escaping @Sendable (Result<PeerCredentials, DBusError>) -> Void) {
        call(destination: DBusConnection.busName, path: DBusConnection.busPath, interface: DBusConnection.busName,
             member: "GetConnectionCredentials", arguments: [.string(busName)]) { result in
            completion(result.flatMap { values in
                guard let dict = values.first?.vardictValue else { return .failure(.failed("malformed credentials reply")) }
                var credentials = PeerCredentials(uid: dict["UnixUserID"]?.uint32Value, pid: dict["ProcessID"]?.uint32Value)
                credentials.groups = dict["UnixGroupIDs"]?.arrayValues?.compactMap(\.uint32Value) ?? []
                return .success(credentials)
            })
        }
    }

    // MARK: signals

    /// Subscribes to signals (an `AddMatch` on the bus plus local filtering). Off the loop
    /// thread this waits for the bus to confirm the match, so signals emitted after it
    /// returns are received; on the loop thread the match is sent without waiting.
    @discardableResult
    public func addSignalHandler(sender: String? = nil, path: ObjectPath? = nil, interface: String? = nil,
                                 member: String? = nil,
                                 _ handler: @escaping @Sendable (DBusSignalMessage) -> Void) throws(DBusError) -> SignalHandlerToken {
        if let sender, !DBusNames.isValidBusName(sender) { throw .invalidArgs("invalid sender '\(sender)'") }
        if let interface, !DBusNames.isValidInterface(interface) { throw .invalidArgs("invalid interface '\(interface)'") }
        if let member, !DBusNames.isValidMember(member) { throw .invalidArgs("invalid member '\(member)'") }
        let subscription = SignalSubscription(sender: sender, path: path, interface: interface, member: member, handler: handler)
        let id = signalState.withLock { s in
            defer { s.nextID += 1 }
            s.subscriptions[s.nextID] = subscription
            return s.nextID
        }
        if loop.isLoopThread {
            call(destination: DBusConnection.busName, path: DBusConnection.busPath, interface: DBusConnection.busName,
                 member: "AddMatch", arguments: [.string(subscription.matchRule)]) { result in
                if case .failure(let e) = result { DBusLog.log("AddMatch failed: \(e)") }
            }
        } else {
            do {
                _ = try callBus("AddMatch", [.string(subscription.matchRule)])
            } catch {
                _ = signalState.withLock { $0.subscriptions.removeValue(forKey: id) }
                throw error
            }
        }
        return SignalHandlerToken(id: id)
    }

    /// Removes a handler and its bus match.
    public func removeSignalHandler(_ token: SignalHandlerToken) {
        guard let removed = signalState.withLock({ $0.subscriptions.removeValue(forKey: token.id) }) else { return }
        call(destination: DBusConnection.busName, path: DBusConnection.busPath, interface: DBusConnection.busName,
             member: "RemoveMatch", arguments: [.string(removed.matchRule)]) { _ in }
    }

    /// Calls `handler` with the unique name of every connection that leaves the bus
    /// (`NameOwnerChanged(name, old, "")`), on the loop thread.
    public func onPeerDisconnected(_ handler: @escaping @Sendable (String) -> Void) {
        do {
            try addSignalHandler(sender: DBusConnection.busName, path: DBusConnection.busPath,
                                 interface: DBusConnection.busName, member: "NameOwnerChanged") { signal in
                guard signal.arguments.count == 3, let name = signal.arguments[0].stringValue, name.hasPrefix(":"),
                      signal.arguments[2].stringValue == "" else { return }
                handler(name)
            }
        } catch {
            DBusLog.log("cannot watch for disconnecting peers: \(error)")
        }
    }

    private func handleSignal(_ message: OpaquePointer) {
        let interface = dbus_message_get_interface(message).map { String(cString: $0) } ?? ""
        let member = dbus_message_get_member(message).map { String(cString: $0) } ?? ""
        if interface == "org.freedesktop.DBus.Local" && member == "Disconnected" {
            for handler in signalState.withLock({ $0.disconnectHandlers }) { handler() }
            return
        }
        guard let path = dbus_message_get_path(message).flatMap({ ObjectPath(String(cString: $0)) }) else { return }
        let sender = dbus_message_get_sender(message).map { String(cString: $0) } ?? ""
        let handlers = signalState.withLock { s in
            s.subscriptions.sorted { $0.key < $1.key }.map(\.value)
                .filter { $0.matches(sender: sender, path: path, interface: interface, member: member) }
                .map(\.handler)
        }
        guard !handlers.isEmpty, case .success(let arguments) = Marshal.decode(message) else { return }
        let signal = DBusSignalMessage(sender: sender, path: path, interface: interface, member: member, arguments: arguments)
        for handler in handlers { handler(signal) }
    }
}

/// The closure a loop thread runs, boxed to cross pthread_create's `void *`.
final class LoopThreadBody: Sendable {
    let run: @Sendable () -> Void
    init(_ run: @escaping @Sendable () -> Void) { self.run = run }
}

/// A libdbus pointer carried into a @Sendable closure; libdbus objects are thread-safe
/// after dbus_threads_init_default.
struct UncheckedPointer: @unchecked Sendable {
    let pointer: OpaquePointer?
    init(_ pointer: OpaquePointer?) { self.pointer = pointer }
}
