// The only file that calls into a PKCS#11 module. Every call blocks (card I/O): callers
// run these on their own threads, so nothing here is async.
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

    private func tooLarge(_ name: String) -> PKCS11Error { PKCS11Error(rv: .generalError, function: name) }

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

    // MARK: - Objects

    /// `C_FindObjectsInit`, `C_FindObjects` until exhausted or `limit`, then always
    /// `C_FindObjectsFinal` (so the session is free for the next search even after an error).
    public func findObjects(_ s: SessionHandle, matching template: [Attribute], limit: Int = 10_000) throws
        -> [ObjectHandle]
    {
        try withTemplate(template) { p, n in
            try call("C_FindObjectsInit", \.C_FindObjectsInit) { $0(s.rawValue, p, n) }
        }
        var found: [ObjectHandle] = []
        var failure: (any Error)?
        do {
            let chunkSize = 64
            var chunk = [CK_OBJECT_HANDLE](repeating: 0, count: chunkSize)
            while found.count < limit {
                let want = min(chunkSize, limit - found.count)
                var got: CK_ULONG = 0
                try call("C_FindObjects", \.C_FindObjects) { f in
                    chunk.withUnsafeMutableBufferPointer { f(s.rawValue, $0.baseAddress, CK_ULONG(want), &got) }
                }
                if got == 0 { break }
                guard got <= CK_ULONG(want) else { throw tooLarge("C_FindObjects") }
                found += chunk.prefix(Int(got)).map(ObjectHandle.init(rawValue:))
            }
        } catch {
            failure = error
        }
        do {
            try call("C_FindObjectsFinal", \.C_FindObjectsFinal) { $0(s.rawValue) }
        } catch {
            failure = failure ?? error
        }
        if let failure { throw failure }
        return found
    }

    /// `C_GetAttributeValue`. Attributes that are invalid, sensitive or unavailable are
    /// simply absent from the result; any other failure throws. Two calls whatever the
    /// attributes: use `attributeValues` to learn why one is missing.
    public func getAttributes(_ s: SessionHandle, _ object: ObjectHandle, _ types: [AttributeType]) throws
        -> [AttributeType: [UInt8]]
    {
        guard !types.isEmpty else { return [:] }
        try checkAttributeCount(types.count)
        if types.contains(where: \.isArray) {
            var result = try getAttributes(s, object, types.filter { !$0.isArray })
            for type in types where type.isArray {
                let array = try arrayAttribute(s, object, type)
                if array.status == .ok { result[type] = array.value }
            }
            return result
        }
        // Most attributes fit a small buffer: one call instead of a length query and a fetch
        // (each costs SoftHSM a look at the object's file). Anything else takes the long way.
        let guess = try attributeCall(s, object, types, lengths: Array(repeating: Self.firstGuess, count: types.count))
        if guess.rv == .ok, guess.values.allSatisfy({ $0 != nil }) {
            var result: [AttributeType: [UInt8]] = [:]
            for (type, value) in zip(types, guess.values) { result[type] = value }
            return result
        }
        for _ in 0..<4 {
            let lengths = try attributeCall(s, object, types, lengths: nil).lengths
            let wanted = types.indices.filter { lengths[$0] != unavailableInformation }
            if wanted.isEmpty { return [:] }
            let fetched = try attributeCall(s, object, wanted.map { types[$0] }, lengths: wanted.map { lengths[$0] })
            // The object changed between the two calls: start over with fresh lengths.
            if fetched.rv == .bufferTooSmall { continue }
            var result: [AttributeType: [UInt8]] = [:]
            for (i, value) in zip(wanted, fetched.values) { if let value { result[types[i]] = value } }
            return result
        }
        throw PKCS11Error(rv: .bufferTooSmall, function: "C_GetAttributeValue")
    }

    /// `C_GetAttributeValue` with a verdict per attribute, in the order asked: `.ok` and
    /// the value, or `.attributeSensitive` / `.attributeTypeInvalid` and no value.
    ///
    /// One length query and one fetch for the whole list when everything is readable. A
    /// batch answer can name only one reason for all unreadable attributes, so those
    /// (marked `CK_UNAVAILABLE_INFORMATION`) are then asked one at a time to get each
    /// exact code, which the proxy hands back unchanged. Any other code throws, e.g.
    /// `CKR_OBJECT_HANDLE_INVALID`.
    public func attributeValues(_ s: SessionHandle, _ object: ObjectHandle, _ types: [AttributeType]) throws
        -> [AttributeResult]
    {
        guard !types.isEmpty else { return [] }
        try checkAttributeCount(types.count)
        if types.contains(where: \.isArray) {
            var plain = try attributeValues(s, object, types.filter { !$0.isArray }).makeIterator()
            return try types.map { type in try type.isArray ? arrayAttribute(s, object, type) : plain.next()! }
        }
        var results = types.map { AttributeResult(type: $0, status: .ok, value: []) }
        let lengths = try attributeCall(s, object, types, lengths: nil).lengths
        var single = types.indices.filter { lengths[$0] == unavailableInformation }
        let batch = types.indices.filter { lengths[$0] != unavailableInformation }
        if !batch.isEmpty {
            let fetched = try attributeCall(s, object, batch.map { types[$0] }, lengths: batch.map { lengths[$0] })
            if fetched.rv == .ok, fetched.values.allSatisfy({ $0 != nil }) {
                for (i, value) in zip(batch, fetched.values) { results[i].value = value ?? [] }
            } else {
                // The object changed in between (or the module is inconsistent): one at a time.
                single = Array(types.indices)
            }
        }
        for i in single { results[i] = try attributeValue(s, object, types[i]) }
        return results
    }

    /// One attribute alone, so the return code is its own.
    private func attributeValue(_ s: SessionHandle, _ object: ObjectHandle, _ type: AttributeType) throws
        -> AttributeResult
    {
        for _ in 0..<4 {
            let query = try attributeCall(s, object, [type], lengths: nil)
            if query.rv != .ok { return AttributeResult(type: type, status: query.rv, value: []) }
            // CKR_OK with no length is a contradiction, not an answer.
            guard query.lengths[0] != unavailableInformation else { throw tooLarge("C_GetAttributeValue") }
            let fetched = try attributeCall(s, object, [type], lengths: query.lengths)
            if fetched.rv == .bufferTooSmall { continue }
            if fetched.rv != .ok { return AttributeResult(type: type, status: fetched.rv, value: []) }
            guard let value = fetched.values[0] else { throw tooLarge("C_GetAttributeValue") }
            return AttributeResult(type: type, status: .ok, value: value)
        }
        throw PKCS11Error(rv: .bufferTooSmall, function: "C_GetAttributeValue")
    }

    private func checkAttributeCount(_ count: Int) throws {
        guard count <= Self.maxListCount else { throw PKCS11Error(rv: .argumentsBad, function: "C_GetAttributeValue") }
    }

    /// One `C_GetAttributeValue`. Without `lengths` it is the length query (all pValue
    /// NULL); with them, a fetch into buffers of those sizes. Returns the code (sensitive,
    /// type-invalid and buffer-too-small are answers here, anything else throws), the
    /// lengths the module wrote, and for a fetch each value, nil where the module marked
    /// it unavailable.
    /// The buffer each attribute gets on `getAttributes`' first try.
    static let firstGuess: CK_ULONG = 256

    private func attributeCall(
        _ s: SessionHandle, _ object: ObjectHandle, _ types: [AttributeType], lengths: [CK_ULONG]?
    ) throws -> (rv: ReturnValue, lengths: [CK_ULONG], values: [[UInt8]?]) {
        let name = "C_GetAttributeValue"
        let accepting: [ReturnValue] = [.attributeSensitive, .attributeTypeInvalid, .bufferTooSmall]
        var template = types.map { CK_ATTRIBUTE(type: $0.rawValue, pValue: nil, ulValueLen: 0) }
        guard let sizes = lengths else {
            let rv = try call(name, \.C_GetAttributeValue, accepting: accepting) { f in
                template.withUnsafeMutableBufferPointer { f(s.rawValue, object.rawValue, $0.baseAddress, CK_ULONG($0.count)) }
            }
            // A length query has no buffer to be too small for.
            if rv == .bufferTooSmall { throw PKCS11Error(rv: rv, function: name) }
            return (rv, template.map(\.ulValueLen), [])
        }
        var total = 0
        for size in sizes {
            guard size <= CK_ULONG(Self.maxLength) else { throw tooLarge(name) }
            total += Int(size)
            guard total <= Self.maxLength else { throw tooLarge(name) }
        }
        // SAFETY: one buffer for all values, carved into the template's pValue slices;
        // freed after the values have been copied out.
        let storage = UnsafeMutableRawBufferPointer.allocate(byteCount: max(total, 1), alignment: 16)
        defer { storage.deallocate() }
        // Zeroed: were an array attribute asked here after all, the module would read this
        // buffer as CK_ATTRIBUTEs and write through their pValue; NULL ones it leaves alone.
        storage.initializeMemory(as: UInt8.self, repeating: 0)
        var offset = 0
        for i in template.indices {
            template[i].pValue = storage.baseAddress! + offset
            template[i].ulValueLen = sizes[i]
            offset += Int(sizes[i])
        }
        let rv = try call(name, \.C_GetAttributeValue, accepting: accepting) { f in
            template.withUnsafeMutableBufferPointer { f(s.rawValue, object.rawValue, $0.baseAddress, CK_ULONG($0.count)) }
        }
        var values: [[UInt8]?] = []
        values.reserveCapacity(template.count)
        for (a, size) in zip(template, sizes) {
            if a.ulValueLen == unavailableInformation {
                values.append(nil)
                continue
            }
            guard a.ulValueLen <= size, let p = a.pValue else { throw tooLarge(name) }
            values.append(Array(UnsafeRawBufferPointer(start: p, count: Int(a.ulValueLen))))
        }
        return (rv, template.map(\.ulValueLen), values)
    }

    /// `C_CreateObject`
    public func createObject(_ s: SessionHandle, _ template: [Attribute]) throws -> ObjectHandle {
        var object: CK_OBJECT_HANDLE = 0
        try withTemplate(template) { p, n in
            try call("C_CreateObject", \.C_CreateObject) { $0(s.rawValue, p, n, &object) }
        }
        return ObjectHandle(rawValue: object)
    }

    /// `C_CopyObject`: a copy of `object` with `template` overriding its attributes.
    public func copyObject(_ s: SessionHandle, _ object: ObjectHandle, _ template: [Attribute]) throws -> ObjectHandle {
        var copy: CK_OBJECT_HANDLE = 0
        try withTemplate(template) { p, n in
            try call("C_CopyObject", \.C_CopyObject) { $0(s.rawValue, object.rawValue, p, n, &copy) }
        }
        return ObjectHandle(rawValue: copy)
    }

    /// `C_DestroyObject`
    public func destroyObject(_ s: SessionHandle, _ object: ObjectHandle) throws {
        try call("C_DestroyObject", \.C_DestroyObject) { $0(s.rawValue, object.rawValue) }
    }

    /// `C_GetObjectSize`
    public func objectSize(_ s: SessionHandle, _ object: ObjectHandle) throws -> UInt {
        var size: CK_ULONG = 0
        try call("C_GetObjectSize", \.C_GetObjectSize) { $0(s.rawValue, object.rawValue, &size) }
        return UInt(size)
    }

    /// `C_SetAttributeValue`
    public func setAttributes(_ s: SessionHandle, _ object: ObjectHandle, _ template: [Attribute]) throws {
        try withTemplate(template) { p, n in
            try call("C_SetAttributeValue", \.C_SetAttributeValue) { $0(s.rawValue, object.rawValue, p, n) }
        }
    }

    /// `C_GenerateKey`: a secret key.
    public func generateKey(_ s: SessionHandle, mechanism: Mechanism, template: [Attribute]) throws -> ObjectHandle {
        var key: CK_OBJECT_HANDLE = 0
        try mechanism.withCMechanism { m in
            try withTemplate(template) { p, n in
                try call("C_GenerateKey", \.C_GenerateKey) { $0(s.rawValue, m, p, n, &key) }
            }
        }
        return ObjectHandle(rawValue: key)
    }

    /// `C_GenerateKeyPair`
    public func generateKeyPair(
        _ s: SessionHandle, mechanism: Mechanism, publicTemplate: [Attribute], privateTemplate: [Attribute]
    ) throws -> (public: ObjectHandle, private: ObjectHandle) {
        var publicKey: CK_OBJECT_HANDLE = 0
        var privateKey: CK_OBJECT_HANDLE = 0
        try mechanism.withCMechanism { m in
            try withTemplate(publicTemplate) { pub, pubCount in
                try withTemplate(privateTemplate) { priv, privCount in
                    try call("C_GenerateKeyPair", \.C_GenerateKeyPair) {
                        $0(s.rawValue, m, pub, pubCount, priv, privCount, &publicKey, &privateKey)
                    }
                }
            }
        }
        return (ObjectHandle(rawValue: publicKey), ObjectHandle(rawValue: privateKey))
    }

    // MARK: - Cryptography

    /// `C_SignInit` then the two-call `C_Sign`.
    public func sign(_ s: SessionHandle, mechanism: Mechanism, key: ObjectHandle, data: [UInt8]) throws -> [UInt8] {
        try signInit(s, mechanism: mechanism, key: key)
        return try signAfterInit(s, data: data)
    }

    /// `C_SignInit` alone, for when a `CKU_CONTEXT_SPECIFIC` login must come before the data.
    public func signInit(_ s: SessionHandle, mechanism: Mechanism, key: ObjectHandle) throws {
        try mechanism.withCMechanism { m in
            try call("C_SignInit", \.C_SignInit) { $0(s.rawValue, m, key.rawValue) }
        }
    }

    /// The two-call `C_Sign` of an operation started with `signInit`. A signature longer than
    /// 64 MiB is refused (the operation then stays active until the session closes).
    public func signAfterInit(_ s: SessionHandle, data: [UInt8]) throws -> [UInt8] {
        try withInput(data) { input, length in
            try twoCall("C_Sign", \.C_Sign, zero: UInt8(0), cap: Self.maxLength, guess: Self.outputGuess) { f, out, outLength in
                f(s.rawValue, input, length, out, outLength)
            }
        }
    }

    /// `C_SignUpdate` of a multi-part signature started with `signInit`.
    public func signUpdate(_ s: SessionHandle, data: [UInt8]) throws {
        try withInput(data) { input, length in
            try call("C_SignUpdate", \.C_SignUpdate) { $0(s.rawValue, input, length) }
        }
    }

    /// The two-call `C_SignFinal` of a multi-part signature.
    public func signFinal(_ s: SessionHandle) throws -> [UInt8] {
        try twoCall("C_SignFinal", \.C_SignFinal, zero: UInt8(0), cap: Self.maxLength, guess: Self.outputGuess) { f, out, outLength in
            f(s.rawValue, out, outLength)
        }
    }

    /// `C_VerifyInit` then `C_Verify`: false on `CKR_SIGNATURE_INVALID`, other failures throw.
    public func verify(_ s: SessionHandle, mechanism: Mechanism, key: ObjectHandle, data: [UInt8], signature: [UInt8])
        throws -> Bool
    {
        do {
            try verifyRaw(s, mechanism: mechanism, key: key, data: data, signature: signature)
            return true
        } catch let e as PKCS11Error where e.rv == .signatureInvalid && e.function == "C_Verify" {
            return false
        }
    }

    /// `C_VerifyInit` then `C_Verify`, every failure thrown, `CKR_SIGNATURE_INVALID` and
    /// `CKR_SIGNATURE_LEN_RANGE` included (the proxy must return the module's exact code).
    public func verifyRaw(
        _ s: SessionHandle, mechanism: Mechanism, key: ObjectHandle, data: [UInt8], signature: [UInt8]
    ) throws {
        try mechanism.withCMechanism { m in
            try call("C_VerifyInit", \.C_VerifyInit) { $0(s.rawValue, m, key.rawValue) }
        }
        try withInput(data) { input, length in
            try withInput(signature) { sig, sigLength in
                try call("C_Verify", \.C_Verify) { $0(s.rawValue, input, length, sig, sigLength) }
            }
        }
    }

    /// `C_DigestInit` then the two-call `C_Digest` (no login needed).
    public func digest(_ s: SessionHandle, mechanism: Mechanism, data: [UInt8]) throws -> [UInt8] {
        try mechanism.withCMechanism { m in
            try call("C_DigestInit", \.C_DigestInit) { $0(s.rawValue, m) }
        }
        return try withInput(data) { input, length in
            try twoCall("C_Digest", \.C_Digest, zero: UInt8(0), cap: Self.maxLength, guess: Self.outputGuess) { f, out, outLength in
                f(s.rawValue, input, length, out, outLength)
            }
        }
    }

    /// `C_EncryptInit` then the two-call `C_Encrypt`.
    public func encrypt(_ s: SessionHandle, mechanism: Mechanism, key: ObjectHandle, data: [UInt8]) throws -> [UInt8] {
        try mechanism.withCMechanism { m in
            try call("C_EncryptInit", \.C_EncryptInit) { $0(s.rawValue, m, key.rawValue) }
        }
        return try withInput(data) { input, length in
            try twoCall("C_Encrypt", \.C_Encrypt, zero: UInt8(0), cap: Self.maxLength, guess: Self.outputGuess(for: data)) { f, out, outLength in
                f(s.rawValue, input, length, out, outLength)
            }
        }
    }

    /// `C_DecryptInit` then the two-call `C_Decrypt`.
    public func decrypt(_ s: SessionHandle, mechanism: Mechanism, key: ObjectHandle, data: [UInt8]) throws -> [UInt8] {
        try decryptInit(s, mechanism: mechanism, key: key)
        return try decryptAfterInit(s, data: data)
    }

    /// `C_DecryptInit` alone, for when a `CKU_CONTEXT_SPECIFIC` login must come before the data.
    public func decryptInit(_ s: SessionHandle, mechanism: Mechanism, key: ObjectHandle) throws {
        try mechanism.withCMechanism { m in
            try call("C_DecryptInit", \.C_DecryptInit) { $0(s.rawValue, m, key.rawValue) }
        }
    }

    /// The two-call `C_Decrypt` of an operation started with `decryptInit`.
    public func decryptAfterInit(_ s: SessionHandle, data: [UInt8]) throws -> [UInt8] {
        try withInput(data) { input, length in
            try twoCall("C_Decrypt", \.C_Decrypt, zero: UInt8(0), cap: Self.maxLength, guess: Self.outputGuess(for: data)) { f, out, outLength in
                f(s.rawValue, input, length, out, outLength)
            }
        }
    }

    /// `C_GenerateRandom`; at most 64 MiB.
    public func generateRandom(_ s: SessionHandle, count: Int) throws -> [UInt8] {
        guard count >= 0, count <= Self.maxLength else {
            throw PKCS11Error(rv: .argumentsBad, function: "C_GenerateRandom")
        }
        var bytes = [UInt8](repeating: 0, count: max(count, 1))
        try call("C_GenerateRandom", \.C_GenerateRandom) { f in
            bytes.withUnsafeMutableBufferPointer { f(s.rawValue, $0.baseAddress, CK_ULONG(count)) }
        }
        return Array(bytes.prefix(count))
    }

    /// `C_SeedRandom`
    public func seedRandom(_ s: SessionHandle, _ seed: [UInt8]) throws {
        try withInput(seed) { input, length in
            try call("C_SeedRandom", \.C_SeedRandom) { $0(s.rawValue, input, length) }
        }
    }
}

/// `CK_UNAVAILABLE_INFORMATION`: the header's `(~0UL)` does not import into Swift.
private let unavailableInformation = CK_ULONG.max

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
