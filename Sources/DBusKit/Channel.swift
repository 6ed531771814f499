import CDBus
import Dispatch
import Glibc
import Synchronization

/// What a `DBusConnection` is: a bus connection, the client end of a peer channel, or a
/// channel a `DBusChannelServer` accepted.
enum Role: Sendable {
    case bus
    case peerClient
    case channel(ChannelBinding)
}

/// Decides which bus name an accepted channel speaks for. Given the `ay` argument of the
/// bind call and the peer's kernel-reported credentials, it returns the bus name, or nil to
/// refuse (the channel is then closed).
public typealias ChannelBinder = @Sendable (_ ticket: [UInt8], _ peer: PeerCredentials) -> String?

/// A peer-to-peer D-Bus channel beside the bus: calls on it skip the bus daemon's relay.
///
/// The bus remains the only place identities come from: an accepted channel answers
/// nothing but one bind call (`bindInterface.bindMember(ay ticket)`), and the binder maps
/// the ticket (handed out over the bus to one bus name) and the peer's SO_PEERCRED
/// credentials to that bus name. From then on the channel's calls are dispatched to the
/// bus connection's objects exactly as if that name had sent them on the bus. A channel
/// never carries signals; methods with sensitive arguments are refused on it (see
/// `dispatchMethodCall`).
///
/// Each channel has its own loop thread, so one client's calls never queue behind
/// another's on a shared socket.
public final class DBusChannelServer: @unchecked Sendable {
    // @unchecked: `server` is only touched through libdbus (thread-safe after
    // dbus_threads_init_default); mutable state is in `state`.

    public let address: String
    public let bindInterface: String
    public let bindMember: String
    /// Channels not bound within this many seconds are closed.
    public let bindTimeoutSeconds: Int
    public let maxChannels: Int

    private let server: OpaquePointer
    private let bus: DBusConnection
    private let binder: ChannelBinder
    private let state = Mutex(ServerState())

    struct ServerState {
        var channels: [ObjectIdentifier: DBusConnection] = [:]
        var stopped = false
        /// What channels already closed answered.
        var retired = ReplyStatistics()
    }

    /// Listens on `listenAddress` (e.g. `unix:path=/run/pincache/channel`); accepted
    /// channels serve `bus`'s objects. The server's socket is watched by `bus`'s loop.
    public init(listen listenAddress: String, serving bus: DBusConnection, bindInterface: String,
                bindMember: String, bindTimeoutSeconds: Int = 5, maxChannels: Int,
                binder: @escaping ChannelBinder) throws(DBusError) {
        guard dbus_threads_init_default() != 0 else { throw .noMemory("dbus_threads_init_default failed") }
        let raw = try DBusError.check { e in listenAddress.withCString { dbus_server_listen($0, e) } }
        guard let raw else { throw .failed("cannot listen on \(listenAddress)") }
        // Only the kernel's word on who connected: no anonymous or cookie authentication.
        var mechanisms: [UnsafePointer<CChar>?] = []
        let external = strdup("EXTERNAL")
        mechanisms.append(UnsafePointer(external))
        mechanisms.append(nil)
        let setMechanisms = mechanisms.withUnsafeMutableBufferPointer { dbus_server_set_auth_mechanisms(raw, $0.baseAddress) }
        free(external)
        guard setMechanisms != 0 else {
            dbus_server_disconnect(raw)
            dbus_server_unref(raw)
            throw .noMemory("dbus_server_set_auth_mechanisms failed")
        }
        server = raw
        self.bus = bus
        self.binder = binder
        self.bindInterface = bindInterface
        self.bindMember = bindMember
        self.bindTimeoutSeconds = bindTimeoutSeconds
        self.maxChannels = maxChannels
        address = dbus_server_get_address(raw).map { p in
            defer { dbus_free(p) }
            return String(cString: p)
        } ?? listenAddress
        dbus_server_set_new_connection_function(raw, { _, connection, data in
            guard let connection, let data else { return }
            Unmanaged<DBusChannelServer>.fromOpaque(data).takeUnretainedValue().accept(connection)
        }, Unmanaged.passUnretained(self).toOpaque(), nil)
        bus.loop.install(onServer: raw)
        bus.loop.wake()
    }

    deinit {
        dbus_server_unref(server)
    }

    /// Channels currently open (bound or not).
    public var count: Int { state.withLock { $0.channels.count } }

    /// Calls answered on every channel since the server started, open or closed.
    public var replyStatistics: ReplyStatistics {
        let (live, retired) = state.withLock { (Array($0.channels.values), $0.retired) }
        return live.reduce(into: retired) { total, channel in total.add(channel.replyStatistics) }
    }

    /// Stops listening and closes every channel. Call it before the bus connection closes.
    public func stop() {
        let channels = state.withLock { s -> [DBusConnection] in
            s.stopped = true
            defer { s.channels.removeAll() }
            return Array(s.channels.values)
        }
        let server = UncheckedPointer(self.server)
        let disconnect: @Sendable () -> Void = {
            if let s = server.pointer { dbus_server_disconnect(s) }
        }
        // The server's watches belong to the bus loop: disconnect (which removes them) there.
        if bus.loop.isRunning && !bus.loop.isLoopThread {
            let done = DispatchSemaphore(value: 0)
            bus.loop.perform {
                disconnect()
                done.signal()
            }
            _ = done.wait(timeout: .now() + .seconds(5))
        } else {
            disconnect()
        }
        for channel in channels { channel.close() }
    }

    /// Closes the channels bound to `name` (called when that name leaves the bus).
    public func closeChannels(boundTo name: String) {
        let matching = state.withLock { s in
            s.channels.values.filter { channel in
                if case .channel(let binding) = channel.role { return binding.boundName == name }
                return false
            }
        }
        for channel in matching {
            channel.close()
            forget(channel)
        }
    }

    /// Runs on the bus loop thread, inside dbus_watch_handle on the listening socket.
    private func accept(_ raw: OpaquePointer) {
        let admitted = state.withLock { s in !s.stopped && s.channels.count < maxChannels }
        // Not taking a reference makes libdbus close and free the connection.
        guard admitted else { return }
        // The binder, not the uid, decides: any local user may use the daemon.
        dbus_connection_set_unix_user_function(raw, { _, _, _ in 1 }, nil, nil)
        dbus_connection_set_allow_anonymous(raw, 0)
        let binding = ChannelBinding(server: self)
        let channel = DBusConnection(accepted: raw, objects: bus.objects, channel: binding)
        let key = ObjectIdentifier(channel)
        state.withLock { $0.channels[key] = channel }
        channel.onDisconnected { [weak self, weak channel] in
            guard let channel else { return }
            self?.forget(channel)
            channel.stop()
        }
        channel.startLoopThread()
        DispatchQueue.global().asyncAfter(deadline: .now() + .seconds(bindTimeoutSeconds)) { [weak channel] in
            guard let channel, binding.boundName == nil else { return }
            channel.close()
            self.forget(channel)
        }
    }

    private func forget(_ channel: DBusConnection) {
        state.withLock { s in
            guard s.channels.removeValue(forKey: ObjectIdentifier(channel)) != nil else { return }
            s.retired.add(channel.replyStatistics)
        }
    }

    /// The bind call of an unbound channel, on that channel's loop thread.
    fileprivate func bind(_ binding: ChannelBinding, _ message: OpaquePointer, on channel: DBusConnection) {
        let refuse = { (reason: String) in
            channel.sendError(DBusError(name: DBusConnection.accessDeniedError.name, message: reason), replyingTo: message)
            channel.close()
            self.forget(channel)
        }
        guard case .success(let values) = Marshal.decode(message), values.count == 1, case .bytes(let ticket) = values[0] else {
            return refuse("malformed bind call")
        }
        var peer = PeerCredentials()
        var uid: UInt = 0
        if dbus_connection_get_unix_user(channel.connection, &uid) != 0 { peer.uid = UInt32(truncatingIfNeeded: uid) }
        var pid: UInt = 0
        if dbus_connection_get_unix_process_id(channel.connection, &pid) != 0 { peer.pid = UInt32(truncatingIfNeeded: pid) }
        guard peer.uid != nil, peer.pid != nil, let name = binder(ticket, peer) else {
            return refuse("the ticket is unknown, expired, or was issued to another process")
        }
        binding.bind(to: name)
        channel.countAnswer(error: nil)
        if dbus_message_get_no_reply(message) == 0, let reply = dbus_message_new_method_return(message) {
            channel.send(reply)
            dbus_message_unref(reply)
        }
    }
}

/// The bus name an accepted channel speaks for, set once by its bind call.
final class ChannelBinding: Sendable {
    private let name = Mutex<String?>(nil)
    // Strong: the server drops its channels when they close, which ends the cycle.
    private let server: DBusChannelServer

    init(server: DBusChannelServer) { self.server = server }

    var boundName: String? { name.withLock { $0 } }

    func bind(to bound: String) { name.withLock { $0 = bound } }

    /// Before binding, only the bind call is answered; everything else is refused.
    func handleUnbound(_ message: OpaquePointer, on channel: DBusConnection, interface: String?, member: String,
                       signature: String) {
        guard interface == server.bindInterface, member == server.bindMember, signature == "ay" else {
            return channel.sendError(DBusError(name: DBusConnection.accessDeniedError.name,
                                               message: "this channel is not bound to a bus name yet"),
                                     replyingTo: message)
        }
        server.bind(self, message, on: channel)
    }
}
