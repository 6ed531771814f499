// Declared interfaces: one value per interface drives introspection, dispatch,
// signature checks and the Properties interface.

/// A named, typed argument of a method or signal.
public struct DBusArgument: Sendable {
    public var name: String
    /// One complete type.
    public var signature: String
    /// A secret (`s` or `ay`): decoded as an empty placeholder, read only through
    /// `MethodCall.withSensitiveArgument`, and wiped in the message after the reply.
    public var sensitive: Bool

    public init(_ name: String, _ signature: String, sensitive: Bool = false) {
        self.name = name
        self.signature = signature
        self.sensitive = sensitive
    }
}

/// The annotation introspection carries documentation in: gdbus-codegen, D-Feet and
/// d-spy show it, and `busctl introspect` prints it.
public let docAnnotation = "org.gtk.GDBus.DocString"

/// A method: name, in and out arguments.
public struct DBusMethod: Sendable {
    public var name: String
    public var inArguments: [DBusArgument]
    public var outArguments: [DBusArgument]
    /// What the method does, for people (introspection's DocString annotation).
    public var doc: String

    public init(_ name: String, in: [DBusArgument] = [], out: [DBusArgument] = [], doc: String = "") {
        self.name = name
        self.inArguments = `in`
        self.outArguments = out
        self.doc = doc
    }

    /// The signature a call must carry, e.g. `sayay`.
    public var inSignature: String { inArguments.map(\.signature).joined() }
    /// The signature a reply must carry.
    public var outSignature: String { outArguments.map(\.signature).joined() }
}

/// A signal and its arguments.
public struct DBusSignal: Sendable {
    public var name: String
    public var arguments: [DBusArgument]
    public var doc: String

    public init(_ name: String, _ arguments: [DBusArgument] = [], doc: String = "") {
        self.name = name
        self.arguments = arguments
        self.doc = doc
    }

    public var signature: String { arguments.map(\.signature).joined() }
}

/// A property.
public struct DBusProperty: Sendable {
    public enum Access: Sendable { case read, readwrite }
    /// The `org.freedesktop.DBus.Property.EmitsChangedSignal` annotation: `.emits` is the
    /// D-Bus default ("true") and is not written out.
    public enum ChangeEmission: Sendable { case emits, invalidates, constant, none }

    public var name: String
    public var signature: String
    public var access: Access
    public var emitsChanged: ChangeEmission
    public var doc: String

    public init(
        _ name: String, _ signature: String, access: Access = .read, emitsChanged: ChangeEmission = .emits, doc: String = ""
    ) {
        self.name = name
        self.signature = signature
        self.access = access
        self.emitsChanged = emitsChanged
        self.doc = doc
    }

    var annotationValue: String? {
        switch emitsChanged {
        case .emits: nil
        case .invalidates: "invalidates"
        case .constant: "const"
        case .none: "false"
        }
    }
}

/// One interface declaration.
public struct DBusInterface: Sendable {
    public var name: String
    public var methods: [DBusMethod]
    public var signals: [DBusSignal]
    public var properties: [DBusProperty]
    public var doc: String

    public init(
        _ name: String, methods: [DBusMethod] = [], signals: [DBusSignal] = [], properties: [DBusProperty] = [],
        doc: String = ""
    ) {
        self.name = name
        self.methods = methods
        self.signals = signals
        self.properties = properties
        self.doc = doc
    }

    /// Members without documentation ("method Foo", ...), empty when every one has some.
    public var undocumented: [String] {
        (doc.isEmpty ? ["interface \(name)"] : []) + methods.filter { $0.doc.isEmpty }.map { "method \($0.name)" }
            + signals.filter { $0.doc.isEmpty }.map { "signal \($0.name)" }
            + properties.filter { $0.doc.isEmpty }.map { "property \($0.name)" }
    }

    public func method(named name: String) -> DBusMethod? { methods.first { $0.name == name } }
    public func signal(named name: String) -> DBusSignal? { signals.first { $0.name == name } }
    public func property(named name: String) -> DBusProperty? { properties.first { $0.name == name } }

    /// What is wrong with this declaration (invalid names or signatures), empty if nothing.
    public func problems() -> [String] {
        var out: [String] = []
        if !DBusNames.isValidInterface(name) { out.append("invalid interface name '\(name)'") }
        func checkMember(_ kind: String, _ member: String, _ arguments: [DBusArgument]) {
            if !DBusNames.isValidMember(member) { out.append("\(name): invalid \(kind) name '\(member)'") }
            for a in arguments where !DBusNames.isSingleCompleteType(a.signature) {
                out.append("\(name).\(member): argument '\(a.name)' has invalid type '\(a.signature)'")
            }
            for a in arguments where a.sensitive && a.signature != "s" && a.signature != "ay" {
                out.append("\(name).\(member): sensitive argument '\(a.name)' must be 's' or 'ay'")
            }
        }
        for m in methods { checkMember("method", m.name, m.inArguments + m.outArguments) }
        for s in signals { checkMember("signal", s.name, s.arguments) }
        for p in properties { checkMember("property", p.name, [DBusArgument(p.name, p.signature)]) }
        return out
    }

    /// The `<interface>` element, its first line indented by `indent` spaces and each
    /// level below by two more.
    public func introspectionXML(indent: Int = 2) -> String {
        let i0 = String(repeating: " ", count: indent)
        let i1 = i0 + "  ", i2 = i1 + "  "
        func docLine(_ doc: String, _ indent: String) -> String {
            doc.isEmpty ? "" : "\(indent)<annotation name=\"\(docAnnotation)\" value=\"\(xmlEscape(doc))\"/>\n"
        }
        /// `<tag …/>`, or `<tag …>` with `body` and `</tag>` when there is a body.
        func element(_ tag: String, _ attributes: String, _ body: String) -> String {
            body.isEmpty ? "\(i1)<\(tag) \(attributes)/>\n" : "\(i1)<\(tag) \(attributes)>\n\(body)\(i1)</\(tag)>\n"
        }
        var xml = "\(i0)<interface name=\"\(xmlEscape(name))\">\n" + docLine(doc, i1)
        for m in methods {
            let args = m.inArguments.map { ($0, "in") } + m.outArguments.map { ($0, "out") }
            let body = docLine(m.doc, i2) + args.map { a, direction in
                "\(i2)<arg name=\"\(xmlEscape(a.name))\" type=\"\(xmlEscape(a.signature))\" direction=\"\(direction)\"/>\n"
            }.joined()
            xml += element("method", "name=\"\(xmlEscape(m.name))\"", body)
        }
        for s in signals {
            let body = docLine(s.doc, i2) + s.arguments.map { a in
                "\(i2)<arg name=\"\(xmlEscape(a.name))\" type=\"\(xmlEscape(a.signature))\"/>\n"
            }.joined()
            xml += element("signal", "name=\"\(xmlEscape(s.name))\"", body)
        }
        for p in properties {
            let emits = p.annotationValue.map {
                "\(i2)<annotation name=\"org.freedesktop.DBus.Property.EmitsChangedSignal\" value=\"\($0)\"/>\n"
            }
            let access = p.access == .read ? "read" : "readwrite"
            xml += element(
                "property", "name=\"\(xmlEscape(p.name))\" type=\"\(xmlEscape(p.signature))\" access=\"\(access)\"",
                docLine(p.doc, i2) + (emits ?? ""))
        }
        xml += "\(i0)</interface>\n"
        return xml
    }
}

/// The full introspection document of one object: DOCTYPE, `<node>`, the interfaces in
/// the order given, then one `<node name="child"/>` per child.
public func introspectionDocument(interfaces: [DBusInterface], children: [String]) -> String {
    var xml = """
    <!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"
     "http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">
    <node>

    """
    for interface in interfaces { xml += interface.introspectionXML(indent: 2) }
    for child in children { xml += "  <node name=\"\(xmlEscape(child))\"/>\n" }
    xml += "</node>\n"
    return xml
}

func xmlEscape(_ s: String) -> String {
    var out = ""
    out.reserveCapacity(s.utf8.count)
    for c in s {
        switch c {
        case "&": out += "&amp;"
        case "<": out += "&lt;"
        case ">": out += "&gt;"
        case "\"": out += "&quot;"
        case "'": out += "&apos;"
        default: out.append(c)
        }
    }
    return out
}

/// The standard interfaces the binding implements itself on every exported object
/// (ObjectManager only at paths given to `DBusConnection.setObjectManager(at:)`).
public enum StandardInterfaces {
    public static let introspectable = DBusInterface(
        "org.freedesktop.DBus.Introspectable",
        methods: [DBusMethod("Introspect", out: [DBusArgument("xml_data", "s")])])

    public static let properties = DBusInterface(
        "org.freedesktop.DBus.Properties",
        methods: [
            DBusMethod("Get", in: [DBusArgument("interface_name", "s"), DBusArgument("property_name", "s")],
                       out: [DBusArgument("value", "v")]),
            DBusMethod("GetAll", in: [DBusArgument("interface_name", "s")],
                       out: [DBusArgument("props", "a{sv}")]),
            DBusMethod("Set", in: [DBusArgument("interface_name", "s"), DBusArgument("property_name", "s"),
                                   DBusArgument("value", "v")]),
        ],
        signals: [DBusSignal("PropertiesChanged", [
            DBusArgument("interface_name", "s"), DBusArgument("changed_properties", "a{sv}"),
            DBusArgument("invalidated_properties", "as"),
        ])])

    public static let peer = DBusInterface(
        "org.freedesktop.DBus.Peer",
        methods: [DBusMethod("Ping"), DBusMethod("GetMachineId", out: [DBusArgument("machine_uuid", "s")])])

    public static let objectManager = DBusInterface(
        "org.freedesktop.DBus.ObjectManager",
        methods: [DBusMethod("GetManagedObjects", out: [DBusArgument("object_paths_interfaces_and_properties", "a{oa{sa{sv}}}")])],
        signals: [
            DBusSignal("InterfacesAdded", [DBusArgument("object_path", "o"),
                                           DBusArgument("interfaces_and_properties", "a{sa{sv}}")]),
            DBusSignal("InterfacesRemoved", [DBusArgument("object_path", "o"), DBusArgument("interfaces", "as")]),
        ])
}
