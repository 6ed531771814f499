import CPKCS11

/// Objects: searching, attributes, creating, copying, destroying, generating keys.
extension PKCS11Module {
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
}

/// `CK_UNAVAILABLE_INFORMATION`: the header's `(~0UL)` does not import into Swift.
private let unavailableInformation = CK_ULONG.max
