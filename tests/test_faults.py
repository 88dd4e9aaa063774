"""Faults beyond crashes: full disks, bad journals, hostile clients and hostile relays."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import relay_server, wait_until
from hostile import HostileRelay
from mailerd import wire
from mailerd.schema.control import Status
from mailerd.testing.relay import Faults

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (tmpfs mount, setpriv)")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------ storage


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {result.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> Path:
    """Write a ballast file until the file system says it is full."""
    ballast = directory / "ballast"
    block = b"\0" * (256 * 1024)
    with open(ballast, "wb", buffering=0) as out:
        while True:
            try:
                out.write(block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if len(block) == 1:
                    break
                block = block[: len(block) // 2]
    return ballast


@ROOT_ONLY
def test_full_disk_stops_sending_and_continues_when_space_returns(
        tmp_path, small_disk, relay_factory, daemon_factory):
    relay = relay_factory(Faults(reply_delay=0.005))
    daemon = daemon_factory({"isp": relay_server(relay, connections=2)},
                            daemon={"state_dir": str(small_disk / "state")}).start()
    cid = daemon.send_campaign(tmp_path / "c", 600)
    wait_until(lambda: len(relay.messages()) >= 50, 30, "sending to start")

    ballast = fill(small_disk)
    status = wait_until(lambda: (s := daemon.status()).journal_error and s, 30,
                        "the daemon to notice the full disk")
    assert "full" in status.journal_error
    stalled_at = len(relay.messages())
    # it keeps serving the control socket and keeps not sending, tick after tick
    for _ in range(3):
        wait_until(lambda: daemon.status().uptime > status.uptime + 1, 10, "a second to pass")
        status = daemon.status()
        assert status.journal_error
    assert len(relay.messages()) - stalled_at <= 2  # at most the in-flight transactions
    daemon.log_line("journal_unwritable")
    assert "NOT SENDING" in daemon.ctl("status").stdout

    ballast.unlink()
    wait_until(lambda: daemon.status().journal_error is None, 30, "writes to work again")
    report = daemon.wait_done(cid, timeout=90)
    assert report.counts.sent + report.counts.uncertain == 600
    counts = relay.count_by_rcpt()
    assert len(counts) == 600 and max(counts.values()) == 1
    assert report.counts.sent == len(counts) - report.counts.uncertain


def test_garbage_journal_gives_a_clear_error_and_is_left_alone(relay_factory, daemon_factory):
    daemon = daemon_factory({"isp": relay_server(relay_factory())})
    daemon.state_dir.mkdir()
    journal = daemon.state_dir / "journal.sqlite3"
    journal.write_bytes(os.urandom(64 * 1024))
    before = digest(journal)
    result = daemon.start_expecting_failure()
    assert result.returncode == 3
    assert str(journal) in result.stderr and "journal" in result.stderr
    assert digest(journal) == before
    assert sorted(p.name for p in daemon.state_dir.iterdir()) == ["journal.sqlite3", "mailerd.lock"]


def test_corrupt_journal_pages_are_detected_before_anything_changes(
        tmp_path, relay_factory, daemon_factory):
    relay = relay_factory()
    daemon = daemon_factory({"isp": relay_server(relay)}).start()
    daemon.wait_done(daemon.send_campaign(tmp_path / "c", 300))
    assert daemon.terminate() == 0
    journal = daemon.state_dir / "journal.sqlite3"
    data = bytearray(journal.read_bytes())
    page = 4096
    data[3 * page: 5 * page] = os.urandom(2 * page)  # wreck two b-tree pages
    journal.write_bytes(bytes(data))
    before = digest(journal)
    result = daemon.start_expecting_failure()
    assert result.returncode == 3
    assert "journal" in result.stderr and ("corrupt" in result.stderr or "malformed" in result.stderr)
    assert digest(journal) == before


def test_journal_path_that_is_not_a_file_gives_a_clear_error(relay_factory, daemon_factory):
    # (as root every file is readable; a journal that is not a regular file is the
    # unreadable case a test running as root can produce)
    daemon = daemon_factory({"isp": relay_server(relay_factory())})
    journal = daemon.state_dir / "journal.sqlite3"
    journal.mkdir(parents=True)
    result = daemon.start_expecting_failure()
    assert result.returncode == 3
    assert f"{journal} is not a file" in result.stderr
    assert journal.is_dir() and not any(journal.iterdir())


# ------------------------------------------------------------------ hostile clients


def test_two_hundred_clients_some_stalling_while_a_campaign_runs(
        tmp_path, relay_factory, daemon_factory):
    relay = relay_factory(Faults(reply_delay=0.002))
    daemon = daemon_factory({"isp": relay_server(relay, connections=2)}).start()
    cid = daemon.send_campaign(tmp_path / "c", 800)
    stalled = []
    for i in range(50):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(daemon.socket)
        sock.sendall(b"\x00\x00\x10\x00" + b"half a frame" * (i % 3))
        stalled.append(sock)
    answers: list[int] = []
    errors: list[BaseException] = []

    def client() -> None:
        try:
            answers.append(daemon.call(Status()).pid)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(150)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors[:3]
    assert answers == [daemon.proc.pid] * 150
    report = daemon.wait_done(cid, timeout=90)
    assert report.counts.sent == 800
    for sock in stalled:
        sock.close()


def test_fuzzed_frames_never_hurt_the_daemon(daemon_factory, relay_factory):
    import random

    daemon = daemon_factory({"isp": relay_server(relay_factory())}).start()
    rng = random.Random(7)
    samples = [
        os.urandom(rng.randint(0, 300)),
        wire.HEADER.pack(200) + os.urandom(200),
        wire.pack([1, 2, 3]),
        wire.pack({"op": "Report", "campaign": "x"}),
        wire.pack({"op": "EnqueueRows", "campaign": 1, "rows": [[1, ["a@b.c"]]]}),
        wire.pack({"op": "Resume"}),
        wire.HEADER.pack(wire.MAX_FRAME + 1),
    ]
    for payload in samples * 3:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(daemon.socket)
            try:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(65536):
                    pass
            except OSError:
                pass
    assert daemon.status().pid == daemon.proc.pid
    assert rss_kb(daemon.proc.pid) < 200_000


# ------------------------------------------------------------------ hostile relays


@pytest.mark.parametrize("mode, expect", [
    ("huge_reply", "queued"),
    ("endless_reply", "queued"),
    ("silent_greeting", "queued"),
    ("silent_after_dot", "uncertain"),
])
def test_hostile_relays_time_out_stay_bounded_and_classify(tmp_path, daemon_factory, mode, expect):
    with HostileRelay(mode) as relay:
        daemon = daemon_factory({"isp": {"host": "127.0.0.1", "port": relay.port,
                                         "connections": 1, "timeout": "1s"}}).start()
        cid = daemon.send_campaign(tmp_path / "c", 3)
        if expect == "uncertain":
            wait_until(lambda: daemon.report(cid).counts.uncertain >= 1, 30, "an uncertain")
            daemon.quiesce(cid)
        else:
            wait_until(lambda: "session_backoff" in daemon.log(), 30, "the session to give up")
            workers = daemon.worker_pids()
            assert workers and all(rss_kb(pid) < 150_000 for pid in workers)
        report = daemon.report(cid)
        assert report.counts.failed == 0 and report.counts.sent == 0
        if expect == "queued":
            assert report.counts.queued + report.counts.sending == 3
            assert all(r.attempts == 0 for r in daemon.report(cid, "queued").recipients)
        else:
            uncertain = daemon.report(cid, "uncertain").recipients
            assert len(uncertain) == relay.dots >= 1
            assert "no reply after the final '.'" in uncertain[0].reply
        assert daemon.status().pid == daemon.proc.pid


# ------------------------------------------------------------------ shutdown and settling


def test_sigterm_during_a_busy_campaign_ends_in_time_and_records_cut_transactions(
        tmp_path, relay_factory, daemon_factory):
    relay = relay_factory(Faults(reply_delay=10.0))  # every reply comes 10 s after the '.'
    daemon = daemon_factory({"isp": relay_server(relay, connections=3)},
                            daemon={"shutdown_timeout": "1s"}).start()
    cid = daemon.send_campaign(tmp_path / "c", 30)
    wait_until(lambda: len(relay.messages()) >= 3, 30, "three messages past their '.'")
    started = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(20) == 0
    # shutdown_timeout plus a margin for a loaded machine, well short of the 10 s replies
    assert time.monotonic() - started < 1 + 4
    daemon.start()
    report = daemon.report(cid)
    at_relay = set(relay.count_by_rcpt())
    uncertain = daemon.emails(cid, "uncertain")
    sent = daemon.emails(cid, "sent")
    assert at_relay == uncertain | sent  # every cut transaction is on record as uncertain
    assert report.counts.sending == 0 and len(uncertain) >= 1


def test_settle_uncertain_as_sent_or_resend(tmp_path, relay_factory, daemon_factory):
    relay = relay_factory(Faults(swallow_every=10))
    daemon = daemon_factory({"isp": relay_server(relay, connections=1)}).start()
    cid = daemon.send_campaign(tmp_path / "c", 40)
    daemon.wait_done(cid)
    uncertain = daemon.report(cid, "uncertain").recipients
    assert len(uncertain) == 4
    assert all(r.server == "isp" and r.dot_at and r.message_id for r in uncertain)
    table = daemon.ctl("report", str(cid), "--state", "uncertain").stdout
    assert uncertain[0].message_id in table and "DOT SENT" in table

    first, second, *rest = [r.email for r in uncertain]
    daemon.ctl("settle", str(cid), "--as", "sent", first)
    refused = daemon.ctl("settle", str(cid), "--as", "sent", "nobody@example.com", check=False)
    assert refused.returncode == 1 and "not uncertain" in refused.stderr
    relay.set_faults(Faults())
    daemon.ctl("settle", str(cid), "--as", "resend")
    report = daemon.wait_done(cid)
    assert report.counts.sent == 40 and report.counts.uncertain == 0
    counts = relay.count_by_rcpt()
    assert counts[first] == 1  # settled as sent: never sent again
    assert all(counts[e] == 2 for e in [second, *rest])  # resent on purpose
    ids = {}
    for received in relay.messages():
        if received.rcpt == second:
            ids.setdefault(second, set()).add(_message_id(received.data))
    assert len(ids[second]) == 1  # the resend carries the same Message-ID
    assert "settled as sent by uid=" in daemon.report(cid, "sent").recipients[
        [r.email for r in daemon.report(cid, "sent").recipients].index(first)].reply


def _message_id(data: bytes) -> str:
    import email
    return email.message_from_bytes(data)["Message-ID"]
