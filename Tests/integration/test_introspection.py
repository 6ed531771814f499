"""The live daemon's introspection matches dbus/*.xml, member for member."""

import xml.etree.ElementTree as ET

import pytest

from conftest import need
from pincache_client import BUS_NAME, MANAGER, MANAGER_PATH, SESSION, TOKEN, PIN

IFACES = [MANAGER, TOKEN, SESSION]


def annotations(elem):
    return {a.get("name"): a.get("value") for a in elem.findall("annotation")}


def model(iface):
    """An interface element reduced to what a client can depend on."""
    return {
        "annotations": annotations(iface),
        "methods": {m.get("name"): ([(a.get("name"), a.get("type"), a.get("direction", "in"))
                                     for a in m.findall("arg")], annotations(m))
                    for m in iface.findall("method")},
        "signals": {s.get("name"): ([(a.get("name"), a.get("type")) for a in s.findall("arg")],
                                    annotations(s))
                    for s in iface.findall("signal")},
        "properties": {p.get("name"): (p.get("type"), p.get("access"), annotations(p))
                       for p in iface.findall("property")},
    }


def interface_in(xml_text, name):
    root = ET.fromstring(xml_text)
    found = [i for i in root.findall("interface") if i.get("name") == name]
    assert len(found) == 1, f"{name} appears {len(found)} times"
    return found[0]


def shipped(repo, name):
    path = repo / "dbus" / f"{name}.xml"
    need(path.exists(), f"{path} missing")
    root = ET.parse(path).getroot()
    assert root.tag == "node"
    ifaces = root.findall("interface")
    assert [i.get("name") for i in ifaces] == [name], f"{path} must hold exactly one interface, {name}"
    return ifaces[0]


@pytest.fixture
def live(start_daemon, make_client):
    start_daemon(caching=True)
    c = make_client()
    tok = c.token()
    sess = c.open_session(tok)
    return c, {MANAGER: MANAGER_PATH, TOKEN: tok, SESSION: sess}


@pytest.mark.parametrize("name", IFACES)
def test_introspection_matches_shipped_xml(live, repo, name):
    c, paths = live
    want = model(shipped(repo, name))
    got = model(interface_in(c.introspect(paths[name]), name))
    for part in ("methods", "signals", "properties", "annotations"):
        assert got[part] == want[part], f"{name} {part} differ from dbus/{name}.xml"
    # The contract members, whatever else the XML adds.
    required = {
        MANAGER: {"GetTokens", "FlushCaches", "GetCallerState"},
        TOKEN: {"OpenSession", "ListKeys", "SignOnce"},
        SESSION: {"Login", "Logout", "Sign", "SignWithPin", "Decrypt", "Close"},
    }[name]
    assert required <= set(got["methods"])


def test_contract_signatures(live):
    c, paths = live
    m = model(interface_in(c.introspect(MANAGER_PATH), MANAGER))
    assert [a[1:] for a in m["methods"]["GetTokens"][0]] == [("ao", "out")]
    assert [a[1:] for a in m["methods"]["GetCallerState"][0]] == [("a{sv}", "out")]
    assert [a[1] for a in m["signals"]["TokenInserted"][0]] == ["o"]
    assert [a[1] for a in m["signals"]["TokenRemoved"][0]] == ["o"]
    props = {k: v[:2] for k, v in m["properties"].items()}
    for name, sig in [("Version", "s"), ("CachingMode", "b"), ("LogoutAfterSign", "b"),
                      ("ForceLoginBeforeSignKeyUsage", "u")]:
        assert props.get(name) == (sig, "read"), name
    t = model(interface_in(c.introspect(paths[TOKEN]), TOKEN))
    assert [a[1:] for a in t["methods"]["SignOnce"][0]] == [
        ("s", "in"), ("ay", "in"), ("s", "in"), ("ay", "in"), ("ay", "out")]
    assert [a[1:] for a in t["methods"]["ListKeys"][0]] == [("aa{sv}", "out")]
    s = model(interface_in(c.introspect(paths[SESSION]), SESSION))
    assert [a[1:] for a in s["methods"]["Sign"][0]] == [("ay", "in"), ("s", "in"), ("ay", "in"), ("ay", "out")]
    assert {k: v[0] for k, v in s["properties"].items()} == {"Token": "o", "LoggedIn": "b"}


def test_object_manager(live):
    c, paths = live
    root = ET.fromstring(c.introspect(MANAGER_PATH))
    assert "org.freedesktop.DBus.ObjectManager" in [i.get("name") for i in root.findall("interface")]
    objs = c.call(MANAGER_PATH, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects")
    assert TOKEN in objs[paths[TOKEN]]
    assert objs[paths[TOKEN]][TOKEN]["Label"] == "pincache-demo"


def test_busctl_introspect(live, busctl):
    r = busctl("introspect", BUS_NAME, MANAGER_PATH)
    assert r.returncode == 0, r.stderr
    assert "org.pincache.Manager1" in r.stdout
    assert ".GetCallerState" in r.stdout and ".TokenInserted" in r.stdout
    r = busctl("tree", BUS_NAME)
    assert r.returncode == 0, r.stderr
    assert "/org/pincache/token/" in r.stdout
