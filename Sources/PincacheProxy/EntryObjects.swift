import CPKCS11
import CryptokiWire

// Entry points for objects, keys and random numbers (see Entry.swift for the pattern).

// MARK: objects

@_cdecl("pincache_C_CreateObject")
func pincacheCreateObject(_ session: CK_SESSION_HANDLE, _ template: UnsafeMutablePointer<CK_ATTRIBUTE>?, _ count: CK_ULONG,
                          _ object: UnsafeMutablePointer<CK_OBJECT_HANDLE>?) -> CK_RV {
    entry { library throws(CKError) in
        try library.withSession(session) { s throws(CKError) in
            let encoded = try Codec.template(template, count)
            guard let object else { throw .argumentsBad }
            try library.callMakingObject(Calls.createObject, on: s, [encoded], into: object)
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
            try library.callMakingObject(Calls.copyObject, on: s, [.ulong(UInt64(source)), encoded], into: object)
        }
    }
}

@_cdecl("pincache_C_DestroyObject")
func pincacheDestroyObject(_ session: CK_SESSION_HANDLE, _ object: CK_OBJECT_HANDLE) -> CK_RV {
    entry { library throws(CKError) in
        try library.withSession(session) { s throws(CKError) in
            library.forgetKeyFacts(slot: s.slot, object)
            _ = try library.call(Calls.destroyObject, on: s, [.ulong(UInt64(object))])
        }
    }
}

@_cdecl("pincache_C_GetObjectSize")
func pincacheGetObjectSize(_ session: CK_SESSION_HANDLE, _ object: CK_OBJECT_HANDLE,
                           _ size: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
    entry { library throws(CKError) in
        guard let size else { throw .argumentsBad }
        try library.withSession(session) { s throws(CKError) in
            let reply = try library.call(Calls.getObjectSize, on: s, [.ulong(UInt64(object))])
            guard let value = reply.first?.ulongValue else { throw .deviceError }
            size.pointee = CK_ULONG(value)
        }
    }
}

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
            library.forgetKeyFacts(slot: s.slot, object)
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
            try library.checkOneAtATime(s)
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
            try library.callMakingObject(Calls.generateKey, on: s, [encodedMechanism, encodedTemplate], into: key)
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
                     _ wrappedLength: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
    entry { library throws(CKError) in
        try library.withSession(session) { s throws(CKError) in
            let (_, encodedMechanism) = try Codec.mechanism(mechanism)
            guard let wrappedLength else { throw .argumentsBad }
            // No operation stays active between a length query and the real call: each asks
            // the token (RSA-PKCS wrapping differs every time; only its length is stable).
            let reply = try library.call(
                Calls.wrapKey, on: s, [encodedMechanism, .ulong(UInt64(wrappingKey)), .ulong(UInt64(key))])
            guard let bytes = reply.first?.bytesValue else { throw .deviceError }
            _ = try Codec.deliver(bytes, to: wrapped, length: wrappedLength)
        }
    }
}

@_cdecl("pincache_C_UnwrapKey")
func pincacheUnwrapKey(_ session: CK_SESSION_HANDLE, _ mechanism: UnsafeMutablePointer<CK_MECHANISM>?,
                       _ unwrappingKey: CK_OBJECT_HANDLE, _ wrapped: UnsafeMutablePointer<CK_BYTE>?, _ wrappedLength: CK_ULONG,
                       _ template: UnsafeMutablePointer<CK_ATTRIBUTE>?, _ count: CK_ULONG,
                       _ key: UnsafeMutablePointer<CK_OBJECT_HANDLE>?) -> CK_RV {
    entry { library throws(CKError) in
        try library.withSession(session) { s throws(CKError) in
            let (_, encodedMechanism) = try Codec.mechanism(mechanism)
            let input = try Codec.bytes(wrapped, wrappedLength, tooLong: CKError(CKR_WRAPPED_KEY_LEN_RANGE))
            guard wrappedLength > 0 else { throw CKError(CKR_WRAPPED_KEY_LEN_RANGE) }
            let encodedTemplate = try Codec.template(template, count)
            guard let key else { throw .argumentsBad }
            try library.callMakingObject(
                Calls.unwrapKey, on: s, [encodedMechanism, .ulong(UInt64(unwrappingKey)), .bytes(input), encodedTemplate],
                into: key)
        }
    }
}

@_cdecl("pincache_C_DeriveKey")
func pincacheDeriveKey(_ session: CK_SESSION_HANDLE, _ mechanism: UnsafeMutablePointer<CK_MECHANISM>?,
                       _ baseKey: CK_OBJECT_HANDLE, _ template: UnsafeMutablePointer<CK_ATTRIBUTE>?, _ count: CK_ULONG,
                       _ key: UnsafeMutablePointer<CK_OBJECT_HANDLE>?) -> CK_RV {
    entry { library throws(CKError) in
        try library.withSession(session) { s throws(CKError) in
            let (_, encodedMechanism) = try Codec.mechanism(mechanism)
            let encodedTemplate = try Codec.template(template, count)
            guard let key else { throw .argumentsBad }
            try library.callMakingObject(
                Calls.deriveKey, on: s, [encodedMechanism, .ulong(UInt64(baseKey)), encodedTemplate], into: key)
        }
    }
}

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
