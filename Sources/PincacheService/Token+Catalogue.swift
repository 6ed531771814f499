import PKCS11Kit
import PinPolicy

/// The token's private objects as a login last listed them: their daemon handles, each with its
/// snapshot (the non-sensitive attributes, TokenContext.snapshotTypes).
struct PrivateCatalogue {
    var handles: [UInt64]
    /// When it was listed (monotonic nanoseconds).
    var taken: UInt64
}

/// Searches without a login (issue 14 §2-§3). A caching-mode search used to cost a bracket,
/// because the backend shows private objects only to a logged-in session. Instead, whenever
/// the backend is logged in anyway (a caching login's verification, any bracket) and the
/// catalogue is a second old or missing, the token's private objects are listed and described; a
/// caller holding a cached PIN is then answered from that catalogue for its private objects
/// and by the backend, without a login, for its public ones. The catalogue goes with every
/// change made through the daemon and every token change; a change made outside the daemon
/// shows at the next bracket that is a second or more after the last listing.
extension TokenContext {
    /// How old the catalogue may get before a bracket lists the private objects again.
    static let catalogueRefreshNanoseconds: UInt64 = 1_000_000_000

    /// Lists and describes the token's private objects. Worker, inside a user login only.
    func recordPrivateObjects(_ s: SessionHandle, caller: CallerID) {
        objectTable.catalogue = nil
        guard let found = try? module.findObjects(s, matching: [Attribute(.private, [1]), Attribute(.token, [1])], limit: 10_000)
        else { return }
        var handles: [UInt64] = []
        for h in found {
            guard let handle = try? register(s, h, caller: caller), objectTable.locators[handle]?.isPrivate == true,
                objectTable.locators[handle]?.owner == nil,
                let described = try? module.attributeValues(s, h, Self.snapshotTypes)
            else { return }  // an object that cannot be described: no catalogue, searches bracket
            objectTable.locators[handle]?.snapshot = Dictionary(
                described.map { ($0.type, $0) }, uniquingKeysWith: { a, _ in a })
            handles.append(handle)
        }
        objectTable.catalogue = PrivateCatalogue(handles: handles, taken: Self.now())
    }

    /// At the end of a caching-mode bracket, still logged in: a catalogue a second old or
    /// missing is listed again.
    func refreshCatalogueIfOld(_ s: SessionHandle, caller: CallerID) {
        if let c = objectTable.catalogue, Self.now() &- c.taken < Self.catalogueRefreshNanoseconds { return }
        recordPrivateObjects(s, caller: caller)
    }

    /// The catalogue's private objects that match `template` (byte equality, as C_FindObjects
    /// compares); nil when it cannot tell: no catalogue, or the template names an attribute
    /// that is not described or is sensitive on some object.
    func catalogueMatches(_ template: [Attribute]) -> [UInt64]? {
        guard let catalogue = objectTable.catalogue else { return nil }
        var out: [UInt64] = []
        for handle in catalogue.handles {
            guard let snapshot = objectTable.locators[handle]?.snapshot else { return nil }
            var matches = true
            for a in template {
                guard let r = snapshot[a.type] else { return nil }
                if r.status == .attributeSensitive { return nil }
                if r.status != .ok || r.value != a.value { matches = false }
            }
            if matches { out.append(handle) }
        }
        return out
    }

    /// C_FindObjects for a caller holding a cached PIN, without a backend login: public objects
    /// from the backend, private ones from the catalogue. nil when the catalogue cannot answer,
    /// or the caller has private session objects of its own (only a login shows those).
    func findWithoutLogin(caller: CallerID, settings: Settings, _ s: SessionHandle, template: [Attribute], max: Int)
        throws -> [UInt64]?
    {
        let wantsPrivate = template.first { $0.type == .private }?.value.pkcs11Bool
        var privatePart: [UInt64] = []
        if wantsPrivate != false {
            guard let matched = catalogueMatches(template) else { return nil }
            privatePart = matched
        }
        if objectTable.locators.values.contains(where: { $0.owner == caller && $0.isPrivate }) { return nil }
        // The policy's verdict as for a bracket (expired PIN, token busy, PIN held back), but no
        // PIN is presented: the catalogue was read in an earlier login.
        return try withPrivateAccess(
            caller: caller, settings: settings, kind: .readPrivate, requiresFreshPIN: false, freshPIN: nil,
            alwaysAuthenticate: false, session: s, withoutLogin: true
        ) { _ in
            var out: [UInt64] = []
            if wantsPrivate != true {
                var publicTemplate = template.filter { $0.type != .private }
                publicTemplate.append(Attribute(.private, [0]))
                for h in try module.findObjects(s, matching: publicTemplate, limit: max) {
                    if let handle = try register(s, h, caller: caller) { out.append(handle) }
                }
            }
            return Array((out + privatePart).prefix(max))
        }
    }
}
