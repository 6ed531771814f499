import Foundation
import Glibc
import Testing
@testable import DBusKit

@Suite struct RoundTripTests {
    static let values: [DBusValue] = [
        .byte(0), .byte(255), .boolean(true), .boolean(false), .int16(-32768), .uint16(65535),
        .int32(Int32.min), .uint32(UInt32.max), .int64(Int64.min), .uint64(UInt64.max),
        .double(3.25), .double(-1e300),
        .string(""), .string("héllo ✓ 𝄞"), .objectPath(ObjectPath("/org/pincache/token/1")!), .objectPath(.root),
        .signature(""), .signature("a{oa{sa{sv}}}"),
        .bytes([]), .bytes([0, 1, 2, 254, 255]),
        .array(elementSignature: "s", [.string("a"), .string("b")]),
        .array(elementSignature: "i", []),
        .array(elementSignature: "ay", [.bytes([1]), .bytes([])]),
        .vardict([:]),
        .vardict(["Id": .bytes([1, 2]), "Bits": .uint32(2048), "CanSign": .boolean(true),
                  "Nested": .vardict(["deep": .vardict(["x": .objectPath(.root)])])]),
        .array(elementSignature: "a{sv}", [.vardict(["a": .int32(1)]), .vardict([:]), .vardict(["b": .string("c")])]),
        .dictionary(keySignature: "o", valueSignature: "a{sa{sv}}", [
            DBusDictEntry(key: .objectPath(ObjectPath("/a")!),
                          value: .dictionary(keySignature: "s", valueSignature: "a{sv}",
                                             [DBusDictEntry(key: .string("org.x.Y"), value: .vardict(["p": .uint64(7)]))])),
        ]),
        .dictionary(keySignature: "u", valueSignature: "s", [DBusDictEntry(key: .uint32(1), value: .string("one"))]),
        .structure([.int32(1), .string("x"), .variant(.bytes([9]))]),
        .structure([.structure([.byte(1)]), .array(elementSignature: "(ss)", [.structure([.string("a"), .string("b")])])]),
        .variant(.variant(.uint32(5))),
        .variant(.array(elementSignature: "v", [.variant(.string("in")), .variant(.int16(-1))])),
        .array(elementSignature: "(oa{sv})", [.structure([.objectPath(.root), .vardict(["k": .double(0.5)])])]),
    ]

    /// An interface with one echo method per value, typed by that value's signature.
    static let echoInterface = DBusInterface("org.example.Echo1", methods: values.indices.map { i in
        DBusMethod("M\(i)", in: [DBusArgument("v", values[i].signature)], out: [DBusArgument("v", values[i].signature)])
    } + [DBusMethod("Many", in: [DBusArgument("a", "s"), DBusArgument("b", "ay"), DBusArgument("c", "a{sv}")],
                    out: [DBusArgument("a", "s"), DBusArgument("b", "ay"), DBusArgument("c", "a{sv}")])])

    @Test func everyValueSurvivesTheBus() throws {
        try withServerAndClient { _, server, client in
            let echo: @Sendable (MethodCall) -> Void = { $0.reply($0.arguments) }
            var handlers: [String: @Sendable (MethodCall) -> Void] = [:]
            for method in Self.echoInterface.methods { handlers[method.name] = echo }
            server.export(testPath, interfaces: [ExportedInterface(Self.echoInterface, methods: handlers)])
            for (i, value) in Self.values.enumerated() {
                let reply = try client.callTest(server, "M\(i)", [value], interface: "org.example.Echo1")
                #expect(reply == [value], "value \(i) of type \(value.signature)")
            }
            let many: [DBusValue] = [.string("pin"), .bytes([1, 2, 3]), .vardict(["x": .boolean(false)])]
            #expect(try client.callTest(server, "Many", many, interface: "org.example.Echo1") == many)
        }
    }

    @Test func arrayOfBytesDecodesAsBytes() throws {
        try withServerAndClient { _, server, client in
            let iface = DBusInterface("org.example.Echo1", methods: [DBusMethod("B", in: [DBusArgument("b", "ay")], out: [DBusArgument("b", "ay")])])
            server.export(testPath, interfaces: [ExportedInterface(iface, methods: ["B": { $0.reply($0.arguments) }])])
            let reply = try client.callTest(server, "B", [.array(elementSignature: "y", [.byte(1), .byte(2)])], interface: "org.example.Echo1")
            #expect(reply == [.bytes([1, 2])])
        }
    }

    @Test func unixFileDescriptorsArePassedAndOwned() throws {
        try withServerAndClient { _, server, client in
            let iface = DBusInterface("org.example.Fd1", methods: [
                DBusMethod("Write", in: [DBusArgument("fd", "h")]),
                DBusMethod("Echo", in: [DBusArgument("fd", "h")], out: [DBusArgument("fd", "h")]),
            ])
            server.export(testPath, interfaces: [ExportedInterface(iface, methods: [
                "Write": { call in
                    guard case .unixFD(let fd) = call.arguments[0] else { return call.reply(error: .invalidArgs("fd")) }
                    _ = write(fd, "hi", 2)
                    close(fd)
                    call.reply([])
                },
                "Echo": { call in
                    guard case .unixFD(let fd) = call.arguments[0] else { return call.reply(error: .invalidArgs("fd")) }
                    call.reply([.unixFD(fd)])
                    close(fd)
                },
            ])])
            var fds: [Int32] = [-1, -1]
            #expect(pipe(&fds) == 0)
            defer { close(fds[0]) }
            _ = try client.callTest(server, "Write", [.unixFD(fds[1])], interface: "org.example.Fd1")
            let echoed = try client.callTest(server, "Echo", [.unixFD(fds[1])], interface: "org.example.Fd1")
            close(fds[1])
            guard case .unixFD(let back)? = echoed.first else { Issue.record("no fd back"); return }
            #expect(back != fds[1])
            var original = stat(), returned = stat()
            fstat(fds[0], &original)
            fstat(back, &returned)
            #expect(original.st_ino == returned.st_ino)   // both ends of one pipe
            _ = write(back, "!", 1)
            close(back)
            var buffer = [UInt8](repeating: 0, count: 8)
            let n = read(fds[0], &buffer, 8)
            #expect(n == 3)
            #expect(Array(buffer.prefix(3)) == Array("hi!".utf8))
        }
    }
}
