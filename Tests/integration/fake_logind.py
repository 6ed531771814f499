#!/usr/bin/python3
"""A stand-in for systemd-logind on a test bus: owns org.freedesktop.login1 and speaks the
part of its real interface pincached uses (issue 15 §2).

- /org/freedesktop/login1, org.freedesktop.login1.Manager: GetSessionByPID(u) → o, from
  SESSIONS_FILE (JSON {"pid": "session id"}, read at every call; an unknown pid gets logind's
  org.freedesktop.login1.NoSessionForPID); the signal PrepareForSleep(b).
- /org/freedesktop/login1/session/<id>, org.freedesktop.login1.Session: the signal Lock().

Standard input drives the signals, one command per line: `lock ID`, `sleep true|false`; each
is answered `sent` on standard output once emitted.

usage: fake_logind.py ADDRESS SESSIONS_FILE
"""

import json
import sys
import threading

import dbus
import dbus.bus
import dbus.mainloop.glib
import dbus.service
from gi.repository import GLib

NAME = "org.freedesktop.login1"
PATH = "/org/freedesktop/login1"
MANAGER = "org.freedesktop.login1.Manager"
SESSION = "org.freedesktop.login1.Session"


class NoSessionForPID(dbus.DBusException):
    _dbus_error_name = "org.freedesktop.login1.NoSessionForPID"


class Manager(dbus.service.Object):
    def __init__(self, conn, sessions_file):
        super().__init__(conn, PATH)
        self.sessions_file = sessions_file

    @dbus.service.method(MANAGER, in_signature="u", out_signature="o")
    def GetSessionByPID(self, pid):
        with open(self.sessions_file) as f:
            sessions = json.load(f)
        session = sessions.get(str(int(pid)))
        if session is None:
            raise NoSessionForPID(f"PID {int(pid)} does not belong to any known session")
        return dbus.ObjectPath(f"{PATH}/session/{session}")

    @dbus.service.signal(MANAGER, signature="b")
    def PrepareForSleep(self, start):
        pass


class Session(dbus.service.Object):
    def __init__(self, conn, session_id):
        super().__init__(conn, f"{PATH}/session/{session_id}")

    @dbus.service.signal(SESSION, signature="")
    def Lock(self):
        pass


def main():
    address, sessions_file = sys.argv[1:3]
    dbus.mainloop.glib.DBusGMainLoop(set_as_default=True)
    conn = dbus.bus.BusConnection(address)
    _name = dbus.service.BusName(NAME, conn)
    manager = Manager(conn, sessions_file)
    sessions = {}

    def command(line):
        words = line.split()
        if words[:1] == ["lock"]:
            session = sessions.get(words[1]) or Session(conn, words[1])
            sessions[words[1]] = session
            session.Lock()
        elif words[:1] == ["sleep"]:
            manager.PrepareForSleep(words[1] == "true")
        conn.flush()
        print("sent", flush=True)
        return False

    def read_commands():
        for line in sys.stdin:
            GLib.idle_add(command, line)
        GLib.idle_add(loop.quit)

    loop = GLib.MainLoop()
    threading.Thread(target=read_commands, daemon=True).start()
    print("ready", flush=True)
    loop.run()


if __name__ == "__main__":
    main()
