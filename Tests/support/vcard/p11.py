"""A small ctypes PKCS#11 client for tests (several operations in one session, which
pkcs11-tool cannot do). Only what the virtual-card tests need; errors carry the CK_RV.

Linux x86-64 PKCS#11 ABI: CK_ULONG is unsigned long (8 bytes), structs are unpacked.
"""

import ctypes
from ctypes import byref, c_ubyte, c_ulong, c_void_p

OPENSC_PKCS11 = "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so"

CKF_TOKEN_PRESENT = 0x1
CKF_RW_SESSION, CKF_SERIAL_SESSION = 0x2, 0x4
CKU_SO, CKU_USER, CKU_CONTEXT_SPECIFIC = 0, 1, 2
CKO_PUBLIC_KEY, CKO_PRIVATE_KEY = 2, 3
CKA_CLASS, CKA_LABEL, CKA_ID = 0x0, 0x3, 0x102
CKA_MODULUS, CKA_PUBLIC_EXPONENT, CKA_EC_POINT = 0x120, 0x122, 0x181
CKA_ALWAYS_AUTHENTICATE = 0x202
CKM_RSA_PKCS, CKM_SHA256_RSA_PKCS, CKM_ECDSA, CKM_ECDSA_SHA256 = 0x1, 0x40, 0x1041, 0x1044

RV_NAMES = {
    0x00: "CKR_OK", 0x05: "CKR_GENERAL_ERROR", 0x06: "CKR_FUNCTION_FAILED",
    0x07: "CKR_ARGUMENTS_BAD", 0x30: "CKR_DEVICE_ERROR", 0x31: "CKR_DEVICE_MEMORY",
    0x32: "CKR_DEVICE_REMOVED", 0x54: "CKR_FUNCTION_NOT_SUPPORTED",
    0x68: "CKR_MECHANISM_INVALID", 0x82: "CKR_OBJECT_HANDLE_INVALID",
    0xA0: "CKR_PIN_INCORRECT", 0xA1: "CKR_PIN_INVALID", 0xA2: "CKR_PIN_LEN_RANGE",
    0xA4: "CKR_PIN_LOCKED", 0xB0: "CKR_SESSION_CLOSED", 0xB3: "CKR_SESSION_HANDLE_INVALID",
    0xE0: "CKR_TOKEN_NOT_PRESENT", 0xE1: "CKR_TOKEN_NOT_RECOGNIZED",
    0x100: "CKR_USER_ALREADY_LOGGED_IN", 0x101: "CKR_USER_NOT_LOGGED_IN",
    0x190: "CKR_CRYPTOKI_ALREADY_INITIALIZED", 0x191: "CKR_CRYPTOKI_NOT_INITIALIZED",
}


class P11Error(Exception):
    """A PKCS#11 call returned something other than CKR_OK."""

    def __init__(self, func, rv):
        self.func, self.rv = func, rv
        self.name = RV_NAMES.get(rv, f"0x{rv:X}")
        super().__init__(f"{func} failed: {self.name}")


class CK_ATTRIBUTE(ctypes.Structure):
    _fields_ = [("type", c_ulong), ("pValue", c_void_p), ("ulValueLen", c_ulong)]


class CK_MECHANISM(ctypes.Structure):
    _fields_ = [("mechanism", c_ulong), ("pParameter", c_void_p), ("ulParameterLen", c_ulong)]


def _text(raw):
    return bytes(raw).decode("utf-8", "replace").rstrip(" \x00")


class Module:
    """One loaded and initialised PKCS#11 module (C_Initialize ... C_Finalize)."""

    def __init__(self, path=OPENSC_PKCS11):
        self.lib = ctypes.CDLL(path)
        self.call("C_Initialize", None)

    def call(self, name, *args):
        f = getattr(self.lib, name)
        f.restype = c_ulong
        rv = f(*args)
        if rv != 0:
            raise P11Error(name, rv)

    def finalize(self):
        if self.lib is not None:
            self.call("C_Finalize", None)
            self.lib = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.finalize()

    def slots(self, token_present=False):
        n = c_ulong(0)
        self.call("C_GetSlotList", c_ubyte(token_present), None, byref(n))
        arr = (c_ulong * max(n.value, 1))()
        self.call("C_GetSlotList", c_ubyte(token_present), arr, byref(n))
        return list(arr[:n.value])

    def slot_info(self, slot):
        # CK_SLOT_INFO: description[64], manufacturer[32], flags, two versions.
        buf = (c_ubyte * 256)()
        self.call("C_GetSlotInfo", c_ulong(slot), buf)
        return {"description": _text(buf[0:64]), "manufacturer": _text(buf[64:96]),
                "flags": int.from_bytes(bytes(buf[96:104]), "little")}

    def token_info(self, slot):
        # CK_TOKEN_INFO: label[32], manufacturer[32], model[16], serial[16], flags, ...
        buf = (c_ubyte * 512)()
        self.call("C_GetTokenInfo", c_ulong(slot), buf)
        return {"label": _text(buf[0:32]), "manufacturer": _text(buf[32:64]),
                "model": _text(buf[64:80]), "serial": _text(buf[80:96]),
                "flags": int.from_bytes(bytes(buf[96:104]), "little")}

    def find_slot(self, serial, label_contains=None):
        """The slot whose token has this serial (and a label containing that), or None."""
        for s in self.slots(token_present=True):
            try:
                ti = self.token_info(s)
            except P11Error:
                continue
            if ti["serial"] == serial and (label_contains is None or label_contains in ti["label"]):
                return s
        return None

    def open(self, slot):
        h = c_ulong(0)
        self.call("C_OpenSession", c_ulong(slot), c_ulong(CKF_SERIAL_SESSION | CKF_RW_SESSION),
                  None, None, byref(h))
        return Session(self, h.value)


class Session:
    """A PKCS#11 session; PINs are passed as bytes straight to C_Login."""

    def __init__(self, module, handle):
        self.m, self.h = module, handle

    def login(self, pin, user_type=CKU_USER):
        pin = pin.encode() if isinstance(pin, str) else pin
        self.m.call("C_Login", c_ulong(self.h), c_ulong(user_type), pin, c_ulong(len(pin)))

    def logout(self):
        self.m.call("C_Logout", c_ulong(self.h))

    def close(self):
        self.m.call("C_CloseSession", c_ulong(self.h))

    def find(self, cls, key_id=None):
        attrs = [(CKA_CLASS, c_ulong(cls))]
        if key_id is not None:
            attrs.append((CKA_ID, (c_ubyte * len(key_id)).from_buffer_copy(key_id)))
        tmpl = (CK_ATTRIBUTE * len(attrs))()
        for i, (t, v) in enumerate(attrs):
            tmpl[i] = CK_ATTRIBUTE(t, ctypes.cast(byref(v), c_void_p), ctypes.sizeof(v))
        self.m.call("C_FindObjectsInit", c_ulong(self.h), tmpl, c_ulong(len(attrs)))
        out = (c_ulong * 32)()
        n = c_ulong(0)
        try:
            self.m.call("C_FindObjects", c_ulong(self.h), out, c_ulong(32), byref(n))
        finally:
            self.m.call("C_FindObjectsFinal", c_ulong(self.h))
        return list(out[:n.value])

    def attribute(self, obj, attr_type):
        a = CK_ATTRIBUTE(attr_type, None, 0)
        self.m.call("C_GetAttributeValue", c_ulong(self.h), c_ulong(obj), byref(a), c_ulong(1))
        buf = (c_ubyte * a.ulValueLen)()
        a.pValue = ctypes.cast(buf, c_void_p)
        self.m.call("C_GetAttributeValue", c_ulong(self.h), c_ulong(obj), byref(a), c_ulong(1))
        return bytes(buf[:a.ulValueLen])

    def sign(self, key, mechanism, data, context_pin=None):
        mech = CK_MECHANISM(mechanism, None, 0)
        self.m.call("C_SignInit", c_ulong(self.h), byref(mech), c_ulong(key))
        if context_pin is not None:
            self.login(context_pin, CKU_CONTEXT_SPECIFIC)
        n = c_ulong(0)
        self.m.call("C_Sign", c_ulong(self.h), data, c_ulong(len(data)), None, byref(n))
        out = (c_ubyte * n.value)()
        self.m.call("C_Sign", c_ulong(self.h), data, c_ulong(len(data)), out, byref(n))
        return bytes(out[:n.value])
