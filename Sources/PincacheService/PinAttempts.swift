import Glibc
import Dispatch
import SystemKit
import PKCS11Kit
import PinPolicy

/// The pipeline of every request that carries a typed PIN (a login of any user type, a PIN for
/// one signature, SignOnce, C_InitToken's SO PIN, C_SetPIN's old PIN), for both front ends:
/// authorise → wait out the user's backoff on this token (GuessThrottle, never on the token's
/// thread) → the token's worker → record the token's verdict. Each wrong PIN and each delay
/// is logged, with the uid and the token, never the PIN.
extension PincacheService {
    func submitPIN<T: Sendable>(
        _ needs: [Access], _ requester: Requester, _ token: TokenContext, operation: String, keyID: [UInt8]? = nil,
        inline: Bool, denied: @escaping @Sendable (ServiceError) -> Void, _ job: @escaping @Sendable () throws -> T,
        done: @escaping @Sendable (Result<T, ServiceError>) -> Void
    ) {
        let info = requester.info
        // The token's PIN flags move with every PIN it is shown (issue 13 §9): after a wrong
        // one, or while any flag is up, the snapshot that GetSlots and Token1 read is
        // refreshed in the same turn of the worker, before the caller hears the verdict.
        let job: @Sendable () throws -> T = {
            var failed = true
            defer {
                if failed || PinStatus(tokenFlags: token.snapshot.info?.flags ?? 0) != [] { token.refresh() }
            }
            let result = try job()
            failed = false
            return result
        }
        authorise(needs, requester, token: token, operation: operation, keyID: keyID, denied: denied) { [weak self] in
            // Without a uid (never on a real bus) one key serves all such callers.
            let key = GuessThrottle.Key(uid: info.uid ?? UInt32.max, token: token.id)
            self?.admitPIN(key, info, token, operation, inline: inline, job, done: done)
        }
    }

    /// Admits one PIN attempt to the token (waiting, off the token's thread, while the
    /// throttle says so), runs it, and reports its verdict exactly once, whatever happens.
    private func admitPIN<T: Sendable>(
        _ key: GuessThrottle.Key, _ info: CallerInfo, _ token: TokenContext, _ operation: String, inline: Bool,
        _ job: @escaping @Sendable () throws -> T, done: @escaping @Sendable (Result<T, ServiceError>) -> Void
    ) {
        let now = TokenContext.now()
        guard let at = guesses.withLock({ $0.admit(key, now: now) }) else {
            // As many of this user's attempts are unanswered as it may have: ask again shortly.
            DispatchQueue.global().asyncAfter(deadline: .now() + .milliseconds(5)) { [weak self] in
                self?.admitPIN(key, info, token, operation, inline: inline, job, done: done)
            }
            return
        }
        let reported: @Sendable (Result<T, ServiceError>) -> Void = { [weak self] result in
            let verdict: GuessThrottle.Verdict
            switch result {
            case .success: verdict = .accepted
            case .failure(let e): verdict = e.rv == 0xa0 ? .rejected : .other  // CKR_PIN_INCORRECT
            }
            let n = self?.guesses.withLock { $0.report(key, verdict) } ?? 0
            if verdict == .rejected {
                Log.warning(
                    "wrong PIN: uid \(Self.uidText(info)) (\(info.executable ?? "unknown executable")), token \(token.id) (\(token.snapshot.info?.label ?? "-")), \(operation); \(n) in a row")
            }
            Audit.record(
                .pinSubmission, caller: info, token: token, operation: operation,
                result: { if case .failure(let e) = result { return Audit.result(of: e) } else { return "ok" } }())
            done(result)
        }
        let run: @Sendable () -> Void = { [weak self] in
            guard let self else { return reported(.failure(ServiceError(.backendError, "the daemon is shutting down", rv: 0x32))) }
            self.onWorker(token, caller: info.id, inline: inline && at <= now, job, reported)
        }
        guard at > now else { return run() }
        let delay = at - now
        Log.warning(
            "PIN attempt of uid \(Self.uidText(info)) on token \(token.id) (\(operation)) delayed \(delay / 1_000_000) ms after \(guesses.withLock { $0.failures(key) }) wrong PINs in a row", event: .guessesThrottled)
        DispatchQueue.global().asyncAfter(deadline: .now() + .nanoseconds(Int(min(delay, UInt64(Int.max)))), execute: run)
    }

    static func uidText(_ info: CallerInfo) -> String { info.uid.map(String.init) ?? "?" }

    /// The audit step around a private-key operation, for both front ends: one record with
    /// how the key was reached (cached PIN, fresh PIN, held login) and the result.
    func audited<T: Sendable>(
        _ info: CallerInfo, _ token: TokenContext, _ operation: String, keyID: [UInt8]?, mechanism: UInt, freshPIN: Bool,
        recordIf used: @escaping @Sendable (T) -> Bool = { _ in true }, _ job: @escaping @Sendable () throws -> T
    ) -> @Sendable () throws -> T {
        {
            let state = token.policy.withLock { $0.state(of: info.id) }
            let how = freshPIN ? "fresh" : state.holdsLogin ? "held-login" : state.cachedPIN ? "cached" : "none"
            let extra = [
                ("PINCACHE_KEY_ID", hexString(keyID ?? [])),
                ("PINCACHE_MECHANISM", "0x" + String(mechanism, radix: 16)), ("PINCACHE_PIN", how),
            ]
            do {
                let result = try job()
                if used(result) {
                    Audit.record(.keyOperation, caller: info, token: token, operation: operation, result: "ok", extra: extra)
                }
                return result
            } catch {
                Audit.record(
                    .keyOperation, caller: info, token: token, operation: operation, result: Audit.result(of: error), extra: extra)
                throw error
            }
        }
    }
}
