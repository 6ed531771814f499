import PKCS11Kit
import PinPolicy

/// A multi-part encryption or decryption the token runs part by part (issue 13 §10), in a
/// backend session of its own, so the parts' output comes as the token produces it and no
/// size limit applies beyond one part's. Keyed by the proxy session and direction, as
/// PKCS#11 allows one operation of each kind per session.
struct CipherStream {
    var session: SessionHandle
    var owner: CallerID
    /// The key is private at the backend: the stream lives in its owner's held login.
    var inLogin: Bool
}

struct CipherStreamKey: Hashable {
    var session: UInt64
    var direction: PKCS11Module.CipherDirection
}

extension TokenContext {
    /// Worker: C_EncryptInit / C_DecryptInit in a new backend session, or false when the key
    /// needs a login the caller does not hold. A caching-mode login lasts one bracket, one
    /// call: a private key's parts are then gathered by the proxy and served at the final call
    /// as before. Keys public at the backend (public keys, public secret keys, the session
    /// objects kept private by the daemon) and a non-caching caller's own login stream.
    func streamBegin(
        caller: CallerID, session id: UInt64, direction: PKCS11Module.CipherDirection, mechanism: Mechanism, key handle: UInt64
    ) throws -> Bool {
        let function = direction == .encrypt ? "C_EncryptInit" : "C_DecryptInit"
        let loc = try locator(handle, caller: caller, function: function, invalid: .keyHandleInvalid)
        if let refused = MechanismKeyTypes.refusal(mechanism, keyType: loc.keyType, function: function) { throw refused }
        let state = policy.withLock { $0.state(of: caller) }
        if loc.isPrivate {
            guard state.loggedIn else {
                try policy.withLock { try $0.checkAvailable(for: caller) }
                throw PKCS11Error(rv: .keyHandleInvalid, function: function)
            }
            guard state.holdsLogin else { return false }
        }
        let key = CipherStreamKey(session: id, direction: direction)
        endStream(key)
        _ = try presentTokenInfo()
        // The shared session stays open, so closing this one can never end the token's login.
        _ = try backendCall { try session() }
        let s = try backendCall { try module.openSession(slot, readWrite: false) }
        do {
            let h = try resolve(handle, s, caller: caller, function: function, invalid: .keyHandleInvalid)
            try backendCall { try module.cipherInit(s, direction, mechanism: mechanism, key: h) }
        } catch {
            try? module.closeSession(s)
            throw error
        }
        streams[key] = CipherStream(session: s, owner: caller, inLogin: loc.isPrivate)
        return true
    }

    /// Worker: one update (`data`) or the final call (nil) of a stream, with the token's
    /// verdict as an answer and whether its operation goes on. It ends with a final call that
    /// delivered; after any other error the token is asked (a length query of no data, which
    /// changes nothing), as PKCS#11 says an error ends the operation but SoftHSM keeps it
    /// after bad arguments. A token or session gone throws.
    func streamPart(
        session id: UInt64, direction: PKCS11Module.CipherDirection, data: [UInt8]?, output: PKCS11Module.OutputBuffer
    ) throws -> (part: PKCS11Module.PartOutput, active: Bool) {
        let key = CipherStreamKey(session: id, direction: direction)
        guard let stream = streams[key] else {
            let names = direction == .encrypt ? ("C_EncryptUpdate", "C_EncryptFinal") : ("C_DecryptUpdate", "C_DecryptFinal")
            throw PKCS11Error(rv: .operationNotInitialized, function: data == nil ? names.1 : names.0)
        }
        do {
            let part = try backendCall { try module.cipherPart(stream.session, direction, data: data, output: output) }
            if data == nil, part.rv == .ok, output != .lengthQuery {
                endStream(key)
                return (part, false)
            }
            return (part, true)
        } catch let e as PKCS11Error where !Self.sessionLost.contains(e.rv) {
            let probe = try? module.cipherPart(stream.session, direction, data: [], output: .lengthQuery)
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

    func endStream(_ key: CipherStreamKey) {
        if let stream = streams.removeValue(forKey: key) { try? module.closeSession(stream.session) }
    }

    /// The proxy session closed.
    func endStreams(ofSession id: UInt64) {
        for key in streams.keys where key.session == id { endStream(key) }
    }

    /// The caller's login ended: so do the streams that ran in it.
    func endStreamsInLogin(of caller: CallerID) {
        for (key, stream) in streams where stream.owner == caller && stream.inLogin { endStream(key) }
    }
}
