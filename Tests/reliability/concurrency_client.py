"""One concurrency process for test_concurrency.py: THREADS clients (each its own bus
connection, so its own cache environment) sign SIGS times each and verify every signature
against the token's certificate file. Writes its progress (signatures done) to PROGRESS_FILE
as it goes, and one JSON object (counts) on stdout at the end.

usage: concurrency_client.py ADDRESS PLAN_JSON THREADS SIGS CACHING(0|1) SEED PROGRESS_FILE
PLAN_JSON: [{"token": path, "ec": cert.der, "rsa": cert.der}, ...] (clients alternate tokens)
"""

import hashlib
import json
import os
import random
import sys
import threading
import time

import dbus
import dbus.bus

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
from pincache_client import EC_KEY, PIN, RSA_KEY, CallError, Client, load_cert, verify  # noqa: E402

CHUNK = 20  # non-caching mode: signatures per held login


def main():
    address, plan, threads, sigs, caching, seed, progress_file = sys.argv[1:8]
    plan, threads, sigs, caching = json.loads(plan), int(threads), int(sigs), caching == "1"
    certs = [{"ec": load_cert(p["ec"]), "rsa": load_cert(p["rsa"])} for p in plan]
    lock = threading.Lock()
    out = {"ok": 0, "wrong": 0, "errors": {}, "busy_retries": 0, "max_latency_ms": 0.0}
    done = [0]

    def bump(**kw):
        with lock:
            for k, v in kw.items():
                out[k] += v

    def client(index):
        rnd = random.Random(int(seed) * 1000 + index)
        which = index % len(plan)
        token, cert = plan[which]["token"], certs[which]
        c = Client(address, f"c{index}")
        s = c.open_session(token)
        logged_in = False
        n = 0
        while n < sigs:
            if not logged_in:
                try:
                    c.login(s, PIN)
                    logged_in = True
                except CallError as e:
                    if e.name == "org.pincache.Error.TokenBusy" and not caching:
                        bump(busy_retries=1)
                        time.sleep(rnd.uniform(0.05, 0.2))  # a held login lasts ~CHUNK signatures
                        continue
                    raise
            for _ in range(1 if caching else min(CHUNK, sigs - n)):
                msg = f"client {seed}/{index} signature {n}".encode()
                use_rsa = n % 4 == 3
                mech = "RSA-PSS-SHA256" if use_rsa else "ECDSA"
                data = msg if use_rsa else hashlib.sha256(msg).digest()
                t0 = time.perf_counter()
                try:
                    sig = c.sign(s, RSA_KEY if use_rsa else EC_KEY, mech, data)
                except CallError as e:
                    with lock:
                        out["errors"][e.name] = out["errors"].get(e.name, 0) + 1
                    n += 1
                    continue
                latency = (time.perf_counter() - t0) * 1000
                try:
                    verify(cert["rsa" if use_rsa else "ec"], mech, msg, sig)
                    bump(ok=1)
                except Exception:
                    bump(wrong=1)
                with lock:
                    out["max_latency_ms"] = max(out["max_latency_ms"], latency)
                    done[0] += 1
                n += 1
            if not caching:
                c.logout(s)
                logged_in = False
                time.sleep(rnd.uniform(0, 0.002))  # let another client take the token
        c.close_session(s)
        c.close()

    failures = []

    def run(i):
        try:
            client(i)
        except Exception as e:  # reported, never swallowed
            failures.append(repr(e))

    ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    while any(t.is_alive() for t in ts):
        with open(progress_file + ".tmp", "w") as f:
            f.write(str(done[0]))
        os.replace(progress_file + ".tmp", progress_file)
        time.sleep(0.5)
    out["failures"] = failures
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
