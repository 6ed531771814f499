// Module*.swift are the only files that call into a PKCS#11 module. Every call blocks (card
// I/O): callers run these on their own threads, so nothing here is async.
import CPKCS11
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A loaded, initialised PKCS#11 module.
///
/// The object owns the `dlopen` handle, so the function pointers stay valid as long as it
/// lives. All methods may be called from any thread: the module is initialised with
/// `CKF_OS_LOCKING_OK` and does its own locking.
public final class PKCS11Module: @unchecked Sendable {
    // @unchecked: the stored state is immutable after init except `state`, which a Mutex
    // guards; the module itself is thread-safe by contract (CKF_OS_LOCKING_OK).

    /// The path given to `dlopen`.
    public let path: String

    /// A broken or hostile module must not make us allocate without bound.
    static let maxListCount = 4096
    static let maxLength = 64 << 20

    private enum State { case loaded, initialized, finalized }

    private let handle: UnsafeMutableRawPointer
    private let functions: UnsafeMutablePointer<CK_FUNCTION_LIST>
    /// The module's PKCS#11 3.0 interface, if it offers one (`C_GetInterface`): only the
    /// functions 3.0 added are called through it.
    let functions3: UnsafeMutablePointer<CK_FUNCTION_LIST_3_0>?
    private let state = Mutex(State.loaded)

    /// `dlopen(RTLD_NOW|RTLD_LOCAL)`, `C_GetFunctionList`, then `C_Initialize` with
    /// `CKF_OS_LOCKING_OK`.
    ///
    /// - Throws: `ModuleLoadError` when the file cannot be loaded or lacks
    ///   `C_GetFunctionList`; `PKCS11Error` when the module refuses.
    /// Whether `path` would load as a module (dlopen and C_GetFunctionList), without
    /// initialising it: `pincached --check-config`.
    public static func probe(path: String) throws {
        guard let handle = dlopen(path, RTLD_NOW | RTLD_LOCAL) else {
            throw ModuleLoadError(path: path, reason: dlerror().map { String(cString: $0) } ?? "dlopen failed")
        }
        defer { dlclose(handle) }
        guard dlsym(handle, "C_GetFunctionList") != nil else {
            throw ModuleLoadError(path: path, reason: "no C_GetFunctionList symbol")
        }
    }

    public init(path: String) throws {
        guard let handle = dlopen(path, RTLD_NOW | RTLD_LOCAL) else {
            throw ModuleLoadError(path: path, reason: dlerror().map { String(cString: $0) } ?? "dlopen failed")
        }
        guard let symbol = dlsym(handle, "C_GetFunctionList") else {
            dlclose(handle)
            throw ModuleLoadError(path: path, reason: "no C_GetFunctionList symbol")
        }
        // SAFETY: C_GetFunctionList has this exact C signature in every PKCS#11 module.
        let getFunctionList = unsafeBitCast(symbol, to: CK_C_GetFunctionList.self)
        var list: UnsafeMutablePointer<CK_FUNCTION_LIST>?
        do {
            try PKCS11Error.check(getFunctionList(&list), "C_GetFunctionList")
        } catch {
            dlclose(handle)
            throw error
        }
        guard let list else {
            dlclose(handle)
            throw ModuleLoadError(path: path, reason: "C_GetFunctionList returned no function list")
        }
        self.path = path
        self.handle = handle
        self.functions = list
        self.functions3 = Self.interface3(handle)

        var args = CK_C_INITIALIZE_ARGS(
            CreateMutex: nil, DestroyMutex: nil, LockMutex: nil, UnlockMutex: nil,
            flags: CK_FLAGS(CKF_OS_LOCKING_OK), pReserved: nil)
        // SAFETY: `args` outlives the call; modules do not keep the pointer.
        try call("C_Initialize", \.C_Initialize) { f in withUnsafeMutablePointer(to: &args) { f($0) } }
        state.withLock { $0 = .initialized }
    }

    /// `C_GetInterface("PKCS 11", 3.0)`, where the module exports it.
    private static func interface3(_ handle: UnsafeMutableRawPointer) -> UnsafeMutablePointer<CK_FUNCTION_LIST_3_0>? {
        guard let symbol = dlsym(handle, "C_GetInterface") else { return nil }
        // SAFETY: C_GetInterface has this C signature in every PKCS#11 3.0 module; the name
        // and version outlive the call, and the interface it returns lives as long as the module.
        let getInterface = unsafeBitCast(symbol, to: CK_C_GetInterface.self)
        var name = Array("PKCS 11".utf8CString).map { CK_UTF8CHAR(bitPattern: $0) }
        var version = CK_VERSION(major: 3, minor: 0)
        var found: UnsafeMutablePointer<CK_INTERFACE>?
        let rv = name.withUnsafeMutableBufferPointer { getInterface($0.baseAddress, &version, &found, 0) }
        guard rv == CKR_OK, let list = found?.pointee.pFunctionList else { return nil }
        return list.assumingMemoryBound(to: CK_FUNCTION_LIST_3_0.self)
    }

    /// `C_Finalize`, at most once (later calls do nothing). Calls made afterwards fail with
    /// `CKR_CRYPTOKI_NOT_INITIALIZED`; the library stays loaded until the object goes.
    public func finalize() {
        let wasInitialized = state.withLock { s -> Bool in
            guard s == .initialized else { return false }
            s = .finalized
            return true
        }
        // Nothing useful can be done about a failing C_Finalize at shutdown.
        if wasInitialized { _ = try? call("C_Finalize", \.C_Finalize) { $0(nil) } }
    }

    deinit {
        finalize()
        dlclose(handle)
    }

    // MARK: - Calling convention

    /// Calls one function of the list. A missing (NULL) entry is `CKR_FUNCTION_NOT_SUPPORTED`
    /// rather than a crash; the result goes through `PKCS11Error.check`.
    @discardableResult
    func call<F>(
        _ name: String, _ member: KeyPath<CK_FUNCTION_LIST, F?>, accepting: [ReturnValue] = [],
        _ body: (F) -> CK_RV
    ) throws -> ReturnValue {
        guard let f = functions.pointee[keyPath: member] else {
            throw PKCS11Error(rv: .functionNotSupported, function: name)
        }
        return try PKCS11Error.check(body(f), name, accepting: accepting)
    }

    func tooLarge(_ name: String) -> PKCS11Error { PKCS11Error(rv: .generalError, function: name) }

    /// PKCS#11's two-call convention: ask for the length, allocate, fetch; if the answer
    /// grew in between (`CKR_BUFFER_TOO_SMALL`), try again with the new length.
    /// `guess`: for the output of a cryptographic operation, a first buffer of this size
    /// instead of a length query, as most applications call it; a module that needs more
    /// answers CKR_BUFFER_TOO_SMALL with the size and keeps the operation (PKCS#11 5.2).
    /// Room for any signature or block a token usually returns (RSA-8192: 1024 bytes).
    static let outputGuess = 1024

    /// A cipher's output is about as long as its input (plus a block of padding).
    static func outputGuess(for input: [UInt8]) -> Int { min(max(outputGuess, input.count + 64), maxLength) }

    func twoCall<F, T>(
        _ name: String, _ member: KeyPath<CK_FUNCTION_LIST, F?>, zero: T, cap: Int, guess: Int? = nil,
        _ body: (F, UnsafeMutablePointer<T>?, UnsafeMutablePointer<CK_ULONG>) -> CK_RV
    ) throws -> [T] {
        var needed: CK_ULONG = 0
        if let guess {
            needed = CK_ULONG(guess)
        } else {
            try call(name, member) { f in body(f, nil, &needed) }
        }
        for _ in 0..<4 {
            guard needed <= CK_ULONG(cap) else { throw tooLarge(name) }
            // Never pass a NULL buffer here: that would be another length query and, for
            // C_Sign, leave the operation running.
            var buffer = [T](repeating: zero, count: max(Int(needed), 1))
            var got = needed
            let rv = try call(name, member, accepting: [.bufferTooSmall]) { f in
                buffer.withUnsafeMutableBufferPointer { body(f, $0.baseAddress, &got) }
            }
            if rv == .ok {
                guard got <= needed else { throw tooLarge(name) }
                return Array(buffer.prefix(Int(got)))
            }
            needed = got
        }
        throw PKCS11Error(rv: .bufferTooSmall, function: name)
    }

    // MARK: - Module, slots, tokens

    /// `C_GetInfo`
    public func info() throws -> ModuleInfo {
        var i = CK_INFO()
        try call("C_GetInfo", \.C_GetInfo) { $0(&i) }
        return ModuleInfo(
            cryptokiVersion: Version(i.cryptokiVersion), manufacturer: paddedString(i.manufacturerID),
            libraryDescription: paddedString(i.libraryDescription), libraryVersion: Version(i.libraryVersion))
    }

    /// `C_GetSlotList`; more than 4096 slots is treated as a broken module.
    public func slotList(tokenPresent: Bool) throws -> [SlotID] {
        try twoCall("C_GetSlotList", \.C_GetSlotList, zero: CK_SLOT_ID(0), cap: Self.maxListCount) { f, p, n in
            f(tokenPresent ? 1 : 0, p, n)
        }.map(SlotID.init(rawValue:))
    }

    /// `C_GetSlotInfo`
    public func slotInfo(_ slot: SlotID) throws -> SlotInfo {
        var i = CK_SLOT_INFO()
        try call("C_GetSlotInfo", \.C_GetSlotInfo) { $0(slot.rawValue, &i) }
        return SlotInfo(
            description: paddedString(i.slotDescription), manufacturer: paddedString(i.manufacturerID),
            flags: i.flags, hardwareVersion: Version(i.hardwareVersion), firmwareVersion: Version(i.firmwareVersion))
    }

    /// `C_GetTokenInfo`
    public func tokenInfo(_ slot: SlotID) throws -> TokenInfo {
        var i = CK_TOKEN_INFO()
        try call("C_GetTokenInfo", \.C_GetTokenInfo) { $0(slot.rawValue, &i) }
        return TokenInfo(
            label: paddedString(i.label), manufacturer: paddedString(i.manufacturerID), model: paddedString(i.model),
            serialNumber: paddedString(i.serialNumber), flags: i.flags,
            minPinLength: i.ulMinPinLen, maxPinLength: i.ulMaxPinLen,
            maxSessionCount: i.ulMaxSessionCount, sessionCount: i.ulSessionCount,
            maxRwSessionCount: i.ulMaxRwSessionCount, rwSessionCount: i.ulRwSessionCount,
            totalPublicMemory: i.ulTotalPublicMemory, freePublicMemory: i.ulFreePublicMemory,
            totalPrivateMemory: i.ulTotalPrivateMemory, freePrivateMemory: i.ulFreePrivateMemory,
            hardwareVersion: Version(i.hardwareVersion), firmwareVersion: Version(i.firmwareVersion),
            utcTime: utcTimeString(i.utcTime))
    }

    /// `C_InitToken`. `label` is blank-padded to 32 bytes; a longer UTF-8 label is
    /// `CKR_ARGUMENTS_BAD` rather than cut (a cut could split a character). `soPIN` as in
    /// `login`: read during the call only, nil for the protected authentication path.
    public func initToken(_ slot: SlotID, soPIN: UnsafeRawBufferPointer?, label: String) throws {
        let name = "C_InitToken"
        var padded = [UInt8](label.utf8)
        guard padded.count <= 32 else { throw PKCS11Error(rv: .argumentsBad, function: name) }
        padded += [UInt8](repeating: 0x20, count: 32 - padded.count)
        try withPIN(soPIN) { pin, pinLength in
            try padded.withUnsafeMutableBufferPointer { l in
                try call(name, \.C_InitToken) { $0(slot.rawValue, pin, pinLength, l.baseAddress) }
            }
        }
    }

    /// `C_GetMechanismList`
    public func mechanismList(_ slot: SlotID) throws -> [MechanismType] {
        try twoCall("C_GetMechanismList", \.C_GetMechanismList, zero: CK_MECHANISM_TYPE(0), cap: Self.maxListCount) {
            f, p, n in f(slot.rawValue, p, n)
        }.map(MechanismType.init(rawValue:))
    }

    /// `C_GetMechanismInfo`
    public func mechanismInfo(_ slot: SlotID, _ type: MechanismType) throws -> MechanismInfo {
        var i = CK_MECHANISM_INFO()
        try call("C_GetMechanismInfo", \.C_GetMechanismInfo) { $0(slot.rawValue, type.rawValue, &i) }
        return MechanismInfo(minKeySize: i.ulMinKeySize, maxKeySize: i.ulMaxKeySize, flags: i.flags)
    }

    /// `C_WaitForSlotEvent`; nil on `CKR_NO_EVENT`. Modules without slot events throw
    /// `CKR_FUNCTION_NOT_SUPPORTED` (the caller then polls).
    public func waitForSlotEvent(dontBlock: Bool) throws -> SlotID? {
        var slot: CK_SLOT_ID = 0
        let rv = try call("C_WaitForSlotEvent", \.C_WaitForSlotEvent, accepting: [.noEvent]) {
            $0(CK_FLAGS(dontBlock ? CKF_DONT_BLOCK : 0), &slot, nil)
        }
        return rv == .noEvent ? nil : SlotID(rawValue: slot)
    }

    // MARK: - Sessions

    /// `C_OpenSession`, always with `CKF_SERIAL_SESSION`, without notification callback.
    public func openSession(_ slot: SlotID, readWrite: Bool = false) throws -> SessionHandle {
        var flags = CK_FLAGS(CKF_SERIAL_SESSION)
        if readWrite { flags |= CK_FLAGS(CKF_RW_SESSION) }
        var session: CK_SESSION_HANDLE = 0
        try call("C_OpenSession", \.C_OpenSession) { $0(slot.rawValue, flags, nil, nil, &session) }
        return SessionHandle(rawValue: session)
    }

    /// `C_CloseSession`
    public func closeSession(_ s: SessionHandle) throws {
        try call("C_CloseSession", \.C_CloseSession) { $0(s.rawValue) }
    }

    /// `C_CloseAllSessions`
    public func closeAllSessions(_ slot: SlotID) throws {
        try call("C_CloseAllSessions", \.C_CloseAllSessions) { $0(slot.rawValue) }
    }

    /// `C_GetSessionInfo`
    public func sessionInfo(_ s: SessionHandle) throws -> SessionInfo {
        var i = CK_SESSION_INFO()
        try call("C_GetSessionInfo", \.C_GetSessionInfo) { $0(s.rawValue, &i) }
        return SessionInfo(slot: SlotID(rawValue: i.slotID), state: i.state, flags: i.flags)
    }

    /// `C_Login`. `pin` is read during the call only and never copied; nil means the
    /// token's protected authentication path (PIN pad). An empty buffer is an empty PIN.
    public func login(_ s: SessionHandle, userType: UserType, pin: UnsafeRawBufferPointer?) throws {
        try withPIN(pin) { pointer, length in
            try call("C_Login", \.C_Login) { $0(s.rawValue, userType.rawValue, pointer, length) }
        }
    }

    /// `C_InitPIN` (SO session): sets the user PIN. `pin` as in `login`.
    public func initPIN(_ s: SessionHandle, pin: UnsafeRawBufferPointer?) throws {
        try withPIN(pin) { pointer, length in
            try call("C_InitPIN", \.C_InitPIN) { $0(s.rawValue, pointer, length) }
        }
    }

    /// `C_SetPIN`: changes the PIN of the user logged in (or the user PIN in a public
    /// session). Both PINs as in `login`; nil for both uses the PIN pad.
    public func setPIN(_ s: SessionHandle, old: UnsafeRawBufferPointer?, new: UnsafeRawBufferPointer?) throws {
        try withPIN(old) { oldPointer, oldLength in
            try withPIN(new) { newPointer, newLength in
                try call("C_SetPIN", \.C_SetPIN) { $0(s.rawValue, oldPointer, oldLength, newPointer, newLength) }
            }
        }
    }

    /// `C_Logout`
    public func logout(_ s: SessionHandle) throws {
        try call("C_Logout", \.C_Logout) { $0(s.rawValue) }
    }
}

/// Hands a PIN to C as `(CK_UTF8CHAR_PTR, CK_ULONG)`: nil stays NULL (PIN pad), an empty
/// buffer becomes a valid address with length 0.
@discardableResult
private func withPIN<R>(_ pin: UnsafeRawBufferPointer?, _ body: (UnsafeMutablePointer<UInt8>?, CK_ULONG) throws -> R)
    rethrows -> R
{
    var empty: UInt8 = 0
    return try withUnsafeMutablePointer(to: &empty) { emptyPointer in
        // SAFETY: PIN parameters are non-const only because the header predates const;
        // modules read them during the call and keep no pointer. An empty buffer may have
        // no base address, so it gets a valid one-byte address with length 0. The PIN is
        // never copied.
        let pointer: UnsafeMutablePointer<UInt8>? = pin.map { buffer in
            buffer.baseAddress.map { UnsafeMutablePointer(mutating: $0.assumingMemoryBound(to: UInt8.self)) }
                ?? emptyPointer
        }
        return try body(pointer, CK_ULONG(pin?.count ?? 0))
    }
}

// MARK: - Marshalling helpers

/// Hands `data` to C as `(CK_BYTE_PTR, CK_ULONG)`.
@discardableResult
func withInput<R>(_ data: [UInt8], _ body: (UnsafeMutablePointer<UInt8>?, CK_ULONG) throws -> R) rethrows -> R {
    // SAFETY: input parameters are non-const in the header only for historical reasons;
    // modules read them during the call and keep no pointer.
    try data.withUnsafeBufferPointer { buffer in
        try body(UnsafeMutablePointer(mutating: buffer.baseAddress), CK_ULONG(buffer.count))
    }
}

/// Hands a template to C as `(CK_ATTRIBUTE_PTR, CK_ULONG)`. An array attribute's flattened
/// template (NestedTemplate) becomes a CK_ATTRIBUTE array of its own for the call; a
/// malformed one (the service refuses those before they get here) an empty one.
@discardableResult
func withTemplate<R>(_ template: [Attribute], _ body: (UnsafeMutablePointer<CK_ATTRIBUTE>?, CK_ULONG) throws -> R)
    rethrows -> R
{
    // A flattened template is longer than the values it holds: this covers them too.
    let total = template.reduce(0) { $0 + $1.value.count }
    // SAFETY: all values are copied into one buffer, and nested arrays into buffers of their
    // own, that outlive the call; the CK_ATTRIBUTE arrays point into them and are discarded
    // with them.
    let storage = UnsafeMutableRawBufferPointer.allocate(byteCount: max(total, 1), alignment: 16)
    defer { storage.deallocate() }
    var nestedArrays: [UnsafeMutablePointer<CK_ATTRIBUTE>] = []
    defer { nestedArrays.forEach { $0.deallocate() } }
    var offset = 0
    func place(_ value: [UInt8]) -> UnsafeMutableRawPointer {
        let start = storage.baseAddress! + offset
        value.withUnsafeBytes { source in
            if let base = source.baseAddress { start.copyMemory(from: base, byteCount: source.count) }
        }
        offset += value.count
        return start
    }
    var attributes: [CK_ATTRIBUTE] = []
    attributes.reserveCapacity(template.count)
    for a in template {
        guard a.type.isArray else {
            attributes.append(CK_ATTRIBUTE(type: a.type.rawValue, pValue: place(a.value), ulValueLen: CK_ULONG(a.value.count)))
            continue
        }
        let entries = NestedTemplate.parse(a.value) ?? []
        let array = UnsafeMutablePointer<CK_ATTRIBUTE>.allocate(capacity: max(entries.count, 1))
        nestedArrays.append(array)
        for (i, entry) in entries.enumerated() {
            (array + i).initialize(
                to: CK_ATTRIBUTE(type: entry.type.rawValue, pValue: place(entry.value), ulValueLen: CK_ULONG(entry.value.count)))
        }
        attributes.append(
            CK_ATTRIBUTE(
                type: a.type.rawValue, pValue: entries.isEmpty ? nil : UnsafeMutableRawPointer(array),
                ulValueLen: CK_ULONG(entries.count * MemoryLayout<CK_ATTRIBUTE>.stride)))
    }
    return try attributes.withUnsafeMutableBufferPointer { try body($0.baseAddress, CK_ULONG($0.count)) }
}

/// A fixed-width, blank-padded `CK_UTF8CHAR` field as a String. Some modules pad with NUL
/// instead of blanks, so the text also ends at the first NUL.
private func paddedString<T>(_ field: T) -> String {
    withUnsafeBytes(of: field) { raw in
        var bytes = raw.prefix { $0 != 0 }
        while let last = bytes.last, last == 0x20 { bytes = bytes.dropLast() }
        return String(decoding: bytes, as: UTF8.self)
    }
}

/// `CK_TOKEN_INFO.utcTime`: the 16 characters as given without NULs (some modules pad
/// with them); a blank field means the token has no clock.
private func utcTimeString<T>(_ field: T) -> String {
    withUnsafeBytes(of: field) { raw in
        let bytes = raw.filter { $0 != 0 }
        return bytes.allSatisfy { $0 == 0x20 } ? "" : String(decoding: bytes, as: UTF8.self)
    }
}

extension Version {
    init(_ v: CK_VERSION) { self.init(major: v.major, minor: v.minor) }
}
