import Foundation
import FoundationXML
import Testing
@testable import DBusKit

@Suite struct IntrospectionTests {
    @Test func interfaceXMLGolden() {
        let iface = DBusInterface(
            "org.example.Golden1",
            methods: [DBusMethod("Do", in: [DBusArgument("pin", "s", sensitive: true)], out: [DBusArgument("r", "ay")]),
                      DBusMethod("Nothing")],
            signals: [DBusSignal("Changed", [DBusArgument("what", "o")]), DBusSignal("Bare")],
            properties: [DBusProperty("A", "s"), DBusProperty("B", "u", access: .readwrite, emitsChanged: .invalidates),
                         DBusProperty("C", "b", emitsChanged: .constant), DBusProperty("D", "b", emitsChanged: .none)])
        let expected = """
          <interface name="org.example.Golden1">
            <method name="Do">
              <arg name="pin" type="s" direction="in"/>
              <arg name="r" type="ay" direction="out"/>
            </method>
            <method name="Nothing"/>
            <signal name="Changed">
              <arg name="what" type="o"/>
            </signal>
            <signal name="Bare"/>
            <property name="A" type="s" access="read"/>
            <property name="B" type="u" access="readwrite">
              <annotation name="org.freedesktop.DBus.Property.EmitsChangedSignal" value="invalidates"/>
            </property>
            <property name="C" type="b" access="read">
              <annotation name="org.freedesktop.DBus.Property.EmitsChangedSignal" value="const"/>
            </property>
            <property name="D" type="b" access="read">
              <annotation name="org.freedesktop.DBus.Property.EmitsChangedSignal" value="false"/>
            </property>
          </interface>

        """
        #expect(iface.introspectionXML() == expected)
        #expect(iface.introspectionXML(indent: 0).hasPrefix("<interface name=\"org.example.Golden1\">\n  <method"))
    }

    @Test func documentHasDoctypeInterfacesAndChildren() throws {
        let doc = introspectionDocument(interfaces: [StandardInterfaces.peer], children: ["a", "b"])
        #expect(doc.hasPrefix("<!DOCTYPE node PUBLIC \"-//freedesktop//DTD D-BUS Object Introspection 1.0//EN\""))
        #expect(doc.contains("<interface name=\"org.freedesktop.DBus.Peer\">"))
        #expect(doc.contains("  <node name=\"a\"/>\n  <node name=\"b\"/>\n</node>\n"))
        // Well-formed XML.
        _ = try XMLDocument(xmlString: doc, options: [])
    }

    @Test func introspectOverTheBus() throws {
        try withServerAndClient { _, server, client in
            server.export(testPath, interfaces: [ExportedInterface(exampleInterface, methods: [:])])
            server.export(ObjectPath("/org/example/sub/deep")!, interfaces: [])
            server.setObjectManager(at: ObjectPath("/org/example")!)

            let objectXML = try #require(client.callTest(server, "Introspect", interface: "org.freedesktop.DBus.Introspectable").first?.stringValue)
            #expect(objectXML.contains(exampleInterface.introspectionXML(indent: 2)))
            for standard in ["Introspectable", "Properties", "Peer"] {
                #expect(objectXML.contains("<interface name=\"org.freedesktop.DBus.\(standard)\">"))
            }
            #expect(!objectXML.contains("ObjectManager"))
            _ = try XMLDocument(xmlString: objectXML, options: [])

            // Intermediate nodes answer Introspect with their children.
            let rootXML = try #require(client.callTest(server, "Introspect", path: .root,
                                                       interface: "org.freedesktop.DBus.Introspectable").first?.stringValue)
            #expect(rootXML.contains("<node name=\"org\"/>"))
            let managerXML = try #require(client.callTest(server, "Introspect", path: ObjectPath("/org/example")!,
                                                          interface: "org.freedesktop.DBus.Introspectable").first?.stringValue)
            #expect(managerXML.contains("<node name=\"obj\"/>"))
            #expect(managerXML.contains("<node name=\"sub\"/>"))
            #expect(managerXML.contains("org.freedesktop.DBus.ObjectManager"))
            #expect(!managerXML.contains("org.example.Test1"))
        }
    }
}
