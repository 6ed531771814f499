import DBusKit
import Synchronization

/// Authorisation through polkit's D-Bus API (org.freedesktop.PolicyKit1.Authority), called
/// asynchronously on the daemon's own bus loop. libpolkit-gobject-1 would need a GLib main loop
/// on a second thread and GObject lifetimes for what is one method call and one cancel here.
///
/// The subject is always the caller's system-bus-name (never a pid: pids are recycled). A check
/// still pending when its caller leaves the bus is cancelled and never answered. On any bus but
/// the system bus a bus name is no polkit subject: every check then passes (DESIGN §3).
final class Authorizer: Sendable {
    enum Action: String, Sendable {
        case login = "org.pincache.login"
        case useCachedPIN = "org.pincache.use-cached-pin"
        case modifyToken = "org.pincache.modify-token"
        case manage = "org.pincache.manage"
    }

    private static let authority = "org.freedesktop.PolicyKit1"
    private static let authorityPath = ObjectPath("/org/freedesktop/PolicyKit1/Authority")!
    private static let authorityInterface = "org.freedesktop.PolicyKit1.Authority"
    /// Bounds what one caller can keep the daemon and polkitd busy with.
    static let maxPendingPerCaller = 16

    let enabled: Bool
    private let connection: DBusConnection
    private let pending = Mutex<[String: Set<String>]>([:])
    private let counter = Atomic<UInt64>(0)

    init(connection: DBusConnection, enabled: Bool) {
        self.connection = connection
        self.enabled = enabled
    }

    var pendingCount: Int { pending.withLock { $0.values.reduce(0) { $0 + $1.count } } }

    /// Calls `completion` (on the bus loop thread, or at once when authorisation is off) with the
    /// verdict, or never if the caller left meanwhile.
    func check(
        _ action: Action, for call: MethodCall, details: [String: String],
        _ completion: @escaping @Sendable (Result<Void, ServiceError>) -> Void
    ) {
        check(action, subject: call.sender, interactive: call.allowsInteractiveAuthorization, details: details, completion)
    }

    /// `subject`: the caller's unique bus name, whichever way its request came in.
    func check(
        _ action: Action, subject sender: String, interactive: Bool, details: [String: String],
        _ completion: @escaping @Sendable (Result<Void, ServiceError>) -> Void
    ) {
        guard enabled else { return completion(.success(())) }
        let id = "pincache-\(counter.wrappingAdd(1, ordering: .relaxed).oldValue)"
        let admitted = pending.withLock { p -> Bool in
            guard p[sender, default: []].count < Self.maxPendingPerCaller else { return false }
            p[sender, default: []].insert(id)
            return true
        }
        guard admitted else {
            return completion(.failure(ServiceError(.notAuthorized, "too many authorisation checks in flight (CKR_FUNCTION_REJECTED (0x200))")))
        }
        let subject = DBusValue.structure([.string("system-bus-name"), .vardict(["name": .string(sender)])])
        let detailEntries = details.sorted { $0.key < $1.key }.map {
            DBusDictEntry(key: .string($0.key), value: .string($0.value))
        }
        connection.call(
            destination: Self.authority, path: Self.authorityPath, interface: Self.authorityInterface,
            member: "CheckAuthorization",
            arguments: [
                subject, .string(action.rawValue),
                .dictionary(keySignature: "s", valueSignature: "s", detailEntries),
                .uint32(interactive ? 1 : 0), .string(id),
            ],
            // An interactive check waits for a person at a password prompt.
            timeoutMilliseconds: interactive ? 300_000 : 25_000
        ) { [self] result in
            let stillWanted = self.pending.withLock { p -> Bool in
                guard p[sender]?.remove(id) != nil else { return false }
                if p[sender]?.isEmpty == true { p[sender] = nil }
                return true
            }
            guard stillWanted else { return }
            switch result {
            case .success(let values):
                let fields = values.first?.structFields ?? []
                if fields.first?.boolValue == true {
                    completion(.success(()))
                } else {
                    let challenge = fields.count > 1 && fields[1].boolValue == true
                    completion(
                        .failure(
                            ServiceError(
                                .notAuthorized,
                                "\(action.rawValue) refused by polkit" + (challenge ? ", authentication required" : "")
                                    + " (CKR_FUNCTION_REJECTED (0x200))")))
                }
            case .failure(let error):
                Log.warning("polkit check \(action.rawValue) failed: \(error.name); denying")
                completion(.failure(ServiceError(.notAuthorized, "polkit is unavailable (\(error.name)); denied (CKR_FUNCTION_REJECTED (0x200))")))
            }
        }
    }

    /// The caller left: its checks are cancelled and will never be answered.
    func callerGone(_ sender: String) {
        let ids = pending.withLock { $0.removeValue(forKey: sender) } ?? []
        for id in ids {
            connection.call(
                destination: Self.authority, path: Self.authorityPath, interface: Self.authorityInterface,
                member: "CancelCheckAuthorization", arguments: [.string(id)]
            ) { _ in }
        }
    }
}
