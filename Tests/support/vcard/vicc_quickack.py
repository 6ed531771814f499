#!/usr/bin/python3
"""Runs Debian's /usr/bin/vicc unchanged, except that its socket ACKs at once.

vpcd sends each message's length and payload with two send() calls; with Nagle on
vpcd's side and delayed ACKs on vicc's, every APDU waits ~40 ms, and OpenSC's driver
probes of an unknown card (hundreds of APDUs per detection) then take tens of seconds.
openpgp_card.py does the same TCP_QUICKACK dance itself.

Usage: vicc_quickack.py [vicc arguments...]   (PYTHONPATH as vicc needs it)
"""

import runpy
import socket
import sys

VICC = "/usr/bin/vicc"


class QuickAckSocket(socket.socket):
    def recv(self, *args, **kwargs):
        data = super().recv(*args, **kwargs)
        try:
            self.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        except OSError:
            pass
        return data


# VirtualSmartcard.py calls socket.socket(...) through the module attribute.
socket.socket = QuickAckSocket
sys.argv[0] = VICC
runpy.run_path(VICC, run_name="__main__")
