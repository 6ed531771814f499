import DBusKit
import PinPolicy
import Synchronization
import SystemKit

/// A token's policy behind a lock, telling the service whose logins each change ended
/// (issue 15 §3): every policy call runs through `withLock`, so no path that wipes a cached PIN
/// or ends a held login can forget to tell its caller. The report is made after the lock is
/// released, so whatever it does (a signal, reading the policy again) cannot deadlock.
final class PolicyBox: @unchecked Sendable {
    // @unchecked: `policy` is only touched with `lock` held.
    private let lock = ConditionLock()
    private var policy = TokenPolicy()
    private let report = Mutex<(@Sendable ([CacheClear]) -> Void)?>(nil)

    /// Where ended logins are reported (set once, when the token is published).
    func onCleared(_ handler: @escaping @Sendable ([CacheClear]) -> Void) {
        report.withLock { $0 = handler }
    }

    func withLock<R, E: Error>(_ body: (inout TokenPolicy) throws(E) -> R) throws(E) -> R {
        lock.lock()
        let result: Result<R, E>
        do throws(E) {
            result = .success(try body(&policy))
        } catch {
            result = .failure(error)
        }
        let cleared = policy.takeCleared()
        lock.unlock()
        if !cleared.isEmpty, let handler = report.withLock({ $0 }) { handler(cleared) }
        return try result.get()
    }
}

/// Who holds a token's exclusive login, as Token1.LockedBy shows it: the executable and the
/// uid, never the bus name or the pid (another user's process is none of the caller's business
/// beyond what to close).
struct LockHolder: Sendable, Equatable {
    let caller: CallerID
    let executable: String
    let uid: UInt32?

    var properties: [String: DBusValue] {
        var p: [String: DBusValue] = ["Executable": .string(executable)]
        if let uid { p["Uid"] = .uint32(uid) }
        return p
    }
}
