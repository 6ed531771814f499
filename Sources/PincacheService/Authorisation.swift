import DBusKit
import PinPolicy

/// The one authorisation step of both front ends (Session1 and the proxy's wire): a request
/// says what it needs, and the polkit action follows from that here, nowhere else
/// (DESIGN §3). A test checks that every action named here is in polkit/*.policy and back.
enum Access: Sendable, Equatable {
    /// Public data, a session's own bookkeeping: nothing to ask.
    case none
    /// A PIN is submitted (a login, a PIN for one operation).
    case login
    /// The caller's cached PIN may be used: asked at the first such use after each login,
    /// then remembered for that environment and token (never shared between environments).
    case cachedPIN
    /// Objects created, copied, changed or destroyed; keys generated into the token; C_SetPIN.
    case modifyToken
    /// FlushCaches, SO login, C_InitToken, C_InitPIN.
    case manage
}

/// Who asks: its environment, and how to reach polkit for it.
struct Requester: Sendable {
    let info: CallerInfo
    /// The polkit subject: always the caller's unique bus name.
    var busName: String { info.id.rawValue }
    /// The bus call allowed an interactive prompt. The proxy's wire carries no such flag:
    /// PKCS#11 applications get polkit's non-interactive verdict.
    let interactive: Bool
}

extension PincacheService {
    static let allActions: [Authorizer.Action] = [.login, .useCachedPIN, .modifyToken, .manage]

    /// Runs `body` once every access in `needs` is granted, in order; otherwise `denied`.
    /// `token` and `operation`, `keyID` fill the details rules can act on.
    func authorise(
        _ needs: [Access], _ requester: Requester, token: TokenContext?, operation: String, keyID: [UInt8]? = nil,
        denied: @escaping @Sendable (ServiceError) -> Void, _ body: @escaping @Sendable () -> Void
    ) {
        guard let first = needs.first else { return body() }
        let rest = Array(needs.dropFirst())
        let next: @Sendable () -> Void = { [weak self] in
            self?.authorise(rest, requester, token: token, operation: operation, keyID: keyID, denied: denied, body)
        }
        let action: Authorizer.Action
        switch first {
        case .none: return next()
        case .login: action = .login
        case .modifyToken: action = .modifyToken
        case .manage: action = .manage
        case .cachedPIN:
            guard let token, token.policy.withLock({ $0.state(of: requester.info.id).cachedPIN }) else { return next() }
            let key = cachedUseKey(token, requester.info.id)
            guard !cachedUseAllowed.withLock({ $0.contains(key) }) else { return next() }
            authorizer.check(
                .useCachedPIN, subject: requester.busName, interactive: requester.interactive,
                details: details(token, requester.info, operation, keyID: keyID)
            ) { [weak self] verdict in
                switch verdict {
                case .success:
                    self?.cachedUseAllowed.withLock { _ = $0.insert(key) }
                    next()
                case .failure(let e): denied(e)
                }
            }
            return
        }
        let details =
            token.map { self.details($0, requester.info, operation, keyID: keyID) }
            ?? ["operation": operation, "executable": requester.info.executable ?? ""]
        authorizer.check(action, subject: requester.busName, interactive: requester.interactive, details: details) {
            verdict in
            switch verdict {
            case .success: next()
            case .failure(let e): denied(e)
            }
        }
    }

    func cachedUseKey(_ token: TokenContext, _ caller: CallerID) -> String { "\(token.id) \(caller.rawValue)" }

    /// A new login asks polkit again before its cached PIN is first used.
    func forgetCachedUse(_ token: TokenContext, _ caller: CallerID) {
        _ = cachedUseAllowed.withLock { $0.remove(cachedUseKey(token, caller)) }
    }
}
