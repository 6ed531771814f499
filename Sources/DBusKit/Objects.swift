import CDBus
import Synchronization
import Glibc

/// An interface declaration bound to its implementation on one object.
public struct ExportedInterface: Sendable {
    public let spec: DBusInterface
    let methods: [String: @Sendable (MethodCall) -> Void]
    let getProperty: @Sendable (String) -> DBusValue?
    let setProperty: (@Sendable (String, DBusValue) throws(DBusError) -> Void)?

    /// - Parameters:
    ///   - methods: handler per method name; they run on the loop thread and must not block.
    ///   - properties: current value of a declared property (nil: not available now).
    public init(_ spec: DBusInterface,
                methods: [String: @Sendable (MethodCall) -> Void],
                properties: @escaping @Sendable (String) -> DBusValue? = { _ in nil }) {
        self.spec = spec
        self.methods = methods
        self.getProperty = properties
        self.setProperty = nil
    }

    /// Also handles `Properties.Set` on `.readwrite` properties: `setProperty` receives a
    /// value already checked against the declared type and throws to refuse it. After a
    /// successful set the binding emits PropertiesChanged as the property declares.
    public init(_ spec: DBusInterface,
                methods: [String: @Sendable (MethodCall) -> Void],
                properties: @escaping @Sendable (String) -> DBusValue?,
                setProperty: @escaping @Sendable (String, DBusValue) throws(DBusError) -> Void) {
        self.spec = spec
        self.methods = methods
        self.getProperty = properties
        self.setProperty = setProperty
    }

    /// Every declared property with a value of the declared type.
    func allProperties() -> DBusValue {
        var values: [String: DBusValue] = [:]
        for property in spec.properties {
            if let value = getProperty(property.name), value.signature == property.signature {
                values[property.name] = value
            }
        }
        return .vardict(values)
    }
}

struct ExportedObject: Sendable {
    var interfaces: [ExportedInterface]
    var accessCheck: (@Sendable (String) -> Bool)?

    /// `a{sa{sv}}`: interface name → properties.
    func interfacesAndProperties() -> DBusValue {
        .dictionary(keySignature: "s", valueSignature: "a{sv}",
                    interfaces.map { DBusDictEntry(key: .string($0.spec.name), value: $0.allProperties()) })
    }
}

/// The exported objects of a bus connection.
final class ObjectStore: Sendable {
    private let tree = Mutex(ObjectTree())

    func withLock<R>(_ body: (inout ObjectTree) throws -> R) rethrows -> R {
        try tree.withLock { try body(&$0) }
    }
}

struct ObjectTree {
    var objects: [ObjectPath: ExportedObject] = [:]
    var managers: Set<ObjectPath> = []
    var deniedPrefixes: Set<ObjectPath> = []

    func isInDeniedSubtree(_ path: ObjectPath) -> Bool {
        deniedPrefixes.contains { path.isDescendant(of: $0) }
    }

    /// A node exists if something is exported at or below it, or it is a manager.
    func isNode(_ path: ObjectPath) -> Bool {
        path == .root || managers.contains(path) || objects.keys.contains { $0.isDescendant(of: path) }
            || managers.contains { $0.isDescendant(of: path) }
    }

    func manager(above path: ObjectPath) -> ObjectPath? {
        managers.filter { path.isDescendant(of: $0) }.max { $0.rawValue.count < $1.rawValue.count }
    }

    /// Names of the direct children of `path`, each with the object exported there if any.
    func children(of path: ObjectPath) -> [(name: String, path: ObjectPath, object: ExportedObject?)] {
        var names = Set<String>()
        for known in Array(objects.keys) + Array(managers) where known.isDescendant(of: path) {
            if let next = known.elements.dropFirst(path.elements.count).first { names.insert(String(next)) }
        }
        return names.sorted().compactMap { name in
            path.appending(name).map { (name, $0, objects[$0]) }
        }
    }
}

/// What a resolved method call goes to.
private enum Target {
    case exported(ExportedInterface)
    case standard(DBusInterface)

    var spec: DBusInterface {
        switch self {
        case .exported(let e): e.spec
        case .standard(let s): s
        }
    }
}

extension DBusConnection {
    /// The one reply for a refused access check and for an unknown path in a denied
    /// subtree: identical, so a caller cannot tell whether the object exists.
    public static let accessDeniedError = DBusError.accessDenied("Access denied")

    /// Exports (or replaces) the object at `path`. Interfaces whose declaration is invalid
    /// are logged and left out. `accessCheck(sender)` false refuses every call to the
    /// object with `accessDeniedError`; such objects are listed by GetManagedObjects only
    /// to callers that pass the check and are not announced with InterfacesAdded/Removed,
    /// which go to everyone.
    public func export(_ path: ObjectPath, interfaces: [ExportedInterface], accessCheck: (@Sendable (String) -> Bool)? = nil) {
        let valid = interfaces.filter { exported in
            let problems = exported.spec.problems()
            for problem in problems { DBusLog.log("export \(path): \(problem)") }
            return problems.isEmpty
        }
        let object = ExportedObject(interfaces: valid, accessCheck: accessCheck)
        let (previous, manager) = objects.withLock { tree in
            let previous = tree.objects.updateValue(object, forKey: path)
            return (previous, tree.manager(above: path))
        }
        guard let manager else { return }
        if let previous, previous.accessCheck == nil {
            announceRemoved(path, previous, manager: manager)
        }
        if accessCheck == nil {
            emitSignal(path: manager, interface: StandardInterfaces.objectManager.name, name: "InterfacesAdded",
                       arguments: [.objectPath(path), object.interfacesAndProperties()])
        }
    }

    /// Removes the object at `path` (InterfacesRemoved if a manager is above it).
    public func unexport(_ path: ObjectPath) {
        let (previous, manager) = objects.withLock { tree in
            (tree.objects.removeValue(forKey: path), tree.manager(above: path))
        }
        if let previous, let manager, previous.accessCheck == nil {
            announceRemoved(path, previous, manager: manager)
        }
    }

    private func announceRemoved(_ path: ObjectPath, _ object: ExportedObject, manager: ObjectPath) {
        emitSignal(path: manager, interface: StandardInterfaces.objectManager.name, name: "InterfacesRemoved",
                   arguments: [.objectPath(path),
                               .array(elementSignature: "s", object.interfaces.map { .string($0.spec.name) })])
    }

    /// Serves org.freedesktop.DBus.ObjectManager at `path` for the objects below it.
    public func setObjectManager(at path: ObjectPath) {
        _ = objects.withLock { $0.managers.insert(path) }
    }

    /// Calls to unknown paths strictly below `prefix` get `accessDeniedError`, exactly as a
    /// failed access check does, and such paths are hidden from introspection.
    public func setDeniedSubtree(_ prefix: ObjectPath) {
        _ = objects.withLock { $0.deniedPrefixes.insert(prefix) }
    }

    // MARK: dispatch

    func dispatchMethodCall(_ message: OpaquePointer) {
        let member = dbus_message_get_member(message).map { String(cString: $0) } ?? ""
        let interface = dbus_message_get_interface(message).map { String(cString: $0) }
        let signature = dbus_message_get_signature(message).map { String(cString: $0) } ?? ""
        let sender = dbus_message_get_sender(message).map { String(cString: $0) } ?? ""
        guard let path = dbus_message_get_path(message).flatMap({ ObjectPath(String(cString: $0)) }) else {
            return sendError(.unknownObject("no object path"), replyingTo: message)
        }
        let (object, isNode, isManager, denied) = objects.withLock { tree in
            (tree.objects[path], tree.isNode(path), tree.managers.contains(path), tree.isInDeniedSubtree(path))
        }

        // 1. Access: a refused check and an unknown path in a denied subtree look the same.
        if let object, let check = object.accessCheck, !check(sender) {
            return sendError(DBusConnection.accessDeniedError, replyingTo: message)
        }
        if object == nil && denied {
            return sendError(DBusConnection.accessDeniedError, replyingTo: message)
        }
        // 2. Unknown path; intermediate nodes stay introspectable.
        if object == nil && !isNode {
            return sendError(.unknownObject("no object at '\(path)'"), replyingTo: message)
        }
        // 3./4. Resolve the interface and member among the object's and the standard ones.
        var targets: [Target] = (object?.interfaces ?? []).map { .exported($0) }
        targets.append(.standard(StandardInterfaces.introspectable))
        if object != nil { targets.append(.standard(StandardInterfaces.properties)) }
        targets.append(.standard(StandardInterfaces.peer))
        if isManager { targets.append(.standard(StandardInterfaces.objectManager)) }

        let target: Target
        let method: DBusMethod
        if let interface {
            guard let found = targets.first(where: { $0.spec.name == interface }) else {
                return sendError(.unknownInterface("no interface '\(interface)' at '\(path)'"), replyingTo: message)
            }
            guard let m = found.spec.method(named: member) else {
                return sendError(.unknownMethod("no method '\(member)' in interface '\(interface)'"), replyingTo: message)
            }
            (target, method) = (found, m)
        } else {
            let matches = targets.compactMap { t in t.spec.method(named: member).map { (t, $0) } }
            guard matches.count == 1, let only = matches.first else {
                let reason = matches.isEmpty ? "no method '\(member)' at '\(path)'"
                    : "method '\(member)' is ambiguous at '\(path)': name the interface"
                return sendError(.unknownMethod(reason), replyingTo: message)
            }
            (target, method) = only
        }
        // 5. Signature.
        guard signature == method.inSignature else {
            return sendError(.invalidArgs("expected signature '\(method.inSignature)', got '\(signature)'"), replyingTo: message)
        }
        // 6. Decode (sensitive arguments stay in the message) and hand over.
        let placeholders = Set(method.inArguments.indices.filter { method.inArguments[$0].sensitive })
        let arguments: [DBusValue]
        switch Marshal.decode(message, placeholders: placeholders) {
        case .failure(let error): return sendError(error, replyingTo: message)
        case .success(let values): arguments = values
        }
        let call = MethodCall(connection: self, message: message, sender: sender, path: path,
                              interface: target.spec.name, method: method, arguments: arguments)
        switch target {
        case .exported(let exported):
            if let handler = exported.methods[member] {
                handler(call)
            } else {
                closeDescriptors(in: arguments)
                call.reply(error: .unknownMethod("method '\(member)' is not implemented"))
            }
        case .standard(let spec):
            handleStandard(spec.name, call, object: object)
        }
    }

    private func closeDescriptors(in values: [DBusValue]) {
        for value in values {
            switch value {
            case .unixFD(let fd): Glibc.close(fd)
            case .array(_, let vs), .structure(let vs): closeDescriptors(in: vs)
            case .variant(let v): closeDescriptors(in: [v])
            case .dictionary(_, _, let entries): closeDescriptors(in: entries.flatMap { [$0.key, $0.value] })
            default: break
            }
        }
    }

    private func handleStandard(_ interface: String, _ call: MethodCall, object: ExportedObject?) {
        let args = call.arguments
        switch (interface, call.member) {
        case (StandardInterfaces.introspectable.name, "Introspect"):
            call.reply([.string(introspect(call.path, sender: call.sender, object: object))])
        case (StandardInterfaces.peer.name, "Ping"):
            call.reply([])
        case (StandardInterfaces.peer.name, "GetMachineId"):
            do {
                let id = try DBusError.check { dbus_try_get_local_machine_id($0) }
                guard let id else { return call.reply(error: .failed("no machine id")) }
                defer { dbus_free(id) }
                call.reply([.string(String(cString: id))])
            } catch {
                call.reply(error: error)
            }
        case (StandardInterfaces.objectManager.name, "GetManagedObjects"):
            call.reply([managedObjects(below: call.path, sender: call.sender)])
        case (StandardInterfaces.properties.name, _):
            guard let object, let interfaceName = args.first?.stringValue else {
                return call.reply(error: .unknownObject("no object at '\(call.path)'"))
            }
            handleProperties(call, object: object, interfaceName: interfaceName)
        default:
            call.reply(error: .unknownMethod("no method '\(call.member)' in interface '\(interface)'"))
        }
    }

    private func handleProperties(_ call: MethodCall, object: ExportedObject, interfaceName: String) {
        let args = call.arguments
        // A Set's variant may carry file descriptors; they are ours unless the setter takes
        // them, so every refusal path closes them (a caller could otherwise exhaust our fds).
        var handedToSetter = false
        defer { if !handedToSetter { closeDescriptors(in: args) } }
        guard let exported = object.interfaces.first(where: { $0.spec.name == interfaceName }) else {
            let standard = [StandardInterfaces.introspectable, StandardInterfaces.properties, StandardInterfaces.peer,
                            StandardInterfaces.objectManager].map(\.name)
            if standard.contains(interfaceName) {
                // Standard interfaces have no properties.
                if call.member == "GetAll" { return call.reply([.vardict([:])]) }
                let name = args.count > 1 ? args[1].stringValue ?? "" : ""
                return call.reply(error: .unknownProperty("no property '\(name)' in '\(interfaceName)'"))
            }
            return call.reply(error: .unknownInterface("no interface '\(interfaceName)' at '\(call.path)'"))
        }
        if call.member == "GetAll" {
            return call.reply([exported.allProperties()])
        }
        guard args.count >= 2, let name = args[1].stringValue, let declared = exported.spec.property(named: name) else {
            let name = args.count > 1 ? args[1].stringValue ?? "" : ""
            return call.reply(error: .unknownProperty("no property '\(name)' in '\(interfaceName)'"))
        }
        switch call.member {
        case "Get":
            guard let value = exported.getProperty(name) else {
                return call.reply(error: .failed("property '\(name)' is not available"))
            }
            guard value.signature == declared.signature else {
                DBusLog.log("property \(interfaceName).\(name): declared '\(declared.signature)', getter gave '\(value.signature)'")
                return call.reply(error: .failed("internal error: property does not match its declared type"))
            }
            call.reply([.variant(value)])
        case "Set":
            guard declared.access == .readwrite, let setter = exported.setProperty else {
                return call.reply(error: .propertyReadOnly("property '\(name)' is read-only"))
            }
            guard args.count == 3, let value = args[2].variantValue else {
                return call.reply(error: .invalidArgs("expected a variant value"))
            }
            guard value.signature == declared.signature else {
                return call.reply(error: .invalidArgs("property '\(name)' has type '\(declared.signature)', got '\(value.signature)'"))
            }
            handedToSetter = true
            do {
                try setter(name, value)
            } catch {
                return call.reply(error: error)
            }
            // PropertiesChanged before the reply: a caller that sees the reply can rely on
            // the signal having been sent already.
            switch declared.emitsChanged {
            case .emits:
                if let current = exported.getProperty(name), current.signature == declared.signature {
                    emitPropertiesChanged(path: call.path, interface: interfaceName, changed: [name: current])
                }
            case .invalidates:
                emitPropertiesChanged(path: call.path, interface: interfaceName, changed: [:], invalidated: [name])
            case .constant, .none:
                break
            }
            call.reply([])
        default:
            call.reply(error: .unknownMethod("no method '\(call.member)' in interface '\(interfaceName)'"))
        }
    }

    /// Children visible to `sender`: in a denied subtree only objects whose access check passes.
    private func visibleChildren(of path: ObjectPath, sender: String) -> [String] {
        let (children, denied) = objects.withLock { tree in
            let children = tree.children(of: path)
            return (children, children.map { tree.isInDeniedSubtree($0.path) })
        }
        return zip(children, denied).compactMap { child, isDenied in
            if let check = child.object?.accessCheck, !check(sender) { return nil }
            if isDenied && child.object == nil { return nil }
            return child.name
        }
    }

    private func introspect(_ path: ObjectPath, sender: String, object: ExportedObject?) -> String {
        var interfaces = (object?.interfaces ?? []).map(\.spec)
        interfaces.append(StandardInterfaces.introspectable)
        if object != nil { interfaces.append(StandardInterfaces.properties) }
        interfaces.append(StandardInterfaces.peer)
        if objects.withLock({ $0.managers.contains(path) }) { interfaces.append(StandardInterfaces.objectManager) }
        return introspectionDocument(interfaces: interfaces, children: visibleChildren(of: path, sender: sender))
    }

    private func managedObjects(below manager: ObjectPath, sender: String) -> DBusValue {
        let below = objects.withLock { tree in
            tree.objects.filter { $0.key.isDescendant(of: manager) }.sorted { $0.key < $1.key }
        }
        let entries = below.compactMap { path, object -> DBusDictEntry? in
            if let check = object.accessCheck, !check(sender) { return nil }
            return DBusDictEntry(key: .objectPath(path), value: object.interfacesAndProperties())
        }
        return .dictionary(keySignature: "o", valueSignature: "a{sa{sv}}", entries)
    }
}
