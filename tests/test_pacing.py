"""Pacing end to end: real daemon, fake relays that limit, throttle and park us."""

from __future__ import annotations

import signal

from conftest import relay_server, wait_until
from mailerd.testing.relay import Faults


def arrival_times(relay) -> list[float]:
    return sorted(r.t for r in relay.messages())


def busiest_window(times: list[float], width: float) -> int:
    best, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= width:
            start += 1
        best = max(best, end - start + 1)
    return best


def server_status(daemon, name="isp"):
    return next(s for s in daemon.status().servers if s.name == name)


def test_one_session_relay_settles_at_one_connection(tmp_path, relay_factory, daemon_factory):
    relay = relay_factory(Faults(max_sessions=1, reply_delay=0.01))
    daemon = daemon_factory({"isp": relay_server(relay, connections=6)}).start()
    cid = daemon.send_campaign(tmp_path / "c", 500)
    report = daemon.wait_done(cid, timeout=90)
    assert report.counts.sent == 500 and report.counts.failed == 0
    assert max(relay.count_by_rcpt().values()) == 1
    status = server_status(daemon)
    assert status.effective_connections == 1
    assert status.learned["connections"] == 1
    # a fixed retry loop: 5 surplus sessions retrying every second for the whole run
    elapsed = max(arrival_times(relay)) - min(arrival_times(relay))
    fixed_loop = 5 * max(elapsed, 1.0)
    assert relay.sessions_refused <= 15, relay.sessions_refused
    assert relay.sessions_refused < fixed_loop / 2
    assert relay.max_concurrent_seen == 1


def test_session_length_is_learned_and_kept_after_restart(tmp_path, relay_factory, daemon_factory):
    relay = relay_factory(Faults(drop_after=10))
    daemon = daemon_factory({"isp": relay_server(relay, connections=2)}).start()
    cid = daemon.send_campaign(tmp_path / "a", 80)
    daemon.wait_done(cid)
    status = server_status(daemon)
    assert status.learned["messages_per_connection"] == 10
    assert status.messages_per_connection == 10
    drops_when_learned = status.drops
    assert drops_when_learned >= 2

    cid = daemon.send_campaign(tmp_path / "b", 80, domain="example.net")
    daemon.wait_done(cid)
    assert server_status(daemon).drops == drops_when_learned  # rotated at 10: no more drops

    assert daemon.terminate() == 0
    daemon.start()
    status = server_status(daemon)
    assert status.learned["messages_per_connection"] == 10
    cid = daemon.send_campaign(tmp_path / "c", 50, domain="example.org")
    daemon.wait_done(cid)
    assert server_status(daemon).drops == 0
    assert max(relay.count_by_rcpt().values()) == 1 and len(relay.count_by_rcpt()) == 210


def test_session_length_is_learned_from_a_too_many_messages_reply(tmp_path, relay_factory,
                                                                   daemon_factory):
    """One "too many messages in one session" refusal is enough: the count is known."""
    relay = relay_factory(Faults(session_limit=7))
    daemon = daemon_factory({"isp": relay_server(relay, connections=2)}).start()
    cid = daemon.send_campaign(tmp_path / "c", 70)
    report = daemon.wait_done(cid)
    assert report.counts.sent == 70 and report.counts.failed == 0
    assert sorted(relay.count_by_rcpt().values()) == [1] * 70
    assert all(r.attempts == 1 for r in daemon.report(cid, "sent").recipients)
    status = server_status(daemon)
    assert status.learned["messages_per_connection"] == 7
    # learned at the first refusal of each session that was already running
    assert relay.drop_reasons["session_limit"] <= 2, relay.drop_reasons


def test_group_and_interval_pause_all_sessions(tmp_path, relay_factory, daemon_factory):
    relay = relay_factory()
    daemon = daemon_factory({"isp": relay_server(
        relay, connections=3, group_size=20, group_interval="2s")}).start()
    cid = daemon.send_campaign(tmp_path / "c", 100)
    daemon.wait_done(cid, timeout=60)
    times = arrival_times(relay)
    assert len(times) == 100
    gaps = [(i, b - a) for i, (a, b) in enumerate(zip(times, times[1:])) if b - a >= 1.5]
    assert [i + 1 for i, _ in gaps] == [20, 40, 60, 80], gaps
    assert all(gap < 3.0 for _, gap in gaps)
    assert len({r.session for r in relay.messages()}) >= 3  # several connections took part


def test_rate_holds_across_workers_and_a_restart(tmp_path, relay_factory, daemon_factory):
    relay = relay_factory()
    daemon = daemon_factory({"isp": relay_server(relay, connections=4, rate="20/s")}).start()
    cid = daemon.send_campaign(tmp_path / "c", 120)
    wait_until(lambda: len(relay.messages()) >= 50, 30, "50 messages")
    daemon.terminate(30)
    daemon.start()
    daemon.wait_done(cid, timeout=60)
    times = arrival_times(relay)
    assert len(times) == 120 and max(relay.count_by_rcpt().values()) == 1
    # Arrival times at the relay, not the daemon's send times: on a loaded machine the
    # relay's thread may take a backlog of messages at once (42 and 43 in 2 s were seen at
    # load 9, 22 in 1 s before), so allow 0.5 s of such jitter: 20/s x 2.5 s + 1. A daemon
    # ignoring the rate sends hundreds a second here.
    assert busiest_window(times, 2.0) <= 51
    assert times[-1] - times[0] >= 5.0  # 120 messages at 20/s take about 6 s


def test_quota_parks_the_server_which_resumes_by_itself(tmp_path, relay_factory, daemon_factory):
    relay = relay_factory(Faults(quota_after=100, quota_seconds=3,
                                 quota_reply="421 4.7.0 quota exceeded"))
    daemon = daemon_factory({"isp": relay_server(relay, connections=2, quota_cooloff="1s")}).start()
    cid = daemon.send_campaign(tmp_path / "c", 180)
    wait_until(lambda: server_status(daemon).state == "parked", 30, "the server to be parked")
    report = daemon.wait_done(cid, timeout=90)
    assert report.counts.sent == 180
    assert report.counts.failed == report.counts.deferred == report.counts.uncertain == 0
    assert max(relay.count_by_rcpt().values()) == 1 and len(relay.count_by_rcpt()) == 180
    assert all(r.attempts == 1 for r in daemon.report(cid, "sent").recipients)
    daemon.log_line("action=park", "quota exceeded")


def test_other_server_takes_the_traffic_while_one_is_parked(tmp_path, relay_factory,
                                                          daemon_factory):
    limited = relay_factory(Faults(quota_after=30, quota_seconds=0,
                                   quota_reply="550 5.4.5 Daily user sending quota exceeded"))
    spare = relay_factory()
    daemon = daemon_factory({
        "limited": relay_server(limited, connections=2, quota_cooloff="1h"),
        "spare": relay_server(spare, connections=2),
    }).start()
    cid = daemon.send_campaign(tmp_path / "c", 200)
    report = daemon.wait_done(cid, timeout=60)
    assert report.counts.sent == 200 and report.counts.failed == 0
    on_limited, on_spare = limited.count_by_rcpt(), spare.count_by_rcpt()
    assert not set(on_limited) & set(on_spare)
    assert len(on_limited) + len(on_spare) == 200
    assert 0 < len(on_limited) <= 32
    status = server_status(daemon, "limited")
    assert status.state == "parked" and "quota" in status.reason
    assert status.learned["daily_quota"] >= 30


def test_set_and_sighup_change_a_running_campaign(tmp_path, relay_factory, daemon_factory):
    relay = relay_factory()
    daemon = daemon_factory({"isp": relay_server(relay, connections=2, rate="5/s")}).start()
    cid = daemon.send_campaign(tmp_path / "c", 300)
    wait_until(lambda: len(relay.messages()) >= 5, 30, "5 messages")

    daemon.ctl("set", "isp", "rate=200/s")
    wait_until(lambda: len(relay.messages()) >= 150, 10, "the faster rate")  # 5/s would take 30 s
    status = server_status(daemon)
    assert status.settings == {"rate": "200/s"} and status.rate == 200

    config = daemon.config.read_text().replace('rate = "5/s"', 'rate = "4/s"')
    daemon.config.write_text(config)
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: server_status(daemon).rate == 4, 10, "the reloaded rate")
    assert server_status(daemon).settings == {}
    before = len(relay.messages())
    wait_until(lambda: len(relay.messages()) >= before + 8, 10, "sending to go on")
    window_start = arrival_times(relay)[before + 2]
    assert busiest_window([t for t in arrival_times(relay) if t >= window_start], 1.0) <= 5

    refused = daemon.ctl("set", "isp", "rate=fast", check=False)
    assert refused.returncode == 1 and "invalid rate" in refused.stderr
    daemon.ctl("set", "isp", "rate=none")
    report = daemon.wait_done(cid, timeout=60)
    assert report.counts.sent == 300
    assert max(relay.count_by_rcpt().values()) == 1 and len(relay.count_by_rcpt()) == 300


def test_plan_estimates_from_the_rate(tmp_path, relay_factory, daemon_factory):
    relay = relay_factory()
    daemon = daemon_factory({"isp": relay_server(relay, connections=1, rate="2/s")}).start()
    cid = daemon.send_campaign(tmp_path / "c", 100)
    wait_until(lambda: len(relay.messages()) >= 2, 30, "sending to start")
    plan = daemon.ctl("plan", str(cid), "--json").stdout
    import json
    data = json.loads(plan)
    assert 90 <= data["left"] <= 100
    assert 35 <= data["seconds"] <= 60  # ~98 left at 2/s
    assert data["servers"][0]["server"] == "isp"
    daemon.ctl("cancel", str(cid))





def messages_per_session(relay) -> list[int]:
    counts: dict[int, int] = {}
    for received in relay.messages():
        counts[received.session] = counts.get(received.session, 0) + 1
    return list(counts.values())


def test_messages_per_connection_and_relay_limits_mailmax(tmp_path, relay_factory, daemon_factory):
    capped = relay_factory(Faults(limits_mailmax=5))
    configured = relay_factory(Faults(limits_mailmax=50))
    daemon = daemon_factory({
        "capped": relay_server(capped, connections=1),
        "configured": relay_server(configured, connections=1, messages_per_connection=3),
    }).start()
    daemon.wait_done(daemon.send_campaign(tmp_path / "a", 30, servers=["capped"]))
    daemon.wait_done(daemon.send_campaign(tmp_path / "b", 30, servers=["configured"]))
    assert max(messages_per_session(capped)) == 5 and sum(messages_per_session(capped)) == 30
    assert max(messages_per_session(configured)) == 3 and sum(messages_per_session(configured)) == 30
    assert capped.drops == configured.drops == 0
    assert server_status(daemon, "capped").drops == 0
