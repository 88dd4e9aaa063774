"""Worker lives: the restart limit, the liveness rule, spawns that fail, what `status` counts.

The rules are written out in mailerd/supervisor/processes.py. A hung worker is a real
worker process frozen with SIGSTOP: the relay alone cannot hang one, since aiosmtplib
bounds every wait for a reply by the server's `timeout`.
"""

from __future__ import annotations

import os
import resource
import signal
from pathlib import Path

from conftest import campaign_addresses, relay_server, wait_until
from mailerd import wire
from mailerd.schema.control import ServerInfo
from mailerd.supervisor.processes import LIVENESS_MARGIN, RESTART_LIMIT, SILENT_REPLIES
from mailerd.testing.relay import Faults, FakeRelay, Received

TIMEOUT = 1.0  # the servers' SMTP timeout in the liveness tests
SILENCE_LIMIT = SILENT_REPLIES * TIMEOUT + LIVENESS_MARGIN


def server_named(daemon, name: str) -> ServerInfo:
    return next(s for s in daemon.status().servers if s.name == name)


def only_worker(daemon) -> int:
    """The pid of the one worker, once it waits for work."""
    def ready() -> int | None:
        workers = [w for s in daemon.status().servers for w in s.workers]
        return workers[0].pid if len(workers) == 1 and workers[0].state == "idle" else None
    return wait_until(ready, 20, "the worker to be ready")


def assert_exactly_once(relay: FakeRelay, expected: set[str]) -> None:
    counts = relay.count_by_rcpt()
    assert {a: n for a, n in counts.items() if n > 1} == {}, "nobody is sent twice"
    assert set(counts) == expected


def test_a_worker_that_cannot_start_marks_its_server_broken_and_the_others_keep_sending(
        tmp_path: Path, relay_factory, daemon_factory):
    relay = relay_factory()
    # A password file bigger than a frame: the worker's Setup can never reach it, and a
    # worker without its Setup exits 3 at once, every time.
    password = tmp_path / "password"
    password.write_text("x" * (wire.MAX_FRAME + 1))
    bad = relay_server(relay, connections=2, security="starttls", username="news",
                       password_file=str(password))
    daemon = daemon_factory({"good": relay_server(relay, connections=1), "bad": bad}).start()

    broken = wait_until(lambda: (s := server_named(daemon, "bad")).state == "broken" and s,
                        60, "the server to be marked broken")
    assert broken.broken and "before reaching the relay" in broken.broken
    restarts = sum(w.restarts for w in broken.workers)
    assert RESTART_LIMIT <= restarts <= RESTART_LIMIT + 1  # a life under way may still end
    line = daemon.log_line("server_broken", "server=bad")
    assert f"failed_starts={RESTART_LIMIT}" in line and "exit_code=3" in line
    assert "broken" in daemon.ctl("status").stdout.split("server bad", 1)[1].splitlines()[0]

    # the other server carries the whole campaign; the broken one is not respawned meanwhile
    campaign = daemon.send_campaign(tmp_path / "c", 30)
    report = daemon.wait_done(campaign)
    assert report.counts.sent == 30
    assert_exactly_once(relay, campaign_addresses(30))
    after = server_named(daemon, "bad")
    assert sum(w.restarts for w in after.workers) == restarts
    assert all(w.pid is None for w in after.workers)

    # a reload repairs it: the password file is read again and the workers start
    password.write_text("secret")
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.log_line("server_repaired", "server=bad")
    repaired = wait_until(lambda: (s := server_named(daemon, "bad")).state != "broken"
                          and all(w.pid for w in s.workers) and s, 30, "fresh workers")
    assert repaired.broken is None


def test_a_worker_silent_while_holding_jobs_is_killed_and_its_jobs_go_back_to_the_queue(
        tmp_path: Path, relay_factory, daemon_factory):
    relay = relay_factory()
    daemon = daemon_factory({"isp": relay_server(relay, connections=1, timeout=f"{TIMEOUT:g}s")}).start()
    hung = only_worker(daemon)
    os.kill(hung, signal.SIGSTOP)  # alive, but it will never read its jobs

    campaign = daemon.send_campaign(tmp_path / "c", 3)
    report = daemon.wait_done(campaign, timeout=SILENCE_LIMIT + 40)
    assert report.counts.sent == 3 and report.counts.uncertain == 0
    assert_exactly_once(relay, campaign_addresses(3))
    killed = daemon.log_line("worker_killed", f"pid={hung}")
    assert "silent while holding a job" in killed
    assert "requeued=" in daemon.log_line("worker_jobs_settled", "server=isp")
    assert hung not in daemon.worker_pids()


def test_a_worker_hung_after_its_final_dot_is_killed_and_its_recipient_is_uncertain(
        tmp_path: Path, relay_factory, daemon_factory):
    frozen: list[int] = []

    def freeze_the_sender(entries: tuple[Received, ...]) -> None:
        # the relay has read the "." (so `data-sent` was durable): the worker hangs now,
        # before it can read any reply
        if not frozen:
            frozen.append(worker)
            os.kill(worker, signal.SIGSTOP)

    relay = relay_factory(on_message=freeze_the_sender)
    daemon = daemon_factory({"isp": relay_server(relay, connections=1, timeout=f"{TIMEOUT:g}s")}).start()
    worker = only_worker(daemon)

    campaign = daemon.send_campaign(tmp_path / "c", 3)
    report = daemon.wait_done(campaign, timeout=SILENCE_LIMIT + 40)
    assert frozen == [worker]
    assert report.counts.uncertain == 1 and report.counts.sent == 2
    first = relay.messages()[0].rcpt
    assert daemon.emails(campaign, "uncertain") == {first}
    assert_exactly_once(relay, campaign_addresses(3))  # the uncertain one is not sent again
    assert "silent while holding a job" in daemon.log_line("worker_killed", f"pid={worker}")
    assert "uncertain=1" in daemon.log_line("worker_jobs_settled", "server=isp")


def test_a_spawn_that_fails_for_lack_of_descriptors_is_retried(
        tmp_path: Path, relay_factory, daemon_factory):
    relay = relay_factory()
    daemon = daemon_factory({"isp": relay_server(relay, connections=1)}).start()
    first = only_worker(daemon)
    soft, hard = resource.prlimit(daemon.proc.pid, resource.RLIMIT_NOFILE)
    # No new descriptor at all (0-2 are open): the respawn's socketpair() fails with EMFILE.
    # Nothing else is asked of the daemon meanwhile; the log is written on fd 2.
    resource.prlimit(daemon.proc.pid, resource.RLIMIT_NOFILE, (3, hard))
    try:
        os.kill(first, signal.SIGKILL)
        failed = daemon.log_line("worker_spawn_failed", "server=isp", timeout=30)
        assert "retry_in=" in failed
    finally:
        resource.prlimit(daemon.proc.pid, resource.RLIMIT_NOFILE, (soft, hard))

    second = wait_until(lambda: [p for p in daemon.worker_pids() if p != first], 30,
                        "a new worker in the slot")
    assert len(second) == 1
    campaign = daemon.send_campaign(tmp_path / "c", 5)
    assert daemon.wait_done(campaign).counts.sent == 5
    assert_exactly_once(relay, campaign_addresses(5))


def test_status_counts_as_sent_only_what_the_relay_accepted(tmp_path, relay_factory, daemon_factory):
    relay = relay_factory(Faults(reject_domains=["unknown.example"]))
    daemon = daemon_factory({"isp": relay_server(relay, connections=1)}).start()
    campaign = daemon.send_campaign(tmp_path / "c", 3, extra_rows=[
        "nobody1@unknown.example,N,X1", "nobody2@unknown.example,N,X2"])
    report = daemon.wait_done(campaign)
    assert (report.counts.sent, report.counts.failed) == (3, 2)
    windows = server_named(daemon, "isp").windows
    assert windows == {"minute": 3, "hour": 3, "day": 3}  # five hand-outs, three sent
    assert "sent: last minute 3, hour 3, day 3" in daemon.ctl("status").stdout
