"""The Pacer's rules on a clock we control: no relay, no daemon, exact numbers."""

from __future__ import annotations

from mailerd.pacing.classify import Cause
from mailerd.pacing.pacer import TURN_TTL, Pacer
from mailerd.schema.config import ServerConfig, parse_rate
from mailerd.schema.records import Learned

import pytest


def pacer(**settings) -> Pacer:
    return Pacer("isp", ServerConfig(**settings))


def start_many(p: Pacer, now: float, count: int) -> float:
    """Take `count` starts as soon as the pacer allows; return the clock after."""
    for _ in range(count):
        now = max(now, p.next_start(now))
        p.take(now)
    return now


def test_parse_rate():
    assert parse_rate("20/s").per_second == 20
    assert parse_rate("30/min").per_second == 0.5
    assert parse_rate("500/h").per == 3600
    with pytest.raises(ValueError, match="invalid rate"):
        parse_rate("fast")


def test_rate_spaces_starts_and_no_window_exceeds_it():
    p = pacer(rate="10/s")
    starts = []
    now = 0.0
    for _ in range(50):
        now = max(now, p.next_start(now))
        p.take(now)
        starts.append(now)
    assert all(b - a >= 0.1 - 1e-9 for a, b in zip(starts, starts[1:]))
    assert starts[-1] == pytest.approx(4.9)


def test_group_pause_after_every_group():
    p = pacer(group_size=5, group_interval=10, connections=3)
    end = start_many(p, 0.0, 5)
    assert end == 0.0
    assert p.next_start(0.0) == 10.0
    assert p.state(1.0)[0] == "paused"
    p.tick(10.0)
    assert p.next_start(10.0) == 10.0


def test_on_several_hosts_a_group_is_spent_from_the_turns_granted():
    p = pacer(group_size=5, group_interval=10, connections=3)
    p.shared_groups = True  # cluster.py: the account's groups are counted in the journal
    assert p.needs_turns(0.0)
    assert p.grant_turns(2, 0.0, asked_at=0.0, now=0.01) is None
    assert not p.needs_turns(0.02)
    assert p.take(0.02) is None and p.take(0.03) is None
    assert p.needs_turns(0.04)  # used up: ask again
    # the grant that fills the group: its turns first, then the pause it began
    assert p.grant_turns(1, 10.5, asked_at=0.04, now=0.05) is None
    assert p.next_start(0.06) == 0.06 and p.state(0.06)[0] == "ok"
    decision = p.take(0.06)
    assert decision is not None and decision.action == "pause"
    assert p.next_start(0.07) == pytest.approx(10.55)
    assert p.state(1.0)[:2] == ("paused", "group of 5 sent")


def test_a_pause_another_host_began_shows_here_and_turns_expire():
    p = pacer(group_size=5, group_interval=10, connections=3)
    p.shared_groups = True
    decision = p.grant_turns(0, 8.0, asked_at=1.0, now=1.1)
    assert decision is not None and decision.cause == "group"
    assert p.state(2.0) == ("paused", "group of 5 sent", pytest.approx(9.1))
    assert p.next_start(2.0) == pytest.approx(9.1)
    p.grant_turns(3, 0.0, asked_at=9.2, now=9.3)
    assert not p.needs_turns(9.6)
    assert p.needs_turns(9.2 + TURN_TTL)  # not used in time: lost, never carried over
    assert p.turns == 0


def test_on_one_host_the_pacer_counts_its_groups_without_turns():
    p = pacer(group_size=5, group_interval=10, connections=3)
    assert not p.needs_turns(0.0)
    assert start_many(p, 0.0, 5) == 0.0 and p.next_start(0.0) == 10.0


def test_quota_window_counts_restored_sends():
    p = Pacer("isp", ServerConfig(hourly_quota=3), sends=[100.0, 200.0, 300.0])
    assert p.next_start(400.0) == 100.0 + 3600
    assert p.state(400.0)[0] == "parked"
    assert p.next_start(3701.0) == 3701.0


def test_too_many_sessions_halves_then_recovers_one_step_per_clean_period():
    p = pacer(connections=8, clean_period=60)
    p.on_refusal(Cause.SESSIONS, "421 too many connections", 0.0)
    assert p.effective_connections() == 4
    p.on_refusal(Cause.SESSIONS, "421 too many connections", 1.0)
    assert p.effective_connections() == 2
    p.on_refusal(Cause.SESSIONS, "421", 2.0)
    p.on_refusal(Cause.SESSIONS, "421", 3.0)
    assert p.effective_connections() == 1  # never below one
    p.tick(30.0)
    assert p.effective_connections() == 1
    p.tick(63.0)
    assert p.effective_connections() == 2
    for t in (124.0, 185.0, 246.0, 307.0, 368.0, 429.0, 490.0):
        p.tick(t)
    assert p.effective_connections() == 8 and p.learned.connections is None


def test_session_length_learned_from_repeated_drops_only():
    p = pacer()
    assert p.on_session_end(10, True, "", 0.0, False) is None
    assert p.on_session_end(7, True, "", 1.0, False) is None  # a random drop: different count
    assert p.messages_per_connection() == 0
    p.on_session_end(7, True, "", 2.0, False)
    assert p.messages_per_connection() == 7
    assert p.on_session_end(3, False, "", 3.0, False) is None  # our own QUIT teaches nothing


def test_a_new_session_dropped_while_others_live_means_too_many_sessions():
    p = pacer(connections=4)
    decision = p.on_session_end(0, True, "", 0.0, other_sessions_alive=True)
    assert decision is not None and decision.cause == "too many sessions"
    assert p.effective_connections() == 2


def test_rate_refusal_slows_down_and_pauses_with_the_relay_hint():
    p = pacer()
    start_many(p, 0.0, 1)
    for t in range(1, 41):
        p.take(t * 0.1)
    decision = p.on_refusal(Cause.RATE, "422 try again in 15 seconds", 4.0)
    assert decision.action == "slow down"
    assert p.next_start(4.0) == pytest.approx(19.0)
    assert p.effective_rate() == pytest.approx(0.7 * 41 / 4.0, rel=0.05)


def test_quota_refusal_parks_with_growing_cooloff_and_learns_a_daily_quota():
    p = pacer(quota_cooloff=60)
    p.on_refusal(Cause.QUOTA, "421 4.7.0 quota exceeded", 0.0)
    assert p.next_start(0.0) == 60.0
    assert p.on_refusal(Cause.QUOTA, "421 quota", 10.0).action == "note"  # already parked
    p.tick(60.0)
    p.on_refusal(Cause.QUOTA, "421 4.7.0 quota exceeded", 61.0)
    assert p.next_start(61.0) == 61.0 + 120

    daily = Pacer("isp", ServerConfig(), sends=[1000.0 + i for i in range(50)])
    daily.on_refusal(Cause.QUOTA, "550 5.4.5 Daily user sending quota exceeded", 2000.0)
    assert daily.learned.daily_quota == 50
    assert daily.next_start(2000.0) == 1000.0 + 86400


def test_learned_state_round_trips_through_msgpack():
    import msgspec
    learned = Learned(connections=2, messages_per_connection=10, rate=1.5, parked_until=5.0)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(learned), type=Learned) == learned


def test_estimates_account_for_rate_group_and_quota():
    assert pacer(rate="10/s").seconds_for(100, 0.0, 0.0) == pytest.approx(10.0)
    grouped = pacer(rate="10/s", group_size=10, group_interval=9)
    assert grouped.capacity(0.0, 0.0) == pytest.approx(10 / (1 + 9))
    quota = pacer(rate="100/s", daily_quota=100)
    assert quota.seconds_for(250, 0.0, 0.0) >= 2 * 86400
