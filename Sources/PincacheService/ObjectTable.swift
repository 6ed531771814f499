import PKCS11Kit
import PinPolicy

/// The daemon's own object handles for the proxy. Backend handles do not survive a bracket
/// (SoftHSM renumbers private objects at every login), so each handle keeps a locator: the
/// backend handle last seen plus the attributes that identify the object, re-found when the
/// backend handle no longer matches. Session objects (CKA_TOKEN false) are the caller's that
/// made them, as PKCS#11 makes them the application's: the daemon is one application to the
/// backend, so other callers must never see them.
struct ObjectTable {
    struct Locator {
        var backend: ObjectHandle
        var identity: [UInt8]
        var template: [Attribute]
        var isPrivate: Bool
        /// Session objects only: the caller that made it, and in which session (it dies with it).
        var owner: CallerID?
        var creatingSession: UInt64?
        /// The login epoch in which `backend` was last seen to be this object.
        var checkedEpoch: UInt64?
        /// A private object's non-sensitive attributes as its last search read them, inside
        /// that search's bracket (issue 14 §3): logged-in callers read them without a login.
        var snapshot: [AttributeType: AttributeResult]?

        var keyID: [UInt8]? { template.first { $0.type == .id }?.value }
        var objectClass: UInt? { template.first { $0.type == .class }?.value.pkcs11ULong }
    }
    var locators: [UInt64: Locator] = [:]
    var byIdentity: [[UInt8]: UInt64] = [:]
    var next: UInt64 = 1
    /// The token's private objects as a login last listed them (Token+Catalogue.swift).
    var catalogue: PrivateCatalogue?
    static let capacity = 100_000
}

extension TokenContext {
    static let identityTypes: [AttributeType] = [.class, .id, .label, .private, .token, .keyType, .value]

    /// What a private object's snapshot holds: what describes a key, never what would reveal
    /// one (no CKA_VALUE, private exponent, primes; those are read in a bracket, as the
    /// backend decides).
    static let snapshotTypes: [AttributeType] = [
        .class, .token, .private, .label, .id, .keyType, .subject, .sensitive, .encrypt, .decrypt, .wrap, .unwrap,
        .sign, .signRecover, .verify, .verifyRecover, .derive, .modulus, .modulusBits, .publicExponent, .extractable,
        .local, .neverExtractable, .alwaysSensitive, .keyGenMechanism, .modifiable, .ecParams, .ecPoint,
        .alwaysAuthenticate, .wrapWithTrusted,
        AttributeType(rawValue: 0x4),  // CKA_UNIQUE_ID (3.0)
        AttributeType(rawValue: 0x4000_0600),  // CKA_ALLOWED_MECHANISMS
    ]
    static let snapshotTypeSet = Set(snapshotTypes)

    /// What of a bracketed read may join a private object's snapshot: the described types,
    /// and any type's refusal (sensitive, not applicable), which carries no secret.
    static func snapshotWorthy(_ r: AttributeResult) -> Bool { r.status != .ok || snapshotTypeSet.contains(r.type) }

    /// An object's identity bytes from its attributes; nil if the handle is not valid here.
    /// One C_GetAttributeValue for the plain attributes; CKA_VALUE (sensitive on keys, so it
    /// would cost a call per attribute) only for data objects and certificates.
    private func identity(_ s: SessionHandle, _ h: ObjectHandle) -> (bytes: [UInt8], attrs: [AttributeType: [UInt8]])? {
        guard var a = try? module.getAttributes(s, h, Array(Self.identityTypes.dropLast())), let cls = a[.class] else {
            return nil
        }
        if let c = cls.pkcs11ULong, c == ObjectClass.data.rawValue || c == ObjectClass.certificate.rawValue {
            a[.value] = (try? module.getAttributes(s, h, [.value]))?[.value]
        }
        var bytes: [UInt8] = []
        for t in Self.identityTypes {
            var v = a[t] ?? []
            if t == .value { v = fnv1a(v) }
            withUnsafeBytes(of: UInt64(v.count).littleEndian) { bytes.append(contentsOf: $0) }
            bytes += v
        }
        return (bytes, a)
    }

    /// Gives a backend object a daemon handle (the same one every time it is seen). A session
    /// object is registered only by the caller that created it (`createdIn`); found by anyone
    /// else it is not theirs, and nil hides it.
    func register(_ s: SessionHandle, _ h: ObjectHandle, caller: CallerID, createdIn session: UInt64? = nil) throws
        -> UInt64?
    {
        guard let found = identity(s, h) else {
            throw PKCS11Error(rv: .objectHandleInvalid, function: "C_GetAttributeValue")
        }
        var bytes = found.bytes
        let a = found.attrs
        let isTokenObject = a[.token]?.pkcs11Bool ?? true
        if !isTokenObject { bytes += Array(caller.rawValue.utf8) }
        if let existing = objectTable.byIdentity[bytes] {
            objectTable.locators[existing]?.backend = h
            objectTable.locators[existing]?.checkedEpoch = loginEpoch
            return existing
        }
        if !isTokenObject && session == nil { return nil }
        guard objectTable.locators.count < ObjectTable.capacity else {
            throw PKCS11Error(rv: .deviceMemory, function: "C_FindObjects")
        }
        var template: [Attribute] = []
        for t in [AttributeType.class, .id, .label, .keyType] {
            if let v = a[t] { template.append(Attribute(t, v)) }
        }
        let handle = objectTable.next
        objectTable.next += 1
        objectTable.locators[handle] = ObjectTable.Locator(
            backend: h, identity: bytes, template: template, isPrivate: a[.private]?.pkcs11Bool ?? false,
            owner: isTokenObject ? nil : caller, creatingSession: isTokenObject ? nil : session,
            checkedEpoch: loginEpoch)
        objectTable.byIdentity[bytes] = handle
        if let id = a[.id] { handleKeyIDs.withLock { $0[handle] = id } }
        return handle
    }

    /// register() for objects the caller just made: always gives a handle.
    func registerCreated(_ s: SessionHandle, _ h: ObjectHandle, caller: CallerID, session: UInt64) throws -> UInt64 {
        guard let handle = try register(s, h, caller: caller, createdIn: session) else {
            throw PKCS11Error(rv: .generalError, function: "C_CreateObject")
        }
        return handle
    }

    /// `invalid` is the code for a handle that names nothing here: CKR_KEY_HANDLE_INVALID
    /// where PKCS#11 expects a key, CKR_OBJECT_HANDLE_INVALID elsewhere.
    func locator(_ handle: UInt64, caller: CallerID, function: String, invalid: ReturnValue = .objectHandleInvalid)
        throws -> ObjectTable.Locator
    {
        guard let loc = objectTable.locators[handle], loc.owner == nil || loc.owner == caller else {
            throw PKCS11Error(rv: invalid, function: function)
        }
        return loc
    }

    /// The backend handle of a daemon handle in the current login state.
    func resolve(
        _ handle: UInt64, _ s: SessionHandle, caller: CallerID, function: String,
        invalid: ReturnValue = .objectHandleInvalid
    ) throws -> ObjectHandle {
        let loc = try locator(handle, caller: caller, function: function, invalid: invalid)
        func matches(_ h: ObjectHandle) -> Bool {
            guard var bytes = identity(s, h)?.bytes else { return false }
            if let owner = loc.owner { bytes += Array(owner.rawValue.utf8) }
            return bytes == loc.identity
        }
        // Within one login state backend handles stay put: checked once per epoch.
        if loc.checkedEpoch == loginEpoch { return loc.backend }
        if matches(loc.backend) {
            objectTable.locators[handle]?.checkedEpoch = loginEpoch
            return loc.backend
        }
        for h in try module.findObjects(s, matching: loc.template, limit: 1000) where matches(h) {
            objectTable.locators[handle]?.backend = h
            objectTable.locators[handle]?.checkedEpoch = loginEpoch
            return h
        }
        throw PKCS11Error(rv: invalid, function: function)
    }

    func forgetObject(_ handle: UInt64) {
        if let loc = objectTable.locators.removeValue(forKey: handle) { objectTable.byIdentity[loc.identity] = nil }
        handleKeyIDs.withLock { $0[handle] = nil }
    }

    /// Forgets every handle (the token was swapped or initialised).
    func resetObjects() {
        // Numbering goes on: a program may still hold a handle of the old token's objects,
        // and it must not name one of the new token's (issue 13, handles never reused).
        let next = objectTable.next
        objectTable = ObjectTable()
        objectTable.next = next
        resolvedKeys = [:]
        handleKeyIDs.withLock { $0 = [:] }
    }

    /// The CKA_ID behind a daemon handle as last seen, from any thread (polkit details).
    func knownKeyID(_ handle: UInt64) -> [UInt8]? { handleKeyIDs.withLock { $0[handle] } }

    /// C_SetAttributeValue. The object keeps its handle (issue 13 §3): its locator takes the
    /// new identity (label, id), and its snapshot goes.
    func setAttributes(_ s: SessionHandle, _ handle: UInt64, _ template: [Attribute], caller: CallerID) throws {
        let backend = try resolve(handle, s, caller: caller, function: "C_SetAttributeValue")
        try module.setAttributes(s, backend, template)
        guard var loc = objectTable.locators[handle], let found = identity(s, backend) else {
            forgetObject(handle)
            return
        }
        objectTable.byIdentity[loc.identity] = nil
        loc.identity = found.bytes + (loc.owner.map { Array($0.rawValue.utf8) } ?? [])
        loc.template = [AttributeType.class, .id, .label, .keyType].compactMap { t in found.attrs[t].map { Attribute(t, $0) } }
        loc.isPrivate = found.attrs[.private]?.pkcs11Bool ?? false
        loc.backend = backend
        loc.checkedEpoch = loginEpoch
        loc.snapshot = nil
        objectTable.locators[handle] = loc
        objectTable.catalogue = nil
        resolvedKeys = [:]
        objectTable.byIdentity[loc.identity] = handle
        handleKeyIDs.withLock { $0[handle] = found.attrs[.id] }
    }
}

/// A 64-bit FNV-1a digest: tells object values apart in identities, not a security measure.
private func fnv1a(_ bytes: [UInt8]) -> [UInt8] {
    var h: UInt64 = 0xcbf2_9ce4_8422_2325
    for b in bytes {
        h ^= UInt64(b)
        h = h &* 0x100_0000_01b3
    }
    return withUnsafeBytes(of: h.littleEndian) { Array($0) }
}
