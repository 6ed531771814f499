#!/usr/bin/python3
"""Run as an unprivileged user by the system tests: N attempts to open a system-bus
connection and a cryptoki socket on it (Manager1.OpenCryptoki), each kept open, as that many
proxies would. Prints one JSON line: counts of successes and of each error name."""

import collections
import json
import sys

import dbus

attempts = int(sys.argv[1])
results = collections.Counter()
kept = []
for _ in range(attempts):
    try:
        conn = dbus.bus.BusConnection(dbus.bus.BUS_SYSTEM)
    except dbus.DBusException as e:
        results["connect: " + (e.get_dbus_name() or "error")] += 1
        continue
    try:
        fd = conn.call_blocking("org.pincache.Daemon", "/org/pincache", "org.pincache.Manager1",
                                "OpenCryptoki", "", (), timeout=30)
        kept.append((conn, fd.take()))
        results["socket"] += 1
    except dbus.DBusException as e:
        results["OpenCryptoki: " + (e.get_dbus_name() or "error")] += 1
        kept.append((conn, None))
print(json.dumps(results), flush=True)
