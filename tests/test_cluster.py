"""Several mailerd hosts on one PostgreSQL journal (issue 16): real daemons, a real private
PostgreSQL cluster (mailerd/testing/postgres.py), one fake relay account they all send through.

The relay account allows 3 sessions in total: each host is configured with connections = 3,
so without the cluster-wide ceiling two hosts would open 6, and the relay records the most
sessions it saw at once. It drops every session after its 7th message. Every test asserts what the relay received
(who, how many times, how many sessions at once) and what the shared report says.
Leases are short (2 s) so that takeovers happen within a test's patience.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import (assert_nobody_lost_or_sent_twice, campaign_addresses, relay_server,
                      wait_until)
from mailerd.daemon import EXIT_FENCED
from mailerd.testing.daemon import postgresql_journal
from mailerd.testing.relay import Faults
from test_pacing import arrival_times, busiest_window, server_status

TOTAL = 3000
SESSIONS = 3  # the relay account's connections, for the whole cluster
LEASE = 2.0


@pytest.fixture
def hosts(tmp_path, relay_factory, daemon_factory, pg_dsn):
    """make(n, faults) -> (relay, [n started daemons on one database, host-0 ...])."""
    def make(count: int, faults: Faults | None = None, lease: float = LEASE):
        relay = relay_factory(faults or Faults(drop_after=7, reply_delay=0.002))
        daemons = [daemon_factory({"isp": relay_server(relay, connections=SESSIONS)},
                                  journal=postgresql_journal(pg_dsn, f"host-{i}", f"{lease:g}s"))
                   for i in range(count)]
        for daemon in daemons:
            daemon.start()
        return relay, daemons
    return make


def sent_by(daemon) -> int:
    """Messages this host's workers had accepted by the relay (their `sent` counters)."""
    return sum(w.sent for s in daemon.status().servers for w in s.workers)


def line_with(daemon, *needles: str) -> str | None:
    return next((line for line in daemon.log().splitlines() if all(n in line for n in needles)),
                None)


def followed(daemon, campaign: int, state: str) -> int:
    """How often this host has followed a change of the campaign made on another host."""
    return sum(1 for line in daemon.log().splitlines()
               if "campaign_followed" in line and f"campaign={campaign} " in line + " "
               and f"state={state}" in line)


def wait_followed(daemons, campaign: int, state: str, before: dict | None = None) -> None:
    """Until every one of `daemons` has followed the change (once more than `before`)."""
    wait_until(lambda: all(followed(d, campaign, state) > (before or {}).get(d.host_id, 0)
                           for d in daemons), 5, f"every host to follow {state}")


def wait_seconds(daemon, seconds: float) -> None:
    """Wait until the daemon's own clock has advanced by `seconds`: a real interval in
    which something that should not happen would."""
    start = daemon.status().uptime
    wait_until(lambda: daemon.status().uptime > start + seconds, seconds + 10,
               f"{seconds:g} s to pass")


def assert_exactly_once(relay, expected: set[str]) -> None:
    counts = relay.count_by_rcpt()
    twice = sorted(a for a, n in counts.items() if n > 1)
    assert not twice, f"sent more than once: {twice[:10]}"
    assert set(counts) == expected, f"never received: {sorted(expected - set(counts))[:10]}"


@pytest.mark.parametrize("count", [2, 3])
def test_hosts_share_one_campaign_within_the_accounts_sessions(tmp_path, hosts, count):
    relay, daemons = hosts(count)
    cid = daemons[0].send_campaign(tmp_path / "c", TOTAL)
    report = daemons[-1].wait_done(cid, timeout=240)
    assert report.counts.sent == TOTAL
    assert report.counts.uncertain == report.counts.failed == report.counts.queued == 0
    assert_exactly_once(relay, campaign_addresses(TOTAL))
    assert relay.max_concurrent_seen <= SESSIONS, "the account's sessions: a cluster-wide ceiling"
    assert relay.drops > 100  # the relay really did cut the sessions
    shares = [sent_by(d) for d in daemons]
    assert all(shares), f"every host sent some: {shares}"
    assert sum(shares) == TOTAL
    status = daemons[0].status()
    assert sorted(h.host for h in status.hosts) == [f"host-{i}" for i in range(count)]
    assert all(h.alive for h in status.hosts)
    listed = daemons[1].ctl("status").stdout
    assert all(f"host-{i}" in listed for i in range(count))


def test_pause_resume_and_cancel_on_any_host_reach_every_host(tmp_path, hosts):
    relay, (a, b, c) = hosts(3, Faults(reply_delay=0.01))
    cid = a.send_campaign(tmp_path / "c", TOTAL)
    wait_until(lambda: sent_by(b) and sent_by(c), 60, "every host to send")
    b.ctl("pause", str(cid))
    wait_followed((a, c), cid, "paused")
    wait_until(lambda: a.report(cid).counts.sending == 0, 5, "every host to stop sending")
    paused_at = len(relay.messages())
    wait_seconds(a, 2)  # a pause that did not reach a host would let it send on
    assert len(relay.messages()) == paused_at
    assert a.report(cid).counts.sent == paused_at < TOTAL

    before = {d.host_id: followed(d, cid, "running") for d in (a, b)}
    c.ctl("resume", str(cid))
    wait_followed((a, b), cid, "running", before)
    wait_until(lambda: len(relay.messages()) >= paused_at + 100, 30, "sending to resume")
    a.ctl("cancel", str(cid))
    wait_followed((b, c), cid, "cancelled")
    wait_until(lambda: b.report(cid).counts.sending == 0, 5, "the cancel to reach every host")
    cancelled_at = len(relay.messages())
    wait_seconds(a, 2)
    assert len(relay.messages()) == cancelled_at
    report = c.report(cid)
    assert report.state == "cancelled" and report.counts.sent == cancelled_at < TOTAL
    assert max(relay.count_by_rcpt().values()) == 1


def test_kill_9_of_one_host_the_others_finish_after_its_lease(tmp_path, hosts):
    relay, (a, b, victim) = hosts(3)
    cid = a.send_campaign(tmp_path / "c", TOTAL)
    wait_until(lambda: len(relay.messages()) >= 600 and sent_by(victim) >= 50, 120,
               "600 messages at the relay, some from the victim")
    victim.kill_group()
    killed_at = time.monotonic()
    taken = wait_until(lambda: line_with(a, "host_taken_over", "host=host-2")
                       or line_with(b, "host_taken_over", "host=host-2"), 30,
                       "the victim to be taken over")
    assert time.monotonic() - killed_at <= LEASE + 2 + 2  # the lease, a look, and the log
    report = a.wait_done(cid, timeout=240)
    uncertain = a.emails(cid, "uncertain")
    assert report.counts.uncertain <= SESSIONS, "at most one per session the victim held"
    assert f"uncertain={report.counts.uncertain}" in taken
    assert_nobody_lost_or_sent_twice(relay.count_by_rcpt(), uncertain, campaign_addresses(TOTAL),
                                     report.counts.sent, report.counts.uncertain)
    assert {h.host: h.alive for h in a.status().hosts}["host-2"] is False


def test_a_host_frozen_past_its_lease_sends_nothing_it_lost_and_exits_fenced(tmp_path, hosts):
    relay, (a, frozen) = hosts(2, Faults(reply_delay=0.01))
    cid = a.send_campaign(tmp_path / "c", TOTAL)
    wait_until(lambda: sent_by(frozen) >= 50 and a.report(cid).counts.sending, 120,
               "the host to be sending")
    frozen.signal_group(signal.SIGSTOP)
    try:
        a.log_line("host_taken_over", "host=host-1", timeout=LEASE + 10)
        # the other host sends what the frozen one held, while it is still frozen
        wait_seconds(a, 1)
    finally:
        frozen.signal_group(signal.SIGCONT)
    assert frozen.proc.wait(30) == EXIT_FENCED
    assert frozen.log_line("fenced", "host=host-1")
    report = a.wait_done(cid, timeout=240)
    # after its thaw the host may still write the "." of a recipient whose data-sent it
    # had committed before it froze (that one is uncertain now), but none of those it lost
    assert_nobody_lost_or_sent_twice(relay.count_by_rcpt(), a.emails(cid, "uncertain"),
                                     campaign_addresses(TOTAL), report.counts.sent,
                                     report.counts.uncertain)
    assert report.counts.uncertain <= SESSIONS


def test_postgresql_restarted_mid_campaign_hosts_wait_and_go_on(tmp_path, hosts, pg_cluster):
    relay, daemons = hosts(2, Faults(reply_delay=0.002))
    cid = daemons[0].send_campaign(tmp_path / "c", TOTAL)
    wait_until(lambda: len(relay.messages()) >= 600, 120, "600 messages at the relay")
    pg_cluster.restart()
    report = daemons[1].wait_done(cid, timeout=240)
    assert report.counts.sent == TOTAL and report.counts.uncertain == 0
    assert_exactly_once(relay, campaign_addresses(TOTAL))
    assert all(d.proc.poll() is None for d in daemons), "nobody was fenced or crashed"
    assert all(sent_by(d) for d in daemons)


def test_check_config_connects_to_the_database_and_fences_nobody(tmp_path, hosts):
    relay, (host,) = hosts(1)
    generation = host.status().hosts[0].generation
    checked = subprocess.run([sys.executable, "-m", "mailerd", "--config", str(host.config),
                              "--check-config"], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    assert host.status().hosts[0].generation == generation  # the running host is untouched
    assert host.proc.poll() is None

    bad = tmp_path / "bad.toml"  # the same config, but nothing listens at the database's port
    bad.write_text(re.sub(r"^dsn = .*$", 'dsn = "host=127.0.0.1 port=9 user=mailerd dbname=none"',
                          host.config.read_text(), flags=re.M))
    refused = subprocess.run([sys.executable, "-m", "mailerd", "--config", str(bad),
                              "--check-config"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert "journal" in refused.stderr and "127.0.0.1" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr


def test_an_hourly_quota_counts_every_hosts_sends(tmp_path, relay_factory, daemon_factory,
                                                  pg_dsn):
    # two sessions for the account, one for each host once both are up; each host alone
    # would stop at its own 300, i.e. 600 in all
    relay = relay_factory(Faults(reply_delay=0.05))
    daemons = [daemon_factory({"isp": relay_server(relay, connections=2, hourly_quota=300)},
                              journal=postgresql_journal(pg_dsn, f"host-{i}")).start()
               for i in range(2)]
    cid = daemons[0].send_campaign(tmp_path / "c", 1000)
    wait_until(lambda: all(sent_by(d) for d in daemons) and len(relay.messages()) >= 300, 90,
               "both hosts to send, 300 in all")
    wait_seconds(daemons[0], 6)  # time for a host that did not see the other's sends to go on
    sent = len(relay.messages())
    assert sent < 380, f"the quota is the account's: {sent} sent, hourly_quota = 300"
    assert daemons[1].report(cid).counts.sent == sent
    assert all(s.state == "parked" for d in daemons for s in d.status().servers)


# ---------------------------------------------------------------- the account's pacing, shared

def test_the_accounts_rate_is_shared_by_the_hosts(tmp_path, relay_factory, daemon_factory,
                                                  pg_dsn):
    relay = relay_factory()
    daemons = [daemon_factory({"isp": relay_server(relay, connections=4, rate="20/s")},
                              journal=postgresql_journal(pg_dsn, f"host-{i}")).start()
               for i in range(2)]
    # each host claims its own batch of the 3,000: both send from the start
    cid = daemons[0].send_campaign(tmp_path / "c", TOTAL)
    wait_until(lambda: len(relay.messages()) >= 300, 60, "300 messages at the relay")
    daemons[1].ctl("cancel", str(cid))
    wait_until(lambda: all(d.report(cid).counts.sending == 0 for d in daemons), 10,
               "both hosts to stop sending")
    assert max(relay.count_by_rcpt().values()) == 1
    assert all(sent_by(d) >= 100 for d in daemons), [sent_by(d) for d in daemons]
    times = arrival_times(relay)[:300]
    # the jitter allowance of test_pacing.py's rate test: 20/s x 2.5 s + 1; two hosts each
    # pacing at the whole rate send about 80 in 2 s
    assert busiest_window(times, 2.0) <= 51
    assert times[-1] - times[0] >= 12.0  # 300 messages at 20/s take about 15 s


def test_mailerctl_set_on_one_host_paces_every_host_and_a_reload_keeps_it(
        tmp_path, relay_factory, daemon_factory, pg_dsn):
    relay = relay_factory(Faults(reply_delay=0.01))
    a, b = [daemon_factory({"isp": relay_server(relay, connections=3, rate="50/s")},
                           journal=postgresql_journal(pg_dsn, f"host-{i}")).start()
            for i in range(2)]
    settings = {"rate": "4/s", "connections": "1"}
    a.ctl("set", "isp", *(f"{k}={v}" for k, v in settings.items()))

    def follows(daemon) -> bool:
        server = server_status(daemon)
        return server.settings == settings and server.effective_connections == 1

    wait_until(lambda: follows(b), 5, "host-1 to follow host-0's mailerctl set")
    cid = b.send_campaign(tmp_path / "c", 40)
    b.wait_done(cid, timeout=60)
    times = arrival_times(relay)
    assert len(times) == 40 and max(relay.count_by_rcpt().values()) == 1
    assert busiest_window(times, 2.0) <= 4 * 2.5 + 1, "the account's rate is host-0's 4/s"
    assert times[-1] - times[0] >= 7.0  # 40 at 4/s take about 10 s; at 50/s, under 1 s
    assert relay.max_concurrent_seen == 1

    reloaded = b.log().count("config_reloaded")
    b.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: b.log().count("config_reloaded") > reloaded, 30, "host-1's reload")
    wait_seconds(a, 2)  # a reload that dropped them would reach host-0 within a look
    assert follows(a) and follows(b), "a reload of one host keeps the cluster's settings"


def test_a_limit_learned_by_one_host_reaches_the_others(tmp_path, hosts):
    # host-1 is frozen (well within its lease) while host-0 meets the relay's daily quota
    # and learns it: thawed, host-1 must follow without asking the relay itself
    relay, (a, b) = hosts(2, Faults(quota_after=20, quota_seconds=0), lease=10.0)
    b.signal_group(signal.SIGSTOP)
    try:
        cid = a.send_campaign(tmp_path / "c", 100)
        wait_until(lambda: "daily_quota" in server_status(a).learned, 7,
                   "host-0 to learn the quota")
    finally:
        b.signal_group(signal.SIGCONT)
    wait_until(lambda: "daily_quota" in server_status(b).learned, 5,
               "host-1 to follow what host-0 learned")
    assert server_status(b).learned["daily_quota"] == server_status(a).learned["daily_quota"]
    wait_seconds(b, 2)  # a host that did not follow would ask the relay meanwhile
    assert server_status(b).state == "parked"
    assert server_status(b).refused == 0 and sent_by(b) == 0
    assert a.report(cid).counts.sent == len(relay.messages()) <= 20 + SESSIONS
