"""The installed package on the real system bus with the real polkitd (issue 4).

Every client runs as an unprivileged user (runuser), so polkit decides by the test rule
of conftest.py: U1 allowed, U2 denied; FlushCaches needs org.pincache.manage, which only
root has without an agent. Signatures are verified against the certificate files written
when the token was made, never against what the daemon says.
"""

import glob
import grp
import hashlib
import json
import os
import pwd
import re
import stat
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature

from conftest import (DAEMON_USER, LABEL, PIN, REPO, RUN_DIR, U1, U2, U3, client_env, daemon_pids, run, stop_daemon,
                      wait_for)

MANAGER = "/org/pincache"
M1 = "org.pincache.Manager1"
T1 = "org.pincache.Token1"
S1 = "org.pincache.Session1"
PROPS = "org.freedesktop.DBus.Properties"
ERR = "org.pincache.Error."
ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
MSG = b"signed on the system bus"
EC_KEY, RSA_KEY = "01", "02"
ACTIONS = {  # DESIGN §3: id -> implicit any / inactive / active
    "org.pincache.login": ("no", "no", "yes"),
    "org.pincache.use-cached-pin": ("no", "no", "yes"),
    "org.pincache.modify-token": ("auth_admin_keep", "auth_admin_keep", "yes"),
    "org.pincache.manage": ("auth_admin_keep",) * 3,
}
INSTALLED = [
    "/usr/sbin/pincached", "/usr/bin/pincachectl",
    "/usr/share/dbus-1/system.d/org.pincache.conf",
    "/usr/share/dbus-1/system-services/org.pincache.Daemon.service",
    "/usr/share/dbus-1/interfaces/org.pincache.Manager1.xml",
    "/usr/share/dbus-1/interfaces/org.pincache.Token1.xml",
    "/usr/share/dbus-1/interfaces/org.pincache.Session1.xml",
    "/usr/share/polkit-1/actions/org.pincache.policy",
    "/lib/systemd/system/pincached.service",
    "/etc/pincache/pincache.cfg",
    "/usr/share/man/man8/pincached.8.gz", "/usr/share/man/man5/pincache.cfg.5.gz",
    "/usr/share/man/man1/pincachectl.1.gz",
    "/usr/share/doc/pincache/copyright", "/usr/share/doc/pincache/changelog.gz",
    "/usr/share/bash-completion/completions/pincachectl", "/usr/share/zsh/vendor-completions/_pincachectl",
    "/usr/share/p11-kit/modules/pincache.module", "/usr/libexec/pincache/p11-kit-routing",
]


def verify_ec(system, data, signature):
    """ECDSA raw r||s over SHA-256(data), checked with the certificate's public key."""
    cert = x509.load_der_x509_certificate(system.cert("ec"))
    half = len(signature) // 2
    der = encode_dss_signature(int.from_bytes(signature[:half], "big"), int.from_bytes(signature[half:], "big"))
    cert.public_key().verify(der, data, ec.ECDSA(hashes.SHA256()))


def verify_rsa(system, data, signature):
    cert = x509.load_der_x509_certificate(system.cert("rsa"))
    cert.public_key().verify(signature, data, padding.PKCS1v15(), hashes.SHA256())


def token_path(client):
    for path in client.ok(MANAGER, M1, "GetTokens"):
        if client.ok(path, PROPS, "Get", "ss", T1, "Label") == LABEL:
            return path
    raise AssertionError(f"no token labelled {LABEL}")


def bus_call_root(*args):
    return run(["busctl", "--system", "call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
                "org.freedesktop.DBus", *args]).stdout.split()


# --- the package and activation ---------------------------------------------------------

def test_package_installs_files_and_system_user(system):
    status = run(["dpkg-query", "-W", "-f=${db:Status-Status}", "pincache"]).stdout
    assert status == "installed"
    missing = [f for f in INSTALLED if not Path(f).exists()]
    assert not missing, f"not installed: {missing}"
    user = pwd.getpwnam(DAEMON_USER)
    assert user.pw_uid != 0 and user.pw_shell.endswith("nologin")
    assert DAEMON_USER in grp.getgrnam("softhsm").gr_mem, "postinst did not add pincache to group softhsm"
    # Every file as shipped (md5sums), and Depends as dpkg-shlibdeps computed it: the libraries
    # the binaries link, with versions, and no obsolete policykit-1.
    r = run(["dpkg", "--verify", "pincache"], check=False)
    assert r.returncode == 0 and not [l for l in r.stdout.splitlines() if "/etc/" not in l], r.stdout
    depends = run(["dpkg-query", "-W", "-f=${Depends}", "pincache"]).stdout
    for library in ("libc6 (>=", "libdbus-1-3 (>=", "libpcsclite1 (>=", "libp11-kit0 (>="):
        assert library in depends, depends
    assert "policykit-1" not in depends and "polkitd" in depends, depends
    # Stripped, with the debug symbols in pincache-dbgsym (by build id).
    for binary in ("/usr/sbin/pincached", "/usr/bin/pincachectl"):
        sections = run(["readelf", "-S", "-W", binary]).stdout
        assert ".debug_info" not in sections and ".gnu_debuglink" in sections, binary
        assert "BIND_NOW" in run(["readelf", "-d", binary]).stdout or "NOW" in run(["readelf", "-d", binary]).stdout


def test_lintian_finds_no_errors_and_no_unexplained_warnings(system):
    """Issue 16 §1: 0 errors, and every warning is in the package's override file with a reason."""
    dbgsym = system.deb.replace("/pincache_", "/pincache-dbgsym_")
    debs = [system.deb] + ([dbgsym] if os.path.exists(dbgsym) else [])
    r = run(["lintian", "--fail-on", "error,warning", *debs], check=False)
    tags = [l for l in r.stdout.splitlines() if l[:2] in ("E:", "W:")]
    assert r.returncode == 0 and not tags, r.stdout + r.stderr


def test_bash_completion_knows_the_subcommands(system):
    script = ("source /usr/share/bash-completion/completions/pincachectl; "
              "COMP_WORDS=(pincachectl st); COMP_CWORD=1; COMP_LINE='pincachectl st'; COMP_POINT=${#COMP_LINE}; "
              "_pincachectl; printf '%s\\n' \"${COMPREPLY[@]}\"")
    r = run(["bash", "-c", script], check=False)
    assert {"status", "stats"} <= set(r.stdout.split()), (r.stdout, r.stderr)


def test_call_from_user_activates_daemon_as_pincache(system):
    stop_daemon()
    c = system.client(U1)
    tokens = c.ok(MANAGER, M1, "GetTokens")
    assert any(t.startswith("/org/pincache/token/") for t in tokens)
    uid = int(bus_call_root("GetConnectionUnixUser", "s", "org.pincache.Daemon")[1])
    assert uid == pwd.getpwnam(DAEMON_USER).pw_uid, f"daemon runs as uid {uid}"
    pid = int(bus_call_root("GetConnectionUnixProcessID", "s", "org.pincache.Daemon")[1])
    assert Path(f"/proc/{pid}/exe").resolve() == Path("/usr/sbin/pincached")
    status = Path(f"/proc/{pid}/status").read_text()
    uids = re.search(r"^Uid:\s+(.*)$", status, re.M).group(1).split()
    assert set(map(int, uids)) == {uid}, f"real/effective/saved/fs uids {uids}"
    groups = set(map(int, re.search(r"^Groups:\s*(.*)$", status, re.M).group(1).split()))
    assert grp.getgrnam("softhsm").gr_gid in groups, "activated daemon lacks group softhsm"


# --- polkit ------------------------------------------------------------------------------

def test_allowed_user_logs_in_and_signs(system):
    c = system.client(U1)
    tok = token_path(c)
    session = c.ok(tok, T1, "OpenSession")
    c.ok(session, S1, "Login", "s", PIN)
    digest = hashlib.sha256(MSG).digest()
    sig = c.ok(session, S1, "Sign", "aysay", {"hex": EC_KEY}, "ECDSA", {"hex": digest.hex()})
    verify_ec(system, MSG, bytes.fromhex(sig["hex"]))
    state = c.ok(MANAGER, M1, "GetCallerState")
    assert tok in state["Cached"]


def test_allowed_user_sign_once(system):
    c = system.client(U1)
    sig = c.ok(token_path(c), T1, "SignOnce", "saysay", PIN, {"hex": RSA_KEY}, "SHA256-RSA-PKCS",
               {"hex": MSG.hex()})
    verify_rsa(system, MSG, bytes.fromhex(sig["hex"]))


def test_denied_user_gets_not_authorized_for_login(system):
    c = system.client(U2)
    session = c.ok(token_path(c), T1, "OpenSession")
    answer = c.call(session, S1, "Login", "s", PIN)
    assert answer.get("error") == ERR + "NotAuthorized", answer
    assert c.ok(MANAGER, M1, "GetCallerState")["Cached"] == []


def test_denied_user_gets_not_authorized_for_sign_once(system):
    c = system.client(U2)
    answer = c.call(token_path(c), T1, "SignOnce", "saysay", PIN, {"hex": EC_KEY}, "ECDSA-SHA256",
                    {"hex": MSG.hex()})
    assert answer.get("error") == ERR + "NotAuthorized", answer


def test_flush_from_non_admin_is_refused(system):
    c = system.client(U1)
    answer = c.call(MANAGER, M1, "FlushCaches")
    assert answer.get("error") == ERR + "NotAuthorized", answer
    r = system.run_as(U1, "/usr/bin/pincachectl", "flush")
    assert r.returncode == 4, (r.returncode, r.stdout, r.stderr)
    assert "NotAuthorized" in r.stderr


def test_flush_from_root_clears_every_environment(system):
    a, b = system.client(U1), system.client(U1)
    tok = token_path(a)
    sessions = []
    for c in (a, b):
        s = c.ok(tok, T1, "OpenSession")
        c.ok(s, S1, "Login", "s", PIN)
        assert tok in c.ok(MANAGER, M1, "GetCallerState")["Cached"]
        sessions.append(s)
    r = run(["/usr/bin/pincachectl", "flush"], check=False)
    assert r.returncode == 0, (r.stdout, r.stderr)
    digest = hashlib.sha256(MSG).digest()
    for c, s in zip((a, b), sessions):
        assert c.ok(MANAGER, M1, "GetCallerState")["Cached"] == []
        answer = c.call(s, S1, "Sign", "aysay", {"hex": EC_KEY}, "ECDSA", {"hex": digest.hex()})
        assert answer.get("error") == ERR + "NotLoggedIn", answer


def test_pkaction_shows_installed_actions(system):
    for action, (any_, inactive, active) in ACTIONS.items():
        out = run(["pkaction", "--action-id", action, "--verbose"]).stdout
        assert f"implicit any:      {any_}" in out, out
        assert f"implicit inactive: {inactive}" in out, out
        assert f"implicit active:   {active}" in out, out


def test_every_action_the_daemon_checks_is_in_the_policy():
    """Action ids are string literals in the daemon's sources; each must be shipped."""
    policy = (REPO / "polkit" / "org.pincache.policy").read_text()
    shipped = set(re.findall(r'<action id="([^"]+)"', policy))
    assert shipped == set(ACTIONS)
    checked = set()
    for source in (REPO / "Sources").rglob("*.swift"):
        if "pincachectl" in source.parts:
            continue
        checked |= set(re.findall(r'"(org\.pincache\.[a-z][a-z-]*)"', source.read_text()))
    assert checked, "the daemon's sources name no polkit action (org.pincache.login ...): no check is wired in"
    assert checked <= shipped, f"checked but not in the policy: {checked - shipped}"


# --- bus policy ----------------------------------------------------------------------------

def test_bus_policy_refuses_other_interfaces(system):
    c = system.client(U1)
    # Allowed: the standard read-only interfaces.
    assert "org.pincache.Manager1" in c.ok(MANAGER, "org.freedesktop.DBus.Introspectable", "Introspect")
    c.ok(MANAGER, "org.freedesktop.DBus.Peer", "Ping")
    c.ok(MANAGER, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects")
    assert c.ok(MANAGER, PROPS, "Get", "ss", M1, "Version")
    assert isinstance(c.ok(MANAGER, M1, "GetTokens"), list)
    # Refused by the bus itself, before the daemon sees them.
    for iface, member, sig, args in [
        (PROPS, "Set", "ssv", [M1, "CachingMode", False]),
        ("org.example.NotPincache", "Anything", "", []),
        ("org.freedesktop.DBus.Debug.Stats", "GetStats", "", []),
    ]:
        answer = c.call(MANAGER, iface, member, sig, *args)
        assert answer.get("error") == ACCESS_DENIED, (iface, member, answer)
        assert "policy" in answer["message"].lower() or "rejected" in answer["message"].lower(), answer


def test_bus_policy_covers_every_shipped_interface_and_nothing_else():
    """Each interface in dbus/*.xml is callable; every allow rule pairs destination and interface."""
    import xml.etree.ElementTree as ET
    conf = ET.parse(REPO / "dbus" / "org.pincache.conf").getroot()
    allowed = {}
    for policy in conf.iter("policy"):
        for allow in policy.iter("allow"):
            if "own" in allow.attrib:
                assert policy.get("user") == DAEMON_USER and allow.get("own") == "org.pincache.Daemon"
                continue
            assert allow.get("send_destination") == "org.pincache.Daemon", allow.attrib
            assert allow.get("send_interface"), f"allow rule without send_interface: {allow.attrib}"
            assert set(allow.attrib) <= {"send_destination", "send_interface", "send_member"}, allow.attrib
            allowed.setdefault(allow.get("send_interface"), set()).add(allow.get("send_member"))
    shipped = {ET.parse(x).getroot().find("interface").get("name")
               for x in (REPO / "dbus").glob("org.pincache.*.xml")}
    standard = {"org.freedesktop.DBus.Introspectable", "org.freedesktop.DBus.Peer",
                "org.freedesktop.DBus.ObjectManager", "org.freedesktop.DBus.Properties"}
    assert set(allowed) == shipped | standard, set(allowed) ^ (shipped | standard)
    assert allowed["org.freedesktop.DBus.Properties"] == {"Get", "GetAll"}
    assert all(members == {None} for name, members in allowed.items() if name != "org.freedesktop.DBus.Properties")


def test_only_the_daemon_user_may_own_the_name(system):
    c = system.client(U1)
    answer = c.send(op="request_name", name="org.pincache.Daemon")
    assert answer.get("error") == ACCESS_DENIED, answer


# --- systemd unit ------------------------------------------------------------------------

def test_systemd_analyze_verify_is_clean(system):
    r = run(["systemd-analyze", "verify", "/lib/systemd/system/pincached.service"], check=False)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


def test_systemd_security_exposure_at_most_2_5(system):
    r = run(["systemd-analyze", "security", "--offline=true", "/lib/systemd/system/pincached.service"],
            check=False)
    m = re.search(r"Overall exposure level for pincached\.service: ([0-9.]+)", r.stdout + r.stderr)
    assert m, r.stdout[-2000:] + r.stderr
    assert float(m.group(1)) <= 2.5, r.stdout


# --- configuration -------------------------------------------------------------------------

def test_sample_config_documents_and_accepts_every_key(system, tmp_path):
    sample = Path("/etc/pincache/pincache.cfg").read_text()
    for key in ("P11_EnableCachePIN", "P11_LogoutAfterSign", "ForceLoginBeforeSignKeyUsage", "PinCacheTimeout",
                "MD_EnableCachePIN", "CSP_EnableCachePIN", "CSP_LogoutAfterSign", "Module", "MaxSessionsPerClient",
                "SlotPollInterval", "[app "):
        assert key in sample, f"sample config does not mention {key}"
    # Every commented-out example, switched on, must parse: the daemon then fails on the bus
    # (exit 1), not on the file (exit 2).
    enabled = re.sub(r"^#(\w+=|\[app )", r"\1", sample, flags=re.M)
    enabled = "\n".join(l for l in enabled.splitlines() if not l.startswith("Module="))
    cfg = tmp_path / "all.cfg"
    cfg.write_text(enabled)
    r = run(["/usr/sbin/pincached", "--config", str(cfg), "--bus", "unix:path=/nonexistent"], check=False)
    assert r.returncode == 1 and "cannot connect" in r.stderr, (r.returncode, r.stderr)
    for key in ("PinFailureFreeTries", "PinFailureDelay", "PinFailureMaxDelay"):
        assert key in sample, f"sample config does not mention {key}"


def test_check_config_on_the_installed_files(system, tmp_path):
    """Issue 16 §4: the installed configuration checks valid as the unit's ExecReload runs
    it; a file an ordinary user owns is refused as at startup, naming the file."""
    r = run(["/usr/sbin/pincached", "--check-config"], check=False)
    assert r.returncode == 0 and "/etc/pincache/pincache.cfg: valid" in r.stdout, (r.returncode, r.stdout, r.stderr)
    unit = Path("/lib/systemd/system/pincached.service").read_text()
    assert "ExecReload=/usr/sbin/pincached --check-config" in unit
    cfg = tmp_path / "user.cfg"
    cfg.write_text("P11_EnableCachePIN=1\n")
    os.chown(cfg, pwd.getpwnam(U1).pw_uid, -1)
    r = run(["/usr/sbin/pincached", "--check-config", str(cfg)], check=False)
    assert r.returncode == 2 and str(cfg) in r.stderr and "not trusted" in r.stderr, (r.returncode, r.stderr)


# --- pincachectl --------------------------------------------------------------------------

def test_pincachectl_listings(system):
    ctl = "/usr/bin/pincachectl"
    r = system.run_as(U1, ctl, "status")
    assert r.returncode == 0, r.stderr
    assert "pincached" in r.stdout and LABEL in r.stdout and "Your environment" in r.stdout
    status = json.loads(system.run_as(U1, ctl, "status", "--json", check=True).stdout)
    assert status["Manager"]["Version"] and any(t["Label"] == LABEL for t in status["Tokens"])
    assert status["Caller"]["Cached"] == [] and status["Caller"]["Sessions"] == 0

    r = system.run_as(U1, ctl, "tokens", check=True)
    assert r.stdout.splitlines()[0].split()[:3] == ["ID", "LABEL", "SERIAL"] and LABEL in r.stdout
    tokens = json.loads(system.run_as(U1, ctl, "--json", "tokens", check=True).stdout)
    mine = [t for t in tokens if t["Label"] == LABEL]
    assert len(mine) == 1 and mine[0]["Path"].startswith("/org/pincache/token/")

    r = system.run_as(U1, ctl, "keys", LABEL, check=True)
    assert r.stdout.splitlines()[0].split()[:2] == ["ID", "LABEL"] and "ec-key" in r.stdout
    for spec in (LABEL, mine[0]["Id"], mine[0]["Path"]):
        keys = json.loads(system.run_as(U1, ctl, "keys", spec, "--json", check=True).stdout)
        assert {k["Id"]: k["KeyType"] for k in keys} == {EC_KEY: "EC", RSA_KEY: "RSA"}
        ec_cert = next(k["Certificate"] for k in keys if k["Id"] == EC_KEY)
        assert bytes.fromhex(ec_cert) == system.cert("ec")


def test_pincachectl_sign_with_pin_from_stdin(system):
    data = system.workdir / "data.bin"
    data.write_bytes(MSG)
    data.chmod(0o644)
    r = system.run_as(U1, "/usr/bin/pincachectl", "sign", LABEL, EC_KEY, "--mechanism", "ECDSA-SHA256",
                      "--in", str(data), "--pin-stdin", input=(PIN + "\n").encode(), text=False)
    assert r.returncode == 0, r.stderr
    verify_ec(system, MSG, r.stdout)
    r = system.run_as(U2, "/usr/bin/pincachectl", "sign", LABEL, EC_KEY, "--mechanism", "ECDSA-SHA256",
                      "--in", str(data), "--pin-stdin", input=(PIN + "\n").encode(), text=False)
    stderr = r.stderr.decode(errors="replace")
    assert r.returncode == 4 and "NotAuthorized" in stderr, (r.returncode, stderr, r.stdout.hex())


def test_pincachectl_exit_codes(system):
    ctl = "/usr/bin/pincachectl"
    r = system.run_as(U1, ctl, "--bus", "unix:path=/nonexistent", "status")
    assert r.returncode == 3, (r.returncode, r.stderr)
    r = system.run_as(U1, ctl, "keys", "no-such-token")
    assert r.returncode == 1 and "no token" in r.stderr, (r.returncode, r.stderr)
    r = system.run_as(U1, ctl, "sign", LABEL, "not-hex", "--mechanism", "ECDSA")
    assert r.returncode == 64, (r.returncode, r.stderr)
    # Issue 16 §5: a --bus that is no address is a usage error, not an absent daemon.
    r = system.run_as(U1, ctl, "--bus", "garbage", "status")
    assert r.returncode == 64 and "D-Bus address" in r.stderr, (r.returncode, r.stderr)


def test_pincachectl_version_stats_and_json_signature(system):
    """Issue 16 §5: --version matches the daemon's; `stats` shows a user their own figures;
    `sign --json` prints the signature as hex in a JSON object, not raw bytes."""
    ctl = "/usr/bin/pincachectl"
    ours = system.run_as(U1, ctl, "--version").stdout.split()[-1]
    daemon = run(["/usr/sbin/pincached", "--version"]).stdout.split()[-1]
    assert ours == daemon, (ours, daemon)
    r = system.run_as(U1, ctl, "stats")
    assert r.returncode == 0 and f"uid {pwd.getpwnam(U1).pw_uid}" in r.stdout, (r.returncode, r.stdout, r.stderr)
    assert "CallsServed" not in r.stdout
    r = system.run_as(U1, ctl, "--json", "stats")
    assert json.loads(r.stdout)["Scope"] == f"uid {pwd.getpwnam(U1).pw_uid}", r.stdout
    data = system.workdir / "data-json.bin"
    data.write_bytes(MSG)
    data.chmod(0o644)
    r = system.run_as(U1, ctl, "--json", "sign", LABEL, EC_KEY, "--mechanism", "ECDSA-SHA256", "--in", str(data),
                      "--pin-stdin", input=PIN + "\n")
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout)
    verify_ec(system, MSG, bytes.fromhex(answer["Signature"]))


def daemon_statistics():
    r = run(["busctl", "--system", "--json=short", "call", "org.pincache.Daemon", MANAGER, M1, "GetStatistics"])
    return {k: v["data"] for k, v in json.loads(r.stdout)["data"][0].items()}


def proxy_sign(system, user, out_name):
    """pkcs11-tool as `user` through the installed proxy: login, find the EC key, sign."""
    proxies = glob.glob("/usr/lib/*/pkcs11/libpincache-pkcs11.so")
    assert len(proxies) == 1, proxies
    data = system.workdir / f"{out_name}-data.bin"
    data.write_bytes(hashlib.sha256(MSG).digest())
    data.chmod(0o644)
    out = system.workdir / f"{out_name}-sig.bin"
    out.write_bytes(b"")
    out.chmod(0o666)
    r = system.run_as(user, "pkcs11-tool", "--module", proxies[0], "--token-label", LABEL, "--login",
                      "--pin", PIN, "--sign", "--id", EC_KEY, "--mechanism", "ECDSA",
                      "--input-file", str(data), "--output-file", str(out))
    return r, out


def test_proxy_of_another_user_signs_over_its_socket_and_nothing_listens(system):
    """A user's PKCS#11 application, through the installed proxy, gets its socket from the
    system bus (Manager1.OpenCryptoki passes it through the bus policy) and makes every call
    there; nothing of pincache's listens in the filesystem."""
    system.client(U1).ok(MANAGER, M1, "GetStatistics")  # activates the daemon
    before = daemon_statistics()
    r, out = proxy_sign(system, U1, "wire")
    assert r.returncode == 0, r.stdout + r.stderr
    verify_ec(system, MSG, out.read_bytes())
    after = daemon_statistics()
    assert after["CryptokiCalls"] > before["CryptokiCalls"], "the proxy's calls did not go over its socket"
    assert not os.path.exists(RUN_DIR) or not any(
        stat.S_ISSOCK(os.stat(os.path.join(RUN_DIR, n)).st_mode) for n in os.listdir(RUN_DIR)), os.listdir(RUN_DIR)
    # No listening unix socket of pincache's anywhere (flag __SO_ACCEPTCON in /proc/net/unix).
    listening = [line for line in Path("/proc/net/unix").read_text().splitlines()[1:]
                 if len(line.split()) > 7 and int(line.split()[3], 16) & 0x10000 and "pincache" in line.split()[7]]
    assert not listening, listening


def test_denied_cached_pin_use_is_denied_on_both_front_ends(system):
    """U3 may log in but not use its cached PIN (the test rule): through the installed proxy its
    login succeeds and the private-key work after it is refused with CKR_FUNCTION_REJECTED,
    exactly as Session1.Sign after Session1.Login is refused with NotAuthorized."""
    r, out = proxy_sign(system, U3, "denied")
    assert r.returncode != 0, r.stdout + r.stderr
    assert "CKR_FUNCTION_REJECTED" in r.stdout + r.stderr or "(0x200)" in r.stdout + r.stderr, r.stdout + r.stderr
    assert out.read_bytes() == b""
    c = system.client(U3)
    tok = token_path(c)
    session = c.ok(tok, T1, "OpenSession")
    c.ok(session, S1, "Login", "s", PIN)
    digest = hashlib.sha256(MSG).digest()
    answer = c.call(session, S1, "Sign", "aysay", {"hex": EC_KEY}, "ECDSA", {"hex": digest.hex()})
    assert answer.get("error") == "org.pincache.Error.NotAuthorized", answer


# --- issue 12: the shared machine ------------------------------------------------------------

def test_statistics_of_a_non_admin_are_their_own(system):
    """§8: U2 sees the figures of its own uid only; root sees the daemon's."""
    a = system.client(U1)
    tok = token_path(a)
    s = a.ok(tok, T1, "OpenSession")
    a.ok(s, S1, "Login", "s", PIN)
    assert tok in a.ok(MANAGER, M1, "GetCallerState")["Cached"]
    b = system.client(U2)
    b.ok(tok, T1, "OpenSession")
    mine = b.ok(MANAGER, M1, "GetStatistics")
    uid = pwd.getpwnam(U2).pw_uid
    assert mine["Scope"] == f"uid {uid}", mine
    # U2 may not log in: none of the cached PINs are its own, whatever other tests left.
    assert mine["CachedPINs"] == 0 and mine["Sessions"] >= 1 and mine["Environments"] >= 1, mine
    for daemon_wide in ("CallsServed", "CryptokiCalls", "Errors", "PendingAuthorizations", "LockedMemoryBytes"):
        assert daemon_wide not in mine, mine
    everything = daemon_statistics()
    assert everything["Scope"] == "all" and everything["CachedPINs"] >= 1, everything
    assert everything["Environments"] > mine["Environments"] and "CallsServed" in everything, everything


def test_wrong_pins_of_one_user_are_slowed_but_not_anothers(system):
    """§3 on the installed service: U1's wrong PINs are spaced out per the installed defaults
    (3 free, then 1 s, 2 s, …); U1's delay is not U3's."""
    a = system.client(U1)
    tok = token_path(a)
    s = a.ok(tok, T1, "OpenSession")
    started = time.monotonic()
    for _ in range(5):
        assert a.call(s, S1, "Login", "s", "999999").get("error") == ERR + "PinIncorrect"
    assert time.monotonic() - started >= 3.0 - 0.1  # the 4th waited 1 s, the 5th 2 s
    other = system.client(U3)
    t = other.ok(tok, T1, "OpenSession")
    quick = time.monotonic()
    assert other.call(t, S1, "Login", "s", "999999").get("error") in (ERR + "PinIncorrect", ERR + "NotAuthorized")
    assert time.monotonic() - quick < 0.9
    a.ok(s, S1, "Login", "s", PIN)  # waits once more, then resets the count and the token's flags
    # (The log lines are checked by Tests/integration/test_pipeline.py: an activated daemon's
    # stderr has no reader here.)


def token_objects_directly():
    """Every object on the test token, read by root straight from SoftHSM (not through pincache)."""
    r = run(["pkcs11-tool", "--module", "/usr/lib/softhsm/libsofthsm2.so", "--token-label", LABEL, "--login",
             "--pin", PIN, "--list-objects"])
    return r.stdout


def test_token_changes_need_modify_token_on_the_proxy(system):
    """§1: U3 (modify-token refused) can neither write nor delete public objects through the
    installed proxy, and the token is unchanged; U1 (allowed) can. U3 does not log in: with a
    cached PIN its refusal of use-cached-pin would answer first."""
    proxies = glob.glob("/usr/lib/*/pkcs11/libpincache-pkcs11.so")
    assert len(proxies) == 1, proxies
    payload = system.workdir / "data-object.bin"
    payload.write_bytes(b"pincache shared-machine data object")
    payload.chmod(0o644)
    public = ["pkcs11-tool", "--module", proxies[0], "--token-label", LABEL]
    tool = public + ["--login", "--pin", PIN]
    before = token_objects_directly()
    r = system.run_as(U3, *public, "--write-object", str(payload), "--type", "data", "--label", "u3-data")
    # pkcs11-tool names the code, or prints it as a number where its table lacks the name.
    assert r.returncode != 0 and re.search(r"CKR_FUNCTION_REJECTED|\(0x200\)", r.stdout + r.stderr), r.stdout + r.stderr
    r = system.run_as(U3, *public, "--delete-object", "--type", "cert", "--id", EC_KEY)
    assert r.returncode != 0 and re.search(r"CKR_ACTION_PROHIBITED|\(0x1b\)", r.stdout + r.stderr), r.stdout + r.stderr
    assert token_objects_directly() == before
    r = system.run_as(U1, *tool, "--write-object", str(payload), "--type", "data", "--label", "u1-data")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "u1-data" in token_objects_directly()
    r = system.run_as(U1, *tool, "--delete-object", "--type", "data", "--label", "u1-data")
    assert r.returncode == 0, r.stdout + r.stderr
    assert token_objects_directly() == before


def test_a_flood_from_one_user_hits_a_clear_limit_while_another_signs(system):
    """§2 on the installed service: U3 makes 5000 attempts at a bus connection plus a cryptoki
    socket; they stop at clear limits (the bus's connections per user, the daemon's sockets
    per uid); meanwhile U1 signs with its cached PIN at p99 ≤ 50 ms, and the daemon keeps its
    PID."""
    a = system.client(U1)
    tok = token_path(a)
    s = a.ok(tok, T1, "OpenSession")
    a.ok(s, S1, "Login", "s", PIN)
    pid = int(bus_call_root("GetConnectionUnixProcessID", "s", "org.pincache.Daemon")[1])
    flood = subprocess.Popen(["runuser", "-u", U3, "--", "/usr/bin/python3", str(system.workdir / "flood.py"), "5000"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=client_env(),
                             cwd=str(system.workdir))
    digest = hashlib.sha256(MSG).digest()
    latencies = []
    while flood.poll() is None or len(latencies) < 100:
        started = time.monotonic()
        sig = a.ok(s, S1, "Sign", "aysay", {"hex": EC_KEY}, "ECDSA", {"hex": digest.hex()})
        latencies.append(time.monotonic() - started)
        if len(latencies) > 5000:
            break
    out, err = flood.communicate(timeout=120)
    verify_ec(system, MSG, bytes.fromhex(sig["hex"]))
    results = json.loads(out.strip().splitlines()[-1])
    assert sum(results.values()) == 5000, (results, err)
    refused = {k: v for k, v in results.items() if k != "socket"}
    assert refused and all(k.endswith("LimitsExceeded") for k in refused), results
    assert results.get("socket", 0) <= 128, results
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    print(f"FIGURE system flood: {results}; U1 signature p99 {p99 * 1000:.1f} ms over {len(latencies)}")
    assert p99 <= 0.05, p99
    assert int(bus_call_root("GetConnectionUnixProcessID", "s", "org.pincache.Daemon")[1]) == pid


def test_another_users_typo_leaves_my_cache_usable_after_a_good_login(system):
    """§4 on the installed service: U3's wrong PIN makes the token count; U1's cached PIN is
    held back, not lost, and signs again once U3 logs in correctly."""
    a = system.client(U1)
    tok = token_path(a)
    s = a.ok(tok, T1, "OpenSession")
    a.ok(s, S1, "Login", "s", PIN)
    digest = hashlib.sha256(MSG).digest()
    a.ok(s, S1, "Sign", "aysay", {"hex": EC_KEY}, "ECDSA", {"hex": digest.hex()})
    c = system.client(U3)
    t = c.ok(tok, T1, "OpenSession")
    assert c.call(t, S1, "Login", "s", "999999").get("error") == ERR + "PinIncorrect"
    answer = a.call(s, S1, "Sign", "aysay", {"hex": EC_KEY}, "ECDSA", {"hex": digest.hex()})
    assert answer.get("error") == ERR + "NotLoggedIn" and "held back" in answer.get("message", ""), answer
    assert tok in a.ok(MANAGER, M1, "GetCallerState")["Cached"]
    c.ok(t, S1, "Login", "s", PIN)
    sig = a.ok(s, S1, "Sign", "aysay", {"hex": EC_KEY}, "ECDSA", {"hex": digest.hex()})
    verify_ec(system, MSG, bytes.fromhex(sig["hex"]))


def capabilities(pid):
    return int(re.search(r"^CapEff:\s+([0-9a-f]+)$", Path(f"/proc/{pid}/status").read_text(), re.M).group(1), 16)


def test_app_section_applies_to_another_users_program_on_the_installed_service(system):
    """Issue 15 §5: pkcs11-tool of an unprivileged user, through the installed proxy, gets its
    [app] section (here non-caching mode, so its login locks the token and Token1.LockedBy
    names it). The daemon runs as the unit runs it — user pincache, CAP_SYS_PTRACE ambient and
    bounding, no new privileges (setpriv; this machine has no systemd) — and keeps no
    capability itself: only its executable helper holds CAP_SYS_PTRACE."""
    cfg = Path("/etc/pincache/pincache.cfg")
    original = cfg.read_text()
    stop_daemon()
    daemon = None
    try:
        cfg.write_text(original + "\n[app /usr/bin/pkcs11-tool]\nP11_EnableCachePIN=0\n")
        daemon = subprocess.Popen(
            ["setpriv", "--reuid=pincache", "--regid=pincache", "--init-groups", "--inh-caps=-all,+sys_ptrace",
             "--ambient-caps=+sys_ptrace", "--bounding-set=-all,+sys_ptrace", "--no-new-privs",
             "/usr/sbin/pincached", "--bus", "system"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: len(daemon_pids()) == 1 and bus_call_root("NameHasOwner", "s", "org.pincache.Daemon")[1] == "true",
                 20, "pincached started as the unit would")
        pid = daemon_pids()[0]
        helpers = [int(p) for p in run(["pgrep", "-u", DAEMON_USER, "-x", "pincache-exe"], check=False).stdout.split()]
        assert len(helpers) == 1, helpers
        assert capabilities(pid) == 0, hex(capabilities(pid))
        assert capabilities(helpers[0]) == 1 << 19, hex(capabilities(helpers[0]))  # CAP_SYS_PTRACE alone

        proxies = glob.glob("/usr/lib/*/pkcs11/libpincache-pkcs11.so")
        # The data comes through a FIFO: pkcs11-tool logs in, then waits in open() for a writer.
        fifo = system.workdir / "app-section-data"
        fifo.unlink(missing_ok=True)
        os.mkfifo(fifo)
        fifo.chmod(0o666)
        tool = subprocess.Popen(
            ["runuser", "-u", U1, "--", "pkcs11-tool", "--module", proxies[0], "--token-label", LABEL, "--login",
             "--pin", PIN, "--sign", "--id", EC_KEY, "--mechanism", "ECDSA", "--input-file", str(fifo),
             "--output-file", "/dev/null"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=client_env())
        watcher = system.client(U3)
        tok = token_path(watcher)
        holder = {"Executable": "/usr/bin/pkcs11-tool", "Uid": pwd.getpwnam(U1).pw_uid}
        # pkcs11-tool has logged in and waits for its input: its login holds the token.
        seen = []
        try:
            wait_for(lambda: seen.append(watcher.ok(tok, PROPS, "Get", "ss", T1, "LockedBy")) or seen[-1] == holder, 20,
                     "LockedBy = pkcs11-tool of U1")
        except AssertionError:
            tool.kill()
            raise AssertionError(f"LockedBy {seen[-3:]}; pkcs11-tool: {tool.communicate()}")
        fifo.write_bytes(hashlib.sha256(MSG).digest())
        out, err = tool.communicate(timeout=60)
        assert tool.returncode == 0, err
        wait_for(lambda: watcher.ok(tok, PROPS, "Get", "ss", T1, "LockedBy") == {}, 20, "LockedBy empty again")
    finally:
        cfg.write_text(original)
        if daemon is not None:
            daemon.terminate()
            daemon.wait(timeout=20)
        stop_daemon()

def test_a_refused_configuration_is_named_when_activation_fails(system):
    """Issue 16 §4: activation with a bad configuration tells the user what to check, not the
    launch helper's "out of memory" (its reading of the daemon's exit status)."""
    cfg = Path("/etc/pincache/pincache.cfg")
    original = cfg.read_text()
    stop_daemon()
    try:
        cfg.write_text(original + "\nP11_EnableCachePIN=maybe\n")
        r = run(["runuser", "-u", U1, "--", "/usr/bin/pincachectl", "status"], check=False, env=client_env(),
                stdin=subprocess.DEVNULL, timeout=60)
        assert r.returncode == 3, (r.returncode, r.stderr)
        assert "pincached --check-config" in r.stderr and "out of memory" not in r.stderr, r.stderr
        r = run(["/usr/sbin/pincached", "--check-config"], check=False)
        assert r.returncode == 2 and "/etc/pincache/pincache.cfg:" in r.stderr, r.stderr
    finally:
        cfg.write_text(original)
    assert token_path(system.client(U1))

def test_flush_on_a_terminal_asks_for_the_admin_password_through_pkttyagent(system):
    """Issue 16 §5: as systemctl does, pincachectl starts polkit's text agent when standard
    input is a terminal, so auth_admin_keep can prompt; a wrong password is refused (exit 4).
    With --no-ask-password nothing prompts and the refusal is immediate."""
    import fcntl
    import select
    import termios
    master, slave = os.openpty()

    def controlling_tty():
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(["runuser", "-u", U1, "--", "/usr/bin/pincachectl", "flush"], stdin=slave,
                            stdout=slave, stderr=slave, env=client_env(), start_new_session=True,
                            preexec_fn=controlling_tty)
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 30
    try:
        while b"Password:" not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1)
            if ready:
                try:
                    seen += os.read(master, 4096)
                except OSError:
                    break
        assert b"AUTHENTICATING FOR org.pincache.manage" in seen and b"Password:" in seen, seen
        # pkttyagent prints the prompt first and only then turns echo off with TCSAFLUSH, which
        # discards input typed in between: answer once echo is off (the flush is then done),
        # or the agent waits for a line forever (seen once in CI).
        while termios.tcgetattr(master)[3] & termios.ECHO and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not termios.tcgetattr(master)[3] & termios.ECHO, seen
        os.write(master, b"not-the-password\n")
        while proc.poll() is None and time.monotonic() < deadline + 30:
            ready, _, _ = select.select([master], [], [], 1)
            if ready:
                try:
                    seen += os.read(master, 4096)
                except OSError:
                    break
        assert proc.wait(timeout=30) == 4, seen
        assert b"refused (FlushCaches)" in seen, seen
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    r = run(["runuser", "-u", U1, "--", "/usr/bin/pincachectl", "--no-ask-password", "flush"],
            check=False, env=client_env(), stdin=subprocess.DEVNULL, timeout=30)
    assert r.returncode == 4 and "Password" not in r.stdout + r.stderr, (r.stdout, r.stderr)


# --- the package's life: upgrade, remove, purge (last: it takes the package away) ----------

ROUTING_MARK = "# Written by pincache (p11-kit-routing)"


def p11kit_modules():
    out = run(["p11-kit", "list-modules"]).stdout
    return [line.split(":")[0] for line in out.splitlines() if line and not line[0].isspace()]


def routed_files():
    return sorted(p.name for p in Path("/etc/pkcs11/modules").glob("*.module")
                  if p.read_text().startswith(ROUTING_MARK))


def test_p11_kit_programs_see_each_token_once_through_pincache(system):
    """Issue 13 §13: the package routes other packages' p11-kit modules through pincache
    (/etc/pkcs11/modules/NAME.module with enable-in: pincached), so p11-kit-aware programs
    list each token once, through pincache's proxy, while pincached itself still loads the
    backends through p11-kit. Trust modules stay for everyone."""
    assert {"softhsm2.module", "opensc-pkcs11.module"} <= set(routed_files()), routed_files()
    soft = Path("/etc/pkcs11/modules/softhsm2.module").read_text()
    assert "enable-in: pincached" in soft and "libsofthsm2.so" in soft, soft
    assert not Path("/etc/pkcs11/modules/p11-kit-trust.module").exists()
    modules = p11kit_modules()
    assert "pincache" in modules and "p11-kit-trust" in modules, modules
    assert "softhsm2" not in modules and "opensc-pkcs11" not in modules, modules
    # Root could read SoftHSM's store directly: before routing p11tool listed the token twice.
    system.client(U1).ok(MANAGER, M1, "GetStatistics")  # activates the daemon
    tokens = run(["p11tool", "--list-tokens"]).stdout
    labels = re.findall(r"^\s*Label: (.*)$", tokens, re.M)
    print(f"FIGURE p11-kit routing: p11tool --list-tokens labels = {labels}")
    assert labels.count(LABEL) == 1, tokens
    # And through it a signature (the backend reached by pincached only).
    r, out = proxy_sign(system, U1, "routed")
    assert r.returncode == 0, r.stdout + r.stderr
    verify_ec(system, MSG, out.read_bytes())


def test_zz_upgrade_remove_and_purge(system, tmp_path):
    """Issue 16 §1: an upgrade keeps the admin's configuration and leaves a working daemon;
    remove stops the daemon (its cached PINs die with it) and keeps configuration and user;
    purge takes both. The package is reinstalled afterwards for whatever runs next."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    version = run(["dpkg-query", "-W", "-f=${Version}", "pincache"]).stdout
    tree = tmp_path / "upgrade"
    run(["dpkg-deb", "-R", system.deb, str(tree)])
    control = tree / "DEBIAN" / "control"
    control.write_text(re.sub(r"^Version: .*$", f"Version: {version}+systest1", control.read_text(), flags=re.M))
    upgrade = tmp_path / "pincache_upgrade.deb"
    run(["dpkg-deb", "--root-owner-group", "-b", str(tree), str(upgrade)])
    cfg = Path("/etc/pincache/pincache.cfg")
    original = cfg.read_text()
    try:
        cfg.write_text(original + "\n# the admin's line, kept across upgrades\n")
        a = system.client(U1)
        assert token_path(a)
        assert daemon_pids()
        run(["apt-get", "install", "-y", "--no-install-recommends", str(upgrade)], env=env)
        assert run(["dpkg-query", "-W", "-f=${Version}", "pincache"]).stdout == f"{version}+systest1"
        assert "the admin's line" in cfg.read_text()
        b = system.client(U1)
        s = b.ok(token_path(b), T1, "OpenSession")
        b.ok(s, S1, "Login", "s", PIN)
        digest = hashlib.sha256(MSG).digest()
        verify_ec(system, MSG, bytes.fromhex(b.ok(s, S1, "Sign", "aysay", {"hex": EC_KEY}, "ECDSA",
                                                   {"hex": digest.hex()})["hex"]))

        run(["apt-get", "remove", "-y", "pincache"], env=env)
        wait_for(lambda: not daemon_pids(), 10, "prerm to stop the daemon")
        assert not Path("/usr/sbin/pincached").exists()
        assert cfg.exists() and "the admin's line" in cfg.read_text()
        assert pwd.getpwnam(DAEMON_USER)
        assert '"org.pincache.Daemon"' not in " ".join(bus_call_root("ListActivatableNames"))
        # The other packages' modules are everyone's again.
        assert routed_files() == []
        assert "softhsm2" in p11kit_modules()

        run(["apt-get", "purge", "-y", "pincache"], env=env)
        assert not Path("/etc/pincache").exists()
        assert not Path("/var/lib/pincache").exists()
        with pytest.raises(KeyError):
            pwd.getpwnam(DAEMON_USER)
        assert run(["dpkg-query", "-W", "-f=${db:Status-Status}", "pincache"], check=False).stdout in ("", "not-installed")
    finally:
        run(["apt-get", "install", "-y", "--no-install-recommends", "--allow-downgrades", system.deb], env=env)
        cfg.write_text(original)
        assert "softhsm2.module" in routed_files()
        # The new system user gets a new uid; SoftHSM's store is group softhsm's, which postinst restored.
        assert DAEMON_USER in grp.getgrnam("softhsm").gr_mem
