import Foundation
import Glibc
import Testing
@testable import DBusKit

@Suite struct ConnectionTests {
    @Test func busAddressParsing() {
        #expect(BusAddress(parsing: "system") == .system)
        #expect(BusAddress(parsing: "session") == .session)
        #expect(BusAddress(parsing: "unix:path=/x") == .address("unix:path=/x"))
    }

    @Test func connectFailureThrows() {
        let e = caughtError { _ = try DBusConnection(bus: .address("unix:path=/nonexistent/dbuskit-socket")) }
        #expect(e?.name.hasPrefix("org.freedesktop.DBus.Error.") == true)
    }

    @Test func peerDisconnectIsReported() throws {
        let bus = try TestBus()
        defer { bus.stop() }
        let server = try bus.connect()
        defer { server.close() }
        let gone = Collector<String>()
        server.onPeerDisconnected { gone.add($0) }
        let client = try bus.connect()
        let name = client.uniqueName
        #expect(try client.callBlocking(destination: server.uniqueName, path: .root, interface: "org.freedesktop.DBus.Peer",
                                        member: "Ping", arguments: []) == [])
        client.close()
        let names = gone.wait(for: 1)
        #expect(names.contains(name))
    }

    @Test func requestNameAndCredentials() throws {
        try withServerAndClient { _, server, client in
            try server.requestName("org.example.Daemon")
            let taken = caughtError { try client.requestName("org.example.Daemon") }
            #expect(taken?.name == "org.freedesktop.DBus.Error.Failed")
            #expect(caughtError { try client.requestName("not a name") }?.name == "org.freedesktop.DBus.Error.InvalidArgs")
            // The well-known name routes to the server.
            #expect(try client.callBlocking(destination: "org.example.Daemon", path: .root, interface: "org.freedesktop.DBus.Peer",
                                            member: "Ping", arguments: []) == [])
            let credentials = Collector<Result<PeerCredentials, DBusError>>()
            server.connectionCredentials(of: client.uniqueName) { credentials.add($0) }
            let result = try #require(credentials.wait().first)
            let c = try result.get()
            #expect(c.uid == getuid())
            #expect(c.pid == UInt32(getpid()))
            let missing = Collector<Result<PeerCredentials, DBusError>>()
            server.connectionCredentials(of: ":1.9999") { missing.add($0) }
            if case .success = try #require(missing.wait().first) { Issue.record("credentials of a missing peer") }
        }
    }

    @Test func signalsReachSubscribersAndStopAfterRemoval() throws {
        try withServerAndClient { _, server, client in
            let got = Collector<DBusSignalMessage>()
            let token = try client.addSignalHandler(interface: "org.example.Test1", member: "Happened") { got.add($0) }
            server.emitSignal(path: testPath, interface: "org.example.Test1", name: "Happened", arguments: [.string("one")])
            let first = got.wait(for: 1)
            #expect(first.first?.arguments == [.string("one")])
            #expect(first.first?.path == testPath)
            client.removeSignalHandler(token)
            server.emitSignal(path: testPath, interface: "org.example.Test1", name: "Happened", arguments: [.string("two")])
            // A round trip through the bus orders the second signal before this reply.
            _ = try client.callBlocking(destination: server.uniqueName, path: .root, interface: "org.freedesktop.DBus.Peer",
                                        member: "Ping", arguments: [])
            #expect(got.current.count == 1)
        }
    }

    @Test func asyncCallTimesOutWithNoReply() throws {
        try withServerAndClient { _, server, client in
            let held = Collector<MethodCall>()
            DispatchTests.exportExample(server, extra: ["Echo": { held.add($0) }])
            let started = Date()
            let e = caughtError {
                _ = try client.callBlocking(destination: server.uniqueName, path: testPath, interface: "org.example.Test1",
                                            member: "Echo", arguments: [.string("x")], timeoutMilliseconds: 200)
            }
            #expect(e?.name == "org.freedesktop.DBus.Error.NoReply")
            #expect(Date().timeIntervalSince(started) < 2)
        }
    }

    @Test func externalClientBusctl() throws {
        try withServerAndClient { bus, server, _ in
            DispatchTests.exportExample(server)
            PropertiesTests.exportWithProperties(server, model: PropertiesTests.Model(), path: ObjectPath("/org/example/props")!)
            let echo = try runTool("/usr/bin/busctl", ["--address=\(bus.address)", "call", server.uniqueName,
                                                       testPath.rawValue, "org.example.Test1", "Echo", "s", "hello world"])
            #expect(echo.trimmingCharacters(in: .whitespacesAndNewlines) == "s \"hello world\"")
            let label = try runTool("/usr/bin/busctl", ["--address=\(bus.address)", "get-property", server.uniqueName,
                                                        "/org/example/props", "org.example.Test1", "Label"])
            #expect(label.trimmingCharacters(in: .whitespacesAndNewlines) == "s \"Token A\"")
            let introspection = try runTool("/usr/bin/busctl", ["--address=\(bus.address)", "introspect", server.uniqueName,
                                                                testPath.rawValue, "org.example.Test1"])
            #expect(introspection.contains(".Sign"))
            #expect(introspection.contains("sayay"))
            let gdbus = try runTool("/usr/bin/gdbus", ["call", "--address", bus.address, "--dest", server.uniqueName,
                                                       "--object-path", testPath.rawValue, "--method", "org.example.Test1.Echo", "hi"])
            #expect(gdbus.trimmingCharacters(in: .whitespacesAndNewlines) == "('hi',)")
            // busctl and gdbus convert arguments by the introspected signature; python-dbus
            // sends what it is told.
            do {
                _ = try runTool("/usr/bin/python3", ["-c", """
                    import dbus, sys
                    bus = dbus.bus.BusConnection(sys.argv[1])
                    obj = bus.get_object(sys.argv[2], '/org/example/obj', introspect=False)
                    obj.Echo(7, signature='i', dbus_interface='org.example.Test1')
                    """, bus.address, server.uniqueName])
                Issue.record("an int32 was accepted for 's'")
            } catch {
                let text = "\(error)"
                #expect(text.contains("org.freedesktop.DBus.Error.InvalidArgs"))
                #expect(text.contains("expected signature 's', got 'i'"))
            }
        }
    }
}
