import CPincacheProxy
import CPKCS11
import CryptokiWire
import DBusKit
import Glibc
import Synchronization

/// The bus connection and the cryptoki socket it gave (DESIGN §4, "One wire"): the bus
/// carries identity (the polkit subject is this connection's name), lifetime and slot
/// events; every PKCS#11 call goes over the socket. Sessions remember the link they were
/// opened on: once it is replaced (bus connection lost, daemon restarted) the daemon has
/// closed them, and their handles answer CKR_SESSION_HANDLE_INVALID.
final class Link: Sendable {
    let connection: DBusConnection
    let client: WireClient

    init(connection: DBusConnection, client: WireClient) {
        self.connection = connection
        self.client = client
    }

    var isAlive: Bool { connection.isConnected && !client.isBroken }

    /// Leaves the bus and closes the socket: the daemon ends this environment.
    func close() {
        client.shutDown()
        connection.close()
    }
}

/// What GetSlots said about one slot: the table's `slotInfo` fields by name.
struct SlotSnapshot: Sendable {
    var name: String
    var fields: [String: WireValue]

    var tokenPresent: Bool { (fields["token_present"]?.ulongValue ?? 0) != 0 }
    /// A card is there but its module cannot read it (token_present 2).
    var tokenUnrecognized: Bool { fields["token_present"]?.ulongValue == 2 }
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
        var slotIDs: [String: CK_SLOT_ID] = [:]
        /// Slots of the last GetSlots, in the daemon's order.
        var slots: [CK_SLOT_ID] = []
        var snapshots: [CK_SLOT_ID: SlotSnapshot] = [:]
        var mechanisms: [CK_SLOT_ID: [MechanismEntry]] = [:]
        var sessions: [CK_SESSION_HANDLE: Session] = [:]
        var nextSession: CK_SESSION_HANDLE = 1
        /// What C_*Init learnt of keys (Calls.keyFacts), per slot and handle, for every
        /// session of this process: gone with the link (a new daemon numbers anew) and when
        /// this process changes or destroys the object.
        var keyFacts: [CK_SLOT_ID: [CK_OBJECT_HANDLE: KeyFacts]] = [:]
        /// Calls.optionalFunctions's answer per slot: a slot's module does not change.
        var optionalFunctions: [CK_SLOT_ID: OptionalFunctions] = [:]
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
        // is not there yet is no error (calls connect again when needed). The slot table is
        // read at once, so a slot ID the program kept (or got on its command line) is valid
        // before any C_GetSlotList (issue 13 §1).
        if (try? library.link()) != nil { _ = try? library.refreshSlots() }
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

    // MARK: the link

    /// The live link, connecting (again) if there is none or the old one died: a private
    /// bus connection, then `Manager1.OpenCryptoki` on it and the socket's Hello.
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
            if mayCreateThreads {
                connection.startLoopThread()
                subscribe(connection)
            }
            let client: WireClient
            do throws(CKError) {
                client = try openCryptoki(on: connection)
            } catch {
                connection.close()
                throw error
            }
            let link = Link(connection: connection, client: client)
            let kept = state.withLock { s -> Bool in
                guard !s.finalized else { return false }
                s.link = link
                s.keyFacts = [:]
                return true
            }
            guard kept else {
                link.close()
                throw .notInitialized
            }
            return link
        }
    }

    private func openCryptoki(on connection: DBusConnection) throws(CKError) -> WireClient {
        let reply: [DBusValue]
        do {
            reply = try connection.callBlocking(
                destination: Wire.daemonName, path: Wire.managerPath, interface: Wire.manager, member: "OpenCryptoki",
                arguments: [], timeoutMilliseconds: Wire.defaultTimeout * 1000)
        } catch {
            throw .deviceRemoved
        }
        guard reply.count == 1, case .unixFD(let fd) = reply[0], fd >= 0 else {
            reply.forEach(Wire.closeDescriptors)
            throw .deviceError
        }
        // Tests put a relay between the proxy and the daemon here (ProxyLoopbackTests).
        let socket = Self.interposeSocket?(fd) ?? fd
        do {
            return try WireClient(fd: socket)
        } catch {
            throw CKError(error)
        }
    }

    /// For tests only: given the daemon's socket, returns the one the proxy uses instead
    /// (a relay that can break frames on purpose). Never set in the shipped library.
    nonisolated(unsafe) static var interposeSocket: (@Sendable (Int32) -> Int32)?

    private func liveLink() -> Link? {
        guard let link = state.withLock({ $0.link }), link.isAlive else { return nil }
        return link
    }

    // MARK: the generic forwarder

    /// Sends `call` with `arguments` (in the table's order) and returns its response fields,
    /// decoded within the table's caps. Session calls go over the link the session was
    /// opened on; other calls reconnect once when the daemon went away since the last call.
    func call(_ call: Call, _ arguments: [WireValue], session: Session? = nil) throws(CKError) -> [WireValue] {
        let timeout = (call.slow ? Wire.slowTimeout : Wire.defaultTimeout) * 1000
        if let session {
            guard let link = liveLink(), link === session.link else { throw .sessionHandleInvalid }
            do {
                return try link.client.exchange(call, arguments, timeoutMilliseconds: timeout)
            } catch {
                throw CKError(error)
            }
        }
        var attempt = 0
        while true {
            attempt += 1
            let link = try self.link()
            do {
                return try link.client.exchange(call, arguments, timeoutMilliseconds: timeout)
            } catch .closed where attempt < 2 && (call == Calls.getSlots || call == Calls.getMechanisms) {
                // The daemon restarted since the last call: a new link, once, for reads only
                // (a change the old daemon may have made must not be made twice).
                continue
            } catch {
                throw CKError(error)
            }
        }
    }

    // MARK: slots

    /// Asks the daemon for every slot (GetSlots) and updates the slot table; slot ids
    /// stay the same for a token object path for the life of this instance.
    @discardableResult
    func refreshSlots() throws(CKError) -> [CK_SLOT_ID] {
        let parsed = try Replies.slots(try call(Calls.getSlots, []))
        var changed: [CK_SLOT_ID] = []
        let ids = state.withLock { s -> [CK_SLOT_ID] in
            var ids: [CK_SLOT_ID] = []
            var seen = Set<CK_SLOT_ID>()
            let names = parsed.map(\.name)
            for snapshot in parsed {
                let id = s.slotID(for: snapshot.name, among: names)
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
        guard state.withLock({ $0.snapshots[slot] != nil || $0.slotName(slot) != nil }) else { throw .slotIDInvalid }
        do {
            try refreshSlots()
        } catch {
            // The daemon is unreachable: what we knew is still the best answer.
        }
        guard let snapshot = state.withLock({ $0.snapshots[slot] }) else { throw .slotIDInvalid }
        return snapshot
    }

    /// The daemon's name of a slot (its token id).
    func slotName(_ slot: CK_SLOT_ID) throws(CKError) -> String {
        guard let name = state.withLock({ $0.slotName(slot) }) else { throw .slotIDInvalid }
        return name
    }

    /// The slot's mechanisms, asked once per slot.
    func mechanisms(_ slot: CK_SLOT_ID, refresh: Bool = false) throws(CKError) -> [MechanismEntry] {
        if !refresh, let cached = state.withLock({ $0.mechanisms[slot] }) { return cached }
        let list = try Replies.mechanisms(try call(Calls.getMechanisms, [.string(try slotName(slot))]))
        state.withLock { $0.mechanisms[slot] = list }
        return list
    }

    // MARK: sessions

    func session(_ handle: CK_SESSION_HANDLE) throws(CKError) -> Session {
        guard let session = state.withLock({ $0.sessions[handle] }) else { throw .sessionHandleInvalid }
        return session
    }

    func openSession(slot: CK_SLOT_ID, flags: CK_FLAGS) throws(CKError) -> CK_SESSION_HANDLE {
        let name = try slotName(slot)
        // The link is read before the call, so the session is bound to the socket that answers.
        let link = try self.link()
        let reply: [WireValue]
        do {
            reply = try link.client.exchange(
                Calls.openSession, [.string(name), .ulong(UInt64(flags))], timeoutMilliseconds: Wire.defaultTimeout * 1000)
        } catch {
            throw CKError(error)
        }
        guard let number = reply.first?.ulongValue else { throw .deviceError }
        let session = Session(slot: slot, number: number, link: link, flags: flags)
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
            _ = try call(Calls.closeSession, [.ulong(session.number)], session: session)
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

    private func subscribe(_ connection: DBusConnection) {
        let onTokenSignal: @Sendable (DBusSignalMessage) -> Void = { [weak self] signal in
            guard let self, signal.member == "TokenInserted" || signal.member == "TokenRemoved",
                  signal.arguments.count == 1, let path = signal.arguments[0].objectPathValue else { return }
            self.postEvent(self.state.withLock { $0.slotID(for: path.lastComponent, among: $0.knownNames + [path.lastComponent]) })
        }
        let onObjectSignal: @Sendable (DBusSignalMessage) -> Void = { [weak self] signal in
            guard let self, signal.member == "InterfacesAdded" || signal.member == "InterfacesRemoved",
                  let path = signal.arguments.first?.objectPathValue,
                  path.rawValue.hasPrefix(Wire.tokenPathPrefix) else { return }
            self.postEvent(self.state.withLock { $0.slotID(for: path.lastComponent, among: $0.knownNames + [path.lastComponent]) })
        }
        // A missing match only costs slot events; the calls still work.
        _ = try? connection.addSignalHandler(sender: Wire.daemonName, path: Wire.managerPath,
                                             interface: Wire.manager, onTokenSignal)
        _ = try? connection.addSignalHandler(sender: Wire.daemonName, path: Wire.managerPath,
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
                events.waitOutsideForkGate(milliseconds: 1000)
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
                events.waitOutsideForkGate(milliseconds: 1000)
                return nil
            }
            if let next { return next }
        }
    }
}

extension Library.State {
    /// A slot's ID: the backend's own (issue 13 §1), so it is the same in every process,
    /// after a fork, a C_Finalize/C_Initialize or a daemon restart, and what the module would
    /// show directly. The daemon names a slot `m<module>_s<backend slot ID>`; when two
    /// modules have a slot with one ID, the first module keeps it and the other's becomes
    /// `module << 48 | ID`. Names of another form (none today) get a hash of the name.
    mutating func slotID(for name: String, among names: [String]) -> CK_SLOT_ID {
        if let id = slotIDs[name] { return id }
        var id = Self.derivedSlotID(name, among: names)
        if slotIDs.values.contains(id) { id = Self.hashedSlotID(name) }
        slotIDs[name] = id
        return id
    }

    /// Every slot name this instance has given an ID.
    var knownNames: [String] { Array(slotIDs.keys) }

    static func parseSlotName(_ name: String) -> (module: UInt64, slot: UInt64)? {
        let parts = name.split(separator: "_", maxSplits: 1)
        guard parts.count == 2, parts[0].hasPrefix("m"), parts[1].hasPrefix("s"),
            let module = UInt64(parts[0].dropFirst()), let slot = UInt64(parts[1].dropFirst())
        else { return nil }
        return (module, slot)
    }

    static func derivedSlotID(_ name: String, among names: [String]) -> CK_SLOT_ID {
        guard let (module, slot) = parseSlotName(name) else { return hashedSlotID(name) }
        let firstModule = names.compactMap(parseSlotName).filter { $0.slot == slot }.map(\.module).min() ?? module
        if module == firstModule { return CK_SLOT_ID(slot) }
        return CK_SLOT_ID(module << 48 | (slot & 0xFFFF_FFFF_FFFF))
    }

    /// FNV-1a of the name with the top bit set, apart from every backend ID seen in practice.
    static func hashedSlotID(_ name: String) -> CK_SLOT_ID {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for b in name.utf8 {
            h ^= UInt64(b)
            h = h &* 0x100_0000_01b3
        }
        return CK_SLOT_ID(h | 1 << 63)
    }

    func slotName(_ slot: CK_SLOT_ID) -> String? {
        snapshots[slot]?.name ?? slotIDs.first(where: { $0.value == slot })?.key
    }
}

extension ObjectPath {
    /// `/org/pincache/token/<id>` → `<id>`.
    var lastComponent: String { String(rawValue.split(separator: "/").last ?? "") }
}
