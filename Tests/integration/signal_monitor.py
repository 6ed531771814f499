"""dbus-monitor on the test bus (which allows monitoring), its signals parsed."""

import re
import subprocess
import threading
import time

_HEADER = re.compile(r"^signal .*?(?:destination=(\S+) )?serial=\d+ path=([^;]+); interface=([^;]+); member=(\S+)")
_SIMPLE = re.compile(r'^\s+(object path|string|int32|uint32|boolean) (.*)$')


class SignalMonitor:
    """Every signal matching `rule`, as dicts: member, path, interface, destination (None for
    a broadcast) and args (the simple-typed top-level arguments, in order)."""

    def __init__(self, address, rule):
        self.proc = subprocess.Popen(["dbus-monitor", "--address", address, rule],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.lines = []
        threading.Thread(target=self._read, daemon=True).start()
        # dbus-monitor is a monitor once the bus took its name away (NameLost): from then on
        # it sees every signal. A fixed wait missed the first ones on a loaded machine.
        deadline = time.monotonic() + 10
        while not any("member=NameLost" in line for line in list(self.lines)):
            assert time.monotonic() < deadline, "dbus-monitor did not become a monitor within 10 s"
            time.sleep(0.01)

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def signals(self):
        out = []
        for line in list(self.lines):
            header = _HEADER.match(line)
            if header:
                destination, path, interface, member = header.groups()
                out.append({"member": member, "path": path, "interface": interface,
                            "destination": destination, "args": []})
                continue
            value = _SIMPLE.match(line)
            if value and out and line.startswith("   ") and not line.startswith("      "):
                kind, text = value.groups()
                if kind in ("object path", "string"):
                    text = text.strip('"')
                elif kind == "boolean":
                    text = text == "true"
                else:
                    text = int(text)
                out[-1]["args"].append(text)
        return out

    def stop(self):
        self.proc.kill()
