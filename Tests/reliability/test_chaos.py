"""Issue 6 item 8: chaos. Several clients sign in a loop — D-Bus clients and PKCS#11
proxy clients (ctypes), on the virtual OpenPGP card and on SoftHSM — while pcscd is
restarted, the card pulled and re-inserted, and the daemon killed and restarted
(RELIABILITY=ci: 300 signatures, 3 pcscd restarts, 10 pulls, 1 kill; long: 1000, 10, 50, 3).

Checked: no daemon dies except by our kills, no call takes longer than its deadline,
every answer is a success or a documented error, every signature verifies, a pulled
card's PINs are wiped from every environment (GetCallerState / GetStatistics), and
every client — the proxy ones without restarting — signs again after the last event.
"""

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hygiene_support import (  # noqa: F401 (fixtures)
    LONG, PYTHON, SOFTHSM_MODULE, bus, build_dir, figure, make_client, need, pincached_bin, proxy_lib,
    random_pin, secret_store, sized, start, wait_until)
from fixtures import OPENSC_CONF, OPENSC_PKCS11, pcscd, vcard_factory  # noqa: F401 (fixtures)

ITEM = 8
HERE = Path(__file__).resolve().parent
SIGNATURES = sized(300, 1000)
PCSCD_RESTARTS = sized(3, 10)
PULLS = sized(10, 50)
KILLS = sized(1, 3)
# D-Bus clients wait 30 s for a reply; the proxy gives Login and Sign 120 s (Wire.slowTimeout).
DEADLINE = {"dbus": 30.0, "proxy": 30.0}
SLOW_PROXY_OPS = ("login", "sign")
SLOW_DEADLINE = 120.0

# Answers a client may get while tokens, pcscd and the daemon come and go (DESIGN §2,
# dbus/README.md "Errors"). Anything else — PinIncorrect above all: the PIN is right,
# so that would be a stale or misdirected PIN — fails the test.
DBUS_DOCUMENTED = {
    "org.pincache.Error.TokenNotPresent", "org.pincache.Error.NotLoggedIn", "org.pincache.Error.TokenBusy",
    "org.pincache.Error.BackendError",   # carries its CKR_* code, checked below
    "org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NoReply",
    "org.freedesktop.DBus.Error.UnknownObject", "org.freedesktop.DBus.Error.AccessDenied",
    "org.freedesktop.DBus.Error.NameHasNoOwner", "test.NoToken",
}
PROXY_DOCUMENTED = {
    "CKR_DEVICE_REMOVED", "CKR_SESSION_HANDLE_INVALID", "CKR_TOKEN_NOT_PRESENT", "CKR_USER_NOT_LOGGED_IN",
    "CKR_SESSION_CLOSED", "CKR_DEVICE_ERROR", "CKR_OBJECT_HANDLE_INVALID", "0xE0", "CKR_TOKEN_NOT_RECOGNIZED",
    "CKR_USER_ANOTHER_ALREADY_LOGGED_IN", "0x104", "CKR_KEY_HANDLE_INVALID", "0x60",
    # OpenSC 0.23 answers C_Login/C_Sign with CKR_GENERAL_ERROR when the card leaves the
    # reader mid-call; the daemon passes a backend's code through unchanged (dbus/README.md).
    "CKR_GENERAL_ERROR",
    # CKR_USER_PIN_NOT_INITIALIZED: OpenSC's answer while it reads a card that is leaving
    # again (its token flags are not filled in yet); seen once in a long run.
    "0x102",
    # C_GetSlotList's second call when a slot appeared after the first (a re-inserted card):
    # the PKCS#11 answer to a list that grew (p11.py asks for the count, then the list).
    "0x150",
}
# A backend error's code must be one a vanishing card explains.
BACKEND_CODES = ("CKR_DEVICE_ERROR", "CKR_DEVICE_REMOVED", "CKR_TOKEN_NOT_PRESENT", "CKR_SESSION_HANDLE_INVALID",
                 "CKR_SESSION_CLOSED", "CKR_CARD_REMOVED", "CKR_FUNCTION_FAILED", "CKR_GENERAL_ERROR",
                 "CKR_TOKEN_NOT_RECOGNIZED", "CKR_USER_PIN_NOT_INITIALIZED")


class Worker:
    def __init__(self, name, kind, target, args, workdir, stop):
        self.name, self.kind, self.target = name, kind, target
        self.out = workdir / f"{name}.jsonl"
        self.err = workdir / f"{name}.stderr"
        self.proc = subprocess.Popen(
            [PYTHON, str(HERE / "chaos_worker.py"), "--kind", kind, "--name", name, "--out", str(self.out),
             "--stop", str(stop), *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(self.err, "wb"))

    def records(self):
        try:
            lines = self.out.read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for l in lines:
            try:
                out.append(json.loads(l))
            except json.JSONDecodeError:
                pass   # a line being written
        return out

    def signatures(self):
        return sum(1 for r in self.records() if r["op"] == "sign" and r["ok"])


def test_chaos(start, pcscd, vcard_factory, bus, proxy_lib, secret_store, make_client, tmp_path):
    need(os.path.exists(OPENSC_PKCS11), f"{OPENSC_PKCS11} missing (apt-get install opensc-pkcs11)")
    store, soft_pin, _ = secret_store
    card_pin = random_pin(32)
    card = vcard_factory("chaos", pin=card_pin).insert()
    opensc = {"OPENSC_CONF": str(OPENSC_CONF)}

    def start_daemon():
        return start(caching=True, module=OPENSC_PKCS11, env=opensc,
                     extra=["SlotPollInterval=300", f"Module={SOFTHSM_MODULE}"])

    daemons = [start_daemon()]
    obs = make_client("observer")

    def token_by(serial, label_has=""):
        for t in obs.tokens():
            p = obs.token_props(t)
            if p["Present"] and p["Serial"] == serial and label_has in p["Label"]:
                return t
        return None

    card_tok = wait_until(lambda: token_by(card.token_serial, "(sig)"), timeout=30, what="the card as a token")
    soft_serial = next(obs.token_props(t)["Serial"] for t in obs.tokens()
                       if obs.token_props(t)["Label"] == "pincache-demo")
    card_pub = tmp_path / "card-sig.pub.pem"
    card_pub.write_bytes(card.public_key_pem("sig"))
    soft_pub = store / "pincache-demo" / "ec-cert.der"

    work = tmp_path / "workers"
    work.mkdir()
    stop = work / "STOP"
    on_card = ["--serial", card.token_serial, "--label-has", "(sig)", "--pin", card_pin, "--pubkey", str(card_pub)]
    on_soft = ["--serial", soft_serial, "--pin", soft_pin, "--pubkey", str(soft_pub)]
    common = ["--bus", bus.address]
    proxy = ["--proxy", str(proxy_lib)]
    workers = [
        Worker("dbus-card-1", "dbus", "card", common + on_card, work, stop),
        Worker("dbus-card-2", "dbus", "card", common + on_card, work, stop),
        Worker("dbus-soft", "dbus", "soft", common + on_soft + ["--pause", "0.1"], work, stop),
        Worker("proxy-card", "proxy", "card", common + on_card + proxy, work, stop),
        Worker("proxy-soft", "proxy", "soft", common + on_soft + proxy + ["--pause", "0.1"], work, stop),
    ]
    n_soft_clients = sum(1 for w in workers if w.target == "soft")

    def total():
        return sum(w.signatures() for w in workers)

    def card_signed_since(t):
        return any(r["op"] == "sign" and r["ok"] and r["t"] > t
                   for w in workers if w.target == "card" for r in w.records())

    t_previous = time.monotonic()
    events = ["pull"] * PULLS + ["pcscd"] * PCSCD_RESTARTS + ["kill"] * KILLS
    random.Random(6).shuffle(events)
    per_event = SIGNATURES / (len(events) + 1)
    wiped_checks = 0
    unexpected_exits = []
    event_log = []
    t_start = time.monotonic()
    try:
        for i, event in enumerate(events):
            # Let the clients make progress between events, the card's too: a card client
            # that did not come back after the last event fails the run here.
            goal = per_event * (i + 1)
            wait_until(lambda: total() >= goal, timeout=120, interval=0.2,
                       what=f"{goal:.0f} signatures before event {i} ({event})")
            wait_until(lambda: card_signed_since(t_previous), timeout=120, interval=0.2,
                       what=f"a card signature before event {i} ({event})")
            d = daemons[-1]
            if d.proc.poll() is not None:
                unexpected_exits.append((d.proc.returncode, d.stderr_text()[-2000:]))
                pytest.fail(f"pincached died on its own (exit {d.proc.returncode}):\n{d.stderr_text()[-3000:]}")
            t0 = time.monotonic()
            if event == "pull":
                # An observer environment holds the card's PIN when it goes.
                tok = wait_until(lambda: token_by(card.token_serial, "(sig)"), timeout=30, what="card present")
                s = obs.open_session(tok)
                wait_until(lambda: obs.error(obs.login, s, card_pin) in (None, "org.pincache.Error.AlreadyLoggedIn"),
                           timeout=30, interval=0.2, what="observer login on the card")
                assert tok in obs.cached()
                card.pull()
                wait_until(lambda: not obs.token_props(tok)["Present"], timeout=20, what="Present=false after the pull")
                state = obs.caller_state()
                stats = obs.statistics()
                assert tok not in state["Cached"], "the pulled card's PIN is still cached for the observer"
                assert stats["CachedPINs"] <= n_soft_clients, \
                    f"{stats['CachedPINs']} PINs cached with the card out; at most {n_soft_clients} (SoftHSM) may be"
                wiped_checks += 1
                time.sleep(0.3)
                card.insert()
            elif event == "pcscd":
                pcscd.restart()
                # vpcd drops the card's link with pcscd; the card process then exits
                # (a virtual card cannot stay in a reader that went away): put it back.
                try:
                    card.proc.wait(10)
                except subprocess.TimeoutExpired:
                    pass
                if not card.inserted:
                    card.insert()
            elif event == "kill":
                d.proc.kill()
                d.proc.wait()
                daemons.append(start_daemon())
            try:
                wait_until(lambda: token_by(card.token_serial, "(sig)"), timeout=60, interval=0.2,
                           what=f"the card back after {event}")
            except AssertionError:
                pytest.fail(f"the card did not come back after {event}: card process alive={card.inserted}, "
                            f"pcscd sees it={pcscd.card_present(card.reader)}\ncard: {card.output()[-1500:]}\n"
                            f"pincached: {daemons[-1].stderr_text()[-3000:]}")
            event_log.append((event, round(time.monotonic() - t0, 2)))
            t_previous = time.monotonic()
        t_last = time.monotonic()
        # Every client signs again after the last event, in the same process as before.
        for w in workers:
            wait_until(lambda: any(r["op"] == "sign" and r["ok"] and r["t"] > t_last for r in w.records()),
                       timeout=90, interval=0.2, what=f"{w.name} signing after the last event")
            assert w.proc.poll() is None, f"{w.name} exited: {w.err.read_text()[-2000:]}"
        wait_until(lambda: total() >= SIGNATURES, timeout=300, interval=0.5, what=f"{SIGNATURES} signatures")
        assert daemons[-1].proc.poll() is None, "pincached died after the last event"
    finally:
        stop.touch()
        for w in workers:
            try:
                w.proc.wait(150)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
    elapsed = time.monotonic() - t_start

    # --- what the clients saw ---------------------------------------------------------------
    records = {w.name: w.records() for w in workers}
    problems = []
    latencies = []
    errors = {}
    for w in workers:
        for r in records[w.name]:
            deadline = SLOW_DEADLINE if w.kind == "proxy" and r["op"] in SLOW_PROXY_OPS else DEADLINE[w.kind]
            latencies.append(r["lat"])
            if r["lat"] > deadline + 1:
                problems.append(f"{w.name}: {r['op']} took {r['lat']:.1f}s (deadline {deadline:.0f}s)")
            if r["op"] == "sign" and r["ok"] and not r.get("verified"):
                problems.append(f"{w.name}: a signature did not verify")
            if r["ok"]:
                continue
            errors[(w.kind, r["err"])] = errors.get((w.kind, r["err"]), 0) + 1
            documented = DBUS_DOCUMENTED if w.kind == "dbus" else PROXY_DOCUMENTED
            if r["err"] not in documented:
                problems.append(f"{w.name}: {r['op']} answered an undocumented error {r['err']}: {r['msg']}")
            elif r["err"] == "org.pincache.Error.BackendError" and not any(c in (r["msg"] or "") for c in BACKEND_CODES):
                problems.append(f"{w.name}: {r['op']} BackendError without an explained CKR code: {r['msg']}")
            if r["err"] == "org.freedesktop.DBus.Error.NoReply" and r["lat"] > DEADLINE["dbus"] - 1:
                problems.append(f"{w.name}: {r['op']} blocked until the D-Bus timeout ({r['lat']:.1f}s)")
    # No wrong PIN ever reached the card: its retry counter is still full.
    assert card.counters()["pw1"] == 3, card.counters()
    for d in daemons:
        log = d.stderr_text()
        assert "Fatal error" not in log and "Crash" not in log, log[-3000:]
    print("  events:", event_log)
    backend = sorted({r["msg"] for rs in records.values() for r in rs if r["err"] == "org.pincache.Error.BackendError"})
    print("  backend errors:", backend)
    for (kind, name), n in sorted(errors.items()):
        print(f"  {kind} error {name}: {n}")
    assert not problems, "\n".join(problems[:40])

    signatures = sum(1 for rs in records.values() for r in rs if r["op"] == "sign" and r["ok"])
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1] if latencies else 0
    card_signatures = sum(1 for w in workers if w.target == "card" for r in records[w.name] if r["op"] == "sign" and r["ok"])
    figure(ITEM, "signatures (all verified)", signatures,
           note=f"{card_signatures} on the card; {len(workers)} clients: 3 D-Bus, 2 proxy")
    figure(ITEM, "events: card pulls / pcscd restarts / daemon kills", f"{PULLS}/{PCSCD_RESTARTS}/{KILLS}")
    figure(ITEM, "daemon crashes (besides the kills)", 0, limit=0)
    figure(ITEM, "calls past their deadline", 0, limit=0)
    figure(ITEM, "slowest call", round(latencies[-1], 2), "s", limit=DEADLINE["dbus"], note=f"p99 {p99:.3f} s")
    figure(ITEM, "documented errors answered", sum(errors.values()),
           note=", ".join(f"{n}:{k[1].rsplit('.', 1)[-1]}" for k, n in sorted(errors.items())))
    figure(ITEM, "pulls after which the card's PINs were cached anywhere", 0, note=f"{wiped_checks} checked")
    figure(ITEM, "clients that had to be restarted", 0, limit=0)
    figure(ITEM, "card PIN retries lost", 3 - card.counters()["pw1"], limit=0)
    figure(ITEM, "run time", round(elapsed, 1), "s")
