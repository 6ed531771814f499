import CPKCS11
import CryptokiWire

// The PKCS#11 entry points, exported under C names the function table in
// CPincacheProxy/proxy.c points at. Each one only lists its arguments: `entry` finds the
// initialised instance and turns every CKError into a return value, so nothing throws or
// traps across the C boundary.

/// Runs `body` against the initialised instance; CKR_CRYPTOKI_NOT_INITIALIZED without one.
@inline(__always)
func entry(_ body: (Library) throws(CKError) -> Void) -> CK_RV {
    guard let library = Library.current else { return CKR_CRYPTOKI_NOT_INITIALIZED }
    do {
        try body(library)
        return CKR_OK
    } catch {
        return error.rv
    }
}

/// Writes a count-and-array answer with the length-query convention.
func deliverList<T>(_ items: [T], to buffer: UnsafeMutablePointer<T>?,
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
        guard !snapshot.tokenUnrecognized else { throw CKError(CKR_TOKEN_NOT_RECOGNIZED) }
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
                               _ length: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
    entry { library throws(CKError) in try library.getOperationState(session: session, state: state, length: length) }
}

@_cdecl("pincache_C_SetOperationState")
func pincacheSetOperationState(_ session: CK_SESSION_HANDLE, _ state: UnsafeMutablePointer<CK_BYTE>?, _ length: CK_ULONG,
                               _ encryptionKey: CK_OBJECT_HANDLE, _ authenticationKey: CK_OBJECT_HANDLE) -> CK_RV {
    entry { library throws(CKError) in try library.setOperationState(session: session, state: state, length: length) }
}

@_cdecl("pincache_C_Login")
func pincacheLogin(_ session: CK_SESSION_HANDLE, _ userType: CK_USER_TYPE, _ pin: UnsafeMutablePointer<CK_UTF8CHAR>?,
                   _ length: CK_ULONG) -> CK_RV {
    entry { library throws(CKError) in try library.login(session: session, userType: userType, pin: pin, length: length) }
}

@_cdecl("pincache_C_LoginUser")
func pincacheLoginUser(_ session: CK_SESSION_HANDLE, _ userType: CK_USER_TYPE, _ pin: UnsafeMutablePointer<CK_UTF8CHAR>?,
                       _ length: CK_ULONG, _ username: UnsafeMutablePointer<CK_UTF8CHAR>?, _ usernameLength: CK_ULONG) -> CK_RV {
    entry { library throws(CKError) in
        try library.loginUser(session: session, userType: userType, pin: pin, length: length, usernameLength: usernameLength)
    }
}

@_cdecl("pincache_C_SessionCancel")
func pincacheSessionCancel(_ session: CK_SESSION_HANDLE, _ flags: CK_FLAGS) -> CK_RV {
    entry { library throws(CKError) in try library.sessionCancel(session: session, flags: flags) }
}

extension Library {
    func login(session handle: CK_SESSION_HANDLE, userType: CK_USER_TYPE, pin: UnsafePointer<CK_UTF8CHAR>?,
               length: CK_ULONG) throws(CKError) {
        try withSession(handle) { s throws(CKError) in
            var secret = try Codec.pin(pin, length)
            defer { Codec.wipe(&secret) }
            _ = try call(Calls.login, on: s, [.ulong(UInt64(userType)), .bytes(secret)])
        }
    }
}

@_cdecl("pincache_C_Logout")
func pincacheLogout(_ session: CK_SESSION_HANDLE) -> CK_RV {
    entry { library throws(CKError) in
        try library.withSession(session) { s throws(CKError) in _ = try library.call(Calls.logout, on: s, []) }
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
