import DBusKit
import PKCS11Kit
import PinPolicy

/// Token1, one object per backend slot: its properties as the slot shows them, its keys,
/// sessions, and SignOnce.
extension PincacheService {
    func tokenInterface(_ token: TokenContext) -> ExportedInterface {
        ExportedInterface(
            PincacheInterfaces.token,
            methods: [
                "OpenSession": { [weak self] call in
                    guard let self else { return }
                    self.withCaller(call) { info in self.openSession(call, info, token) }
                },
                "ListKeys": { [weak self] call in
                    guard let self else { return }
                    self.withCaller(call) { info in
                        self.onWorker(token, call, caller: info.id, { try token.listKeys() }) { keys in
                            let settings = self.registry.lookup(info.id.rawValue)?.settings ?? info.settings
                            return [.array(elementSignature: "a{sv}", keys.map { self.encodeKey($0, settings: settings) })]
                        }
                    }
                },
                "SignOnce": { [weak self] call in
                    guard let self else { return }
                    let pin: SecretPIN
                    switch self.readPIN(call, at: 0) {
                    case .success(let p): pin = p
                    case .failure(let e): return call.reply(error: e)
                    }
                    switch self.operationArguments(call, first: 1, use: .sign) {
                    case .failure(let e): call.reply(error: e)
                    case .success(let (keyID, mechanism, data)):
                        self.withCaller(call) { info in
                            self.submitPIN(
                                [.login], Requester(info: info, interactive: call.allowsInteractiveAuthorization), token,
                                operation: "sign-once", keyID: keyID, inline: false, denied: { call.reply(error: $0.dbusError) },
                                { try token.signOnce(caller: info.id, keyID: keyID, mechanism: mechanism, data: data, pin: pin) }
                            ) { call.reply($0) { [.bytes($0)] } }
                        }
                    }
                },
            ],
            properties: { name in Self.tokenProperty(name, token.snapshot, token) })
    }

    /// A Token1 property as seen in `s` (the current snapshot, or an old one for change detection).
    static func tokenProperty(_ name: String, _ s: TokenSnapshot, _ token: TokenContext) -> DBusValue? {
        let info = s.info
        switch name {
        case "Label": return .string(info?.label ?? "")
        case "Manufacturer": return .string(info?.manufacturer ?? "")
        case "Model": return .string(info?.model ?? "")
        case "Serial": return .string(info?.serialNumber ?? "")
        case "SlotDescription": return .string(s.slotDescription)
        case "Present": return .boolean(s.present)
        case "Recognized": return .boolean(s.recognized)
        case "Kind": return .string(s.removable ? "smartcard" : "software")
        case "Module": return .string(token.backend.path)
        case "ProtectedAuthenticationPath": return .boolean(info?.protectedAuthenticationPath ?? false)
        case "PinMinLength": return .uint32(UInt32(clamping: info?.minPinLength ?? 0))
        case "PinMaxLength": return .uint32(UInt32(clamping: info?.maxPinLength ?? 0))
        case "UserPinCountLow": return .boolean(info?.userPinCountLow ?? false)
        case "UserPinFinalTry": return .boolean(info?.userPinFinalTry ?? false)
        case "UserPinLocked": return .boolean(info?.userPinLocked ?? false)
        case "PinTriesLeft":
            guard let info else { return .int32(-1) }
            return .int32(info.userPinLocked ? 0 : info.userPinFinalTry ? 1 : -1)
        case "LockedBy": return .vardict(token.lockedBy.withLock { $0 }?.properties ?? [:])
        default: return nil
        }
    }

    func encodeKey(_ k: KeyRecord, settings: Settings) -> DBusValue {
        let always = k.backendAlwaysAuthenticate || (k.canSign && settings.requiresFreshPIN(keyUsage: k.keyUsage))
        return .vardict([
            "Id": .bytes(k.id),
            "Label": .string(k.label),
            "KeyType": .string(k.keyType),
            "Bits": .uint32(k.bits),
            "CanSign": .boolean(k.canSign),
            "CanDecrypt": .boolean(k.canDecrypt),
            "KeyUsage": .uint32(k.keyUsage ?? 0),
            "AlwaysAuthenticate": .boolean(always),
            "Certificate": .bytes(k.certificate),
        ])
    }

    /// Emits what a refresh changed: PropertiesChanged, and Inserted/Removed on presence flips.
    func tokenChanged(_ token: TokenContext, _ old: TokenSnapshot, _ new: TokenSnapshot) {
        var changed: [String: DBusValue] = [:]
        for property in PincacheInterfaces.token.properties where property.emitsChanged == .emits {
            let before = Self.tokenProperty(property.name, old, token)
            let after = Self.tokenProperty(property.name, new, token)
            if before != after, let after { changed[property.name] = after }
        }
        // A slot not yet exported announces itself when it is (rescanSlots).
        guard !changed.isEmpty, token.published.load(ordering: .acquiring) else { return }
        connection.emitPropertiesChanged(path: token.path, interface: PincacheInterfaces.token.name, changed: changed)
        if old.present != new.present {
            emitPresence(token, present: new.present)
            Log.info("token \(token.id): card \(new.present ? "inserted" : "removed") (\(new.slotDescription))", event: new.present ? .cardInserted : .cardRemoved)
        }
    }
}
