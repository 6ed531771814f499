import Foundation
import Synchronization
import Testing
@testable import DBusKit

@Suite struct DispatchTests {
    static func exportExample(_ server: DBusConnection, path: ObjectPath = testPath,
                              accessCheck: (@Sendable (String) -> Bool)? = nil,
                              extra: [String: @Sendable (MethodCall) -> Void] = [:]) {
        var methods: [String: @Sendable (MethodCall) -> Void] = [
            "Echo": { $0.reply($0.arguments) },
            "Forget": { _ in },
            "Wrong": { $0.reply([.string("not a u")]) },
        ]
        methods.merge(extra) { $1 }
        server.export(path, interfaces: [ExportedInterface(exampleInterface, methods: methods)], accessCheck: accessCheck)
    }

    @Test func signatureMismatchIsInvalidArgs() throws {
        try withServerAndClient { _, server, client in
            Self.exportExample(server)
            let e = caughtError { _ = try client.callTest(server, "Sign", [.int64(1)]) }
            #expect(e == .invalidArgs("expected signature 'sayay', got 'x'"))
        }
    }

    @Test func unknownObjectInterfaceMethod() throws {
        try withServerAndClient { _, server, client in
            Self.exportExample(server)
            let noObject = caughtError { _ = try client.callTest(server, "Echo", [.string("x")], path: ObjectPath("/nowhere")!) }
            #expect(noObject?.name == "org.freedesktop.DBus.Error.UnknownObject")
            let noInterface = caughtError { _ = try client.callTest(server, "Echo", [.string("x")], interface: "org.example.Nope") }
            #expect(noInterface?.name == "org.freedesktop.DBus.Error.UnknownInterface")
            let noMethod = caughtError { _ = try client.callTest(server, "Nope") }
            #expect(noMethod?.name == "org.freedesktop.DBus.Error.UnknownMethod")
            // An intermediate node exists for Introspect but has no other interfaces.
            let intermediate = caughtError { _ = try client.callTest(server, "Echo", [.string("x")], path: ObjectPath("/org/example")!) }
            #expect(intermediate?.name == "org.freedesktop.DBus.Error.UnknownInterface")
            let ping = try client.callTest(server, "Ping", path: ObjectPath("/org")!, interface: "org.freedesktop.DBus.Peer")
            #expect(ping == [])
        }
    }

    @Test func messageWithoutInterfaceIsResolved() throws {
        try withServerAndClient { bus, server, client in
            let seen = Collector<String>()
            Self.exportExample(server, extra: ["Echo": { call in
                seen.add(call.interface)
                call.reply(call.arguments)
            }])
            // busctl cannot omit the interface, python-dbus can.
            let output = try runTool("/usr/bin/python3", ["-c", """
                import dbus, sys
                bus = dbus.bus.BusConnection(sys.argv[1])
                obj = bus.get_object(sys.argv[2], '/org/example/obj', introspect=False)
                print(obj.Echo('hello', signature='s'))
                """, bus.address, server.uniqueName])
            #expect(output.trimmingCharacters(in: .whitespacesAndNewlines) == "hello")
            #expect(seen.current == ["org.example.Test1"])
        }
    }

    @Test func accessCheckAndDeniedSubtreeGiveIdenticalErrors() throws {
        try withServerAndClient { _, server, client in
            let owner = client.uniqueName
            let sessions = ObjectPath("/org/example/session")!
            server.setDeniedSubtree(sessions)
            Self.exportExample(server, path: sessions.appending("1")!, accessCheck: { $0 == "nobody" })
            Self.exportExample(server, path: sessions.appending("2")!, accessCheck: { $0 == owner })

            let refused = caughtError { _ = try client.callTest(server, "Echo", [.string("x")], path: sessions.appending("1")!) }
            let missing = caughtError { _ = try client.callTest(server, "Echo", [.string("x")], path: sessions.appending("99")!) }
            let missingDeep = caughtError { _ = try client.callTest(server, "Introspect", path: ObjectPath("/org/example/session/1/x")!,
                                                                     interface: "org.freedesktop.DBus.Introspectable") }
            let refusedIntrospect = caughtError { _ = try client.callTest(server, "Introspect", path: sessions.appending("1")!,
                                                                           interface: "org.freedesktop.DBus.Introspectable") }
            #expect(refused == DBusConnection.accessDeniedError)
            #expect(refused == missing)
            #expect(refused == missingDeep)
            #expect(refused == refusedIntrospect)
            #expect(try client.callTest(server, "Echo", [.string("mine")], path: sessions.appending("2")!) == [.string("mine")])
            // Introspection of the subtree shows only what the caller may use.
            let xml = try #require(client.callTest(server, "Introspect", path: sessions,
                                                   interface: "org.freedesktop.DBus.Introspectable").first?.stringValue)
            #expect(xml.contains("<node name=\"2\"/>"))
            #expect(!xml.contains("<node name=\"1\"/>"))
        }
    }

    @Test func releasedWithoutReplyAnswersFailed() throws {
        try withServerAndClient { _, server, client in
            Self.exportExample(server)
            let e = caughtError { _ = try client.callTest(server, "Forget") }
            #expect(e == .failed("no reply"))
        }
    }

    @Test func replyNotMatchingDeclarationIsFailed() throws {
        try withServerAndClient { _, server, client in
            Self.exportExample(server)
            let e = caughtError { _ = try client.callTest(server, "Wrong") }
            #expect(e?.name == "org.freedesktop.DBus.Error.Failed")
        }
    }

    @Test func sensitiveArgumentIsReadInPlaceAndWiped() throws {
        try withServerAndClient { _, server, client in
            let kept = Mutex<MethodCall?>(nil)
            Self.exportExample(server, extra: ["Sign": { call in
                let pin = call.withSensitiveArgument(at: 0) { Array($0) }
                #expect(call.arguments[0] == .string(""))
                #expect(call.arguments[1] == .bytes([7]))
                kept.withLock { $0 = call }
                call.reply([.bytes(pin + (call.arguments[2].bytesValue ?? []))])
            }])
            let reply = try client.callTest(server, "Sign", [.string("123456"), .bytes([7]), .bytes([9])])
            #expect(reply == [.bytes(Array("123456".utf8) + [9])])
            let call = try #require(kept.withLock { $0 })
            // After the reply the secret's bytes inside libdbus's message are gone.
            #expect(call.withSensitiveArgument(at: 0) { $0.count } == 0)
            #expect(call.withSensitiveArgument(at: 1) { Array($0) } == [7])
        }
    }

    @Test func firstReplyWins() throws {
        try withServerAndClient { _, server, client in
            Self.exportExample(server, extra: ["Echo": { call in
                call.reply([.string("first")])
                call.reply([.string("second")])
                call.reply(error: .failed("third"))
            }])
            let reply = try client.callTest(server, "Echo", [.string("x")])
            #expect(reply == [.string("first")])
        }
    }

    @Test func repliesFromEightThreadsAtOnce() throws {
        try withServerAndClient { _, server, client in
            let pending = Collector<MethodCall>()
            Self.exportExample(server, extra: ["Echo": { pending.add($0) }])
            let replies = Collector<Result<[DBusValue], DBusError>>()
            let count = 64
            for i in 0..<count {
                client.call(destination: server.uniqueName, path: testPath, interface: "org.example.Test1", member: "Echo",
                            arguments: [.string("n\(i)")]) { replies.add($0) }
            }
            let calls = pending.wait(for: count)
            try #require(calls.count == count)
            // 8 threads each answer every call; only the first answer per call goes out.
            let start = DispatchSemaphore(value: 0)
            let group = DispatchGroup()
            for t in 0..<8 {
                group.enter()
                Thread {
                    start.wait()
                    for call in calls { call.reply([.string(call.arguments[0].stringValue! + "-t\(t)")]) }
                    group.leave()
                }.start()
            }
            for _ in 0..<8 { start.signal() }
            group.wait()
            let results = replies.wait(for: count)
            #expect(results.count == count)
            let texts = results.compactMap { try? $0.get().first?.stringValue }
            #expect(texts.count == count)
            #expect(Set(texts.map { $0.split(separator: "-").first.map(String.init) ?? "" }) == Set((0..<count).map { "n\($0)" }))
            Thread.sleep(forTimeInterval: 0.2)
            #expect(replies.current.count == count)   // no duplicate replies
        }
    }

    @Test func callBlockingOnLoopThreadFailsInsteadOfDeadlocking() throws {
        try withServerAndClient { _, server, client in
            let seen = Collector<DBusError?>()
            Self.exportExample(server, extra: ["Echo": { call in
                do {
                    _ = try server.callBlocking(destination: client.uniqueName, path: .root,
                                                interface: "org.freedesktop.DBus.Peer", member: "Ping", arguments: [])
                    seen.add(nil)
                } catch {
                    seen.add(error as? DBusError)
                }
                call.reply(call.arguments)
            }])
            _ = try client.callTest(server, "Echo", [.string("x")])
            #expect(seen.wait().first??.name == "org.freedesktop.DBus.Error.Failed")
        }
    }
}

/// Runs an external program and returns its standard output; throws if it fails.
func runTool(_ path: String, _ arguments: [String]) throws -> String {
    guard FileManager.default.isExecutableFile(atPath: path) else {
        throw DBusError.failed("\(path) is not installed")
    }
    let process = Process()
    process.executableURL = URL(fileURLWithPath: path)
    process.arguments = arguments
    let out = Pipe(), err = Pipe()
    process.standardOutput = out
    process.standardError = err
    try process.run()
    let data = out.fileHandleForReading.readDataToEndOfFile()
    let errors = err.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    guard process.terminationStatus == 0 else {
        throw DBusError.failed("\(path) exited \(process.terminationStatus): \(String(decoding: errors, as: UTF8.self))")
    }
    return String(decoding: data, as: UTF8.self)
}
