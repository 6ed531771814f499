import Dispatch
import Foundation
import Glibc
import Synchronization
import Testing
@testable import DBusKit

/// A private dbus-daemon for one test, killed when the test ends.
final class TestBus: @unchecked Sendable {
    let address: String
    private let process: Process
    private let directory: URL

    init() throws {
        let daemon = "/usr/bin/dbus-daemon"
        guard FileManager.default.isExecutableFile(atPath: daemon) else {
            throw DBusError.failed("dbus-daemon is not installed (Debian package dbus-daemon)")
        }
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("dbuskit-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        let config = directory.appendingPathComponent("bus.conf")
        try """
        <!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
         "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
        <busconfig>
          <type>session</type>
          <listen>unix:dir=\(directory.path)</listen>
          <auth>EXTERNAL</auth>
          <policy context="default">
            <allow send_destination="*" eavesdrop="true"/>
            <allow eavesdrop="true"/>
            <allow own="*"/>
          </policy>
        </busconfig>
        """.write(to: config, atomically: true, encoding: .utf8)
        process = Process()
        process.executableURL = URL(fileURLWithPath: daemon)
        process.arguments = ["--config-file=\(config.path)", "--nofork", "--print-address=1"]
        let output = Pipe()
        process.standardOutput = output
        process.standardError = FileHandle.nullDevice
        try process.run()
        var line = Data()
        let handle = output.fileHandleForReading
        while !line.contains(UInt8(ascii: "\n")) {
            let chunk = handle.availableData
            if chunk.isEmpty { break }
            line.append(chunk)
        }
        address = String(decoding: line, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        guard !address.isEmpty else {
            kill(process.processIdentifier, SIGKILL)
            throw DBusError.failed("dbus-daemon printed no address")
        }
    }

    /// A connection to this bus with its loop running on its own thread.
    func connect() throws -> DBusConnection {
        let connection = try DBusConnection(bus: .address(address))
        connection.startLoopThread()
        return connection
    }

    func stop() {
        if process.isRunning {
            // SIGKILL: the child inherits the test runner's signal mask, which blocks SIGTERM.
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }
        try? FileManager.default.removeItem(at: directory)
    }

    deinit { stop() }
}

/// Runs `body` with a fresh bus and a server and a client connection.
func withServerAndClient(_ body: (TestBus, DBusConnection, DBusConnection) throws -> Void) throws {
    let bus = try TestBus()
    defer { bus.stop() }
    let server = try bus.connect()
    let client = try bus.connect()
    defer {
        client.close()
        server.close()
    }
    try body(bus, server, client)
}

/// Collects values delivered from other threads and waits for them.
final class Collector<T: Sendable>: Sendable {
    private let items = Mutex<[T]>([])
    private let semaphore = DispatchSemaphore(value: 0)

    func add(_ item: T) {
        items.withLock { $0.append(item) }
        semaphore.signal()
    }

    /// Waits until `count` items arrived (or the timeout passed) and returns what arrived.
    func wait(for count: Int = 1, seconds: Double = 10) -> [T] {
        let deadline = DispatchTime.now() + seconds
        while items.withLock({ $0.count }) < count {
            if semaphore.wait(timeout: deadline) == .timedOut { break }
        }
        return items.withLock { $0 }
    }

    var current: [T] { items.withLock { $0 } }
}

/// The error a throwing call produced, or nil (and a recorded issue) if it succeeded.
func caughtError(_ body: () throws -> Void, sourceLocation: SourceLocation = #_sourceLocation) -> DBusError? {
    do {
        try body()
        Issue.record("expected a D-Bus error", sourceLocation: sourceLocation)
        return nil
    } catch let error as DBusError {
        return error
    } catch {
        Issue.record("not a DBusError: \(error)", sourceLocation: sourceLocation)
        return nil
    }
}

let exampleInterface = DBusInterface(
    "org.example.Test1",
    methods: [
        DBusMethod("Echo", in: [DBusArgument("text", "s")], out: [DBusArgument("text", "s")]),
        DBusMethod("Sign", in: [DBusArgument("pin", "s", sensitive: true), DBusArgument("key", "ay"), DBusArgument("data", "ay")],
                   out: [DBusArgument("signature", "ay")]),
        DBusMethod("Forget"),
        DBusMethod("Wrong", out: [DBusArgument("value", "u")]),
    ],
    signals: [DBusSignal("Happened", [DBusArgument("what", "s")])],
    properties: [
        DBusProperty("Label", "s"),
        DBusProperty("Count", "u", access: .readwrite),
        DBusProperty("Serial", "s", emitsChanged: .constant),
        DBusProperty("Volatile", "b", emitsChanged: .invalidates),
    ])

let testPath = ObjectPath("/org/example/obj")!

extension DBusConnection {
    /// Calls a method on `server`'s test object.
    func callTest(_ server: DBusConnection, _ member: String, _ arguments: [DBusValue] = [],
                  path: ObjectPath = testPath, interface: String = "org.example.Test1") throws(DBusError) -> [DBusValue] {
        try callBlocking(destination: server.uniqueName, path: path, interface: interface, member: member,
                         arguments: arguments, timeoutMilliseconds: 5_000)
    }
}
