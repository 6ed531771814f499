import DBusKit
import Glibc

/// Names and time limits of the proxy's way to the daemon. What travels on the socket is
/// declared once, in CryptokiWire's call table, with every cap.
enum Wire {
    static let daemonName = "org.pincache.Daemon"
    static let manager = "org.pincache.Manager1"
    static let managerPath = ObjectPath("/org/pincache")!
    static let tokenPathPrefix = "/org/pincache/token/"

    /// Ordinary calls; a call the table marks `slow` (it may wait for a person — PIN entry,
    /// a polkit prompt, a PIN pad — or for slow card work) gets `slowTimeout`.
    static let defaultTimeout: Int32 = 30
    static let slowTimeout: Int32 = 120

    /// Closes any descriptors a rejected bus reply carried (libdbus dup'ed them for us).
    static func closeDescriptors(in value: DBusValue) {
        switch value {
        case .unixFD(let fd): if fd >= 0 { _ = Glibc.close(fd) }
        case .array(_, let elements): elements.forEach(closeDescriptors)
        case .dictionary(_, _, let entries): entries.forEach { closeDescriptors(in: $0.key); closeDescriptors(in: $0.value) }
        case .structure(let fields): fields.forEach(closeDescriptors)
        case .variant(let inner): closeDescriptors(in: inner)
        default: break
        }
    }
}
