"""[app /path/to/exe] sections override the defaults for callers running that executable."""

import json

from pincache_client import BUS_NAME, ERR, MANAGER, MANAGER_PATH, PIN


def test_app_section_disables_caching_for_python_only(start_daemon, make_client, busctl, python_exe):
    start_daemon(caching=True, apps={python_exe: ["P11_EnableCachePIN=0"]})
    a, b = make_client("A"), make_client("B")
    st = a.caller_state()
    assert st["Executable"] == python_exe
    assert st["CachingMode"] is False
    assert a.manager_props()["CachingMode"] is True  # the global default is unchanged
    # Effective, not just reported: A's login locks the token against B.
    tok = a.token()
    sa, sb = a.open_session(tok), b.open_session(tok)
    a.login(sa, PIN)
    assert a.locked() == {tok} and a.cached() == set()
    assert b.error(b.login, sb, PIN) == ERR + "TokenBusy"
    # busctl is another executable: it gets the default (caching) mode.
    r = busctl("--json=short", "call", BUS_NAME, MANAGER_PATH, MANAGER, "GetCallerState")
    assert r.returncode == 0, r.stderr
    state = json.loads(r.stdout)["data"][0]
    assert state["CachingMode"]["data"] is True
    assert state["Executable"]["data"].endswith("/busctl")


def test_app_section_for_other_exe_does_not_apply(start_daemon, make_client):
    start_daemon(caching=True, apps={"/usr/bin/busctl": ["P11_EnableCachePIN=0"]})
    a = make_client()
    assert a.caller_state()["CachingMode"] is True
