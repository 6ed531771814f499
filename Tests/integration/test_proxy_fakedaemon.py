#!/usr/bin/python3
"""A scripted stand-in for pincached, for testing the proxy's own mechanics where the real
daemon cannot be made to misbehave: call counts (one round trip per C_Sign), daemon restarts
and crashes, slot signals, hostile replies and broken transports. It owns org.pincache.Daemon,
answers Manager1.OpenCryptoki with a socket and speaks the wire on it (cryptoki_wire.py, from
the table the daemon declares).

Usage: test_proxy_fakedaemon.py BUS_ADDRESS [--hostile MODE]
MODE (what Sign or GetSlots/FindObjects answer):
  wrong-signature  GetSlots answers a body that is not its declared fields
  huge-find        FindObjects answers 100001 handles (over the table's cap)
  crash-on-sign    the process exits without answering Sign
  short-frame      Sign's reply announces more body than is sent, then the socket closes
  wrong-call       Sign is answered with another call's id
  oversize         Sign's reply header announces a body over the frame cap
  gone-mid-call    the socket closes without answering Sign
  wrong-tag        Sign is answered under a tag nobody asked for
Control interface org.pincache.Test on /org/pincache: Calls() -> a{su} (calls seen, by name),
Insert(o) (emits TokenInserted).
"""

import hashlib
import os
import socket
import struct
import sys
import threading
from pathlib import Path

import dbus
import dbus.mainloop.glib
import dbus.service
from gi.repository import GLib

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cryptoki_wire as wire  # noqa: E402

MANAGER = "org.pincache.Manager1"
TEST = "org.pincache.Test"
PIN = b"1234"
EC_KEY = 7
CKM_ECDSA, CKM_SHA256 = 0x1041, 0x250
CKF_SIGN, CKF_VERIFY, CKF_DIGEST = 0x800, 0x2000, 0x400
VERSION = (0, 0)


def slot_record(name, present):
    text = lambda t: t if present else ""  # noqa: E731
    return (name, "fake slot", "pincache tests", 1 if present else 0, (1, 2), (3, 4), 1 if present else 0,
            text("fake-token"), text("pincache tests"), text("fake"), text("0001"),
            0x40D if present else 0, 0, 0, 255 if present else 0, 4 if present else 0,
            *([2 ** 64 - 1] * 4 if present else [0] * 4), VERSION, VERSION, "")


class Caller:
    """One socket: one environment."""

    def __init__(self, daemon, sock):
        self.d = daemon
        self.sock = sock
        self.logged_in = False
        self.sessions = {}

    def serve(self):
        try:
            while True:
                tag, call_id, kind, body = wire.read_frame(self.sock)
                call = wire.BY_ID[call_id]
                args = wire.decode(body, call["request"])
                self.d.count(call["name"])
                answer = self.answer(call["name"], tag, args)
                if answer is None:
                    return
                self.sock.sendall(answer)
        except (wire.Closed, OSError):
            pass
        finally:
            self.sock.close()

    def fail(self, name, tag, rv, message):
        return wire.error(name, rv, message, tag=tag)

    def answer(self, name, tag, a):
        hostile = self.d.hostile
        if name == "Hello":
            return wire.reply(name, wire.TABLE["version"], "fake", tag=tag)
        if name == "GetSlots":
            if hostile == "wrong-signature":
                return wire.frame(tag, wire.CALLS[name]["id"], wire.REPLY, struct.pack("<I", 3) + b"not")
            # Named as pincached names slots (m<module>_s<backend slot ID>): the proxy shows IDs 0 and 1.
            return wire.reply(name, [slot_record("m0_s0", True), slot_record("m0_s1", False)], tag=tag)
        if name == "GetMechanisms":
            return wire.reply(name, [(CKM_ECDSA, 256, 256, CKF_SIGN | CKF_VERIFY), (CKM_SHA256, 0, 0, CKF_DIGEST)], tag=tag)
        if name == "OpenSession":
            slot, flags = a
            if slot != "m0_s0":
                return self.fail(name, tag, 0xE0, "no token")
            if not flags & 4:
                return self.fail(name, tag, 0xB4, "CKF_SERIAL_SESSION required")
            n = self.d.next_session()
            self.sessions[n] = flags
            return wire.reply(name, n, tag=tag)
        session = a[0]
        if session not in self.sessions:
            return self.fail(name, tag, 0xB3, "no such session")
        if name == "CloseSession":
            del self.sessions[session]
            return wire.reply(name, tag=tag)
        if name == "GetSessionInfo":
            rw = self.sessions[session] & 2
            state = (3 if rw else 1) if self.logged_in else (2 if rw else 0)
            return wire.reply(name, state, self.sessions[session], 0, tag=tag)
        if name == "Login":
            if self.logged_in:
                return self.fail(name, tag, 0x100, "CKR_USER_ALREADY_LOGGED_IN")
            if a[2] != PIN:
                return self.fail(name, tag, 0xA0, "CKR_PIN_INCORRECT")
            self.logged_in = True
            return wire.reply(name, tag=tag)
        if name == "Logout":
            self.logged_in = False
            return wire.reply(name, tag=tag)
        if name == "FindObjects":
            if hostile == "huge-find":
                return wire.reply(name, list(range(100001)), tag=tag, check=False)
            return wire.reply(name, [EC_KEY], tag=tag)
        if name == "GetAttributes":
            out = []
            for t in a[2]:
                if t == 0x100:
                    out.append((t, 0, (3).to_bytes(8, "little")))
                elif t == 0x11:
                    out.append((t, 0x11, b""))
                elif t == 0x3:
                    out.append((t, 0, b"fake-ec-key"))
                else:
                    out.append((t, 0x12, b""))
            return wire.reply(name, out, tag=tag)
        if name == "KeyFacts":
            # The key's verdict at C_*Init (issue 13 §5): the private EC key, usable to sign
            # (the login is Sign's business here, as these tests script it).
            return wire.reply(name, [(0x0, 0, (3).to_bytes(8, "little")), (0x100, 0, (3).to_bytes(8, "little")),
                                     (0x108, 0, b"\x01"), (0x10a, 0x12, b""), (0x104, 0x12, b""),
                                     (0x105, 0, b"\x00"), (0x109, 0, b"\x00"), (0x10b, 0x12, b"")], tag=tag)
        if name == "Sign":
            return self.sign(name, tag, a)
        if name == "Digest":
            return wire.reply(name, hashlib.sha256(a[2]).digest(), tag=tag)
        return self.fail(name, tag, 0x54, "CKR_FUNCTION_NOT_SUPPORTED")

    def sign(self, name, tag, a):
        hostile = self.d.hostile
        good = wire.reply(name, hashlib.sha256(a[3]).digest() + bytes(32), tag=tag)
        if hostile == "crash-on-sign":
            os._exit(3)
        if hostile == "short-frame":
            self.sock.sendall(good[:-10])
            return None
        if hostile == "gone-mid-call":
            return None
        if hostile == "wrong-call":
            return wire.reply("Digest", bytes(32), tag=tag)
        if hostile == "oversize":
            return struct.pack("<IIHBB", wire.TABLE["max_body"] + 1, tag, wire.CALLS[name]["id"], wire.REPLY, 0)
        if hostile == "wrong-tag":
            return wire.reply(name, bytes(64), tag=tag + 1000)
        if not self.logged_in:
            return self.fail(name, tag, 0x101, "CKR_USER_NOT_LOGGED_IN")
        if a[2] != EC_KEY:
            return self.fail(name, tag, 0x60, "CKR_KEY_HANDLE_INVALID")
        return good


class Daemon:
    def __init__(self, hostile):
        self.hostile = hostile
        self.calls = {}
        self.lock = threading.Lock()
        self.sessions = 0

    def count(self, name):
        with self.lock:
            self.calls[name] = self.calls.get(name, 0) + 1

    def next_session(self):
        with self.lock:
            self.sessions += 1
            return self.sessions


class Manager(dbus.service.Object):
    def __init__(self, bus, d):
        super().__init__(bus, "/org/pincache")
        self.d = d

    @dbus.service.method(MANAGER, in_signature="", out_signature="h")
    def OpenCryptoki(self):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        threading.Thread(target=Caller(self.d, ours).serve, daemon=True).start()
        fd = dbus.types.UnixFd(theirs.fileno())
        theirs.close()
        return fd

    @dbus.service.method(TEST, in_signature="", out_signature="a{su}")
    def Calls(self):
        with self.d.lock:
            return dbus.Dictionary(dict(self.d.calls), signature="su")

    @dbus.service.method(TEST, in_signature="o", out_signature="")
    def Insert(self, path):
        self.TokenInserted(path)

    @dbus.service.signal(MANAGER, signature="o")
    def TokenInserted(self, path):
        pass


def main():
    address = sys.argv[1]
    hostile = sys.argv[3] if len(sys.argv) > 3 and sys.argv[2] == "--hostile" else None
    dbus.mainloop.glib.DBusGMainLoop(set_as_default=True)
    bus = dbus.bus.BusConnection(address)
    keep = Manager(bus, Daemon(hostile))
    bus.request_name("org.pincache.Daemon", dbus.bus.NAME_FLAG_DO_NOT_QUEUE)
    print("ready", flush=True)
    GLib.MainLoop().run()
    del keep


if __name__ == "__main__":
    main()
