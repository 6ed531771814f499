import CPKCS11
import CryptokiWire

// The PKCS#11 entry points, exported under C names the function table in
// CPincacheProxy/proxy.c points at. Each one only lists its arguments: `entry` finds the
// initialised instance and turns every CKError into a return value, so nothing throws or
// traps across the C boundary.

/// Runs `body` against the initialised instance; CKR_CRYPTOKI_NOT_INITIALIZED without one.
@inline(__always)
private func entry(_ body: (Library) throws(CKError) -> Void) -> CK_RV {
    guard let library = Library.current else { return CKR_CRYPTOKI_NOT_INITIALIZED }
    do {
        try body(library)
        return CKR_OK
    } catch {
        return error.rv
    }
}

/// Writes a count-and-array answer with the length-query convention.
private func deliverList<T>(_ items: [T], to buffer: UnsafeMutablePointer<T>?,
                            count: UnsafeMutablePointer<CK_ULONG>) throws(CKError) {
    let needed = CK_ULONG(items.count)
    guard let buffer else {
        count.pointee = needed
        return
    }
    guard count.pointee >= needed else {
        count.pointee = needed
        throw .bufferTooSmall
    }
    for (index, item) in items.enumerated() { buffer[index] = item }
    count.pointee = needed
}

private func notSupported() -> CK_RV {
    Library.current == nil ? CKR_CRYPTOKI_NOT_INITIALIZED : CKR_FUNCTION_NOT_SUPPORTED
}

// MARK: general

@_cdecl("pincache_C_Initialize")
func pincacheInitialize(_ initArgs: UnsafeMutableRawPointer?) -> CK_RV {
    var mayCreateThreads = true
    if let initArgs {
        // SAFETY: PKCS#11 says a non-NULL argument points at a CK_C_INITIALIZE_ARGS.
        let args = initArgs.assumingMemoryBound(to: CK_C_INITIALIZE_ARGS.self).pointee
        guard args.pReserved == nil else { return CKR_ARGUMENTS_BAD }
        let supplied = [args.CreateMutex != nil, args.DestroyMutex != nil, args.LockMutex != nil, args.UnlockMutex != nil]
        guard supplied.allSatisfy({ $0 }) || !supplied.contains(true) else { return CKR_ARGUMENTS_BAD }
        // Application mutexes cannot protect libdbus's own locking: only OS locking will do.
        if supplied[0] && args.flags & CK_FLAGS(CKF_OS_LOCKING_OK) == 0 { return CKR_CANT_LOCK }
        mayCreateThreads = args.flags & CK_FLAGS(CKF_LIBRARY_CANT_CREATE_OS_THREADS) == 0
    }
    return Library.initialize(mayCreateThreads: mayCreateThreads)
}

@_cdecl("pincache_C_Finalize")
func pincacheFinalize(_ reserved: UnsafeMutableRawPointer?) -> CK_RV {
    guard reserved == nil else { return Library.current == nil ? CKR_CRYPTOKI_NOT_INITIALIZED : CKR_ARGUMENTS_BAD }
    return Library.finalize()
}

@_cdecl("pincache_C_GetInfo")
func pincacheGetInfo(_ info: UnsafeMutablePointer<CK_INFO>?) -> CK_RV {
    entry { _ throws(CKError) in
        guard let info else { throw .argumentsBad }
        var value = CK_INFO()
        value.cryptokiVersion = CK_VERSION(major: 2, minor: 40)
        withUnsafeMutableBytes(of: &value.manufacturerID) { Codec.pad("pincache", into: $0) }
        withUnsafeMutableBytes(of: &value.libraryDescription) { Codec.pad("pincache PKCS#11 proxy", into: $0) }
        value.flags = 0
        value.libraryVersion = CK_VERSION(major: 0, minor: 1)
        info.pointee = value
    }
}

// MARK: slots and tokens

@_cdecl("pincache_C_GetSlotList")
func pincacheGetSlotList(_ tokenPresent: CK_BBOOL, _ list: UnsafeMutablePointer<CK_SLOT_ID>?,
                         _ count: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
    entry { library throws(CKError) in
        guard let count else { throw .argumentsBad }
        var slots: [CK_SLOT_ID]
        do throws(CKError) {
            slots = try library.refreshSlots()
        } catch where error == .deviceRemoved {
            // No daemon: no slots, rather than failing every application that loads us.
            slots = []
        }
        if tokenPresent != 0 {
            let present = library.state.withLock { s in Set(s.snapshots.filter(\.value.tokenPresent).map(\.key)) }
            slots = slots.filter(present.contains)
        }
        try deliverList(slots, to: list, count: count)
    }
}

@_cdecl("pincache_C_GetSlotInfo")
func pincacheGetSlotInfo(_ slot: CK_SLOT_ID, _ info: UnsafeMutablePointer<CK_SLOT_INFO>?) -> CK_RV {
    entry { library throws(CKError) in
        let snapshot = try library.snapshot(slot)
        guard let info else { throw .argumentsBad }
        info.pointee = snapshot.slotInfo
    }
}

@_cdecl("pincache_C_GetTokenInfo")
func pincacheGetTokenInfo(_ slot: CK_SLOT_ID, _ info: UnsafeMutablePointer<CK_TOKEN_INFO>?) -> CK_RV {
    entry { library throws(CKError) in
        let snapshot = try library.snapshot(slot)
        guard let info else { throw .argumentsBad }
        guard snapshot.tokenPresent else { throw CKError(CKR_TOKEN_NOT_PRESENT) }
        info.pointee = snapshot.tokenInfo
    }
}

@_cdecl("pincache_C_GetMechanismList")
func pincacheGetMechanismList(_ slot: CK_SLOT_ID, _ list: UnsafeMutablePointer<CK_MECHANISM_TYPE>?,
                              _ count: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
    entry { library throws(CKError) in
        _ = try library.slotName(slot)
        guard let count else { throw .argumentsBad }
        // A length query refreshes; the call with a buffer that follows reuses it.
        let mechanisms = try library.mechanisms(slot, refresh: list == nil)
        try deliverList(mechanisms.map(\.type), to: list, count: count)
    }
}

@_cdecl("pincache_C_GetMechanismInfo")
func pincacheGetMechanismInfo(_ slot: CK_SLOT_ID, _ type: CK_MECHANISM_TYPE,
                              _ info: UnsafeMutablePointer<CK_MECHANISM_INFO>?) -> CK_RV {
    entry { library throws(CKError) in
        _ = try library.slotName(slot)
        guard let info else { throw .argumentsBad }
        guard let entry = try library.mechanisms(slot).first(where: { $0.type == type }) else {
            throw CKError(CKR_MECHANISM_INVALID)
        }
        info.pointee = CK_MECHANISM_INFO(ulMinKeySize: entry.minKeySize, ulMaxKeySize: entry.maxKeySize, flags: entry.flags)
    }
}

@_cdecl("pincache_C_InitToken")
func pincacheInitToken(_ slot: CK_SLOT_ID, _ pin: UnsafeMutablePointer<CK_UTF8CHAR>?, _ pinLength: CK_ULONG,
                       _ label: UnsafeMutablePointer<CK_UTF8CHAR>?) -> CK_RV {
    entry { library throws(CKError) in
        let name = try library.slotName(slot)
        guard let label else { throw .argumentsBad }
        var soPin = try Codec.pin(pin, pinLength)
        defer { Codec.wipe(&soPin) }
        // SAFETY: C_InitToken's label is exactly 32 bytes, blank-padded.
        guard let labelText = String(validating: UnsafeBufferPointer(start: label, count: 32), as: UTF8.self),
              !labelText.utf8.contains(0) else { throw .argumentsBad }
        _ = try library.call(Calls.initToken, [.string(name), .bytes(soPin), .string(labelText)])
        library.state.withLock { $0.mechanisms[slot] = nil }
    }
}

@_cdecl("pincache_C_InitPIN")
func pincacheInitPIN(_ session: CK_SESSION_HANDLE, _ pin: UnsafeMutablePointer<CK_UTF8CHAR>?, _ length: CK_ULONG) -> CK_RV {
    entry { library throws(CKError) in
        try library.withSession(session) { s throws(CKError) in
            var newPin = try Codec.pin(pin, length)
            defer { Codec.wipe(&newPin) }
            _ = try library.call(Calls.initPIN, on: s, [.bytes(newPin)])
        }
    }
}

@_cdecl("pincache_C_SetPIN")
func pincacheSetPIN(_ session: CK_SESSION_HANDLE, _ old: UnsafeMutablePointer<CK_UTF8CHAR>?, _ oldLength: CK_ULONG,
                    _ new: UnsafeMutablePointer<CK_UTF8CHAR>?, _ newLength: CK_ULONG) -> CK_RV {
    entry { library throws(CKError) in
        try library.withSession(session) { s throws(CKError) in
            var oldPin = try Codec.pin(old, oldLength)
            defer { Codec.wipe(&oldPin) }
            var newPin = try Codec.pin(new, newLength)
            defer { Codec.wipe(&newPin) }
            _ = try library.call(Calls.setPIN, on: s, [.bytes(oldPin), .bytes(newPin)])
        }
    }
}

// MARK: sessions

@_cdecl("pincache_C_OpenSession")
func pincacheOpenSession(_ slot: CK_SLOT_ID, _ flags: CK_FLAGS, _ application: UnsafeMutableRawPointer?,
                         _ notify: UnsafeMutableRawPointer?, _ handle: UnsafeMutablePointer<CK_SESSION_HANDLE>?) -> CK_RV {
    entry { library throws(CKError) in
        // Notification callbacks are never called: the proxy has no surrender events.
        _ = try library.slotName(slot)
        guard let handle else { throw .argumentsBad }
        guard flags & CK_FLAGS(CKF_SERIAL_SESSION) != 0 else { throw CKError(CKR_SESSION_PARALLEL_NOT_SUPPORTED) }
        handle.pointee = try library.openSession(slot: slot, flags: flags)
    }
}

@_cdecl("pincache_C_CloseSession")
func pincacheCloseSession(_ session: CK_SESSION_HANDLE) -> CK_RV {
    entry { library throws(CKError) in try library.closeSession(session) }
}

@_cdecl("pincache_C_CloseAllSessions")
func pincacheCloseAllSessions(_ slot: CK_SLOT_ID) -> CK_RV {
    entry { library throws(CKError) in
        _ = try library.slotName(slot)
        var first: CKError?
        for handle in library.sessions(on: slot) {
            do throws(CKError) { try library.closeSession(handle) } catch { first = first ?? error }
        }
        if let first, first.rv != CKR_SESSION_HANDLE_INVALID { throw first }
    }
}

@_cdecl("pincache_C_GetSessionInfo")
func pincacheGetSessionInfo(_ session: CK_SESSION_HANDLE, _ info: UnsafeMutablePointer<CK_SESSION_INFO>?) -> CK_RV {
    entry { library throws(CKError) in
        try library.withSession(session) { s throws(CKError) in
            guard let info else { throw .argumentsBad }
            // Asked every time: the caller's login state changes behind its back.
            let reply = try library.call(Calls.getSessionInfo, on: s, [])
            guard reply.count == 3, let state = reply[0].ulongValue, let flags = reply[1].ulongValue,
                  let deviceError = reply[2].ulongValue else { throw .deviceError }
            info.pointee = CK_SESSION_INFO(slotID: s.slot, state: CK_STATE(state), flags: CK_FLAGS(flags),
                                           ulDeviceError: CK_ULONG(deviceError))
        }
    }
}

@_cdecl("pincache_C_GetOperationState")
func pincacheGetOperationState(_ session: CK_SESSION_HANDLE, _ state: UnsafeMutablePointer<CK_BYTE>?,
                               _ length: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV { notSupported() }

@_cdecl("pincache_C_SetOperationState")
func pincacheSetOperationState(_ session: CK_SESSION_HANDLE, _ state: UnsafeMutablePointer<CK_BYTE>?, _ length: CK_ULONG,
                               _ encryptionKey: CK_OBJECT_HANDLE, _ authenticationKey: CK_OBJECT_HANDLE) -> CK_RV { notSupported() }

@_cdecl("pincache_C_Login")
func pincacheLogin(_ session: CK_SESSION_HANDLE, _ userType: CK_USER_TYPE, _ pin: UnsafeMutablePointer<CK_UTF8CHAR>?,
                   _ length: CK_ULONG) -> CK_RV {
    entry { library throws(CKError) in
        try library.withSession(session) { s throws(CKError) in
            var secret = try Codec.pin(pin, length)
            defer { Codec.wipe(&secret) }
            _ = try library.call(Calls.login, on: s, [.ulong(UInt64(userType)), .bytes(secret)])
        }
    }
}

@_cdecl("pincache_C_Logout")
func pincacheLogout(_ session: CK_SESSION_HANDLE) -> CK_RV {
    entry { library throws(CKError) in
        try library.withSession(session) { s throws(CKError) in _ = try library.call(Calls.logout, on: s, []) }
    }
}

// MARK: objects

@_cdecl("pincache_C_CreateObject")
func pincacheCreateObject(_ session: CK_SESSION_HANDLE, _ template: UnsafeMutablePointer<CK_ATTRIBUTE>?, _ count: CK_ULONG,
                          _ object: UnsafeMutablePointer<CK_OBJECT_HANDLE>?) -> CK_RV {
    entry { library throws(CKError) in
        try library.withSession(session) { s throws(CKError) in
            let encoded = try Codec.template(template, count)
            guard let object else { throw .argumentsBad }
            let reply = try library.call(Calls.createObject, on: s, [encoded])
            guard let handle = reply.first?.ulongValue else { throw .deviceError }
            object.pointee = CK_OBJECT_HANDLE(handle)
        }
    }
}

@_cdecl("pincache_C_CopyObject")
func pincacheCopyObject(_ session: CK_SESSION_HANDLE, _ source: CK_OBJECT_HANDLE, _ template: UnsafeMutablePointer<CK_ATTRIBUTE>?,
                        _ count: CK_ULONG, _ object: UnsafeMutablePointer<CK_OBJECT_HANDLE>?) -> CK_RV {
    entry { library throws(CKError) in
        try library.withSession(session) { s throws(CKError) in
            let encoded = try Codec.template(template, count)
            guard let object else { throw .argumentsBad }
            let reply = try library.call(Calls.copyObject, on: s, [.ulong(UInt64(source)), encoded])
            guard let handle = reply.first?.ulongValue else { throw .deviceError }
            object.pointee = CK_OBJECT_HANDLE(handle)
        }
    }
}

@_cdecl("pincache_C_DestroyObject")
func pincacheDestroyObject(_ session: CK_SESSION_HANDLE, _ object: CK_OBJECT_HANDLE) -> CK_RV {
    entry { library throws(CKError) in
        try library.withSession(session) { s throws(CKError) in
            _ = try library.call(Calls.destroyObject, on: s, [.ulong(UInt64(object))])
        }
    }
}

@_cdecl("pincache_C_GetObjectSize")
func pincacheGetObjectSize(_ session: CK_SESSION_HANDLE, _ object: CK_OBJECT_HANDLE,
                           _ size: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV { notSupported() }

@_cdecl("pincache_C_GetAttributeValue")
func pincacheGetAttributeValue(_ session: CK_SESSION_HANDLE, _ object: CK_OBJECT_HANDLE,
                               _ template: UnsafeMutablePointer<CK_ATTRIBUTE>?, _ count: CK_ULONG) -> CK_RV {
    entry { library throws(CKError) in
        try library.getAttributes(session: session, object: object, template: template, count: count)
    }
}

@_cdecl("pincache_C_SetAttributeValue")
func pincacheSetAttributeValue(_ session: CK_SESSION_HANDLE, _ object: CK_OBJECT_HANDLE,
                               _ template: UnsafeMutablePointer<CK_ATTRIBUTE>?, _ count: CK_ULONG) -> CK_RV {
    entry { library throws(CKError) in
        try library.withSession(session) { s throws(CKError) in
            _ = try library.call(Calls.setAttributes, on: s, [.ulong(UInt64(object)), try Codec.template(template, count)])
        }
    }
}

@_cdecl("pincache_C_FindObjectsInit")
func pincacheFindObjectsInit(_ session: CK_SESSION_HANDLE, _ template: UnsafeMutablePointer<CK_ATTRIBUTE>?,
                             _ count: CK_ULONG) -> CK_RV {
    entry { library throws(CKError) in
        try library.withSession(session) { s throws(CKError) in
            guard s.found == nil else { throw .operationActive }
            let encoded = try Codec.template(template, count)
            let reply = try library.call(Calls.findObjects, on: s, [encoded, .ulong(UInt64(Caps.handles))])
            guard let all = reply.first?.arrayValues else { throw .deviceError }
            let handles = all.compactMap(\.ulongValue)
            guard handles.count == all.count else { throw .deviceError }
            s.found = handles.map { CK_OBJECT_HANDLE($0) }
            s.foundPosition = 0
        }
    }
}

@_cdecl("pincache_C_FindObjects")
func pincacheFindObjects(_ session: CK_SESSION_HANDLE, _ objects: UnsafeMutablePointer<CK_OBJECT_HANDLE>?,
                         _ maxCount: CK_ULONG, _ count: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
    entry { library throws(CKError) in
        try library.withSession(session) { s throws(CKError) in
            guard let found = s.found else { throw .operationNotInitialized }
            guard let count, let objects else { throw .argumentsBad }
            let n = min(found.count - s.foundPosition, Int(min(maxCount, CK_ULONG(Caps.handles))))
            for i in 0..<n { objects[i] = found[s.foundPosition + i] }
            s.foundPosition += n
            count.pointee = CK_ULONG(n)
        }
    }
}

@_cdecl("pincache_C_FindObjectsFinal")
func pincacheFindObjectsFinal(_ session: CK_SESSION_HANDLE) -> CK_RV {
    entry { library throws(CKError) in
        try library.withSession(session) { s throws(CKError) in
            guard s.found != nil else { throw .operationNotInitialized }
            s.found = nil
        }
    }
}

// MARK: encryption and decryption

@_cdecl("pincache_C_EncryptInit")
func pincacheEncryptInit(_ session: CK_SESSION_HANDLE, _ mechanism: UnsafeMutablePointer<CK_MECHANISM>?,
                         _ key: CK_OBJECT_HANDLE) -> CK_RV {
    entry { library throws(CKError) in try library.beginOperation(.encrypt, session: session, mechanism: mechanism, key: key) }
}

@_cdecl("pincache_C_Encrypt")
func pincacheEncrypt(_ session: CK_SESSION_HANDLE, _ data: UnsafeMutablePointer<CK_BYTE>?, _ length: CK_ULONG,
                     _ out: UnsafeMutablePointer<CK_BYTE>?, _ outLength: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
    entry { library throws(CKError) in
        try library.finishOperation(.encrypt, session: session, data: .single(UnsafePointer(data), length), output: out, outputLength: outLength)
    }
}

/// *Update of encrypt/decrypt: the input is kept and the whole output comes with the
/// final call (PKCS#11 lets a part produce no output), so it still costs one round trip.
private func updateWithoutOutput(_ kind: OperationKind, _ session: CK_SESSION_HANDLE, _ part: UnsafeMutablePointer<CK_BYTE>?,
                                 _ length: CK_ULONG, _ outLength: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
    entry { library throws(CKError) in
        guard let outLength else {
            try? library.withSession(session) { s in s.operations[kind] = nil }
            throw .argumentsBad
        }
        try library.updateOperation(kind, session: session, part: part, length: length)
        outLength.pointee = 0
    }
}

@_cdecl("pincache_C_EncryptUpdate")
func pincacheEncryptUpdate(_ session: CK_SESSION_HANDLE, _ part: UnsafeMutablePointer<CK_BYTE>?, _ length: CK_ULONG,
                           _ out: UnsafeMutablePointer<CK_BYTE>?, _ outLength: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
    updateWithoutOutput(.encrypt, session, part, length, outLength)
}

@_cdecl("pincache_C_EncryptFinal")
func pincacheEncryptFinal(_ session: CK_SESSION_HANDLE, _ out: UnsafeMutablePointer<CK_BYTE>?,
                          _ outLength: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
    entry { library throws(CKError) in
        try library.finishOperation(.encrypt, session: session, data: .accumulated, output: out, outputLength: outLength)
    }
}

@_cdecl("pincache_C_DecryptInit")
func pincacheDecryptInit(_ session: CK_SESSION_HANDLE, _ mechanism: UnsafeMutablePointer<CK_MECHANISM>?,
                         _ key: CK_OBJECT_HANDLE) -> CK_RV {
    entry { library throws(CKError) in try library.beginOperation(.decrypt, session: session, mechanism: mechanism, key: key) }
}

@_cdecl("pincache_C_Decrypt")
func pincacheDecrypt(_ session: CK_SESSION_HANDLE, _ data: UnsafeMutablePointer<CK_BYTE>?, _ length: CK_ULONG,
                     _ out: UnsafeMutablePointer<CK_BYTE>?, _ outLength: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
    entry { library throws(CKError) in
        try library.finishOperation(.decrypt, session: session, data: .single(UnsafePointer(data), length), output: out, outputLength: outLength)
    }
}

@_cdecl("pincache_C_DecryptUpdate")
func pincacheDecryptUpdate(_ session: CK_SESSION_HANDLE, _ part: UnsafeMutablePointer<CK_BYTE>?, _ length: CK_ULONG,
                           _ out: UnsafeMutablePointer<CK_BYTE>?, _ outLength: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
    updateWithoutOutput(.decrypt, session, part, length, outLength)
}

@_cdecl("pincache_C_DecryptFinal")
func pincacheDecryptFinal(_ session: CK_SESSION_HANDLE, _ out: UnsafeMutablePointer<CK_BYTE>?,
                          _ outLength: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
    entry { library throws(CKError) in
        try library.finishOperation(.decrypt, session: session, data: .accumulated, output: out, outputLength: outLength)
    }
}

// MARK: digest

@_cdecl("pincache_C_DigestInit")
func pincacheDigestInit(_ session: CK_SESSION_HANDLE, _ mechanism: UnsafeMutablePointer<CK_MECHANISM>?) -> CK_RV {
    entry { library throws(CKError) in try library.beginOperation(.digest, session: session, mechanism: mechanism, key: 0) }
}

@_cdecl("pincache_C_Digest")
func pincacheDigest(_ session: CK_SESSION_HANDLE, _ data: UnsafeMutablePointer<CK_BYTE>?, _ length: CK_ULONG,
                    _ out: UnsafeMutablePointer<CK_BYTE>?, _ outLength: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
    entry { library throws(CKError) in
        try library.finishOperation(.digest, session: session, data: .single(UnsafePointer(data), length), output: out, outputLength: outLength)
    }
}

@_cdecl("pincache_C_DigestUpdate")
func pincacheDigestUpdate(_ session: CK_SESSION_HANDLE, _ part: UnsafeMutablePointer<CK_BYTE>?, _ length: CK_ULONG) -> CK_RV {
    entry { library throws(CKError) in try library.updateOperation(.digest, session: session, part: part, length: length) }
}

@_cdecl("pincache_C_DigestKey")
func pincacheDigestKey(_ session: CK_SESSION_HANDLE, _ key: CK_OBJECT_HANDLE) -> CK_RV { notSupported() }

@_cdecl("pincache_C_DigestFinal")
func pincacheDigestFinal(_ session: CK_SESSION_HANDLE, _ out: UnsafeMutablePointer<CK_BYTE>?,
                         _ outLength: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
    entry { library throws(CKError) in
        try library.finishOperation(.digest, session: session, data: .accumulated, output: out, outputLength: outLength)
    }
}

// MARK: signatures

@_cdecl("pincache_C_SignInit")
func pincacheSignInit(_ session: CK_SESSION_HANDLE, _ mechanism: UnsafeMutablePointer<CK_MECHANISM>?,
                      _ key: CK_OBJECT_HANDLE) -> CK_RV {
    entry { library throws(CKError) in try library.beginOperation(.sign, session: session, mechanism: mechanism, key: key) }
}

@_cdecl("pincache_C_Sign")
func pincacheSign(_ session: CK_SESSION_HANDLE, _ data: UnsafeMutablePointer<CK_BYTE>?, _ length: CK_ULONG,
                  _ signature: UnsafeMutablePointer<CK_BYTE>?, _ signatureLength: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
    entry { library throws(CKError) in
        try library.finishOperation(.sign, session: session, data: .single(UnsafePointer(data), length), output: signature,
                                    outputLength: signatureLength)
    }
}

@_cdecl("pincache_C_SignUpdate")
func pincacheSignUpdate(_ session: CK_SESSION_HANDLE, _ part: UnsafeMutablePointer<CK_BYTE>?, _ length: CK_ULONG) -> CK_RV {
    entry { library throws(CKError) in try library.updateOperation(.sign, session: session, part: part, length: length) }
}

@_cdecl("pincache_C_SignFinal")
func pincacheSignFinal(_ session: CK_SESSION_HANDLE, _ signature: UnsafeMutablePointer<CK_BYTE>?,
                       _ signatureLength: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
    entry { library throws(CKError) in
        try library.finishOperation(.sign, session: session, data: .accumulated, output: signature, outputLength: signatureLength)
    }
}

@_cdecl("pincache_C_SignRecoverInit")
func pincacheSignRecoverInit(_ session: CK_SESSION_HANDLE, _ mechanism: UnsafeMutablePointer<CK_MECHANISM>?,
                             _ key: CK_OBJECT_HANDLE) -> CK_RV { notSupported() }

@_cdecl("pincache_C_SignRecover")
func pincacheSignRecover(_ session: CK_SESSION_HANDLE, _ data: UnsafeMutablePointer<CK_BYTE>?, _ length: CK_ULONG,
                         _ signature: UnsafeMutablePointer<CK_BYTE>?, _ signatureLength: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
    notSupported()
}

@_cdecl("pincache_C_VerifyInit")
func pincacheVerifyInit(_ session: CK_SESSION_HANDLE, _ mechanism: UnsafeMutablePointer<CK_MECHANISM>?,
                        _ key: CK_OBJECT_HANDLE) -> CK_RV {
    entry { library throws(CKError) in try library.beginOperation(.verify, session: session, mechanism: mechanism, key: key) }
}

@_cdecl("pincache_C_Verify")
func pincacheVerify(_ session: CK_SESSION_HANDLE, _ data: UnsafeMutablePointer<CK_BYTE>?, _ length: CK_ULONG,
                    _ signature: UnsafeMutablePointer<CK_BYTE>?, _ signatureLength: CK_ULONG) -> CK_RV {
    entry { library throws(CKError) in
        try library.finishVerify(session: session, data: .single(UnsafePointer(data), length), signature: signature, signatureLength: signatureLength)
    }
}

@_cdecl("pincache_C_VerifyUpdate")
func pincacheVerifyUpdate(_ session: CK_SESSION_HANDLE, _ part: UnsafeMutablePointer<CK_BYTE>?, _ length: CK_ULONG) -> CK_RV {
    entry { library throws(CKError) in try library.updateOperation(.verify, session: session, part: part, length: length) }
}

@_cdecl("pincache_C_VerifyFinal")
func pincacheVerifyFinal(_ session: CK_SESSION_HANDLE, _ signature: UnsafeMutablePointer<CK_BYTE>?,
                         _ signatureLength: CK_ULONG) -> CK_RV {
    entry { library throws(CKError) in
        try library.finishVerify(session: session, data: .accumulated, signature: signature, signatureLength: signatureLength)
    }
}

@_cdecl("pincache_C_VerifyRecoverInit")
func pincacheVerifyRecoverInit(_ session: CK_SESSION_HANDLE, _ mechanism: UnsafeMutablePointer<CK_MECHANISM>?,
                               _ key: CK_OBJECT_HANDLE) -> CK_RV { notSupported() }

@_cdecl("pincache_C_VerifyRecover")
func pincacheVerifyRecover(_ session: CK_SESSION_HANDLE, _ signature: UnsafeMutablePointer<CK_BYTE>?, _ length: CK_ULONG,
                           _ data: UnsafeMutablePointer<CK_BYTE>?, _ dataLength: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
    notSupported()
}

// MARK: dual-function operations (not supported: each would need the daemon per part)

@_cdecl("pincache_C_DigestEncryptUpdate")
func pincacheDigestEncryptUpdate(_ session: CK_SESSION_HANDLE, _ part: UnsafeMutablePointer<CK_BYTE>?, _ length: CK_ULONG,
                                 _ out: UnsafeMutablePointer<CK_BYTE>?, _ outLength: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
    notSupported()
}

@_cdecl("pincache_C_DecryptDigestUpdate")
func pincacheDecryptDigestUpdate(_ session: CK_SESSION_HANDLE, _ part: UnsafeMutablePointer<CK_BYTE>?, _ length: CK_ULONG,
                                 _ out: UnsafeMutablePointer<CK_BYTE>?, _ outLength: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
    notSupported()
}

@_cdecl("pincache_C_SignEncryptUpdate")
func pincacheSignEncryptUpdate(_ session: CK_SESSION_HANDLE, _ part: UnsafeMutablePointer<CK_BYTE>?, _ length: CK_ULONG,
                               _ out: UnsafeMutablePointer<CK_BYTE>?, _ outLength: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
    notSupported()
}

@_cdecl("pincache_C_DecryptVerifyUpdate")
func pincacheDecryptVerifyUpdate(_ session: CK_SESSION_HANDLE, _ part: UnsafeMutablePointer<CK_BYTE>?, _ length: CK_ULONG,
                                 _ out: UnsafeMutablePointer<CK_BYTE>?, _ outLength: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
    notSupported()
}

// MARK: keys

@_cdecl("pincache_C_GenerateKey")
func pincacheGenerateKey(_ session: CK_SESSION_HANDLE, _ mechanism: UnsafeMutablePointer<CK_MECHANISM>?,
                         _ template: UnsafeMutablePointer<CK_ATTRIBUTE>?, _ count: CK_ULONG,
                         _ key: UnsafeMutablePointer<CK_OBJECT_HANDLE>?) -> CK_RV {
    entry { library throws(CKError) in
        try library.withSession(session) { s throws(CKError) in
            let (_, encodedMechanism) = try Codec.mechanism(mechanism)
            let encodedTemplate = try Codec.template(template, count)
            guard let key else { throw .argumentsBad }
            let reply = try library.call(Calls.generateKey, on: s, [encodedMechanism, encodedTemplate])
            guard let handle = reply.first?.ulongValue else { throw .deviceError }
            key.pointee = CK_OBJECT_HANDLE(handle)
        }
    }
}

@_cdecl("pincache_C_GenerateKeyPair")
func pincacheGenerateKeyPair(_ session: CK_SESSION_HANDLE, _ mechanism: UnsafeMutablePointer<CK_MECHANISM>?,
                             _ publicTemplate: UnsafeMutablePointer<CK_ATTRIBUTE>?, _ publicCount: CK_ULONG,
                             _ privateTemplate: UnsafeMutablePointer<CK_ATTRIBUTE>?, _ privateCount: CK_ULONG,
                             _ publicKey: UnsafeMutablePointer<CK_OBJECT_HANDLE>?,
                             _ privateKey: UnsafeMutablePointer<CK_OBJECT_HANDLE>?) -> CK_RV {
    entry { library throws(CKError) in
        try library.withSession(session) { s throws(CKError) in
            let (_, encodedMechanism) = try Codec.mechanism(mechanism)
            let encodedPublic = try Codec.template(publicTemplate, publicCount)
            let encodedPrivate = try Codec.template(privateTemplate, privateCount)
            guard let publicKey, let privateKey else { throw .argumentsBad }
            let reply = try library.call(Calls.generateKeyPair, on: s, [encodedMechanism, encodedPublic, encodedPrivate])
            guard reply.count == 2, let pub = reply[0].ulongValue, let priv = reply[1].ulongValue else { throw .deviceError }
            publicKey.pointee = CK_OBJECT_HANDLE(pub)
            privateKey.pointee = CK_OBJECT_HANDLE(priv)
        }
    }
}

@_cdecl("pincache_C_WrapKey")
func pincacheWrapKey(_ session: CK_SESSION_HANDLE, _ mechanism: UnsafeMutablePointer<CK_MECHANISM>?,
                     _ wrappingKey: CK_OBJECT_HANDLE, _ key: CK_OBJECT_HANDLE, _ wrapped: UnsafeMutablePointer<CK_BYTE>?,
                     _ wrappedLength: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV { notSupported() }

@_cdecl("pincache_C_UnwrapKey")
func pincacheUnwrapKey(_ session: CK_SESSION_HANDLE, _ mechanism: UnsafeMutablePointer<CK_MECHANISM>?,
                       _ unwrappingKey: CK_OBJECT_HANDLE, _ wrapped: UnsafeMutablePointer<CK_BYTE>?, _ wrappedLength: CK_ULONG,
                       _ template: UnsafeMutablePointer<CK_ATTRIBUTE>?, _ count: CK_ULONG,
                       _ key: UnsafeMutablePointer<CK_OBJECT_HANDLE>?) -> CK_RV { notSupported() }

@_cdecl("pincache_C_DeriveKey")
func pincacheDeriveKey(_ session: CK_SESSION_HANDLE, _ mechanism: UnsafeMutablePointer<CK_MECHANISM>?,
                       _ baseKey: CK_OBJECT_HANDLE, _ template: UnsafeMutablePointer<CK_ATTRIBUTE>?, _ count: CK_ULONG,
                       _ key: UnsafeMutablePointer<CK_OBJECT_HANDLE>?) -> CK_RV { notSupported() }

// MARK: random

@_cdecl("pincache_C_SeedRandom")
func pincacheSeedRandom(_ session: CK_SESSION_HANDLE, _ seed: UnsafeMutablePointer<CK_BYTE>?, _ length: CK_ULONG) -> CK_RV {
    entry { library throws(CKError) in
        try library.withSession(session) { s throws(CKError) in
            let bytes = try Codec.bytes(seed, length, tooLong: .argumentsBad)
            _ = try library.call(Calls.seedRandom, on: s, [.bytes(bytes)])
        }
    }
}

@_cdecl("pincache_C_GenerateRandom")
func pincacheGenerateRandom(_ session: CK_SESSION_HANDLE, _ out: UnsafeMutablePointer<CK_BYTE>?, _ length: CK_ULONG) -> CK_RV {
    entry { library throws(CKError) in
        try library.withSession(session) { s throws(CKError) in
            guard length == 0 || out != nil else { throw .argumentsBad }
            guard let out else { return }
            // The wire gives at most 1 MiB per call.
            var done: CK_ULONG = 0
            while done < length {
                let chunk = min(length - done, CK_ULONG(Caps.random))
                let reply = try library.call(Calls.generateRandom, on: s, [.ulong(UInt64(chunk))])
                guard let bytes = reply.first?.bytesValue, CK_ULONG(bytes.count) == chunk else { throw .deviceError }
                bytes.withUnsafeBufferPointer { source in
                    if let base = source.baseAddress { out.advanced(by: Int(done)).update(from: base, count: source.count) }
                }
                done += chunk
            }
        }
    }
}

// MARK: legacy and events

@_cdecl("pincache_C_GetFunctionStatus")
func pincacheGetFunctionStatus(_ session: CK_SESSION_HANDLE) -> CK_RV {
    Library.current == nil ? CKR_CRYPTOKI_NOT_INITIALIZED : CKR_FUNCTION_NOT_PARALLEL
}

@_cdecl("pincache_C_CancelFunction")
func pincacheCancelFunction(_ session: CK_SESSION_HANDLE) -> CK_RV {
    Library.current == nil ? CKR_CRYPTOKI_NOT_INITIALIZED : CKR_FUNCTION_NOT_PARALLEL
}

@_cdecl("pincache_C_WaitForSlotEvent")
func pincacheWaitForSlotEvent(_ flags: CK_FLAGS, _ slot: UnsafeMutablePointer<CK_SLOT_ID>?,
                              _ reserved: UnsafeMutableRawPointer?) -> CK_RV {
    entry { library throws(CKError) in
        guard let slot, reserved == nil else { throw .argumentsBad }
        slot.pointee = try library.waitForSlotEvent(block: flags & CK_FLAGS(CKF_DONT_BLOCK) == 0)
    }
}
