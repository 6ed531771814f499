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
        /// The key in `byIdentity`: `base`, or for the n-th of several objects that look the
        /// same (twins), `base` with n appended.
        var identity: [UInt8]
        /// The attributes that identify the object (TokenContext.identityTypes), as bytes.
        var base: [UInt8]
        /// Among twins (issue 13 §2: distinct objects whose identifying attributes are all
        /// equal), this one's place in the backend's search order; 0 for any other object.
        var ordinal = 0
        var twins = false
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
        /// A private session object made non-private at the backend so that a caching-mode
        /// bracket's logout does not destroy it (Token+SessionObjects.swift).
        var keptPrivate = false

        var keyID: [UInt8]? { template.first { $0.type == .id }?.value }
        var objectClass: UInt? { template.first { $0.type == .class }?.value.pkcs11ULong }
        var keyType: UInt? { template.first { $0.type == .keyType }?.value.pkcs11ULong }
    }
    var locators: [UInt64: Locator] = [:]
    var byIdentity: [[UInt8]: UInt64] = [:]
    var next: UInt64 = 1
    /// The token's private objects as a login last listed them (Token+Catalogue.swift).
    var catalogue: PrivateCatalogue?
    static let capacity = 100_000
    /// What a locator searches by when its backend handle is stale: every identity
    /// attribute but CKA_VALUE, so a token key that is the only match is the object.
    static let templateTypes: [AttributeType] = [.class, .id, .label, .keyType, .token, .private]

    static func key(_ base: [UInt8], ordinal: Int) -> [UInt8] {
        ordinal == 0 ? base : base + [0xff, 0x23] + withUnsafeBytes(of: UInt64(ordinal).littleEndian) { Array($0) }
    }

    /// Gives `handle` the first free place among the objects that look like `base`.
    mutating func attach(_ handle: UInt64, base: [UInt8]) {
        var ordinal = 0
        while byIdentity[Self.key(base, ordinal: ordinal)] != nil { ordinal += 1 }
        locators[handle]?.base = base
        locators[handle]?.ordinal = ordinal
        locators[handle]?.identity = Self.key(base, ordinal: ordinal)
        byIdentity[Self.key(base, ordinal: ordinal)] = handle
        if ordinal > 0 { markTwins(base) }
    }

    mutating func markTwins(_ base: [UInt8]) {
        var ordinal = 0
        while let h = byIdentity[Self.key(base, ordinal: ordinal)] {
            locators[h]?.twins = true
            ordinal += 1
        }
    }

    /// Takes `handle` out of `byIdentity`; its twins after it move up one place, as they
    /// stand in the backend's search order once it is gone.
    mutating func detach(_ handle: UInt64) {
        guard let loc = locators[handle], byIdentity[loc.identity] == handle else { return }
        byIdentity[loc.identity] = nil
        var ordinal = loc.ordinal + 1
        while let next = byIdentity[Self.key(loc.base, ordinal: ordinal)] {
            byIdentity[Self.key(loc.base, ordinal: ordinal)] = nil
            byIdentity[Self.key(loc.base, ordinal: ordinal - 1)] = next
            locators[next]?.ordinal = ordinal - 1
            locators[next]?.identity = Self.key(loc.base, ordinal: ordinal - 1)
            ordinal += 1
        }
    }
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
        // Objects that look alike are told apart by the order the backend lists them in: the
        // first one seen in this login state takes place 0, the next place 1... A place
        // already taken in this login state by another backend object is a twin's; a place
        // last seen in an earlier one is this object's (backend handles change with logins).
        // A new object never takes an existing place: that handle is another object's.
        var ordinal = 0
        while let existing = objectTable.byIdentity[ObjectTable.key(bytes, ordinal: ordinal)] {
            let loc = objectTable.locators[existing]!
            if loc.checkedEpoch == loginEpoch {
                if loc.backend == h { return existing }
            } else if session == nil {
                objectTable.locators[existing]?.backend = h
                objectTable.locators[existing]?.checkedEpoch = loginEpoch
                return existing
            }
            ordinal += 1
        }
        if !isTokenObject && session == nil { return nil }
        guard objectTable.locators.count < ObjectTable.capacity else {
            throw PKCS11Error(rv: .deviceMemory, function: "C_FindObjects")
        }
        var template: [Attribute] = []
        for t in ObjectTable.templateTypes {
            if let v = a[t] { template.append(Attribute(t, v)) }
        }
        let handle = objectTable.next
        objectTable.next += 1
        objectTable.locators[handle] = ObjectTable.Locator(
            backend: h, identity: bytes, base: bytes, template: template, isPrivate: a[.private]?.pkcs11Bool ?? false,
            owner: isTokenObject ? nil : caller, creatingSession: isTokenObject ? nil : session,
            checkedEpoch: loginEpoch)
        objectTable.attach(handle, base: bytes)
        if objectTable.locators[handle]!.ordinal > 0 { resyncTwins(bytes, s, newcomer: handle) }
        if let id = a[.id] { handleKeyIDs.withLock { $0[handle] = id } }
        return handle
    }

    /// Places the objects that look like `base` in the backend's search order, right after
    /// `newcomer` (made, or changed to look like them) joined them: the others keep the order
    /// they had, the newcomer takes its own place (the backend's order is not the order of
    /// creation). Without an answer that accounts for every one of them, places stay as they
    /// were.
    private func resyncTwins(_ base: [UInt8], _ s: SessionHandle, newcomer: UInt64) {
        var members: [UInt64] = []
        while let h = objectTable.byIdentity[ObjectTable.key(base, ordinal: members.count)] { members.append(h) }
        guard members.count > 1, let newcomerLocator = objectTable.locators[newcomer] else { return }
        let owner = newcomerLocator.owner.map { Array($0.rawValue.utf8) } ?? []
        guard let found = try? module.findObjects(s, matching: newcomerLocator.template, limit: 1000) else { return }
        let alike = found.filter { h in identity(s, h).map { $0.bytes + owner } == base }
        guard alike.count == members.count, let place = alike.firstIndex(of: newcomerLocator.backend) else { return }
        var rest = alike
        rest.remove(at: place)
        var assignment = [(newcomer, place, newcomerLocator.backend)]
        for (i, member) in members.filter({ $0 != newcomer }).enumerated() {
            assignment.append((member, alike.firstIndex(of: rest[i])!, rest[i]))
        }
        for ordinal in members.indices { objectTable.byIdentity[ObjectTable.key(base, ordinal: ordinal)] = nil }
        for (member, ordinal, backend) in assignment {
            objectTable.locators[member]?.ordinal = ordinal
            objectTable.locators[member]?.identity = ObjectTable.key(base, ordinal: ordinal)
            objectTable.locators[member]?.backend = backend
            objectTable.locators[member]?.checkedEpoch = loginEpoch
            objectTable.locators[member]?.twins = true
            objectTable.byIdentity[ObjectTable.key(base, ordinal: ordinal)] = member
        }
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
            return bytes == loc.base
        }
        // Within one login state backend handles stay put: checked once per epoch.
        if loc.checkedEpoch == loginEpoch { return loc.backend }
        if loc.twins {
            // Which of the look-alikes is this one: its place in the backend's order.
            let alike = try module.findObjects(s, matching: loc.template, limit: 1000).filter(matches)
            guard loc.ordinal < alike.count else { throw PKCS11Error(rv: invalid, function: function) }
            objectTable.locators[handle]?.backend = alike[loc.ordinal]
            objectTable.locators[handle]?.checkedEpoch = loginEpoch
            return alike[loc.ordinal]
        }
        if matches(loc.backend) {
            objectTable.locators[handle]?.checkedEpoch = loginEpoch
            return loc.backend
        }
        let candidates = try module.findObjects(s, matching: loc.template, limit: 1000)
        // A token object other than a data object or certificate is identified by the template
        // alone (issue 14 §2): its only match needs no second look. Session objects may have a
        // look-alike of another caller's; values tell data objects and certificates apart.
        let valueless = loc.objectClass.map { $0 != ObjectClass.data.rawValue && $0 != ObjectClass.certificate.rawValue } ?? false
        if candidates.count == 1, loc.owner == nil, valueless, loc.template.contains(where: { $0.type == .token }) {
            objectTable.locators[handle]?.backend = candidates[0]
            objectTable.locators[handle]?.checkedEpoch = loginEpoch
            return candidates[0]
        }
        for h in candidates where matches(h) {
            objectTable.locators[handle]?.backend = h
            objectTable.locators[handle]?.checkedEpoch = loginEpoch
            return h
        }
        throw PKCS11Error(rv: invalid, function: function)
    }

    func forgetObject(_ handle: UInt64) {
        objectTable.detach(handle)
        objectTable.locators[handle] = nil
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
        objectTable.detach(handle)
        let base = found.bytes + (loc.owner.map { Array($0.rawValue.utf8) } ?? [])
        loc.template = ObjectTable.templateTypes.compactMap { t in found.attrs[t].map { Attribute(t, $0) } }
        loc.isPrivate = found.attrs[.private]?.pkcs11Bool ?? false
        loc.backend = backend
        loc.checkedEpoch = loginEpoch
        loc.snapshot = nil
        loc.twins = false
        objectTable.locators[handle] = loc
        objectTable.catalogue = nil
        resolvedKeys = [:]
        objectTable.attach(handle, base: base)
        if objectTable.locators[handle]!.ordinal > 0 { resyncTwins(base, s, newcomer: handle) }
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
