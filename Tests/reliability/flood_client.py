"""One flood process for test_flood.py: sends malformed calls to pincached and checks that
every one is refused. Prints one JSON object (counts) on stdout.

usage: flood_client.py ADDRESS TOKEN_PATH COUNT SEED BIG BIG_BYTES

Every call is one of the kinds below, chosen at random (seeded); BIG of them carry an
array of BIG_BYTES bytes (the test picks a size just under the bus's maximum message
size). Most calls wait for their reply, so the flood runs as fast as the daemon answers;
one in eight is sent with NO_REPLY_EXPECTED and not waited for.
"""

import json
import os
import random
import sys
import time

import dbus
import dbus.bus
import dbus.lowlevel
import dbus.types

BUS_NAME = "org.pincache.Daemon"
MANAGER_PATH = "/org/pincache"
MANAGER = "org.pincache.Manager1"
TOKEN = "org.pincache.Token1"
SESSION = "org.pincache.Session1"
PROPS = "org.freedesktop.DBus.Properties"
TIMEOUT = 30.0


def main():
    address, token, count, seed, big, big_bytes = sys.argv[1:7]
    count, seed, big, big_bytes = int(count), int(seed), int(big), int(big_bytes)
    rnd = random.Random(seed)
    conn = dbus.bus.BusConnection(address)
    # A session of this client's own, so malformed calls reach Session1 objects too.
    session = str(conn.call_blocking(BUS_NAME, token, TOKEN, "OpenSession", "", (), timeout=TIMEOUT))
    devnull = os.open("/dev/null", os.O_RDONLY)

    def msg(path, interface, member, signature="", *args):
        m = dbus.lowlevel.MethodCallMessage(BUS_NAME, path, interface, member)
        if signature:
            m.append(*args, signature=signature)
        return m

    def fd():
        return dbus.types.UnixFd(devnull)

    kinds = [
        # wrong signatures on real methods
        lambda: msg(MANAGER_PATH, MANAGER, "GetTokens", "s", "extra"),
        lambda: msg(MANAGER_PATH, MANAGER, "GetStatistics", "u", 7),
        lambda: msg(token, TOKEN, "SignOnce", "i", 42),
        lambda: msg(token, TOKEN, "SignOnce", "ssss", "0000", "01", "ECDSA", "data"),
        lambda: msg(session, SESSION, "Sign", "ayay", [1], [2]),
        lambda: msg(session, SESSION, "Login", "ay", [0x31, 0x32]),
        lambda: msg(MANAGER_PATH, MANAGER, "OpenCryptoki", "s", "rw"),
        lambda: msg(token, TOKEN, "OpenSession", "s", "rw"),
        # right signature, refused values (no PIN reaches a token)
        lambda: msg(token, TOKEN, "SignOnce", "saysay", "0" * 300, [1], "ECDSA", [1]),
        lambda: msg(token, TOKEN, "SignOnce", "saysay", "0000", [], "ECDSA", [1]),
        lambda: msg(token, TOKEN, "SignOnce", "saysay", "0000", [1], "NO-SUCH-MECH", [1]),
        lambda: msg(session, SESSION, "Sign", "aysay", [1] * 300, "ECDSA", [1]),
        lambda: msg(session, SESSION, "Decrypt", "aysay", [1] * 300, "RSA-OAEP-SHA1", [1]),
        # unknown paths, interfaces, members
        lambda: msg(f"/org/pincache/nope/{rnd.randrange(1 << 30)}", MANAGER, "GetTokens"),
        lambda: msg(f"/org/pincache/token/{rnd.randrange(1000, 1 << 30)}", TOKEN, "ListKeys"),
        lambda: msg(f"/org/pincache/session/{rnd.randrange(1 << 40)}", SESSION, "Logout"),
        lambda: msg("/", MANAGER, "GetTokens"),
        lambda: msg(MANAGER_PATH, "org.pincache.Nope1", "GetTokens"),
        lambda: msg(MANAGER_PATH, MANAGER, f"Bogus{rnd.randrange(1000)}"),
        lambda: msg(token, PROPS, "Get", "ss", TOKEN, "NoSuchProperty"),
        lambda: msg(token, PROPS, "Set", "ssv", TOKEN, "Label", dbus.String("x", variant_level=1)),
        # no interface
        lambda: msg(MANAGER_PATH, None, "Bogus"),
        lambda: msg(session, None, "Login", "ay", [0x30]),
        lambda: msg(token, None, "SignOnce", "y", 1),
        lambda: msg(f"/org/pincache/x{rnd.randrange(1000)}", None, "Ping", "s", "x"),
        # attached file descriptors
        lambda: msg(MANAGER_PATH, MANAGER, "GetTokens", "h", fd()),
        lambda: msg(token, TOKEN, "SignOnce", "hhhh", fd(), fd(), fd(), fd()),
        lambda: msg(MANAGER_PATH, PROPS, "Set", "ssv", MANAGER, "Version",
                    dbus.types.UnixFd(devnull, variant_level=1)),
        lambda: msg(session, SESSION, "Sign", "ahsay", [fd(), fd()], "ECDSA", [1]),
    ]
    big_kinds = [
        lambda n: msg(token, TOKEN, "SignOnce", "saysay", "0000", [1], "ECDSA", dbus.ByteArray(b"\x00" * n)),
        lambda n: msg(session, SESSION, "Sign", "aysay", dbus.ByteArray(b"\x01" * n), "ECDSA", [1]),
        lambda n: msg(session, SESSION, "Decrypt", "aysay", [1], "RSA-OAEP-SHA1", dbus.ByteArray(b"\x02" * n)),
    ]
    big_at = set(rnd.sample(range(count), min(big, count)))
    out = {"sent": 0, "errors": {}, "unexpected_success": 0, "no_reply_sent": 0, "big": 0, "send_failures": 0}
    for i in range(count):
        if i in big_at:
            m = rnd.choice(big_kinds)(big_bytes)
            out["big"] += 1
        else:
            m = rnd.choice(kinds)()
        out["sent"] += 1
        if rnd.random() < 0.125 and i not in big_at:
            m.set_no_reply(True)
            conn.send_message(m)
            out["no_reply_sent"] += 1
            continue
        try:
            conn.send_message_with_reply_and_block(m, TIMEOUT)
            out["unexpected_success"] += 1
        except dbus.exceptions.DBusException as e:
            name = e.get_dbus_name() or "?"
            out["errors"][name] = out["errors"].get(name, 0) + 1
    # A final round trip: every NO_REPLY call before it has been read by the daemon.
    # The bus refuses calls while the daemon's queue is full (LimitsExceeded): wait for room.
    for attempt in range(600):
        try:
            conn.call_blocking(BUS_NAME, MANAGER_PATH, MANAGER, "GetTokens", "", (), timeout=TIMEOUT)
            break
        except dbus.exceptions.DBusException as e:
            if e.get_dbus_name() != "org.freedesktop.DBus.Error.LimitsExceeded" or attempt == 599:
                raise
            time.sleep(0.1)
    conn.close()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
