import DBusKit
import Foundation
import Glibc
import Synchronization

/// Tickets for the peer channel (`DBusChannelServer`): `CryptokiManager1.OpenChannel` hands
/// one to a bus name, and only a connection from the same process (SO_PEERCRED uid and pid
/// equal to what the bus reported for that name) can redeem it, once, within
/// `lifetime`. A ticket seen by anyone else is worth nothing.
final class ChannelTickets: Sendable {
    struct Ticket: Sendable {
        let name: String
        let uid: UInt32
        let pid: UInt32
        let expires: UInt64
    }

    static let lifetimeNanoseconds: UInt64 = 10_000_000_000
    static let maxOutstandingPerName = 4
    static let ticketBytes = 32

    private let tickets = Mutex<[[UInt8]: Ticket]>([:])

    /// A fresh ticket for `name`, or nil when it has too many outstanding.
    func issue(name: String, uid: UInt32, pid: UInt32) -> [UInt8]? {
        // Swift's system generator is getrandom(2) on Linux.
        var generator = SystemRandomNumberGenerator()
        let bytes = (0..<Self.ticketBytes).map { _ in UInt8.random(in: .min ... .max, using: &generator) }
        let now = DispatchTime.now().uptimeNanoseconds
        return tickets.withLock { t -> [UInt8]? in
            t = t.filter { $0.value.expires > now }
            guard t.values.lazy.filter({ $0.name == name }).count < Self.maxOutstandingPerName else { return nil }
            t[bytes] = Ticket(name: name, uid: uid, pid: pid, expires: now &+ Self.lifetimeNanoseconds)
            return bytes
        }
    }

    /// The bus name `ticket` was issued to, if it is valid and `peer` is that name's process.
    /// The ticket is used up either way.
    func redeem(_ ticket: [UInt8], peer: PeerCredentials) -> String? {
        guard ticket.count == Self.ticketBytes else { return nil }
        let now = DispatchTime.now().uptimeNanoseconds
        guard let found = tickets.withLock({ $0.removeValue(forKey: ticket) }), found.expires > now,
            peer.uid == found.uid, peer.pid == found.pid
        else { return nil }
        return found.name
    }

    func forget(name: String) {
        tickets.withLock { t in t = t.filter { $0.value.name != name } }
    }
}
