#!/usr/bin/python3
"""A D-Bus client the system tests run as other users (runuser -u USER -- sysclient.py).

One bus connection for the life of the process, so one pincache cache environment.
Reads one JSON command per line on stdin, answers one JSON line on stdout:
  {"op": "call", "path": P, "iface": I, "member": M, "sig": S, "args": [...]}
      arguments of type ay are given as {"hex": "..."}
  {"op": "request_name", "name": N}
  {"op": "unique_name"}
Answer: {"ok": RESULT} or {"error": "org.x.Error.Name", "message": "..."};
byte arrays come back as {"hex": "..."}, object paths as strings.
"""

import json
import sys

import dbus

BUS_NAME = "org.pincache.Daemon"


def to_dbus(value):
    if isinstance(value, dict) and set(value) == {"hex"}:
        return bytes.fromhex(value["hex"])
    if isinstance(value, list):
        return [to_dbus(v) for v in value]
    return value


def to_json(value):
    if value is None:
        return None
    if isinstance(value, (dbus.ByteArray, bytes)):
        return {"hex": bytes(value).hex()}
    if isinstance(value, dbus.Array) and value.signature == "y":
        return {"hex": bytes(int(b) for b in value).hex()}
    if isinstance(value, dbus.Boolean):
        return bool(value)
    if isinstance(value, (dbus.Dictionary, dict)):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (dbus.Array, dbus.Struct, list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, (dbus.ObjectPath, dbus.String, str)):
        return str(value)
    if isinstance(value, (int, float)):
        return int(value) if isinstance(value, int) else float(value)
    return str(value)


def main():
    bus = dbus.SystemBus()
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        try:
            if cmd["op"] == "call":
                # byte_arrays: ay replies arrive as dbus.ByteArray, not arrays of dbus.Byte.
                result = bus.call_blocking(BUS_NAME, cmd["path"], cmd["iface"], cmd["member"],
                                           cmd.get("sig", ""), to_dbus(cmd.get("args", [])),
                                           timeout=60, byte_arrays=True)
                answer = {"ok": to_json(result)}
            elif cmd["op"] == "request_name":
                answer = {"ok": int(bus.request_name(cmd["name"], dbus.bus.NAME_FLAG_DO_NOT_QUEUE))}
            elif cmd["op"] == "unique_name":
                answer = {"ok": bus.get_unique_name()}
            else:
                answer = {"error": "sysclient.UnknownOp", "message": cmd["op"]}
        except dbus.exceptions.DBusException as e:
            answer = {"error": e.get_dbus_name(), "message": e.get_dbus_message() or ""}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
