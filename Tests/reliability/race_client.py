"""One disconnect-race process for test_disconnect_race.py: ROUNDS times, a fresh bus
connection sends Login, Sign or SignOnce and leaves at once, by closing its connection or by
being SIGKILLed (a forked child). Prints one JSON object (counts) on stdout.

usage: race_client.py ADDRESS TOKEN_PATH ROUNDS SEED PIN
"""

import json
import os
import random
import signal
import sys
import time

import dbus
import dbus.bus
import dbus.lowlevel

BUS_NAME = "org.pincache.Daemon"
TOKEN = "org.pincache.Token1"
SESSION = "org.pincache.Session1"
EC_KEY = b"\x01"
TIMEOUT = 30.0


def call(conn, path, interface, member, signature="", *args):
    return conn.call_blocking(BUS_NAME, path, interface, member, signature, args, timeout=TIMEOUT)


def fire(conn, path, interface, member, signature, *args):
    """Sends a call without waiting for its reply."""
    m = dbus.lowlevel.MethodCallMessage(BUS_NAME, path, interface, member)
    m.append(*args, signature=signature)
    conn.send_message(m)
    conn.flush()


def one_round(address, token, kind, pin, rnd):
    """Sets up, fires the last call, and returns the connection (still open)."""
    conn = dbus.bus.BusConnection(address)
    if kind == "signonce":
        fire(conn, token, TOKEN, "SignOnce", "saysay", pin, dbus.ByteArray(EC_KEY), "ECDSA",
             dbus.ByteArray(b"\x11" * 32))
        return conn
    session = str(call(conn, token, TOKEN, "OpenSession"))
    if kind == "login":
        fire(conn, session, SESSION, "Login", "s", pin)
    else:
        call(conn, session, SESSION, "Login", "s", pin)
        fire(conn, session, SESSION, "Sign", "aysay", dbus.ByteArray(EC_KEY), "ECDSA",
             dbus.ByteArray(b"\x22" * 32))
    if rnd.random() < 0.5:
        time.sleep(rnd.random() * 0.003)
    return conn


def main():
    address, token, rounds, seed, pin = sys.argv[1:6]
    rounds, rnd = int(rounds), random.Random(int(seed))
    out = {"rounds": 0, "closed": 0, "killed": 0, "by_kind": {}, "setup_logins": 0}
    for _ in range(rounds):
        kind = rnd.choice(["login", "sign", "signonce"])
        out["rounds"] += 1
        out["by_kind"][kind] = out["by_kind"].get(kind, 0) + 1
        if kind == "sign":
            out["setup_logins"] += 1
        if rnd.random() < 0.5:
            conn = one_round(address, token, kind, pin, rnd)
            conn.close()
            out["closed"] += 1
            continue
        # Killed: the child tells us when its call is on the wire, then dies mid-flight.
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                one_round(address, token, kind, pin, rnd)
                os.write(w, b"x")
                time.sleep(60)
            finally:
                os._exit(0)
        os.close(w)
        os.read(r, 1)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
        out["killed"] += 1
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
