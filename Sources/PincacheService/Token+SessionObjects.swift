import PKCS11Kit
import PinPolicy

/// Private session objects in caching mode (issue 13). PKCS#11's C_Logout destroys the
/// application's private session objects, and a caching-mode bracket logs the backend out
/// after every operation, so a private key an application generates, unwraps or derives into
/// its session would be gone before it could use it, though the application never logged out.
/// Such objects are therefore made non-private at the backend and *kept private* by the
/// daemon: they are the caller's alone (every session object is: ObjectTable), CKA_PRIVATE
/// reads TRUE, searches by CKA_PRIVATE see them as private, and they are destroyed when the
/// caller's login ends — when the token would have destroyed them.
extension TokenContext {
    /// The template to send for a new session object of `caller`, and whether the object is
    /// kept private. Only a caching-mode login changes anything: without a login a private
    /// object cannot be made at all, and a held login keeps them as the token does. A missing
    /// CKA_PRIVATE counts as TRUE for private and secret keys (SoftHSM's and most tokens'
    /// default), as FALSE for anything else.
    func sessionObjectTemplate(_ template: [Attribute], caller: CallerID, impliedClass: ObjectClass? = nil)
        -> (template: [Attribute], keptPrivate: Bool)
    {
        let state = policy.withLock { $0.state(of: caller) }
        guard state.cachedPIN, !state.holdsLogin else { return (template, false) }
        if template.first(where: { $0.type == .token })?.value.pkcs11Bool == true { return (template, false) }
        let objectClass = template.first(where: { $0.type == .class })?.value.pkcs11ULong ?? impliedClass?.rawValue
        let keyClasses = [ObjectClass.privateKey.rawValue, ObjectClass.secretKey.rawValue]
        let wantsPrivate =
            template.first(where: { $0.type == .private })?.value.pkcs11Bool
            ?? objectClass.map(keyClasses.contains) ?? false
        guard wantsPrivate else { return (template, false) }
        return (template.filter { $0.type != .private } + [Attribute(.private, [0])], true)
    }

    /// C_CopyObject's template for a copy of `handle`, and whether the copy is kept private. A
    /// kept-private original is not private at the backend, so its copy would not be either:
    /// copied into the session it is kept private in turn; copied onto the token it is made
    /// private there (else a private key of the caller's would become a public token object,
    /// usable by anyone). Making it public is refused, as a token refuses to make a private
    /// object's copy public (SoftHSM: CKR_TEMPLATE_INCONSISTENT).
    func copyTemplate(_ template: [Attribute], of handle: UInt64) throws -> (template: [Attribute], keptPrivate: Bool) {
        guard objectTable.locators[handle]?.keptPrivate == true else { return (template, false) }
        let others = template.filter { $0.type != .private }
        switch (template.first(where: { $0.type == .private })?.value.pkcs11Bool,
                template.first(where: { $0.type == .token })?.value.pkcs11Bool) {
        case (false?, _): throw PKCS11Error(rv: .templateInconsistent, function: "C_CopyObject")
        case (_, true?): return (others + [Attribute(.private, [1])], false)
        default: return (others, true)
        }
    }

    /// registerCreated, remembering that the object is kept private.
    func registerCreated(_ s: SessionHandle, _ h: ObjectHandle, caller: CallerID, session: UInt64, keptPrivate: Bool)
        throws -> UInt64
    {
        let handle = try registerCreated(s, h, caller: caller, session: session)
        if keptPrivate { objectTable.locators[handle]?.keptPrivate = true }
        return handle
    }

    /// Worker: the caller's login ended, and with it its kept-private session objects.
    func destroyKeptPrivate(of caller: CallerID) {
        for (handle, loc) in objectTable.locators where loc.owner == caller && loc.keptPrivate {
            if let session = loc.creatingSession, let s = rawSessions[session],
                let backend = try? resolve(handle, s, caller: caller, function: "C_DestroyObject")
            {
                try? module.destroyObject(s, backend)
            }
            forgetObject(handle)
        }
    }

    /// A search's CKA_PRIVATE as the caller means it, applied to what the backend found: kept
    /// private objects are private. Returns the template for the backend (without CKA_PRIVATE
    /// TRUE, which would miss them) and the filter for its answer.
    func privacyFilter(_ template: [Attribute], caller: CallerID) -> ([Attribute], (UInt64) -> Bool) {
        guard let wanted = template.first(where: { $0.type == .private })?.value.pkcs11Bool,
            objectTable.locators.values.contains(where: { $0.owner == caller && $0.keptPrivate })
        else { return (template, { _ in true }) }
        let backendTemplate = wanted ? template.filter { $0.type != .private } : template
        return (
            backendTemplate,
            { [self] handle in
                guard let loc = objectTable.locators[handle] else { return false }
                return (loc.isPrivate || loc.keptPrivate) == wanted
            }
        )
    }
}
