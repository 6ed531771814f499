#!/usr/bin/python3
"""A scripted stand-in for pincached's org.pincache.Cryptoki1 (cryptoki1.md), for testing
the proxy's own mechanics where the real daemon cannot be made to misbehave: call
counts (one round trip per C_Sign), daemon restarts and crashes, slot signals, and
hostile replies (wrong signatures, oversized counts).

Usage: test_proxy_fakedaemon.py BUS_ADDRESS [--hostile MODE]
MODE: wrong-signature (GetSlots answers 's'), huge-find (FindObjects answers 100001
handles), crash-on-sign (exits without replying to Sign).
Control interface org.pincache.Test on /org/pincache: Calls() -> a{su} (members seen),
Insert(o) (emits TokenInserted).
"""

import hashlib
import os
import sys

import dbus
import dbus.service
import dbus.mainloop.glib
from gi.repository import GLib

# The daemon's interface names (dbus/org.pincache.Cryptoki*1.xml).
CRYPTO_MANAGER = "org.pincache.CryptokiManager1"
CRYPTO_SLOT = "org.pincache.CryptokiSlot1"
CRYPTO_SESSION = "org.pincache.CryptokiSession1"
SESSION1 = "org.pincache.Session1"
MANAGER = "org.pincache.Manager1"
TEST = "org.pincache.Test"
PIN = "1234"
EC_KEY = 7
CKM_ECDSA, CKM_SHA256 = 0x1041, 0x250
CKF_SIGN, CKF_VERIFY, CKF_DIGEST = 0x800, 0x2000, 0x400


class Error(dbus.DBusException):
    def __init__(self, name, message):
        super().__init__(message)
        self._dbus_error_name = name


def ulong(v):
    return dbus.ByteArray(int(v).to_bytes(8, "little"))


class Daemon:
    def __init__(self, bus, hostile):
        self.bus = bus
        self.hostile = hostile
        self.calls = {}
        self.sessions = {}
        self.next_session = 1
        self.logged_in = set()  # caller unique names

    def count(self, member):
        self.calls[member] = self.calls.get(member, 0) + 1


class Manager(dbus.service.Object):
    def __init__(self, d):
        super().__init__(d.bus, "/org/pincache")
        self.d = d

    # No declared out signature, so the hostile mode can answer with the wrong one.
    @dbus.service.method(CRYPTO_MANAGER, in_signature="")
    def GetSlots(self):
        self.d.count("GetSlots")
        if self.d.hostile == "wrong-signature":
            return "not a slot list"
        present = {
            "SlotDescription": "fake slot", "SlotManufacturer": "pincache tests", "SlotFlags": dbus.UInt64(1),
            "HardwareVersion": dbus.Struct((dbus.Byte(1), dbus.Byte(2))), "FirmwareVersion": dbus.Struct((dbus.Byte(3), dbus.Byte(4))),
            "TokenPresent": True, "Label": "fake-token", "Manufacturer": "pincache tests", "Model": "fake",
            "Serial": "0001", "TokenFlags": dbus.UInt64(0x40D), "MaxSessionCount": dbus.UInt64(0),
            "MaxRwSessionCount": dbus.UInt64(0), "MaxPinLen": dbus.UInt64(255), "MinPinLen": dbus.UInt64(4),
            "TotalPublicMemory": dbus.UInt64(2 ** 64 - 1), "FreePublicMemory": dbus.UInt64(2 ** 64 - 1),
            "TotalPrivateMemory": dbus.UInt64(2 ** 64 - 1), "FreePrivateMemory": dbus.UInt64(2 ** 64 - 1),
            "TokenHardwareVersion": dbus.Struct((dbus.Byte(0), dbus.Byte(1))),
            "TokenFirmwareVersion": dbus.Struct((dbus.Byte(0), dbus.Byte(1))), "UtcTime": "",
        }
        empty = {k: present[k] for k in ("SlotDescription", "SlotManufacturer", "HardwareVersion", "FirmwareVersion")}
        empty["SlotFlags"] = dbus.UInt64(0)
        empty["TokenPresent"] = False
        return dbus.Array([(dbus.ObjectPath("/org/pincache/token/0"), dbus.Dictionary(present, signature="sv")),
                           (dbus.ObjectPath("/org/pincache/token/1"), dbus.Dictionary(empty, signature="sv"))],
                          signature="(oa{sv})")

    @dbus.service.method(TEST, in_signature="", out_signature="a{su}")
    def Calls(self):
        return dbus.Dictionary(self.d.calls, signature="su")

    @dbus.service.method(TEST, in_signature="o", out_signature="")
    def Insert(self, path):
        self.TokenInserted(path)

    @dbus.service.signal(MANAGER, signature="o")
    def TokenInserted(self, path):
        pass


class Slot(dbus.service.Object):
    def __init__(self, d, n):
        super().__init__(d.bus, f"/org/pincache/token/{n}")
        self.d = d
        self.n = n

    @dbus.service.method(CRYPTO_SLOT, in_signature="", out_signature="a(tttt)")
    def GetMechanisms(self):
        self.d.count("GetMechanisms")
        return [(CKM_ECDSA, 256, 256, CKF_SIGN | CKF_VERIFY), (CKM_SHA256, 0, 0, CKF_DIGEST)]

    @dbus.service.method(CRYPTO_SLOT, in_signature="t", out_signature="o", sender_keyword="sender")
    def OpenSession(self, flags, sender=None):
        self.d.count("OpenSession")
        if self.n != 0:
            raise Error("org.pincache.Error.TokenNotPresent", "no token (0xe0)")
        if not flags & 4:
            raise Error("org.freedesktop.DBus.Error.InvalidArgs", "CKF_SERIAL_SESSION required (0xb4)")
        n = self.d.next_session
        self.d.next_session += 1
        s = Session(self.d, n, sender, flags)
        self.d.sessions[n] = s
        return s.path


class Session(dbus.service.Object):
    def __init__(self, d, n, owner, flags):
        self.path = f"/org/pincache/session/{n}"
        super().__init__(d.bus, self.path)
        self.d = d
        self.owner = owner
        self.flags = flags

    def check(self, sender, member):
        self.d.count(member)
        if sender != self.owner:
            raise Error("org.freedesktop.DBus.Error.AccessDenied", "not yours")

    @dbus.service.method(CRYPTO_SESSION, in_signature="", out_signature="(ttt)", sender_keyword="sender")
    def GetSessionInfo(self, sender=None):
        self.check(sender, "GetSessionInfo")
        rw = self.flags & 2
        state = (3 if rw else 1) if sender in self.d.logged_in else (2 if rw else 0)
        return (state, self.flags, 0)

    @dbus.service.method(CRYPTO_SESSION, in_signature="ts", out_signature="", sender_keyword="sender")
    def Login(self, user_type, pin, sender=None):
        self.check(sender, "Login")
        if sender in self.d.logged_in:
            raise Error("org.pincache.Error.AlreadyLoggedIn", "C_Login: CKR_USER_ALREADY_LOGGED_IN (0x100)")
        if pin != PIN:
            raise Error("org.pincache.Error.PinIncorrect", "C_Login: CKR_PIN_INCORRECT (0xa0)")
        self.d.logged_in.add(sender)

    @dbus.service.method(CRYPTO_SESSION, in_signature="", out_signature="", sender_keyword="sender")
    def Logout(self, sender=None):
        self.check(sender, "Logout")
        self.d.logged_in.discard(sender)

    @dbus.service.method(CRYPTO_SESSION, in_signature="a(tay)t", out_signature="at", sender_keyword="sender")
    def FindObjects(self, template, max_count, sender=None):
        self.check(sender, "FindObjects")
        if self.d.hostile == "huge-find":
            return dbus.Array(range(100001), signature="t")
        return dbus.Array([EC_KEY], signature="t")

    @dbus.service.method(CRYPTO_SESSION, in_signature="tat", out_signature="a(ttay)", sender_keyword="sender")
    def GetAttributes(self, handle, types, sender=None):
        self.check(sender, "GetAttributes")
        out = []
        for t in types:
            if t == 0x100:
                out.append((t, 0, ulong(3)))
            elif t == 0x11:
                out.append((t, 0x11, dbus.ByteArray(b"")))
            elif t == 0x3:
                out.append((t, 0, dbus.ByteArray(b"fake-ec-key")))
            else:
                out.append((t, 0x12, dbus.ByteArray(b"")))
        return dbus.Array(out, signature="(ttay)")

    @dbus.service.method(CRYPTO_SESSION, in_signature="(tay)tay", out_signature="ay", sender_keyword="sender")
    def Sign(self, mechanism, key, data, sender=None):
        self.check(sender, "Sign")
        if self.d.hostile == "crash-on-sign":
            os._exit(3)
        if sender not in self.d.logged_in:
            raise Error("org.pincache.Error.NotLoggedIn", "not logged in (0x101)")
        if key != EC_KEY:
            raise Error("org.pincache.Error.KeyNotFound", "no such key (0x60)")
        return dbus.ByteArray(hashlib.sha256(bytes(data)).digest() + bytes(32))

    @dbus.service.method(CRYPTO_SESSION, in_signature="(tay)ay", out_signature="ay", sender_keyword="sender")
    def Digest(self, mechanism, data, sender=None):
        self.check(sender, "Digest")
        return dbus.ByteArray(hashlib.sha256(bytes(data)).digest())

    @dbus.service.method(SESSION1, in_signature="", out_signature="", sender_keyword="sender")
    def Close(self, sender=None):
        self.check(sender, "Close")
        self.remove_from_connection()


def main():
    address = sys.argv[1]
    hostile = sys.argv[3] if len(sys.argv) > 3 and sys.argv[2] == "--hostile" else None
    dbus.mainloop.glib.DBusGMainLoop(set_as_default=True)
    bus = dbus.bus.BusConnection(address)
    d = Daemon(bus, hostile)
    keep = [Manager(d), Slot(d, 0), Slot(d, 1)]
    bus.request_name("org.pincache.Daemon", dbus.bus.NAME_FLAG_DO_NOT_QUEUE)
    print("ready", flush=True)
    GLib.MainLoop().run()
    del keep


if __name__ == "__main__":
    main()
