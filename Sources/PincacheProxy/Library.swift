import CPincacheProxy
import CPKCS11
import DBusKit
import FastPathWire
import Glibc
import Synchronization

/// One bus connection and what the proxy learnt through it. Sessions remember the link
/// they were opened on: once it is replaced (bus connection lost, daemon restarted) the
/// daemon has closed them, and their handles answer CKR_SESSION_HANDLE_INVALID.
final class Link: Sendable {
    let connection: DBusConnection
    /// Unique bus name of the daemon we talk to; nil until asked or after it vanished.
    let daemon = Mutex<String?>(nil)
    /// The peer channel to that daemon (`Library.channel(on:to:)`).
    let channel = BesideTheBus<DBusConnection>(isUsable: { $0.isConnected }, discard: { $0.close() })
    /// The fast path to that daemon (`Library.fastPath(on:to:)`).
    let fastPath = BesideTheBus<FastPathSocket>(isUsable: { _ in true }, discard: { $0.shutDown() })

    init(connection: DBusConnection) { self.connection = connection }

    /// Leaves the bus and closes the channel and the fast path.
    func close() {
        channel.drop()
        fastPath.drop()
        connection.close()
    }
}

/// A way to the daemon beside the bus (the peer channel, the fast path): opened on first use
/// by one thread while the others keep using the bus, kept while it serves that daemon
/// instance, and not asked for again from a daemon instance that did not give one.
final class BesideTheBus<Resource: AnyObject & Sendable>: Sendable {
    enum State: Sendable {
        case untried
        /// Another thread is opening it; calls meanwhile go the other way.
        case opening
        case open(daemon: String, Resource)
        /// That daemon offers none, or opening failed, until the daemon changes.
        case unavailable(daemon: String)
    }

    private let state = Mutex(State.untried)
    private let isUsable: @Sendable (Resource) -> Bool
    private let discard: @Sendable (Resource) -> Void

    init(isUsable: @escaping @Sendable (Resource) -> Bool, discard: @escaping @Sendable (Resource) -> Void) {
        self.isUsable = isUsable
        self.discard = discard
    }

    /// The resource for `daemon`, opened with `open` if this thread is the first to need it;
    /// nil while another thread opens it, or when it is unavailable. `linkAlive` is asked
    /// after opening: a link closed meanwhile (C_Finalize, a reconnect) takes it along.
    func get(for daemon: String, linkAlive: () -> Bool, open: () -> Resource?) -> Resource? {
        let decided = state.withLock { s -> Resource?? in
            switch s {
            case .open(let d, let r) where d == daemon && isUsable(r): return .some(r)
            case .unavailable(let d) where d == daemon: return .some(nil)
            case .opening: return .some(nil)
            default:
                s = .opening
                return .none
            }
        }
        if let decided { return decided }
        let opened = open()
        state.withLock { $0 = opened.map { .open(daemon: daemon, $0) } ?? .unavailable(daemon: daemon) }
        if opened != nil, !linkAlive() {
            drop()
            return nil
        }
        return opened
    }

    /// Forgets (and closes) it; the next call opens a new one.
    func drop() {
        let old = state.withLock { s -> Resource? in
            defer { s = .untried }
            if case .open(_, let r) = s { return r }
            return nil
        }
        if let old { discard(old) }
    }
}

/// What GetSlots said about one slot.
struct SlotSnapshot: Sendable {
    var path: ObjectPath
    var properties: [String: DBusValue]

    var tokenPresent: Bool { properties["TokenPresent"]?.boolValue ?? false }
}

/// Mechanism list entry (GetMechanisms).
struct MechanismEntry: Sendable {
    var type: CK_MECHANISM_TYPE
    var minKeySize: CK_ULONG
    var maxKeySize: CK_ULONG
    var flags: CK_FLAGS
}

/// The proxy between C_Initialize and C_Finalize in one process.
///
/// `current` is the only way in: an instance made before a fork belongs to the parent and
/// is never handed out (nor freed) in the child.
final class Library: @unchecked Sendable {
    // @unchecked: mutable state is in `state` (a Mutex) or `events` (a Monitor).

    struct State {
        var link: Link?
        var finalized = false
        var slotIDs: [ObjectPath: CK_SLOT_ID] = [:]
        var nextSlotID: CK_SLOT_ID = 0
        /// Slots of the last GetSlots, in the daemon's order.
        var slots: [CK_SLOT_ID] = []
        var snapshots: [CK_SLOT_ID: SlotSnapshot] = [:]
        var mechanisms: [CK_SLOT_ID: [MechanismEntry]] = [:]
        var sessions: [CK_SESSION_HANDLE: Session] = [:]
        var nextSession: CK_SESSION_HANDLE = 1
    }

    let generation: UInt
    let address: BusAddress
    /// False under CKF_LIBRARY_CANT_CREATE_OS_THREADS: no loop thread, so no signals;
    /// slot events then come from comparing GetSlots answers.
    let mayCreateThreads: Bool
    let state = Mutex(State())
    /// Serialises (re)connecting, which blocks.
    private let connecting = Monitor()
    /// Slot events not yet returned by C_WaitForSlotEvent, guarded by `events`.
    let events = Monitor()
    nonisolated(unsafe) var pendingEvents: [CK_SLOT_ID] = []
    nonisolated(unsafe) var eventsClosed = false

    init(generation: UInt, mayCreateThreads: Bool) {
        self.generation = generation
        self.mayCreateThreads = mayCreateThreads
        if let raw = pincache_bus_address() {
            address = .address(String(cString: raw))
        } else {
            address = .system
        }
    }

    // MARK: the current instance

    nonisolated(unsafe) private static var instance: Library?
    /// Instances abandoned by a fork: never freed, as freeing would touch the parent's
    /// connection and locks.
    nonisolated(unsafe) private static var abandoned: [Library] = []

    /// The initialised instance of this process, or nil (CKR_CRYPTOKI_NOT_INITIALIZED).
    static var current: Library? {
        pincache_global_lock()
        defer { pincache_global_unlock() }
        guard let library = instance, library.generation == pincache_fork_generation() else { return nil }
        return library
    }

    /// C_Initialize's core: installs a new instance unless one is current.
    static func initialize(mayCreateThreads: Bool) -> CK_RV {
        pincache_global_lock()
        let generation = pincache_fork_generation()
        if let old = instance {
            if old.generation == generation {
                pincache_global_unlock()
                return CKR_CRYPTOKI_ALREADY_INITIALIZED
            }
            abandoned.append(old)
        }
        let library = Library(generation: generation, mayCreateThreads: mayCreateThreads)
        instance = library
        pincache_global_unlock()
        // Connecting early lets signals count from C_Initialize on; a daemon or bus that
        // is not there yet is no error (calls connect again when needed).
        _ = try? library.link()
        return CKR_OK
    }

    /// C_Finalize's core.
    static func finalize() -> CK_RV {
        pincache_global_lock()
        guard let library = instance, library.generation == pincache_fork_generation() else {
            pincache_global_unlock()
            return CKR_CRYPTOKI_NOT_INITIALIZED
        }
        instance = nil
        pincache_global_unlock()
        library.shutdown()
        return CKR_OK
    }

    private func shutdown() {
        let link = state.withLock { s -> Link? in
            s.finalized = true
            s.sessions.removeAll()
            defer { s.link = nil }
            return s.link
        }
        events.locked {
            eventsClosed = true
            events.broadcast()
        }
        // Closing leaves the bus: the daemon drops this environment, its sessions and PINs.
        link?.close()
    }

    // MARK: the bus connection

    /// The live link, connecting (again) if there is none or the old one died.
    func link() throws(CKError) -> Link {
        if let link = liveLink() { return link }
        return try connecting.locked { () throws(CKError) -> Link in
            if let link = liveLink() { return link }
            let old = state.withLock { s -> Link? in
                defer { s.link = nil }
                return s.link
            }
            old?.close()
            if state.withLock({ $0.finalized }) { throw .notInitialized }
            let connection: DBusConnection
            do {
                connection = try DBusConnection(bus: address)
            } catch {
                throw .deviceRemoved
            }
            let link = Link(connection: connection)
            if mayCreateThreads {
                connection.startLoopThread()
                subscribe(link)
            }
            let kept = state.withLock { s -> Bool in
                guard !s.finalized else { return false }
                s.link = link
                return true
            }
            guard kept else {
                connection.close()
                throw .notInitialized
            }
            return link
        }
    }

    private func liveLink() -> Link? {
        guard let link = state.withLock({ $0.link }), link.connection.isConnected else { return nil }
        return link
    }

    /// The daemon's unique name, asked once per link (GetNameOwner).
    private func daemonName(on link: Link) throws(CKError) -> String {
        if let name = link.daemon.withLock({ $0 }) { return name }
        let reply: [DBusValue]
        do {
            reply = try link.connection.callBlocking(destination: "org.freedesktop.DBus", path: ObjectPath("/org/freedesktop/DBus")!,
                                                     interface: "org.freedesktop.DBus", member: "GetNameOwner",
                                                     arguments: [.string(Wire.daemonName)],
                                                     timeoutMilliseconds: Wire.defaultTimeout * 1000)
        } catch {
            throw .deviceRemoved
        }
        guard reply.count == 1, let name = reply[0].stringValue, name.hasPrefix(":"), name.utf8.count < 256 else {
            throw .deviceError
        }
        link.daemon.withLock { $0 = name }
        return name
    }

    // MARK: the generic forwarder

    /// Calls `method` on `path` and returns its reply, checked against the declared
    /// signature and the caps. Session calls go to the daemon instance that opened the
    /// session, on the link it was opened on; other calls find the daemon afresh when it
    /// has restarted, and reconnect once when the bus connection was lost.
    func call(_ method: WireMethod, path: ObjectPath, _ arguments: [DBusValue],
              session: Session? = nil) throws(CKError) -> [DBusValue] {
        guard arguments.map(\.signature).joined() == method.inSignature else {
            // A bug in the proxy, not the application's fault; never sent.
            throw CKError(CKR_GENERAL_ERROR)
        }
        if let session {
            guard let link = liveLink(), link === session.link else { throw .sessionHandleInvalid }
            switch send(method, path: path, arguments, link: link, destination: session.daemon) {
            case .success(let reply): return reply
            case .failure(let failure): throw failure.error
            }
        }
        var attempt = 0
        while true {
            attempt += 1
            let link = try self.link()
            let destination = try daemonName(on: link)
            let failure: CallFailure
            switch send(method, path: path, arguments, link: link, destination: destination) {
            case .success(let reply): return reply
            case .failure(let f): failure = f
            }
            guard attempt < 2, let busError = failure.busError else { throw failure.error }
            switch busError.name {
            case "org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner":
                // The daemon restarted since we asked for its name.
                link.daemon.withLock { $0 = nil }
            case "org.freedesktop.DBus.Error.Disconnected" where !link.connection.isConnected:
                // Our bus connection died: `link()` makes a new one.
                break
            default:
                throw failure.error
            }
        }
    }

    private struct CallFailure: Error {
        /// The error reply, when there was one.
        var busError: DBusError?
        var error: CKError
    }

    /// The one place a method call goes out: over the peer channel when there is one and
    /// the call carries no PIN, otherwise (and when the channel turns out dead) over the bus.
    private func send(_ method: WireMethod, path: ObjectPath, _ arguments: [DBusValue], link: Link,
                      destination: String) -> Result<[DBusValue], CallFailure> {
        var reply: [DBusValue]? = nil
        if let operation = method.fastPath, let request = FastPathSocket.request(operation, path: path, arguments),
            let frame = FastPathWire.encode(request), let socket = fastPath(on: link, to: destination), socket.tryAcquire()
        {
            let outcome = socket.exchange(frame, timeoutMilliseconds: method.timeoutMilliseconds)
            socket.release()
            switch outcome {
            case .success(.output(let bytes)):
                reply = operation == .verify ? [] : [.bytes(bytes)]
            case .success(.error(let name, let message)):
                let error = DBusError(name: name, message: message)
                return .failure(CallFailure(busError: error, error: CKError(ErrorMapping.returnValue(for: error, target: method.target))))
            case .failure(.closed):
                // As for a dead channel: the bus tells a restarted daemon from a live one.
                link.fastPath.drop()
            case .failure(.timedOut):
                link.fastPath.drop()
                let error = DBusError.noReply("no reply from the daemon in time")
                return .failure(CallFailure(busError: error, error: CKError(ErrorMapping.returnValue(for: error, target: method.target))))
            case .failure(.malformed):
                link.fastPath.drop()
                return .failure(CallFailure(busError: nil, error: .deviceError))
            }
        }
        if reply == nil, !method.carriesSecret, let channel = channel(on: link, to: destination) {
            do {
                reply = try channel.callBlocking(destination: destination, path: path, interface: method.interface,
                                                 member: method.member, arguments: arguments,
                                                 timeoutMilliseconds: method.timeoutMilliseconds)
            } catch where !channel.isConnected {
                // The daemon closed it or is gone. The call is sent again over the bus, which
                // tells which (a restarted daemon answers ServiceUnknown there); the daemon
                // never closes a channel with a call in progress but when its caller left.
                link.channel.drop()
            } catch {
                let rv = ErrorMapping.returnValue(for: error, target: method.target)
                return .failure(CallFailure(busError: error, error: CKError(rv)))
            }
        }
        if reply == nil {
            do {
                reply = try link.connection.callBlocking(destination: destination, path: path, interface: method.interface,
                                                         member: method.member, arguments: arguments,
                                                         timeoutMilliseconds: method.timeoutMilliseconds)
            } catch {
                let rv = ErrorMapping.returnValue(for: error, target: method.target)
                return .failure(CallFailure(busError: error, error: CKError(rv)))
            }
        }
        guard let reply else { return .failure(CallFailure(busError: nil, error: .deviceError)) }
        guard Replies.check(reply, method) else {
            reply.forEach(Wire.closeDescriptors)
            return .failure(CallFailure(busError: nil, error: .deviceError))
        }
        return .success(reply)
    }

    // MARK: the fast path

    /// The open fast path to `daemon`, asking for one (over the bus) on first use.
    private func fastPath(on link: Link, to daemon: String) -> FastPathSocket? {
        link.fastPath.get(for: daemon, linkAlive: { link.connection.isConnected }) {
            guard let reply = try? link.connection.callBlocking(
                destination: daemon, path: Wire.managerPath, interface: Wire.openFastPath.interface,
                member: Wire.openFastPath.member, arguments: [], timeoutMilliseconds: Wire.channelTimeout * 1000)
            else { return nil }
            return FastPathSocket.adopt(reply)
        }
    }

    // MARK: the peer channel

    /// The open channel to `daemon`, opening it on first use. The bus stays the way in:
    /// OpenChannel (over the bus) gives a one-time ticket that binds the new connection to
    /// this process's bus name. Any failure leaves the link on the bus for this daemon.
    private func channel(on link: Link, to daemon: String) -> DBusConnection? {
        link.channel.get(for: daemon, linkAlive: { link.connection.isConnected }) { openChannel(on: link, to: daemon) }
    }

    private func openChannel(on link: Link, to daemon: String) -> DBusConnection? {
        let offer: [DBusValue]
        do {
            offer = try link.connection.callBlocking(destination: daemon, path: Wire.managerPath, interface: Wire.openChannel.interface,
                                                     member: Wire.openChannel.member, arguments: [],
                                                     timeoutMilliseconds: Wire.channelTimeout * 1000)
        } catch {
            return nil
        }
        // Only a local socket: whatever the daemon says, the proxy never dials out.
        guard Replies.check(offer, Wire.openChannel), let address = offer[0].stringValue, address.hasPrefix("unix:"),
            address.utf8.count <= 4096, case .bytes(let ticket) = offer[1], (16...64).contains(ticket.count)
        else { return nil }
        let channel: DBusConnection
        do {
            channel = try DBusConnection(peer: address)
        } catch {
            return nil
        }
        do {
            _ = try channel.callBlocking(destination: daemon, path: Wire.managerPath, interface: Wire.channelBind.interface,
                                         member: Wire.channelBind.member, arguments: [.bytes(ticket)],
                                         timeoutMilliseconds: Wire.channelTimeout * 1000)
        } catch {
            channel.close()
            return nil
        }
        return channel
    }

    // MARK: slots

    /// Asks the daemon for every slot (GetSlots) and updates the slot table; slot ids
    /// stay the same for a token object path for the life of this instance.
    @discardableResult
    func refreshSlots() throws(CKError) -> [CK_SLOT_ID] {
        let parsed = try Replies.slots(try call(Wire.getSlots, path: Wire.managerPath, []))
        var changed: [CK_SLOT_ID] = []
        let ids = state.withLock { s -> [CK_SLOT_ID] in
            var ids: [CK_SLOT_ID] = []
            var seen = Set<CK_SLOT_ID>()
            for snapshot in parsed {
                let id = s.slotID(for: snapshot.path)
                guard seen.insert(id).inserted else { continue }
                if s.snapshots[id]?.tokenPresent != snapshot.tokenPresent { changed.append(id) }
                s.snapshots[id] = snapshot
                ids.append(id)
            }
            for gone in s.slots where !seen.contains(gone) {
                if s.snapshots[gone]?.tokenPresent == true { changed.append(gone) }
                s.snapshots[gone] = nil
            }
            s.slots = ids
            return ids
        }
        // Without a loop thread there are no signals: presence changes seen here are the
        // slot events.
        if !mayCreateThreads { changed.forEach(postEvent) }
        return ids
    }

    /// The latest snapshot of a slot, refreshed first (cheap, and token flags change).
    func snapshot(_ slot: CK_SLOT_ID) throws(CKError) -> SlotSnapshot {
        guard state.withLock({ $0.snapshots[slot] != nil || $0.slotPath(slot) != nil }) else { throw .slotIDInvalid }
        do {
            try refreshSlots()
        } catch {
            // The daemon is unreachable: what we knew is still the best answer.
        }
        guard let snapshot = state.withLock({ $0.snapshots[slot] }) else { throw .slotIDInvalid }
        return snapshot
    }

    func slotPath(_ slot: CK_SLOT_ID) throws(CKError) -> ObjectPath {
        guard let path = state.withLock({ $0.slotPath(slot) }) else { throw .slotIDInvalid }
        return path
    }

    /// The slot's mechanisms, asked once per slot.
    func mechanisms(_ slot: CK_SLOT_ID, refresh: Bool = false) throws(CKError) -> [MechanismEntry] {
        if !refresh, let cached = state.withLock({ $0.mechanisms[slot] }) { return cached }
        let list = try Replies.mechanisms(try call(Wire.getMechanisms, path: try slotPath(slot), []))
        state.withLock { $0.mechanisms[slot] = list }
        return list
    }

    // MARK: sessions

    func session(_ handle: CK_SESSION_HANDLE) throws(CKError) -> Session {
        guard let session = state.withLock({ $0.sessions[handle] }) else { throw .sessionHandleInvalid }
        return session
    }

    func openSession(slot: CK_SLOT_ID, flags: CK_FLAGS) throws(CKError) -> CK_SESSION_HANDLE {
        let path = try slotPath(slot)
        // The link and daemon name are read before the call, so the session is bound to
        // the daemon instance that answers it.
        let link = try self.link()
        let reply = try call(Wire.openSession, path: path, [.uint64(UInt64(flags))])
        guard let sessionPath = reply[0].objectPathValue, let daemon = link.daemon.withLock({ $0 }) else {
            throw .deviceError
        }
        let session = Session(slot: slot, path: sessionPath, link: link, daemon: daemon, flags: flags)
        return state.withLock { s in
            let handle = s.nextSession
            s.nextSession = s.nextSession == CK_SESSION_HANDLE.max ? 1 : s.nextSession + 1
            s.sessions[handle] = session
            return handle
        }
    }

    /// Forgets a session locally and closes it on the daemon (errors there are moot: a
    /// daemon that lost it has closed it already).
    func closeSession(_ handle: CK_SESSION_HANDLE) throws(CKError) {
        guard let session = state.withLock({ $0.sessions.removeValue(forKey: handle) }) else { throw .sessionHandleInvalid }
        do {
            _ = try call(Wire.close, path: session.path, [], session: session)
        } catch {
            if error.rv != CKR_SESSION_HANDLE_INVALID && error.rv != CKR_DEVICE_REMOVED { throw error }
        }
    }

    func sessions(on slot: CK_SLOT_ID) -> [CK_SESSION_HANDLE] {
        state.withLock { s in s.sessions.filter { $0.value.slot == slot }.map(\.key).sorted() }
    }

    // MARK: slot events

    func postEvent(_ slot: CK_SLOT_ID) {
        events.locked {
            if !pendingEvents.contains(slot) { pendingEvents.append(slot) }
            events.broadcast()
        }
    }

    private func subscribe(_ link: Link) {
        let onTokenSignal: @Sendable (DBusSignalMessage) -> Void = { [weak self] signal in
            guard let self, signal.member == "TokenInserted" || signal.member == "TokenRemoved",
                  signal.arguments.count == 1, let path = signal.arguments[0].objectPathValue else { return }
            self.postEvent(self.state.withLock { $0.slotID(for: path) })
        }
        let onObjectSignal: @Sendable (DBusSignalMessage) -> Void = { [weak self] signal in
            guard let self, signal.member == "InterfacesAdded" || signal.member == "InterfacesRemoved",
                  let path = signal.arguments.first?.objectPathValue,
                  path.rawValue.hasPrefix(Wire.tokenPathPrefix) else { return }
            self.postEvent(self.state.withLock { $0.slotID(for: path) })
        }
        // A missing match only costs slot events; the calls still work.
        _ = try? link.connection.addSignalHandler(sender: Wire.daemonName, path: Wire.managerPath,
                                                  interface: "org.pincache.Manager1", onTokenSignal)
        _ = try? link.connection.addSignalHandler(sender: Wire.daemonName, path: Wire.managerPath,
                                                  interface: "org.freedesktop.DBus.ObjectManager", onObjectSignal)
    }

    /// C_WaitForSlotEvent's core.
    func waitForSlotEvent(block: Bool) throws(CKError) -> CK_SLOT_ID {
        if !mayCreateThreads {
            return try pollForSlotEvent(block: block)
        }
        // Make sure signals are subscribed (the bus may have come back since).
        _ = try? link()
        return try events.locked { () throws(CKError) -> CK_SLOT_ID in
            while true {
                if eventsClosed { throw .notInitialized }
                if !pendingEvents.isEmpty { return pendingEvents.removeFirst() }
                if !block { throw CKError(CKR_NO_EVENT) }
                events.wait(milliseconds: 1000)
            }
        }
    }

    private func pollForSlotEvent(block: Bool) throws(CKError) -> CK_SLOT_ID {
        while true {
            _ = try? refreshSlots()
            let next = try events.locked { () throws(CKError) -> CK_SLOT_ID? in
                if eventsClosed { throw .notInitialized }
                if !pendingEvents.isEmpty { return pendingEvents.removeFirst() }
                if !block { throw CKError(CKR_NO_EVENT) }
                events.wait(milliseconds: 1000)
                return nil
            }
            if let next { return next }
        }
    }
}

extension Library.State {
    mutating func slotID(for path: ObjectPath) -> CK_SLOT_ID {
        if let id = slotIDs[path] { return id }
        let id = nextSlotID
        nextSlotID += 1
        slotIDs[path] = id
        return id
    }

    func slotPath(_ slot: CK_SLOT_ID) -> ObjectPath? {
        snapshots[slot]?.path ?? slotIDs.first(where: { $0.value == slot })?.key
    }
}
