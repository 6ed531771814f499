import Foundation
import Synchronization
import Testing
@testable import DBusKit

@Suite struct PropertiesTests {
    final class Model: Sendable {
        let count = Mutex<UInt32>(1)
    }

    static func exportWithProperties(_ server: DBusConnection, model: Model, path: ObjectPath = testPath) {
        server.export(path, interfaces: [ExportedInterface(exampleInterface, methods: [:], properties: { name in
            switch name {
            case "Label": .string("Token A")
            case "Count": .uint32(model.count.withLock { $0 })
            case "Serial": .string("0001")
            default: nil   // Volatile: not available
            }
        }, setProperty: { name, value throws(DBusError) in
            guard name == "Count", let v = value.uint32Value else { throw .invalidArgs("bad") }
            if v > 100 { throw DBusError(name: "org.example.Error.TooBig", message: "at most 100") }
            model.count.withLock { $0 = v }
        })])
    }

    static let props = "org.freedesktop.DBus.Properties"

    @Test func getGetAllAndErrors() throws {
        try withServerAndClient { _, server, client in
            Self.exportWithProperties(server, model: Model())
            #expect(try client.callTest(server, "Get", [.string("org.example.Test1"), .string("Label")], interface: Self.props)
                    == [.variant(.string("Token A"))])
            let all = try #require(client.callTest(server, "GetAll", [.string("org.example.Test1")], interface: Self.props).first?.vardictValue)
            #expect(all == ["Label": .string("Token A"), "Count": .uint32(1), "Serial": .string("0001")])
            #expect(try client.callTest(server, "GetAll", [.string("org.freedesktop.DBus.Peer")], interface: Self.props) == [.vardict([:])])

            let unknownProperty = caughtError { _ = try client.callTest(server, "Get", [.string("org.example.Test1"), .string("Nope")], interface: Self.props) }
            #expect(unknownProperty?.name == "org.freedesktop.DBus.Error.UnknownProperty")
            let unknownInterface = caughtError { _ = try client.callTest(server, "Get", [.string("org.example.Nope"), .string("Label")], interface: Self.props) }
            #expect(unknownInterface?.name == "org.freedesktop.DBus.Error.UnknownInterface")
            let unknownInterfaceAll = caughtError { _ = try client.callTest(server, "GetAll", [.string("org.example.Nope")], interface: Self.props) }
            #expect(unknownInterfaceAll?.name == "org.freedesktop.DBus.Error.UnknownInterface")
            let readOnly = caughtError { _ = try client.callTest(server, "Set", [.string("org.example.Test1"), .string("Label"), .variant(.string("x"))], interface: Self.props) }
            #expect(readOnly?.name == "org.freedesktop.DBus.Error.PropertyReadOnly")
            let unknownSet = caughtError { _ = try client.callTest(server, "Set", [.string("org.example.Test1"), .string("Nope"), .variant(.string("x"))], interface: Self.props) }
            #expect(unknownSet?.name == "org.freedesktop.DBus.Error.UnknownProperty")
            let wrongType = caughtError { _ = try client.callTest(server, "Set", [.string("org.example.Test1"), .string("Count"), .variant(.string("x"))], interface: Self.props) }
            #expect(wrongType == .invalidArgs("property 'Count' has type 'u', got 's'"))
            let refused = caughtError { _ = try client.callTest(server, "Set", [.string("org.example.Test1"), .string("Count"), .variant(.uint32(101))], interface: Self.props) }
            #expect(refused == DBusError(name: "org.example.Error.TooBig", message: "at most 100"))
            let unavailable = caughtError { _ = try client.callTest(server, "Get", [.string("org.example.Test1"), .string("Volatile")], interface: Self.props) }
            #expect(unavailable?.name == "org.freedesktop.DBus.Error.Failed")
            let badSignature = caughtError { _ = try client.callTest(server, "Get", [.string("org.example.Test1")], interface: Self.props) }
            #expect(badSignature == .invalidArgs("expected signature 'ss', got 's'"))
        }
    }

    @Test func setEmitsPropertiesChanged() throws {
        try withServerAndClient { _, server, client in
            let model = Model()
            Self.exportWithProperties(server, model: model)
            let changes = Collector<DBusSignalMessage>()
            try client.addSignalHandler(sender: server.uniqueName, path: testPath, interface: Self.props,
                                        member: "PropertiesChanged") { changes.add($0) }
            _ = try client.callTest(server, "Set", [.string("org.example.Test1"), .string("Count"), .variant(.uint32(42))], interface: Self.props)
            #expect(model.count.withLock { $0 } == 42)
            server.emitPropertiesChanged(path: testPath, interface: "org.example.Test1", changed: ["Label": .string("B")],
                                         invalidated: ["Volatile"])
            let signals = changes.wait(for: 2)
            try #require(signals.count == 2)
            #expect(signals[0].arguments == [.string("org.example.Test1"), .vardict(["Count": .uint32(42)]),
                                             .array(elementSignature: "s", [])])
            #expect(signals[1].arguments == [.string("org.example.Test1"), .vardict(["Label": .string("B")]),
                                             .array(elementSignature: "s", [.string("Volatile")])])
            #expect(signals[1].sender == server.uniqueName)
        }
    }

    @Test func objectManagerAnnouncesAndLists() throws {
        try withServerAndClient { _, server, client in
            let manager = ObjectPath("/org/example")!
            server.setObjectManager(at: manager)
            let added = Collector<DBusSignalMessage>(), removed = Collector<DBusSignalMessage>()
            let om = "org.freedesktop.DBus.ObjectManager"
            try client.addSignalHandler(path: manager, interface: om, member: "InterfacesAdded") { added.add($0) }
            try client.addSignalHandler(path: manager, interface: om, member: "InterfacesRemoved") { removed.add($0) }

            let model = Model()
            Self.exportWithProperties(server, model: model)
            // Objects with an access check are private: not announced, listed only for permitted callers.
            Self.exportWithProperties(server, model: model, path: ObjectPath("/org/example/private")!)
            server.unexport(ObjectPath("/org/example/private")!)
            server.export(ObjectPath("/org/example/secret")!, interfaces: [ExportedInterface(exampleInterface, methods: [:])],
                          accessCheck: { _ in false })
            let addedSignals = added.wait(for: 2)
            try #require(addedSignals.count == 2)
            #expect(addedSignals[0].arguments.first == .objectPath(testPath))
            let ifaces = try #require(addedSignals[0].arguments.last?.dictionaryEntries)
            #expect(ifaces.map(\.key) == [.string("org.example.Test1")])
            #expect(ifaces.first?.value.vardictValue?["Label"] == .string("Token A"))

            let removedSignals = removed.wait(for: 1)
            #expect(removedSignals.first?.arguments == [.objectPath(ObjectPath("/org/example/private")!),
                                                        .array(elementSignature: "s", [.string("org.example.Test1")])])

            let managed = try #require(client.callTest(server, "GetManagedObjects", path: manager, interface: om).first?.dictionaryEntries)
            #expect(managed.map(\.key) == [.objectPath(testPath)])
            let props = managed.first?.value.dictionaryEntries?.first?.value.vardictValue
            #expect(props?["Count"] == .uint32(1))
            #expect(added.current.count == 2)   // the secret object was never announced
        }
    }
}
