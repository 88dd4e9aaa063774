"""Group/Interval of a relay account on several hosts (issue 16): the account's groups count
every host's messages. Real daemons on a real private PostgreSQL (mailerd/testing/postgres.py), one
fake relay recording when each message arrived.

Each host is given a campaign of its own, enqueued on it: a host claims a new campaign's
recipients at once and the other follows it only at its next look (about a second
later), so each host holds the whole of its own and both send all along. Hosts that
counted their groups each on its own would then each send a group at a time, and the
relay would see two groups inside one interval.
"""

from __future__ import annotations

import threading
import time

import pytest

from conftest import campaign_addresses, relay_server, wait_until
from mailerd.journal.postgres import PgJournal
from mailerd.testing.daemon import postgresql_journal
from mailerd.testing.relay import Faults
from test_cluster import assert_exactly_once, sent_by, wait_seconds
from test_pacing import arrival_times, busiest_window, server_status

SIZE = 10
INTERVAL = 2.0
# Arrival times at the relay, not the daemons' start times: on a loaded machine the relay's
# thread may take a backlog of messages late (test_pacing.py's rate test allows 0.5 s of
# such jitter). The daemons keep group_interval between the starts of two groups, so within
# any window of INTERVAL - JITTER the relay sees one group at most.
JITTER = 0.5


def bursts(times: list[float], gap: float) -> list[int]:
    """Sizes of the runs of arrivals separated by at least `gap` seconds (for messages)."""
    sizes = [1] if times else []
    for before, after in zip(times, times[1:]):
        if after - before >= gap:
            sizes.append(1)
        else:
            sizes[-1] += 1
    return sizes


@pytest.fixture
def two_hosts(relay_factory, daemon_factory, pg_dsn):
    """make(faults, **pacing) -> (relay, [host-0, host-1]): one account of 2 sessions in all."""
    def make(faults: Faults | None = None, **pacing):
        relay = relay_factory(faults)
        daemons = [daemon_factory({"isp": relay_server(relay, connections=2, **pacing)},
                                  journal=postgresql_journal(pg_dsn, f"host-{i}")).start()
                   for i in range(2)]
        return relay, daemons
    return make


def campaign_on_each(tmp_path, daemons, count: int) -> list[tuple[int, str]]:
    """(campaign id, its recipients' domain) for a campaign of `count` enqueued on each host."""
    return [(daemon.send_campaign(tmp_path / f"c{i}", count, domain=f"h{i}.example.com"),
             f"h{i}.example.com") for i, daemon in enumerate(daemons)]


def test_groups_and_intervals_are_the_accounts_across_hosts(tmp_path, two_hosts):
    relay, daemons = two_hosts(group_size=SIZE, group_interval=f"{INTERVAL:g}s")
    campaigns = campaign_on_each(tmp_path, daemons, 30)
    for daemon, (cid, _) in zip(daemons, campaigns):
        assert daemon.wait_done(cid, timeout=60).counts.sent == 30
    assert_exactly_once(relay, set().union(*(campaign_addresses(30, domain)
                                             for _, domain in campaigns)))
    assert all(sent_by(d) for d in daemons), "both hosts sent"
    times = arrival_times(relay)
    seen = bursts(times, 1.0)
    assert busiest_window(times, INTERVAL - JITTER) <= SIZE, \
        f"one group of {SIZE} per {INTERVAL:g}s for the whole account; bursts at the relay: {seen}"
    assert max(seen) <= SIZE and len(seen) >= 60 // SIZE, seen
    # 6 groups, so 5 pauses of at least 2 s; two hosts counting alone take about 4 s
    assert times[-1] - times[0] >= 5 * (INTERVAL - JITTER)


def test_every_host_shows_the_pause_of_the_accounts_group_and_quits_before_it(tmp_path,
                                                                             two_hosts):
    # A pause longer than idle_timeout (30 s): every host's sessions QUIT at once rather
    # than sit idle until the relay cuts them. Both hosts must be sending when the group
    # fills: a slow relay, and a start once each host has seen the other; a rate, so that
    # each host waits until the others have seen it among the account's senders (then
    # each keeps one of the two sessions).
    relay, daemons = two_hosts(Faults(reply_delay=0.1), group_size=SIZE, group_interval="40s",
                               rate="100/s")
    wait_until(lambda: all(sum(h.alive for h in d.status().hosts) == 2 for d in daemons), 10,
               "each host to see the other")
    campaigns = campaign_on_each(tmp_path, daemons, 20)
    wait_until(lambda: len(relay.messages()) >= SIZE, 30, f"the first {SIZE} messages")
    group = sorted(relay.messages(), key=lambda r: r.t)
    assert {r.rcpt.split("@")[1] for r in group} == {domain for _, domain in campaigns}, \
        "both hosts sent some of the group"
    # each host sends the campaign enqueued on it (module docstring)
    sender = next(i for i, (_, domain) in enumerate(campaigns)
                  if group[SIZE - 1].rcpt.endswith(domain))
    other = daemons[1 - sender]  # it did not send the group's last message

    def paused(daemon):
        server = server_status(daemon)
        return server.state == "paused" and server.reason == f"group of {SIZE} sent" and server

    shown = wait_until(lambda: paused(other), 5, "the other host to show the account's pause")
    mine = wait_until(lambda: paused(daemons[sender]), 5, "the sender to show the pause")
    assert abs(shown.until - mine.until) < 1.5 and shown.until > time.time() + 30
    wait_until(lambda: relay.active_sessions == 0, 10, "every host's sessions to QUIT")
    wait_seconds(other, 2)  # a host that did not count the other's messages would send on
    assert len(relay.messages()) == SIZE
    assert paused(other) and paused(daemons[sender])
    for daemon, (cid, _) in zip(daemons, campaigns):
        daemon.ctl("cancel", str(cid))


# ---------------------------------------------------------------- the journal's counter


@pytest.fixture
def journals(pg_dsn):
    """Three hosts' journals, open on one fresh database."""
    hosts = [PgJournal(pg_dsn, f"host-{n}") for n in range(3)]
    for host in hosts:
        host.open()
    yield hosts
    for host in hosts:
        host.close()


def test_a_group_is_granted_once_across_hosts_then_paused(journals):
    a, b, c = journals
    assert a.take_group_turns("isp", 4, SIZE, 60) == (4, 0.0)
    assert b.take_group_turns("isp", 4, SIZE, 60) == (4, 0.0)
    granted, pause = c.take_group_turns("isp", 4, SIZE, 60)
    assert granted == 2 and 59 < pause <= 60  # the rest of the group; the pause begins
    granted, pause = a.take_group_turns("isp", 4, SIZE, 60)
    assert granted == 0 and 58 < pause <= 60  # everybody is told the same pause
    assert b.take_group_turns("other", 4, SIZE, 60) == (4, 0.0)  # per account


def test_a_new_group_after_the_pause_and_a_lowered_size_ends_the_group(journals):
    a, b, _ = journals
    assert a.take_group_turns("isp", 5, 5, 0.3)[0] == 5
    wait_until(lambda: b.take_group_turns("isp", 3, 5, 0.3)[0] == 3, 5, "the pause to end")
    granted, pause = a.take_group_turns("isp", 3, 2, 30)  # mailerctl set group_size=2
    assert granted == 0 and pause > 29, "3 of a group of 2 were sent: its pause begins"


def test_hosts_asking_at_once_are_granted_one_group_in_all(journals):
    granted: list[int] = []
    lock = threading.Lock()

    def ask(host: PgJournal) -> None:
        while True:
            turns, pause = host.take_group_turns("isp", 3, 25, 60)
            with lock:
                granted.append(turns)
            if pause:
                return

    threads = [threading.Thread(target=ask, args=(host,)) for host in journals]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sum(granted) == 25 and max(granted) <= 3
