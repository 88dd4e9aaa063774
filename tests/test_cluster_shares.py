"""Several hosts on one PostgreSQL journal (issue 16): who takes a part of a relay account,
what `mailerctl status` and `plan` say about it, `mailerctl set --reset`, and a host_id
given to two daemons. Real daemons, a real private PostgreSQL (mailerd/testing/postgres.py), real
relays on loopback; every test asserts what the relay received or what mailerctl says.
"""

from __future__ import annotations

import json
import time

from conftest import relay_server, wait_until
from mailerd.daemon import EXIT_CONFIG
from mailerd.testing.daemon import postgresql_journal
from mailerd.testing.relay import Faults
from test_cluster import sent_by, wait_seconds
from test_pacing import arrival_times, busiest_window, server_status

RATE = "20/s"


def two_hosts(relay, daemon_factory, pg_dsn, servers_of_second=None, **isp):
    """host-0 and host-1 on one database, both with the account `isp` at `relay` unless
    `servers_of_second` gives host-1's servers instead."""
    account = {"isp": relay_server(relay, **isp)}
    return [daemon_factory(servers, journal=postgresql_journal(pg_dsn, f"host-{i}")).start()
            for i, servers in enumerate((account, servers_of_second or account))]


def status_json(daemon) -> dict:
    return json.loads(daemon.ctl("status", "--json").stdout)


def isp_json(daemon) -> dict:
    return next(s for s in status_json(daemon)["servers"] if s["name"] == "isp")


# ---------------------------------------------------------------- an idle host takes no part

def test_a_live_host_with_nothing_to_send_through_the_account_takes_no_part_of_its_rate(
        tmp_path, relay_factory, daemon_factory, pg_dsn):
    relay, elsewhere = relay_factory(), relay_factory()
    # host-1 knows no account `isp`: the campaign (servers = ["isp"]) has nothing for it
    sender, idle = two_hosts(relay, daemon_factory, pg_dsn, connections=4, rate=RATE,
                             servers_of_second={"other": relay_server(elsewhere)})
    cid = sender.send_campaign(tmp_path / "c", 200, servers=["isp"])
    sender.wait_done(cid, timeout=60)
    assert {h["host"]: h["alive"] for h in status_json(sender)["hosts"]} == {
        "host-0": True, "host-1": True}, "host-1 was alive all along"
    assert idle.proc.poll() is None and not elsewhere.messages()
    times = arrival_times(relay)
    assert len(times) == 200 and max(relay.count_by_rcpt().values()) == 1
    # the whole 20/s: 200 take about 10 s; at half the rate (two live hosts) about 20 s
    assert times[-1] - times[0] <= 14.0, f"{times[-1] - times[0]:.1f} s for 200 at {RATE}"
    assert busiest_window(times, 2.0) <= 20 * 2.5 + 1, "never more than the account's rate"


# ---------------------------------------------------------------- status and plan

def test_status_shows_this_hosts_part_and_plan_counts_the_accounts_rate(
        tmp_path, relay_factory, daemon_factory, pg_dsn):
    relay = relay_factory()
    a, b = two_hosts(relay, daemon_factory, pg_dsn, connections=4, rate=RATE)
    cid = a.send_campaign(tmp_path / "c", 3000)
    wait_until(lambda: sent_by(a) >= 30 and sent_by(b) >= 30, 60, "both hosts to send")
    wait_seconds(a, 3)  # observed rates over a few seconds of both sending

    for daemon in (a, b):
        isp = isp_json(daemon)
        assert (isp["rate"], isp["account_rate"], isp["hosts"]) == (10.0, 20.0, 2), isp
        assert "rate 10/s of 20/s (2 hosts)" in daemon.ctl("status").stdout

    plan = json.loads(b.ctl("plan", str(cid), "--json").stdout)
    alone = plan["left"] / 20.0  # every host sends: the account's 20/s
    assert 0.8 * alone <= plan["seconds"] <= 1.3 * alone + 3, (plan["seconds"], alone)
    (server,) = plan["servers"]
    assert 15.0 <= server["rate"] <= 20.0, "the account's rate (both hosts), not a host's 10/s"
    a.ctl("cancel", str(cid))


# ---------------------------------------------------------------- mailerctl set --reset

def test_set_on_one_host_reset_on_another_and_every_host_paces_by_the_file_again(
        tmp_path, relay_factory, daemon_factory, pg_dsn):
    relay = relay_factory(Faults(reply_delay=0.01))
    a, b = two_hosts(relay, daemon_factory, pg_dsn, connections=3, rate="200/s")
    a.ctl("set", "isp", "rate=4/s", "connections=1", "messages_per_connection=5")
    wait_until(lambda: server_status(b).settings.get("rate") == "4/s", 5,
               "host-1 to follow host-0's mailerctl set")

    partly = b.ctl("set", "isp", "--reset", "messages_per_connection").stdout
    assert "messages_per_connection back to the config file's values" in partly
    wait_until(lambda: server_status(a).settings == {"rate": "4/s", "connections": "1"}, 5,
               "host-0 to follow the reset of one setting")
    b.ctl("set", "isp", "--reset")
    wait_until(lambda: all(server_status(d).settings == {} for d in (a, b)), 5,
               "every host to drop the run-time settings")
    assert server_status(a).effective_connections == 3

    cid = a.send_campaign(tmp_path / "c", 60, servers=["isp"])
    a.wait_done(cid, timeout=60)
    times = arrival_times(relay)
    assert len(times) == 60 and max(relay.count_by_rcpt().values()) == 1
    assert times[-1] - times[0] < 6.0, "paced by the file's 200/s, not the 4/s that was reset"
    assert relay.max_concurrent_seen > 1, "the file's 3 connections, not the 1 that was reset"

    unknown = a.ctl("set", "isp", "--reset", "rate", check=False)
    assert unknown.returncode != 0 and "rate: not set at run time" in unknown.stderr
    mixed = a.ctl("set", "isp", "--reset", "rate=4/s", check=False)
    assert mixed.returncode != 0 and "--reset takes setting names" in mixed.stderr
    assert "Traceback" not in unknown.stderr + mixed.stderr


def test_set_reset_on_sqlite_goes_back_to_the_file_and_outlives_a_restart(
        tmp_path, relay_factory, daemon_factory):
    relay = relay_factory()
    daemon = daemon_factory({"isp": relay_server(relay, connections=2, rate="50/s")}).start()
    daemon.ctl("set", "isp", "rate=2/s", "connections=1")
    daemon.ctl("set", "isp", "--reset", "rate")
    assert server_status(daemon).settings == {"connections": "1"}
    assert server_status(daemon).rate == 50.0
    daemon.terminate()
    daemon.start()
    assert server_status(daemon).settings == {"connections": "1"}, "the reset was journaled"
    assert "connections back to the config file's values" in daemon.ctl(
        "set", "isp", "--reset").stdout
    assert "nothing was set at run time" in daemon.ctl("set", "isp", "--reset").stdout
    assert server_status(daemon).effective_connections == 2


# ---------------------------------------------------------------- one host_id, two daemons

def test_a_second_daemon_with_a_host_id_in_use_refuses_to_start_and_a_killed_one_restarts(
        tmp_path, relay_factory, daemon_factory, pg_dsn):
    relay = relay_factory(Faults(reply_delay=0.01))
    lease = "10s"
    journal = postgresql_journal(pg_dsn, "host-0", lease)
    first = daemon_factory({"isp": relay_server(relay)}, journal=journal).start()
    cid = first.send_campaign(tmp_path / "c", 3000)
    wait_until(lambda: len(relay.messages()) >= 20, 30, "the first daemon to send")
    generation = first.status().hosts[0].generation

    # the same config but another state directory: another daemon
    second = daemon_factory({"isp": relay_server(relay)}, journal=journal)
    refused = second.start_expecting_failure()
    assert refused.returncode == EXIT_CONFIG, refused.stderr
    assert "host_id 'host-0' is in use by another mailerd" in refused.stderr
    assert str(first.state_dir.resolve()) in refused.stderr, "it names the other daemon"
    assert "Give each daemon its own [journal] host_id" in refused.stderr
    assert "Traceback" not in refused.stderr

    sent = len(relay.messages())
    wait_seconds(first, 2)
    assert first.proc.poll() is None and len(relay.messages()) > sent, "the first sends on"
    assert first.status().hosts[0].generation == generation, "and was not fenced"

    first.kill_group()
    killed_at = time.monotonic()
    first.start()  # the same daemon after a kill -9: at once, not after the lease
    assert time.monotonic() - killed_at < 10.0
    assert first.status().hosts[0].generation == generation + 1
    first.ctl("cancel", str(cid))
    assert max(relay.count_by_rcpt().values()) == 1
