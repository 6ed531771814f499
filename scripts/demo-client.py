#!/usr/bin/python3
"""pincache demo client: narrates one application's life with a cached PIN.

Usage: demo-client.py --address BUS_ADDRESS [--label pincache-demo] [--pin 123456]

Expects a daemon in caching mode with ForceLoginBeforeSignKeyUsage=0x40 and the
token made by make-demo-token.sh. Exits 0 only if every step behaved as documented
(each signature is verified against the certificate stored on the token)."""

import argparse
import hashlib
import os
import sys
import time

import dbus
import dbus.bus
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, utils

BUS_NAME = "org.pincache.Daemon"
ROOT = "/org/pincache"
MANAGER = "org.pincache.Manager1"
TOKEN = "org.pincache.Token1"
SESSION = "org.pincache.Session1"
PROPS = "org.freedesktop.DBus.Properties"


class DemoFailure(Exception):
    pass


def say(text=""):
    print(text, flush=True)


def step(n, text):
    say()
    say(f"== {n}. {text}")


def py(value):
    if isinstance(value, dbus.Boolean):
        return bool(value)
    if isinstance(value, dbus.Array) and value.signature == "y":
        return bytes(value)
    if isinstance(value, (dbus.Array, list)):
        return [py(v) for v in value]
    if isinstance(value, (dbus.Dictionary, dict)):
        return {str(k): py(v) for k, v in value.items()}
    if isinstance(value, (dbus.String, dbus.ObjectPath)):
        return str(value)
    if isinstance(value, (dbus.Byte, dbus.UInt32, dbus.Int32, dbus.UInt64, dbus.Int64)):
        return int(value)
    return value


class Daemon:
    def __init__(self, conn):
        self.conn = conn

    def call(self, path, iface, method, *args):
        obj = self.conn.get_object(BUS_NAME, path, introspect=False)
        return py(obj.get_dbus_method(method, iface)(*args, timeout=30))

    def props(self, path, iface):
        return self.call(path, PROPS, "GetAll", iface)

    def state(self):
        return self.call(ROOT, MANAGER, "GetCallerState")


def wait_for_daemon(conn, timeout, pid=None):
    deadline = time.monotonic() + timeout
    while not conn.name_has_owner(BUS_NAME):
        if pid is not None and not os.path.exists(f"/proc/{pid}"):
            raise DemoFailure(f"pincached (pid {pid}) exited before owning {BUS_NAME}")
        if time.monotonic() > deadline:
            raise DemoFailure(f"{BUS_NAME} did not appear on the bus within {timeout}s")
        time.sleep(0.1)


def verify_ecdsa(cert_der, message, raw):
    pub = x509.load_der_x509_certificate(cert_der).public_key()
    half = len(raw) // 2
    der = utils.encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))
    pub.verify(der, message, ec.ECDSA(hashes.SHA256()))


def verify_rsa(cert_der, message, sig):
    pub = x509.load_der_x509_certificate(cert_der).public_key()
    pub.verify(sig, message, padding.PKCS1v15(), hashes.SHA256())


def expect_error(name, fn, *args):
    try:
        fn(*args)
    except dbus.exceptions.DBusException as e:
        if e.get_dbus_name() != name:
            raise DemoFailure(f"expected {name}, got {e.get_dbus_name()}: {e.get_dbus_message()}")
        return e.get_dbus_message()
    raise DemoFailure(f"expected {name}, but the call succeeded")


def show_state(d, names):
    st = d.state()
    def short(paths):
        return ", ".join(names.get(p, p) for p in paths) or "(none)"
    say(f"   GetCallerState: LoggedIn={short(st['LoggedIn'])}  Cached={short(st['Cached'])}  "
        f"Locked={short(st['Locked'])}  Sessions={st['Sessions']}  CachingMode={st['CachingMode']}")
    say(f"                   Executable={st['Executable']}")
    return st


def run(args):
    conn = dbus.bus.BusConnection(args.address)
    wait_for_daemon(conn, args.wait, args.pid)
    d = Daemon(conn)
    say(f"Connected to the bus as {conn.get_unique_name()}: this connection is one cache environment.")

    step(1, "The daemon and its tokens")
    m = d.props(ROOT, MANAGER)
    say(f"   pincached {m['Version']}: CachingMode={m['CachingMode']} LogoutAfterSign={m['LogoutAfterSign']} "
        f"ForceLoginBeforeSignKeyUsage={m['ForceLoginBeforeSignKeyUsage']:#x}")
    if not m["CachingMode"] or m["ForceLoginBeforeSignKeyUsage"] != 0x40:
        raise DemoFailure("the demo needs caching mode and ForceLoginBeforeSignKeyUsage=0x40")
    token = None
    names = {}
    for path in d.call(ROOT, MANAGER, "GetTokens"):
        p = d.props(path, TOKEN)
        names[path] = p["Label"] or "(no token)"
        say(f"   {path}: label={p['Label']!r} recognized={p['Recognized']} kind={p['Kind']} "
            f"serial={p['Serial']!r}")
        if p["Label"] == args.label:
            token = path
    if token is None:
        raise DemoFailure(f"no token labelled {args.label!r}")

    step(2, f"Keys on {args.label}")
    keys = {}
    for k in d.call(token, TOKEN, "ListKeys"):
        keys[k["Label"]] = k
        say(f"   id={k['Id'].hex()} {k['Label']}: {k['KeyType']}-{k['Bits']} keyUsage={k['KeyUsage']:#04x} "
            f"AlwaysAuthenticate={k['AlwaysAuthenticate']} certificate={len(k['Certificate'])} bytes")
    ec_key, rsa_key = keys.get("ec-key"), keys.get("rsa-nonrep")
    if not ec_key or not rsa_key:
        raise DemoFailure("the demo token needs the keys ec-key and rsa-nonrep")
    if not rsa_key["AlwaysAuthenticate"] or ec_key["AlwaysAuthenticate"]:
        raise DemoFailure("only the non-repudiation key should need the PIN for every signature")

    step(3, "OpenSession and Login: the PIN is verified on the token, then cached for this connection only")
    session = d.call(token, TOKEN, "OpenSession")
    say(f"   session {session}")
    d.call(session, SESSION, "Login", args.pin)
    say("   Login OK")
    st = show_state(d, names)
    if token not in st["Cached"]:
        raise DemoFailure("the PIN should be cached after Login")

    step(4, "Two ECDSA signatures with ec-key, no PIN sent")
    for i in (1, 2):
        message = f"pincache demo message {i}".encode()
        # Raw ECDSA over a SHA-256 digest: every PKCS#11 module has CKM_ECDSA
        # (SoftHSM 2.6 has no CKM_ECDSA_SHA256).
        sig = d.call(session, SESSION, "Sign", dbus.ByteArray(ec_key["Id"]), "ECDSA",
                     dbus.ByteArray(hashlib.sha256(message).digest()))
        verify_ecdsa(ec_key["Certificate"], message, sig)
        say(f"   signature {i}: {sig.hex()[:32]}…  verified against the certificate ✔")

    step(5, "rsa-nonrep has nonRepudiation: the cached PIN is refused for it")
    message = b"I agree to the terms (non-repudiation)"
    msg = expect_error("org.pincache.Error.PinRequired", d.call, session, SESSION, "Sign",
                       dbus.ByteArray(rsa_key["Id"]), "SHA256-RSA-PKCS", dbus.ByteArray(message))
    say(f"   Sign → org.pincache.Error.PinRequired ({msg})")
    sig = d.call(session, SESSION, "SignWithPin", args.pin, dbus.ByteArray(rsa_key["Id"]),
                 "SHA256-RSA-PKCS", dbus.ByteArray(message))
    verify_rsa(rsa_key["Certificate"], message, sig)
    say(f"   SignWithPin: {sig.hex()[:32]}…  verified ✔ (that PIN was used once, never cached)")

    step(6, "Logout: the cached PIN is wiped")
    d.call(session, SESSION, "Logout")
    st = show_state(d, names)
    if st["Cached"] or st["LoggedIn"]:
        raise DemoFailure("nothing should be cached after Logout")
    expect_error("org.pincache.Error.NotLoggedIn", d.call, session, SESSION, "Sign",
                 dbus.ByteArray(ec_key["Id"]), "ECDSA", dbus.ByteArray(hashlib.sha256(b"x").digest()))
    say("   Sign after Logout → org.pincache.Error.NotLoggedIn")
    d.call(session, SESSION, "Close")
    conn.close()
    say()
    say("Demo finished: every step behaved as documented.")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--address", required=True, help="D-Bus address of the bus pincached is on")
    ap.add_argument("--label", default="pincache-demo")
    ap.add_argument("--pin", default="123456")
    ap.add_argument("--wait", type=float, default=20.0, help="seconds to wait for the daemon")
    ap.add_argument("--pid", type=int, help="pincached's pid: stop waiting if it exits")
    args = ap.parse_args()
    try:
        run(args)
    except DemoFailure as e:
        print(f"demo-client: FAILED: {e}", file=sys.stderr)
        return 1
    except dbus.exceptions.DBusException as e:
        print(f"demo-client: FAILED: unexpected {e.get_dbus_name()}: {e.get_dbus_message()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
