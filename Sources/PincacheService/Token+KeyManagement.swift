import PKCS11Kit
import PinPolicy

/// C_WrapKey, C_UnwrapKey and C_DeriveKey of the proxy (issue 13 §11), with the caller's
/// handles. Unwrapping and deriving use a key the way a decryption does (an RSA private key
/// opening a wrapped content key, an EC private key agreeing on a secret), so they take the
/// same path as one: the policy's plan for a decryption, its bracket or held login, its
/// PinCacheMaxUses count and an audit record. Wrapping only reads keys: in the caller's login
/// when one of them is private, without one otherwise.
extension TokenContext {
    func wrapKey(
        caller: CallerID, settings: Settings, session id: UInt64, rw: Bool, mechanism: Mechanism, wrappingKey: UInt64,
        key: UInt64
    ) throws -> [UInt8] {
        let s = try rawSession(id, readWrite: rw)
        let locators = [
            try locator(wrappingKey, caller: caller, function: "C_WrapKey", invalid: .wrappingKeyHandleInvalid),
            try locator(key, caller: caller, function: "C_WrapKey", invalid: .keyHandleInvalid),
        ]
        if let refused = MechanismKeyTypes.refusal(mechanism, keyType: locators[0].keyType, function: "C_WrapKey") {
            throw refused
        }
        let run = {
            let w = try self.resolve(wrappingKey, s, caller: caller, function: "C_WrapKey", invalid: .wrappingKeyHandleInvalid)
            let k = try self.resolve(key, s, caller: caller, function: "C_WrapKey", invalid: .keyHandleInvalid)
            return try self.backendCall { try self.module.wrapKey(s, mechanism: mechanism, wrappingKey: w, key: k) }
        }
        if locators.contains(where: { $0.isPrivate || $0.owner != nil }) {
            return try withAccess(caller: caller, settings: settings, s, readOnly: true, run)
        }
        _ = try presentTokenInfo()
        return try run()
    }

    func unwrapKey(
        caller: CallerID, settings: Settings, session id: UInt64, rw: Bool, mechanism: Mechanism, unwrappingKey: UInt64,
        wrapped: [UInt8], template: [Attribute]
    ) throws -> UInt64 {
        try makeKey(
            caller: caller, settings: settings, session: id, rw: rw, with: unwrappingKey, function: "C_UnwrapKey",
            mechanism: mechanism, invalid: .unwrappingKeyHandleInvalid
        ) { s, base in
            let (sent, kept) = sessionObjectTemplate(template, caller: caller, impliedClass: .secretKey)
            return (try module.unwrapKey(s, mechanism: mechanism, unwrappingKey: base, wrapped: wrapped, template: sent), kept)
        }
    }

    func deriveKey(
        caller: CallerID, settings: Settings, session id: UInt64, rw: Bool, mechanism: Mechanism, baseKey: UInt64,
        template: [Attribute]
    ) throws -> UInt64 {
        try makeKey(
            caller: caller, settings: settings, session: id, rw: rw, with: baseKey, function: "C_DeriveKey",
            mechanism: mechanism, invalid: .keyHandleInvalid
        ) { s, base in
            let (sent, kept) = sessionObjectTemplate(template, caller: caller, impliedClass: .secretKey)
            return (try module.deriveKey(s, mechanism: mechanism, baseKey: base, template: sent), kept)
        }
    }

    /// A new object made with one of the caller's keys, registered (inside the login, where a
    /// private one can be seen) as a handle of the caller's session.
    private func makeKey(
        caller: CallerID, settings: Settings, session id: UInt64, rw: Bool, with key: UInt64, function: String,
        mechanism: Mechanism, invalid: ReturnValue, _ make: (SessionHandle, ObjectHandle) throws -> (ObjectHandle, keptPrivate: Bool)
    ) throws -> UInt64 {
        defer { objectsChanged() }
        return try withKey(
            caller: caller, settings: settings, .handle(key, session: id, readWrite: rw), kind: .decrypt, function: function,
            mechanism: mechanism, freshPIN: nil, invalid: invalid
        ) { s, base, _, _ in
            let (made, kept) = try backendCall { try make(s, base) }
            return try registerCreated(s, made, caller: caller, session: id, keptPrivate: kept)
        }
    }
}
