#!/usr/bin/python3
"""pincache from Python (python3-dbus): log in once, sign twice without the PIN.

A login lives as long as the bus connection that made it (its cache environment): keep ONE
connection for the whole conversation. Each `busctl` or `gdbus call` is a connection of its
own, so a Login made by one is gone before the next (see busctl.sh for what works there).

    PINCACHE_BUS_ADDRESS=unix:path=... ./cached_pin_session.py TOKEN-LABEL KEY-ID-HEX < pin

The PIN is read from standard input (never from the command line). Without
PINCACHE_BUS_ADDRESS the system bus is used. Prints each signature as hex.
"""

import hashlib
import os
import sys

import dbus

DAEMON = "org.pincache.Daemon"
MANAGER, TOKEN, SESSION = "org.pincache.Manager1", "org.pincache.Token1", "org.pincache.Session1"


def main():
    label, key_id = sys.argv[1], bytes.fromhex(sys.argv[2])
    pin = sys.stdin.readline().rstrip("\n")
    address = os.environ.get("PINCACHE_BUS_ADDRESS")
    bus = dbus.bus.BusConnection(address) if address else dbus.SystemBus()

    def call(path, interface, member, *args):
        return bus.get_object(DAEMON, path).get_dbus_method(member, interface)(*args)

    # Find the token by its label.
    for path in call("/org/pincache", MANAGER, "GetTokens"):
        props = call(path, "org.freedesktop.DBus.Properties", "GetAll", TOKEN)
        if props["Label"] == label:
            token = path
            break
    else:
        sys.exit(f"no token labelled {label}")

    session = call(token, TOKEN, "OpenSession")
    call(session, SESSION, "Login", pin)         # the PIN is cached for this connection only
    for message in (b"first message", b"second message"):
        digest = dbus.ByteArray(hashlib.sha256(message).digest())
        signature = call(session, SESSION, "Sign", dbus.ByteArray(key_id), "ECDSA", digest)
        print(bytes(signature).hex())          # no PIN asked: the cached one was used
    state = call("/org/pincache", MANAGER, "GetCallerState")
    print("cached on:", ", ".join(str(p) for p in state["Cached"]))
    call(session, SESSION, "Logout")           # wipes this connection's cached PIN
    call(session, SESSION, "Close")


if __name__ == "__main__":
    main()
