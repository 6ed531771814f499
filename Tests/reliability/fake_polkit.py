"""A polkit authority that never decides: owns org.freedesktop.PolicyKit1 on the given bus,
holds every CheckAuthorization unanswered and counts CancelCheckAuthorization. Test support
for the pending-authorisation quota (test_quotas.py); prints "ready" once it owns the name and
writes its counts as JSON to COUNTS_FILE on every change.

usage: fake_polkit.py ADDRESS COUNTS_FILE
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
    def __init__(self, conn, counts_file):
        super().__init__(conn, PATH)
        self.counts_file = counts_file
        self.held = {}
        self.counts = {"checks": 0, "cancelled": 0, "held": 0}
        self.save()

    def save(self):
        self.counts["held"] = len(self.held)
        with open(self.counts_file + ".tmp", "w") as f:
            json.dump(self.counts, f)
        import os
        os.replace(self.counts_file + ".tmp", self.counts_file)

    @dbus.service.method(IFACE, in_signature="(sa{sv})sa{ss}us", out_signature="(bba{ss})",
                         async_callbacks=("ok", "err"))
    def CheckAuthorization(self, subject, action, details, flags, cancel_id, ok, err):
        self.counts["checks"] += 1
        self.held[str(cancel_id)] = (ok, err)
        self.save()

    @dbus.service.method(IFACE, in_signature="s", out_signature="")
    def CancelCheckAuthorization(self, cancel_id):
        self.counts["cancelled"] += 1
        pending = self.held.pop(str(cancel_id), None)
        if pending:
            pending[1](dbus.exceptions.DBusException("cancelled", name="org.freedesktop.PolicyKit1.Error.Cancelled"))
        self.save()


def main():
    address, counts_file = sys.argv[1:3]
    dbus.mainloop.glib.DBusGMainLoop(set_as_default=True)
    conn = dbus.bus.BusConnection(address)
    _name = dbus.service.BusName(NAME, conn)
    _authority = Authority(conn, counts_file)
    print("ready", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    main()
