"""A randomised crash loop with one invariant: nothing lost, nothing sent twice.

Each cycle lets a campaign run against a misbehaving relay for a random moment,
then kills: the daemon's whole process group, one worker, the daemon in the
middle of an enqueue, or in the middle of a graceful shutdown. After every
restart the journal and the relay must agree:
  - the relay holds every recipient the journal calls sent;
  - everything the relay holds is sent or uncertain in the journal;
  - a recipient the relay received twice was uncertain and explicitly resent;
  - a kill leaves at most one uncertain recipient per connection.

The seed is printed; replay a failure with MAILERD_CHAOS_SEED=<seed>. The soak:
MAILERD_CHAOS_CYCLES=200 (default 20 here, which CI runs).
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import (JOURNAL_BACKENDS, campaign_addresses, make_campaign, relay_server,
                      wait_until)
from mailerd.schema.control import ListCampaigns
from mailerd.testing.relay import Faults

# on both journals: SQLite, and a host of its own on PostgreSQL (issue 16)
pytestmark = pytest.mark.parametrize("journal_backend", JOURNAL_BACKENDS, indirect=True)

SEED = int(os.environ.get("MAILERD_CHAOS_SEED", random.randrange(1 << 30)))
CYCLES = int(os.environ.get("MAILERD_CHAOS_CYCLES", "20"))
CONNECTIONS = 3
TOTAL = 3000


def recovered_uncertain(log: str) -> list[int]:
    return [int(n) for n in re.findall(r"journal_recovered .*?uncertain=(\d+)", log)]


def settled_uncertain(log: str) -> list[int]:
    return [int(n) for n in re.findall(r"worker_jobs_settled .*?uncertain=(\d+)", log)]


def recovered_after_every_start(daemon, starts: int) -> list[int]:
    """recovered_uncertain of the log once it holds the line of each of the `starts` starts
    (the line is logged before the daemon answers, but logging is asynchronous)."""
    return wait_until(
        lambda: len(found := recovered_uncertain(daemon.log())) == starts and found, 10,
        f"{starts} journal_recovered lines in the log")


def check_agreement(daemon, relay, campaign: int, resent: set[str]) -> None:
    received = relay.count_by_rcpt()
    sent, uncertain = daemon.emails(campaign, "sent"), daemon.emails(campaign, "uncertain")
    twice = {address for address, n in received.items() if n > 1}
    assert twice <= resent, f"sent twice without an explicit resend: {sorted(twice - resent)[:5]}"
    assert sent <= set(received), f"journal says sent, relay never got: {sorted(sent - set(received))[:5]}"
    # an explicitly resent recipient may be queued or deferred again while the relay
    # holds the copy that made it uncertain
    unknown = set(received) - sent - uncertain - resent
    assert not unknown, f"relay has them, journal neither sent nor uncertain: {sorted(unknown)[:5]}"


def kill_during_enqueue(daemon, rng, campaign_file, recipients) -> None:
    enqueue = subprocess.Popen(
        [sys.executable, "-m", "mailerctl", "--socket", daemon.socket, "enqueue",
         str(campaign_file), "--recipients", str(recipients)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(rng.uniform(0.0, 0.4))  # fault timing, not synchronisation
    daemon.kill_group()
    enqueue.communicate(timeout=30)


def kill_during_shutdown(daemon, rng) -> None:
    daemon.proc.send_signal(signal.SIGTERM)
    time.sleep(rng.uniform(0.0, 0.3))  # fault timing
    if daemon.proc.poll() is None:
        daemon.kill_group()
    else:
        daemon.proc.wait()


def kill_one_worker(daemon) -> None:
    pids = wait_until(daemon.worker_pids, 20, "a live worker")
    victim = random.Random(pids[0]).choice(pids)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in daemon.worker_pids(), 20, "the worker to be reaped")


def test_randomised_crash_loop(tmp_path, relay_factory, daemon_factory):
    print(f"chaos seed {SEED}, {CYCLES} cycles (replay: MAILERD_CHAOS_SEED={SEED})")
    rng = random.Random(SEED)
    relay = relay_factory(Faults(drop_after=rng.randint(5, 15), max_sessions=CONNECTIONS,
                                 swallow_every=rng.randint(60, 120),
                                 tempfail_every=rng.randint(20, 50), reply_delay=0.002))
    daemon = daemon_factory(
        {"isp": relay_server(relay, connections=CONNECTIONS)},
        delivery={"retry_initial": "0.2s", "retry_max": "0.5s", "max_attempts": 100},
    ).start()
    starts = 1
    # before any kill: a start's line lost to a kill would throw the count off
    recovered_after_every_start(daemon, starts)
    campaign_file, recipients = make_campaign(tmp_path / "c", TOTAL)
    resent: set[str] = set()

    kill_during_enqueue(daemon, rng, campaign_file, recipients)
    daemon.start()
    starts += 1
    campaigns = daemon.call(ListCampaigns()).campaigns
    assert len(campaigns) <= 1 and all(c.total == TOTAL for c in campaigns), "enqueue is all or nothing"
    campaign = campaigns[0].id if campaigns else daemon.enqueue(campaign_file, recipients)

    for cycle in range(CYCLES):
        time.sleep(rng.uniform(0.05, 0.6))  # let it run for a random moment (fault timing)
        mode = rng.choice(("group", "group", "worker", "shutdown"))
        if mode == "worker":
            kill_one_worker(daemon)
        elif mode == "shutdown":
            kill_during_shutdown(daemon, rng)
        else:
            daemon.kill_group()
        if daemon.proc.poll() is not None:
            daemon.start()
            starts += 1
        recovered = recovered_after_every_start(daemon, starts)
        assert all(n <= CONNECTIONS for n in recovered), f"cycle {cycle}"
        assert all(n <= 1 for n in settled_uncertain(daemon.log())), f"cycle {cycle}"
        daemon.quiesce(campaign)
        check_agreement(daemon, relay, campaign, resent)
        if cycle % 5 == 4:
            resent |= daemon.emails(campaign, "uncertain")
            daemon.ctl("resume", str(campaign), "--include-uncertain")
        else:
            daemon.ctl("resume", str(campaign))

    relay.set_faults(Faults())
    resent |= daemon.emails(campaign, "uncertain")
    daemon.ctl("resume", str(campaign), "--include-uncertain")
    report = daemon.wait_done(campaign, timeout=120)
    check_agreement(daemon, relay, campaign, resent)
    counts = report.counts
    assert counts.sent + counts.failed + counts.invalid + counts.uncertain == TOTAL
    assert counts.sent == TOTAL, counts
    assert set(relay.count_by_rcpt()) == campaign_addresses(TOTAL)
