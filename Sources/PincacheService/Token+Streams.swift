import PKCS11Kit
import PinPolicy

/// A multi-part operation the token runs part by part (issue 13 §10), in a backend session of
/// its own, so the parts' output comes as the token produces it and no size limit applies
/// beyond one part's. Keyed by the proxy session and kind, as PKCS#11 allows one operation of
/// each kind per session.
struct OperationStream {
    var session: SessionHandle
    var owner: CallerID
    /// The key is private at the backend: the stream lives in its owner's held login.
    var inLogin: Bool
}

struct OperationStreamKey: Hashable {
    var session: UInt64
    var kind: PKCS11Module.StreamKind
}

extension TokenContext {
    /// Worker: the operation's Init in a new backend session, or false when the daemon keeps
    /// to its own path: a key that needs a login the caller does not hold (a caching-mode login
    /// lasts one bracket, one call), and any signature with a private key, which has its
    /// policy (fresh PINs, PinCacheMaxUses, logout after sign) in `perform`. The proxy then
    /// gathers the parts and sends them with the final call as before. Keys public at the
    /// backend (public keys, public secret keys), digests, and a non-caching caller's own
    /// login for decryption stream; the session objects the daemon keeps private do not.
    func streamBegin(
        caller: CallerID, session id: UInt64, kind: PKCS11Module.StreamKind, mechanism: Mechanism, key handle: UInt64
    ) throws -> Bool {
        let function = kind.names.initial
        var loc: ObjectTable.Locator?
        if kind != .digest {
            let found = try locator(handle, caller: caller, function: function, invalid: .keyHandleInvalid)
            if let refused = MechanismKeyTypes.refusal(mechanism, keyType: found.keyType, function: function) { throw refused }
            if found.isPrivate {
                let state = policy.withLock { $0.state(of: caller) }
                guard state.loggedIn else {
                    try policy.withLock { try $0.checkAvailable(for: caller) }
                    throw PKCS11Error(rv: .keyHandleInvalid, function: function)
                }
                guard state.holdsLogin, kind != .sign else { return false }
            }
            // A session key the daemon keeps private is private to its caller: its uses go
            // where a private key's go (its cached PIN's count, its audit).
            if found.keptPrivate { return false }
            loc = found
        }
        let key = OperationStreamKey(session: id, kind: kind)
        endStream(key)
        _ = try presentTokenInfo()
        // The shared session stays open, so closing this one can never end the token's login.
        _ = try backendCall { try session() }
        let s = try backendCall { try module.openSession(slot, readWrite: false) }
        do {
            let h = try loc.map { _ in try resolve(handle, s, caller: caller, function: function, invalid: .keyHandleInvalid) }
            try backendCall { try module.streamInit(s, kind, mechanism: mechanism, key: h) }
        } catch {
            try? module.closeSession(s)
            throw error
        }
        streams[key] = OperationStream(session: s, owner: caller, inLogin: loc?.isPrivate ?? false)
        return true
    }

    /// Worker: one update (`data`, or the key of a `C_DigestKey`) or the final call (nil) of a
    /// stream, with the token's verdict as an answer and whether its operation goes on. It
    /// ends with a final call that delivered; after any other error the token is asked (an
    /// update of no data, which changes nothing), as PKCS#11 says an error ends the operation
    /// but SoftHSM keeps it after bad arguments. A token or session gone throws.
    func streamPart(
        caller: CallerID, session id: UInt64, kind: PKCS11Module.StreamKind, data: [UInt8]?, digestKey: UInt64,
        signature: [UInt8], output: PKCS11Module.OutputBuffer
    ) throws -> (part: PKCS11Module.PartOutput, active: Bool) {
        let key = OperationStreamKey(session: id, kind: kind)
        guard let stream = streams[key] else {
            throw PKCS11Error(rv: .operationNotInitialized, function: data == nil ? kind.names.final : kind.names.update)
        }
        do {
            guard let data else {
                let part = try backendCall { try module.streamFinal(stream.session, kind, signature: signature, output: output) }
                if part.rv == .ok && (output != .lengthQuery || kind == .verify) {
                    endStream(key)
                    return (part, false)
                }
                return (part, true)
            }
            var keyHandle: ObjectHandle?
            if digestKey != 0 {
                // C_DigestKey: the caller's key, usable without a login it does not hold.
                let loc = try locator(digestKey, caller: caller, function: "C_DigestKey", invalid: .keyHandleInvalid)
                if loc.isPrivate && !policy.withLock({ $0.state(of: caller).holdsLogin }) {
                    throw PKCS11Error(rv: .keyHandleInvalid, function: "C_DigestKey")
                }
                keyHandle = try resolve(digestKey, stream.session, caller: caller, function: "C_DigestKey", invalid: .keyHandleInvalid)
            }
            let part = try backendCall {
                try module.streamUpdate(stream.session, kind, data: data, digestKey: keyHandle, output: output)
            }
            return (part, true)
        } catch let e as PKCS11Error where !Self.sessionLost.contains(e.rv) {
            let probe = try? module.streamUpdate(stream.session, kind, data: [], output: .lengthQuery)
            let active = probe?.rv == .ok
            if !active { endStream(key) }
            return (PKCS11Module.PartOutput(rv: e.rv, length: 0, output: []), active)
        } catch {
            endStream(key)
            throw error
        }
    }

    /// Codes that say the backend session or the token is gone, not the operation's verdict.
    static let sessionLost: Set<ReturnValue> = [.sessionHandleInvalid, .sessionClosed, .deviceRemoved, .tokenNotPresent]

    func endStream(_ key: OperationStreamKey) {
        if let stream = streams.removeValue(forKey: key) { try? module.closeSession(stream.session) }
    }

    /// The proxy session closed, or (`kinds`: bit 1 << kind) cancelled these operations.
    func endStreams(ofSession id: UInt64, kinds: UInt64 = .max) {
        for key in streams.keys where key.session == id && kinds & (1 << key.kind.rawValue) != 0 { endStream(key) }
    }

    /// The caller's login ended: so do the streams that ran in it.
    func endStreamsInLogin(of caller: CallerID) {
        for (key, stream) in streams where stream.owner == caller && stream.inLogin { endStream(key) }
    }
}
