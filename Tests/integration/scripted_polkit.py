#!/usr/bin/python3
"""A polkit authority that decides by a script: owns org.freedesktop.PolicyKit1 on the given
bus and answers CheckAuthorization from RULES_FILE (JSON: {"action id": true|false}, read at
every check; an action not named is allowed), appending every check it answered to LOG_FILE
(one JSON object per line: action, subject name, operation detail, verdict). Test support for
the one authorisation step (test_pipeline.py): the daemon runs with `--bus system` on a
private bus, where it consults polkit as it would on the real one.

usage: scripted_polkit.py ADDRESS RULES_FILE LOG_FILE
"""

import json
import sys

import dbus
import dbus.bus
import dbus.mainloop.glib
import dbus.service
from gi.repository import GLib

NAME = "org.freedesktop.PolicyKit1"
PATH = "/org/freedesktop/PolicyKit1/Authority"
IFACE = "org.freedesktop.PolicyKit1.Authority"


class Authority(dbus.service.Object):
    def __init__(self, conn, rules_file, log_file):
        super().__init__(conn, PATH)
        self.rules_file = rules_file
        self.log_file = log_file

    @dbus.service.method(IFACE, in_signature="(sa{sv})sa{ss}us", out_signature="(bba{ss})")
    def CheckAuthorization(self, subject, action, details, flags, cancel_id):
        with open(self.rules_file) as f:
            rules = json.load(f)
        allowed = bool(rules.get(str(action), True))
        entry = {
            "action": str(action),
            "subject": str(subject[1].get("name", "")),
            "kind": str(subject[0]),
            "operation": str(details.get("operation", "")),
            "allowed": allowed,
        }
        with open(self.log_file, "a") as f:
            f.write(json.dumps(entry) + "\n")
        return (allowed, False, dbus.Dictionary({}, signature="ss"))

    @dbus.service.method(IFACE, in_signature="s", out_signature="")
    def CancelCheckAuthorization(self, cancel_id):
        pass


def main():
    address, rules_file, log_file = sys.argv[1:4]
    dbus.mainloop.glib.DBusGMainLoop(set_as_default=True)
    conn = dbus.bus.BusConnection(address)
    _name = dbus.service.BusName(NAME, conn)
    _authority = Authority(conn, rules_file, log_file)
    print("ready", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    main()
