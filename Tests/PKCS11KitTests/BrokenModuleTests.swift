import Foundation
import PKCS11Kit
import Testing

/// A deliberately broken module (compiled from the C below): it claims absurd counts and
/// lengths, keeps growing its answers, and leaves most function pointers NULL. The wrapper
/// must refuse all of it with a PKCS11Error naming the function, and never allocate the
/// claimed sizes or crash.
@Suite struct BrokenModuleTests {
    static let source = #"""
        #include <string.h>
        #include <p11-kit/pkcs11.h>

        static unsigned long grow = 1;
        static CK_RV init(void *a) { (void)a; return CKR_OK; }
        static CK_RV fin(void *a) { (void)a; return CKR_OK; }
        /* 1,000,000 slots: more than any real reader setup. */
        static CK_RV slots(unsigned char p, CK_SLOT_ID *list, unsigned long *n) {
            (void)p; (void)list; *n = 1000000; return CKR_OK;
        }
        /* Always one more than what was offered. */
        static CK_RV mechs(CK_SLOT_ID s, CK_MECHANISM_TYPE *list, unsigned long *n) {
            (void)s;
            if (list == NULL) { *n = grow; return CKR_OK; }
            *n = ++grow; return CKR_BUFFER_TOO_SMALL;
        }
        static CK_RV open_s(CK_SLOT_ID s, CK_FLAGS f, void *a, CK_NOTIFY n, CK_SESSION_HANDLE *h) {
            (void)s; (void)f; (void)a; (void)n; *h = 1; return CKR_OK;
        }
        /* Object 2: CKA_LABEL grows from 4 to 8 bytes during the first fetch, CKA_VALUE is
           sensitive, all else invalid; the batch code is the last problem seen. Any other
           object: a 1 TiB attribute. */
        static int grown;
        static CK_RV attrs(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE o, CK_ATTRIBUTE *t, unsigned long n) {
            (void)s;
            CK_RV rv = CKR_OK;
            for (unsigned long i = 0; i < n; i++) {
                if (o != 2) { t[i].ulValueLen = 1UL << 40; continue; }
                if (t[i].type == CKA_LABEL) {
                    const char *label = grown ? "abcdefgh" : "abcd";
                    unsigned long len = strlen(label);
                    if (t[i].pValue != NULL && !grown) { grown = 1; len = 8; }
                    if (t[i].pValue == NULL) { t[i].ulValueLen = len; }
                    else if (t[i].ulValueLen < len) { t[i].ulValueLen = CK_UNAVAILABLE_INFORMATION; rv = CKR_BUFFER_TOO_SMALL; }
                    else { memcpy(t[i].pValue, label, len); t[i].ulValueLen = len; }
                } else if (t[i].type == CKA_VALUE) {
                    t[i].ulValueLen = CK_UNAVAILABLE_INFORMATION; rv = CKR_ATTRIBUTE_SENSITIVE;
                } else {
                    t[i].ulValueLen = CK_UNAVAILABLE_INFORMATION; rv = CKR_ATTRIBUTE_TYPE_INVALID;
                }
            }
            return rv;
        }
        static CK_RV sign_init(CK_SESSION_HANDLE s, CK_MECHANISM *m, CK_OBJECT_HANDLE k) {
            (void)s; (void)m; (void)k; return CKR_OK;
        }
        /* A 1 GiB signature. */
        static CK_RV sign(CK_SESSION_HANDLE s, unsigned char *d, unsigned long dl, unsigned char *sig, unsigned long *sl) {
            (void)s; (void)d; (void)dl; (void)sig; *sl = 1UL << 30; return CKR_OK;
        }
        static CK_RV find_init(CK_SESSION_HANDLE s, CK_ATTRIBUTE *t, unsigned long n) {
            (void)s; (void)t; (void)n; return CKR_OK;
        }
        /* Claims more results than it was asked for. */
        static CK_RV find(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE *o, unsigned long max, unsigned long *n) {
            (void)s; (void)o; *n = max + 1; return CKR_OK;
        }
        static int finals;
        static CK_RV find_final(CK_SESSION_HANDLE s) { (void)s; finals++; return CKR_OK; }
        int broken_find_finals(void) { return finals; }

        static CK_FUNCTION_LIST list;
        CK_RV C_GetFunctionList(CK_FUNCTION_LIST **out) {
            memset(&list, 0, sizeof list);
            list.version.major = 2; list.version.minor = 40;
            list.C_Initialize = init; list.C_Finalize = fin;
            list.C_GetSlotList = slots; list.C_GetMechanismList = mechs;
            list.C_OpenSession = open_s; list.C_GetAttributeValue = attrs;
            list.C_SignInit = sign_init; list.C_Sign = sign;
            list.C_FindObjectsInit = find_init; list.C_FindObjects = find;
            list.C_FindObjectsFinal = find_final;
            *out = &list;
            return CKR_OK;
        }
        """#

    static let library: Result<(module: PKCS11Module, path: String), any Error> = Result {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("pkcs11kit-broken-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        let c = dir.appendingPathComponent("broken.c")
        let so = dir.appendingPathComponent("libbroken.so")
        try source.write(to: c, atomically: true, encoding: .utf8)
        try run("cc", ["-Wall", "-Werror", "-shared", "-fPIC", "-I/usr/include/p11-kit-1", c.path, "-o", so.path])
        return (try PKCS11Module(path: so.path), so.path)
    }

    /// How often the broken module's C_FindObjectsFinal ran.
    static func findFinals(_ path: String) throws -> Int32 {
        let handle = try #require(dlopen(path, RTLD_NOW | RTLD_NOLOAD))
        defer { dlclose(handle) }
        let symbol = try #require(dlsym(handle, "broken_find_finals"))
        typealias Counter = @convention(c) () -> Int32
        return unsafeBitCast(symbol, to: Counter.self)()
    }

    @Test func refusesAbsurdCountsAndLengths() throws {
        let (m, path) = try Self.library.get()
        #expect(throws: PKCS11Error(rv: .generalError, function: "C_GetSlotList")) {
            try m.slotList(tokenPresent: false)
        }
        let s = try m.openSession(SlotID(rawValue: 0))
        #expect(throws: PKCS11Error(rv: .generalError, function: "C_GetAttributeValue")) {
            try m.getAttributes(s, ObjectHandle(rawValue: 1), [.label])
        }
        #expect(throws: PKCS11Error(rv: .generalError, function: "C_GetAttributeValue")) {
            try m.attributeValues(s, ObjectHandle(rawValue: 1), [.label])
        }
        #expect(throws: PKCS11Error(rv: .generalError, function: "C_Sign")) {
            try m.sign(s, mechanism: Mechanism(.ecdsa), key: ObjectHandle(rawValue: 1), data: [1])
        }
        let finals = try Self.findFinals(path)
        #expect(throws: PKCS11Error(rv: .generalError, function: "C_FindObjects")) {
            try m.findObjects(s, matching: [])
        }
        #expect(try Self.findFinals(path) == finals + 1, "the search is closed even after a failure")
    }

    @Test func givesUpOnEverGrowingAnswers() throws {
        let m = try Self.library.get().module
        #expect(throws: PKCS11Error(rv: .bufferTooSmall, function: "C_GetMechanismList")) {
            try m.mechanismList(SlotID(rawValue: 0))
        }
    }

    /// The batch fetch fails because the object changed after the length query: every
    /// attribute is then asked alone, each with its own code, the grown one with its new value.
    @Test func attributeValuesFallBackToOneAtATime() throws {
        let (m, _) = try Self.library.get()
        let s = try m.openSession(SlotID(rawValue: 0))
        let object = ObjectHandle(rawValue: 2)
        #expect(try m.attributeValues(s, object, [.id, .label, .value]) == [
            AttributeResult(type: .id, status: .attributeTypeInvalid, value: []),
            AttributeResult(type: .label, status: .ok, value: Array("abcdefgh".utf8)),
            AttributeResult(type: .value, status: .attributeSensitive, value: []),
        ])
        #expect(try m.getAttributes(s, object, [.id, .label, .value]) == [.label: Array("abcdefgh".utf8)])
    }

    @Test func missingFunctionsAreNotSupported() throws {
        let m = try Self.library.get().module
        #expect(throws: PKCS11Error(rv: .functionNotSupported, function: "C_GetInfo")) { try m.info() }
        #expect(throws: PKCS11Error(rv: .functionNotSupported, function: "C_Login")) {
            try m.login(SessionHandle(rawValue: 1), userType: .user, pin: nil)
        }
        let s = SessionHandle(rawValue: 1)
        let o = ObjectHandle(rawValue: 1)
        #expect(throws: PKCS11Error(rv: .functionNotSupported, function: "C_InitToken")) {
            try m.initToken(SlotID(rawValue: 0), soPIN: nil, label: "x")
        }
        #expect(throws: PKCS11Error(rv: .functionNotSupported, function: "C_InitPIN")) { try m.initPIN(s, pin: nil) }
        #expect(throws: PKCS11Error(rv: .functionNotSupported, function: "C_SetPIN")) {
            try m.setPIN(s, old: nil, new: nil)
        }
        #expect(throws: PKCS11Error(rv: .functionNotSupported, function: "C_CreateObject")) { try m.createObject(s, []) }
        #expect(throws: PKCS11Error(rv: .functionNotSupported, function: "C_CopyObject")) { try m.copyObject(s, o, []) }
        #expect(throws: PKCS11Error(rv: .functionNotSupported, function: "C_DestroyObject")) { try m.destroyObject(s, o) }
        #expect(throws: PKCS11Error(rv: .functionNotSupported, function: "C_SetAttributeValue")) {
            try m.setAttributes(s, o, [])
        }
        #expect(throws: PKCS11Error(rv: .functionNotSupported, function: "C_GenerateKey")) {
            try m.generateKey(s, mechanism: Mechanism(.aesKeyGen), template: [])
        }
        #expect(throws: PKCS11Error(rv: .functionNotSupported, function: "C_GenerateKeyPair")) {
            try m.generateKeyPair(s, mechanism: Mechanism(.ecKeyPairGen), publicTemplate: [], privateTemplate: [])
        }
        #expect(throws: PKCS11Error(rv: .functionNotSupported, function: "C_SeedRandom")) { try m.seedRandom(s, [1]) }
        #expect(throws: PKCS11Error(rv: .functionNotSupported, function: "C_VerifyInit")) {
            try m.verifyRaw(s, mechanism: Mechanism(.ecdsa), key: o, data: [1], signature: [2])
        }
    }
}
