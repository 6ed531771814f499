import DBusKit
import PinPolicy

/// What callers are told as it happens (issue 15): why their logins end, who holds a token,
/// and cards coming and going as PC/SC reports them.
extension PincacheService {
    /// Manager1.CacheCleared to each caller whose login on `token` ended (issue 15 §3), unicast:
    /// why one's cache went is nobody else's business. Then LoggedIn and LockedBy follow.
    func cacheCleared(_ token: TokenContext, _ clears: [CacheClear]) {
        // A login left open for riders (Token+SharedLogin) may hold a cleared PIN: any job ends
        // it before running, so one is queued now instead of waiting for the login's linger.
        // Its private session objects go with the login (Token+SessionObjects).
        let callers = Set(clears.map(\.caller))
        // So do the multi-part operations that ran in it (Token+Streams).
        token.worker.submit {
            for caller in callers {
                token.destroyKeptPrivate(of: caller)
                token.endStreamsInLogin(of: caller)
            }
        }
        guard token.published.load(ordering: .acquiring) else { return }
        // A PKCS#11 application has no such event and its proxy's connection never asks for
        // it: its environments are not told (a signal per logout would cost every cold cycle).
        for clear in clears where !cryptokiSockets.isBound(clear.caller.rawValue) {
            connection.emitSignal(
                path: PincacheBus.managerPath, interface: PincacheInterfaces.manager.name, name: "CacheCleared",
                arguments: [.objectPath(token.path), .string(clear.reason.rawValue)], destination: clear.caller.rawValue)
        }
        if busSessions.withLock({ !$0.isEmpty }) { announceLoggedIn(token) }
        announceLockedBy(token)
    }

    /// Token1.LockedBy as PropertiesChanged when the lock holder changed since last told.
    func announceLockedBy(_ token: TokenContext) {
        let holder = token.policy.withLock { $0.lockHolder }
        let now = holder.map { id in
            let info = registry.lookup(id.rawValue)
            return LockHolder(caller: id, executable: info?.executable ?? "", uid: info?.uid)
        }
        let changed = token.lockedBy.withLock { last -> Bool in
            guard last != now else { return false }
            last = now
            return true
        }
        guard changed, token.published.load(ordering: .acquiring) else { return }
        connection.emitPropertiesChanged(
            path: token.path, interface: PincacheInterfaces.token.name, changed: ["LockedBy": .vardict(now?.properties ?? [:])])
    }

    /// PC/SC saw a card come or go in `reader` (issue 15 §1): the reader's tokens show it at
    /// once, TokenInserted with Present=true and Recognized=false until their module has read
    /// the card, which the rescan that follows does; a removal wipes their caches at once.
    func cardEvent(reader: String, present: Bool) {
        for token in tokens where token.snapshot.removable && Self.slot(token.snapshot.slotDescription, isReader: reader) {
            if present { token.cardArrived() } else { token.cardGone() }
        }
    }

    /// A module names a reader's slot after the reader (OpenSC, blank-padded to
    /// CK_SLOT_INFO's 64 bytes, so a long name is cut).
    static func slot(_ description: String, isReader reader: String) -> Bool {
        var d = Substring(description)
        while d.last == " " { d = d.dropLast() }
        return !d.isEmpty && (d == reader || (description.utf8.count >= 60 && reader.hasPrefix(d)))
    }
}
