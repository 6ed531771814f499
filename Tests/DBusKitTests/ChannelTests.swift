import Foundation
import Synchronization
import Testing
@testable import DBusKit

/// DBusChannelServer against a real dbus-daemon: the channel serves the bus connection's
/// objects as the bound name, and only after the binder said yes.
@Suite struct ChannelTests {
    /// A server on a fresh socket whose binder accepts `ticket` for `name` from this process.
    static func listen(_ server: DBusConnection, ticket: [UInt8], as name: String,
                       seen: Collector<PeerCredentials>) throws -> DBusChannelServer {
        let dir = FileManager.default.temporaryDirectory.path
        return try DBusChannelServer(
            listen: "unix:dir=\(dir)", serving: server, bindInterface: "org.example.Channel1", bindMember: "Bind",
            maxChannels: 4
        ) { offered, peer in
            seen.add(peer)
            return offered == ticket && peer.pid == UInt32(getpid()) ? name : nil
        }
    }

    @Test func boundChannelSpeaksForItsNameAndRefusesSecrets() throws {
        try withServerAndClient { _, server, client in
            let senders = Collector<String>()
            DispatchTests.exportExample(server, extra: ["Echo": { call in
                senders.add(call.sender)
                call.reply(call.arguments)
            }])
            let peers = Collector<PeerCredentials>()
            let channels = try Self.listen(server, ticket: [1, 2, 3], as: client.uniqueName, seen: peers)
            defer { channels.stop() }
            let peer = try DBusConnection(peer: channels.address)
            defer { peer.close() }

            // Unbound: nothing but the bind call is answered.
            let early = caughtError { _ = try peer.callTest(server, "Echo", [.string("x")]) }
            #expect(early?.name == "org.freedesktop.DBus.Error.AccessDenied")
            let bound = try peer.callBlocking(destination: "x.y", path: testPath, interface: "org.example.Channel1",
                                              member: "Bind", arguments: [.bytes([1, 2, 3])], timeoutMilliseconds: 5_000)
            #expect(bound == [])
            #expect(peers.current.first?.uid == getuid())

            #expect(try peer.callTest(server, "Echo", [.string("hi")]) == [.string("hi")])
            #expect(senders.current == [client.uniqueName])
            // The example's Sign carries a sensitive argument: refused on a channel.
            let secret = caughtError { _ = try peer.callTest(server, "Sign", [.string("1234"), .bytes([1]), .bytes([2])]) }
            #expect(secret?.name == "org.freedesktop.DBus.Error.AccessDenied")
            #expect(channels.count == 1)
            #expect(channels.replyStatistics.callsServed >= 3)

            channels.closeChannels(boundTo: client.uniqueName)
            #expect(channels.count == 0)
            let after = caughtError { _ = try peer.callTest(server, "Echo", [.string("x")]) }
            #expect(after != nil)
        }
    }

    @Test func wrongTicketClosesTheChannel() throws {
        try withServerAndClient { _, server, client in
            DispatchTests.exportExample(server)
            let channels = try Self.listen(server, ticket: [9], as: client.uniqueName, seen: Collector())
            defer { channels.stop() }
            let peer = try DBusConnection(peer: channels.address)
            defer { peer.close() }
            let refused = caughtError {
                _ = try peer.callBlocking(destination: "x.y", path: testPath, interface: "org.example.Channel1",
                                          member: "Bind", arguments: [.bytes([8])], timeoutMilliseconds: 5_000)
            }
            #expect(refused?.name == "org.freedesktop.DBus.Error.AccessDenied")
            // The refusal goes out before the channel thread closes and forgets the channel.
            let deadline = Date().addingTimeInterval(5)
            while channels.count != 0 && Date() < deadline { usleep(10_000) }
            #expect(channels.count == 0)
            let after = caughtError { _ = try peer.callTest(server, "Echo", [.string("x")]) }
            #expect(after != nil && after?.name != "org.freedesktop.DBus.Error.AccessDenied")
        }
    }
}
