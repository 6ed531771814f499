"""Session1.LoggedIn is announced with PropertiesChanged (issue 16 §6), to the session's
owner only: on Login, Logout, PinCacheTimeout expiry and FlushCaches."""

from pincache_client import PIN, wait_until
from signal_monitor import SignalMonitor


class DBusMonitor(SignalMonitor):
    """Every PropertiesChanged on the test bus."""

    def __init__(self, address):
        super().__init__(address, "type='signal',interface='org.freedesktop.DBus.Properties'")

    def logged_in_changes(self, path):
        """[(destination, value)] of LoggedIn changes announced for `path`, in order."""
        out, header, expect_value = [], None, False
        for line in list(self.lines):
            if line.startswith("signal "):
                header = line if f"path={path};" in line else None
                expect_value = False
            elif header and '"LoggedIn"' in line:
                expect_value = True
            elif header and expect_value and "boolean" in line:
                destination = header.split("destination=")[1].split()[0] if "destination=" in header else None
                out.append((destination, line.split()[-1] == "true"))
                expect_value = False
        return out


def test_logged_in_changes_are_announced_to_the_owner(start_daemon, make_client, bus):
    start_daemon(caching=True, extra=["PinCacheTimeout=1", "SlotPollInterval=200"])
    mon = DBusMonitor(bus.address)
    try:
        a = make_client("A")
        s = a.open_session(a.token())
        a.login(s, PIN)
        wait_until(lambda: mon.logged_in_changes(s) == [(a.unique_name, True)], what="LoggedIn true")
        a.logout(s)
        wait_until(lambda: mon.logged_in_changes(s)[-1:] == [(a.unique_name, False)], what="LoggedIn false")
        # Expiry (PinCacheTimeout=1) is announced too.
        a.login(s, PIN)
        wait_until(lambda: len(mon.logged_in_changes(s)) == 4, timeout=10, what="login, then expiry")
        assert mon.logged_in_changes(s)[2:] == [(a.unique_name, True), (a.unique_name, False)]
        assert a.caller_state()["Cached"] == []
    finally:
        mon.stop()


def test_flush_is_announced(start_daemon, make_client, bus):
    start_daemon(caching=True)
    mon = DBusMonitor(bus.address)
    try:
        a = make_client("A")
        s = a.open_session(a.token())
        a.login(s, PIN)
        make_client("admin").flush()
        wait_until(lambda: mon.logged_in_changes(s) == [(a.unique_name, True), (a.unique_name, False)],
                   what="LoggedIn true then false")
    finally:
        mon.stop()
