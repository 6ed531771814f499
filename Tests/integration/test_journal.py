"""Issue 16 §3: under systemd the daemon logs to journald in its native protocol.

journald is not running here, so the test plays it: a datagram socket where the daemon is told
journald listens (PINCACHE_JOURNAL_SOCKET), and JOURNAL_STREAM naming the daemon's stderr as
systemd does when a unit's stderr is the journal. Each datagram is parsed as journald would."""

import os
import signal
import socket
import time

from pincache_client import ERR, PIN, wait_until

STARTED = "3a6e1f0c8d2b4e79a5c4b7d90e1f2a63"
STOPPING = "b41d8e2f6c0a4973a1e5d6c7b8a9f014"
PIN_SUBMISSION = "5f2c3e0a9b8d4c61a7e2f4d8c1b09a31"
WRONG_PIN = "271828"


class FakeJournal:
    def __init__(self, path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.records = []

    def poll(self):
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return self.records
            fields = {}
            for line in data.decode().split("\n"):
                if line:
                    key, _, value = line.partition("=")
                    assert key not in fields, f"field {key} twice in one record: {data!r}"
                    fields[key] = value
            self.records.append((fields, data))

    def find(self, **wanted):
        return [f for f, _ in self.poll() if all(f.get(k) == v for k, v in wanted.items())]


def test_records_carry_priority_identifier_and_message_id(start_daemon, make_client, tmp_path):
    journal = FakeJournal(tmp_path / "journal.socket")
    stderr = tmp_path / "pincached-0.stderr"  # the file start_daemon gives its first daemon
    stderr.touch()
    st = os.stat(stderr)
    d = start_daemon(caching=True, env_extra={
        "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}", "PINCACHE_JOURNAL_SOCKET": str(journal.path)})

    started = journal.find(MESSAGE_ID=STARTED)
    assert len(started) == 1, journal.records
    assert started[0]["PRIORITY"] == "6" and started[0]["SYSLOG_IDENTIFIER"] == "pincached"
    assert "ready on the bus" in started[0]["MESSAGE"]

    a = make_client("A")
    tok = a.token()
    s = a.open_session(tok)
    assert a.error(a.login, s, WRONG_PIN) == ERR + "PinIncorrect"
    a.login(s, PIN)
    wait_until(lambda: len(journal.find(MESSAGE_ID=PIN_SUBMISSION)) >= 2, what="two PIN-submission records")
    wrong = journal.find(MESSAGE_ID=PIN_SUBMISSION, PINCACHE_RESULT="CKR_PIN_INCORRECT")
    assert len(wrong) == 1 and wrong[0]["PRIORITY"] == "4", journal.records
    assert wrong[0]["PINCACHE_OPERATION"] == "login" and wrong[0]["PINCACHE_UID"] == str(os.getuid())
    good = journal.find(MESSAGE_ID=PIN_SUBMISSION, PINCACHE_RESULT="ok")
    assert len(good) == 1 and good[0]["PRIORITY"] == "6"
    # `journalctl -p warning` shows the wrong PIN; the plain log line says so too.
    assert any(f.get("PRIORITY") == "4" and "wrong PIN" in f.get("MESSAGE", "") for f, _ in journal.records)

    d.proc.send_signal(signal.SIGTERM)
    d.proc.wait(timeout=20)
    stopping = journal.find(MESSAGE_ID=STOPPING)
    assert len(stopping) == 1 and stopping[0]["PRIORITY"] == "6", journal.records

    every = b"".join(data for _, data in journal.poll())
    assert WRONG_PIN.encode() not in every and PIN.encode() not in every
    # Every line went to the journal, none to the stream as well.
    assert "pincached[" not in d.stderr_text(), d.stderr_text()
    for fields, _ in journal.records:
        assert fields.get("PRIORITY") in {"3", "4", "5", "6"}, fields  # no debug without --verbose


def test_without_journal_stream_the_log_stays_on_stderr(start_daemon, make_client, tmp_path):
    """A JOURNAL_STREAM that names some other file (inherited by a child of a service) is not
    the daemon's stderr: lines stay on stderr, nothing is sent to the socket."""
    journal = FakeJournal(tmp_path / "journal.socket")
    other = tmp_path / "other"
    other.touch()
    st = os.stat(other)
    d = start_daemon(caching=True, env_extra={
        "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}", "PINCACHE_JOURNAL_SOCKET": str(journal.path)})
    a = make_client("A")
    assert a.error(a.login, a.open_session(a.token()), WRONG_PIN) == ERR + "PinIncorrect"
    wait_until(lambda: "CKR_PIN_INCORRECT" in d.stderr_text(), what="the audit line on stderr")
    time.sleep(0.2)
    assert journal.poll() == []
    assert "pincached[warning]: wrong PIN" in d.stderr_text()


def test_every_message_id_is_documented():
    """docs/logging.md (installed in the package's doc dir) lists exactly the daemon's IDs."""
    import re
    from pathlib import Path
    repo = Path(__file__).resolve().parents[2]
    ids = set()
    for source in ("Log.swift", "Audit.swift"):
        text = (repo / "Sources" / "PincacheService" / source).read_text()
        ids |= set(re.findall(r'"([0-9a-f]{32})"', text))
    documented = set(re.findall(r"`([0-9a-f]{32})`", (repo / "docs" / "logging.md").read_text()))
    assert len(ids) == 19 and ids == documented, (ids - documented, documented - ids)
