"""One client of the chaos test (test_chaos.py), run as its own process: signs in a loop
until the stop file appears, re-opening and logging in again whenever its session is
lost, and writes one JSON line per call to --out:

    {"t": start time, "op": "sign"|"open"|"login"|"find", "ok": bool, "err": name or null,
     "msg": error text, "lat": seconds, "verified": bool (signatures)}

--kind dbus   talks to pincached's D-Bus API (dbus-python)
--kind proxy  loads libpincache-pkcs11.so through ctypes (Tests/support/vcard/p11.py)

The token is found by serial (and "(sig)" in the label for the card) each time a session
is needed, so a daemon restart or a re-inserted card is found again without restarting
this process. Signatures are raw ECDSA over SHA-256 and verified against --pubkey.
"""

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[0] / "integration"))
sys.path.insert(0, str(HERE.parents[0] / "support" / "vcard"))

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, utils  # noqa: E402


def load_pubkey(path):
    data = Path(path).read_bytes()
    if b"BEGIN PUBLIC KEY" in data:
        return serialization.load_pem_public_key(data)
    if b"BEGIN CERTIFICATE" in data:
        return x509.load_pem_x509_certificate(data).public_key()
    return x509.load_der_x509_certificate(data).public_key()


def verify(pub, digest, sig):
    half = len(sig) // 2
    der = utils.encode_dss_signature(int.from_bytes(sig[:half], "big"), int.from_bytes(sig[half:], "big"))
    try:
        pub.verify(der, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        return True
    except Exception:
        return False


class DBusClient:
    def __init__(self, args):
        from pincache_client import CallError, Client
        self.CallError = CallError
        self.c = Client(args.bus, args.name)
        self.c_timeout = 30.0
        self.args = args
        self.session = None

    def find_token(self):
        for t in self.c.tokens():
            p = self.c.token_props(t)
            if p["Present"] and p["Serial"] == self.args.serial and (self.args.label_has in p["Label"]):
                return t
        raise self.CallError("test.NoToken", "token not present")

    def open(self):
        self.session = self.c.open_session(self.find_token())

    def login(self):
        self.c.login(self.session, self.args.pin)

    def sign(self, digest):
        return self.c.sign(self.session, b"\x01", "ECDSA", digest)

    def error_of(self, e):
        if isinstance(e, self.CallError):
            return e.name, e.message
        return type(e).__name__, str(e)

    def drop(self):
        if self.session is not None:
            try:
                self.c.close_session(self.session)
            except Exception:
                pass
        self.session = None


# CK_FUNCTION_LIST after its CK_VERSION (PKCS#11 2.40 order), for modules that export
# only C_GetFunctionList, as the proxy does.
FUNCTIONS = """C_Initialize C_Finalize C_GetInfo C_GetFunctionList C_GetSlotList C_GetSlotInfo
C_GetTokenInfo C_GetMechanismList C_GetMechanismInfo C_InitToken C_InitPIN C_SetPIN C_OpenSession
C_CloseSession C_CloseAllSessions C_GetSessionInfo C_GetOperationState C_SetOperationState C_Login
C_Logout C_CreateObject C_CopyObject C_DestroyObject C_GetObjectSize C_GetAttributeValue
C_SetAttributeValue C_FindObjectsInit C_FindObjects C_FindObjectsFinal C_EncryptInit C_Encrypt
C_EncryptUpdate C_EncryptFinal C_DecryptInit C_Decrypt C_DecryptUpdate C_DecryptFinal C_DigestInit
C_Digest C_DigestUpdate C_DigestKey C_DigestFinal C_SignInit C_Sign C_SignUpdate C_SignFinal""".split()


class FunctionList:
    """Attribute access to a module's functions through C_GetFunctionList."""

    def __init__(self, path):
        import ctypes
        lib = ctypes.CDLL(path)
        table = ctypes.c_void_p()
        get = lib.C_GetFunctionList
        get.restype = ctypes.c_ulong
        if get(ctypes.byref(table)) != 0 or not table.value:
            raise OSError("C_GetFunctionList failed")
        pointers = ctypes.cast(table.value + 8, ctypes.POINTER(ctypes.c_void_p))   # after CK_VERSION (padded)
        for i, name in enumerate(FUNCTIONS):
            setattr(self, name, lib._FuncPtr(pointers[i]))
        self._lib = lib


class ProxyClient:
    def __init__(self, args):
        import p11
        self.p11 = p11
        os.environ["PINCACHE_BUS_ADDRESS"] = args.bus
        m = p11.Module.__new__(p11.Module)
        m.lib = FunctionList(args.proxy)
        m.call("C_Initialize", None)
        self.m = m
        self.args = args
        self.session = None
        self.key = None

    def open(self):
        slot = self.m.find_slot(self.args.serial, self.args.label_has or None)
        if slot is None:
            raise self.p11.P11Error("find_slot", 0xE0)
        self.session = self.m.open(slot)
        self.key = None

    def login(self):
        self.session.login(self.args.pin)
        keys = self.session.find(self.p11.CKO_PRIVATE_KEY, b"\x01")
        if len(keys) != 1:
            raise self.p11.P11Error("C_FindObjects", 0x82)
        self.key = keys[0]

    def sign(self, digest):
        return self.session.sign(self.key, self.p11.CKM_ECDSA, digest)

    def error_of(self, e):
        if isinstance(e, self.p11.P11Error):
            return e.name, f"{e.func}: {e.name}"
        return type(e).__name__, str(e)

    def drop(self):
        if self.session is not None:
            try:
                self.session.close()
            except Exception:
                pass
        self.session = None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", choices=("dbus", "proxy"), required=True)
    ap.add_argument("--bus", required=True)
    ap.add_argument("--serial", required=True)
    ap.add_argument("--label-has", default="")
    ap.add_argument("--pin", required=True)
    ap.add_argument("--pubkey", required=True)
    ap.add_argument("--proxy")
    ap.add_argument("--name", default="worker")
    ap.add_argument("--out", required=True)
    ap.add_argument("--stop", required=True)
    ap.add_argument("--pause", type=float, default=0.0)
    args = ap.parse_args()
    pub = load_pubkey(args.pubkey)
    out = open(args.out, "a", buffering=1)

    def record(op, t0, ok, err=None, msg=None, **extra):
        out.write(json.dumps({"t": t0, "op": op, "ok": ok, "err": err, "msg": msg,
                              "lat": time.monotonic() - t0, **extra}) + "\n")

    client = None
    n = 0
    while not os.path.exists(args.stop):
        if client is None:
            t0 = time.monotonic()
            try:
                client = DBusClient(args) if args.kind == "dbus" else ProxyClient(args)
            except Exception as e:   # the proxy never fails to load; the bus may be away
                record("connect", t0, False, type(e).__name__, str(e))
                time.sleep(0.5)
                continue
        step = "open" if client.session is None else ("login" if getattr(client, "logged", False) is False else "sign")
        t0 = time.monotonic()
        try:
            if step == "open":
                client.open()
                client.logged = False
                record("open", t0, True)
            elif step == "login":
                client.login()
                client.logged = True
                record("login", t0, True)
            else:
                n += 1
                digest = hashlib.sha256(f"{args.name} {n}".encode()).digest()
                sig = client.sign(digest)
                record("sign", t0, True, verified=verify(pub, digest, sig))
                if args.pause:
                    time.sleep(args.pause)
        except Exception as e:
            name, msg = client.error_of(e)
            record(step, t0, False, name, msg)
            client.drop()
            client.logged = False
            time.sleep(0.1)
    out.close()


if __name__ == "__main__":
    main()
