/// Card events from PC/SC, ahead of the module (issue 15 §1).
extension TokenContext {
    /// PC/SC saw a card arrive in this token's reader (watcher thread): Present shows at once,
    /// with Recognized false and no token information until the module has read the card
    /// (the refresh that follows, on the worker).
    func cardArrived() {
        let change = snapshotState.withLock { s -> (TokenSnapshot, TokenSnapshot)? in
            guard !s.present else { return nil }
            let old = s
            s.present = true
            s.info = nil
            s.infoUnconfirmed = nil
            return (old, s)
        }
        if let (previous, next) = change { onChange(self, previous, next) }
    }

    /// PC/SC saw the card leave (watcher thread): every cached PIN and lock on it goes now,
    /// before any module has noticed; the backend session is dropped on the worker.
    func cardGone() {
        let change = snapshotState.withLock { s -> (TokenSnapshot, TokenSnapshot)? in
            guard s.present else { return nil }
            let old = s
            s.present = false
            s.info = nil
            s.infoUnconfirmed = nil
            return (old, s)
        }
        guard let (previous, next) = change else { return }
        let wiped = policy.withLock { p in
            defer { p.tokenRemoved() }
            return p.cachedPINCount
        }
        worker.submit { [self] in
            dropSession()
            keys = nil
            mechanisms = nil
            resetObjects()
            soHolder.withLock { $0 = nil }
        }
        if previous.identity != nil {
            Log.notice("token \(id): card removed (PC/SC); \(wiped) cached PIN(s) wiped, any exclusive login ended", event: .pinsWiped)
        }
        onChange(self, previous, next)
    }
}
