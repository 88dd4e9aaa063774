"""End to end: a real daemon, real workers, fake relays that misbehave on purpose.

Every test asserts what the relay received (who, how many times, what content) and
what the report says.
"""

from __future__ import annotations

import email
import email.policy
import os
import signal
from collections import Counter

import pytest

from conftest import (JOURNAL_BACKENDS, assert_nobody_lost_or_sent_twice,
                      campaign_addresses, relay_server, wait_until)
from mailerd.testing.relay import Faults

# every test on both journals: SQLite, and a host of its own on PostgreSQL (issue 16)
pytestmark = pytest.mark.parametrize("journal_backend", JOURNAL_BACKENDS, indirect=True)


def assert_exactly_once(relay, expected: set[str]) -> None:
    counts = relay.count_by_rcpt()
    duplicates = {a: n for a, n in counts.items() if n > 1}
    assert not duplicates, f"sent more than once: {sorted(duplicates)[:10]}"
    missing = expected - set(counts)
    assert not missing, f"never received: {sorted(missing)[:10]}"
    assert set(counts) == expected


def sending_workers(daemon) -> list[str]:
    return [f"{s.name}/{w.slot}" for s in daemon.status().servers for w in s.workers
            if w.state == "sending"]


def wait_a_second(daemon) -> None:
    """Wait until the daemon's own clock has advanced by a second."""
    start = daemon.status().uptime
    wait_until(lambda: daemon.status().uptime > start + 1, 10, "a second to pass")


def test_thousand_recipients_over_a_relay_that_drops_every_7_messages(
        tmp_path, relay_factory, daemon_factory):
    relay = relay_factory(Faults(drop_after=7))
    daemon = daemon_factory({"isp": relay_server(relay, connections=4)}).start()
    cid = daemon.send_campaign(tmp_path / "c", 1000)
    report = daemon.wait_done(cid, timeout=120)
    assert_exactly_once(relay, campaign_addresses(1000))
    assert report.counts.sent == 1000
    assert report.counts.failed == report.counts.uncertain == report.counts.queued == 0
    assert relay.drops > 100  # the relay really did cut the sessions
    assert relay.max_concurrent_seen <= 4


def test_messages_are_personalised(tmp_path, relay_factory, daemon_factory):
    relay = relay_factory()
    daemon = daemon_factory({"isp": relay_server(relay)}).start()
    cid = daemon.send_campaign(tmp_path / "c", 20, html="<p>Hi {{ first_name }} ({{ email }})</p>\n")
    daemon.wait_done(cid)
    seen = {}
    for received in relay.messages():
        message = email.message_from_bytes(received.data, policy=email.policy.default)
        seen[received.rcpt] = message
    assert len(seen) == 20
    message = seen["user7@example.com"]
    assert message["Subject"] == "Hello Name7"
    assert message["To"] == "user7@example.com"
    assert message.get_content_type() == "multipart/alternative"
    assert "your code is C000007." in message.get_body(("plain",)).get_content()
    assert "Hi Name7 (user7@example.com)" in message.get_body(("html",)).get_content()
    message_ids = {m["Message-ID"] for m in seen.values()}
    assert len(message_ids) == 20


def test_swallowed_replies_become_uncertain_and_only_explicit_resume_resends_them(
        tmp_path, relay_factory, daemon_factory):
    relay = relay_factory(Faults(swallow_every=25))
    daemon = daemon_factory({"isp": relay_server(relay, connections=2)}).start()
    cid = daemon.send_campaign(tmp_path / "c", 200)
    report = daemon.wait_done(cid)
    assert report.counts.uncertain == 8
    assert report.counts.sent == 192
    uncertain = daemon.emails(cid, "uncertain")
    assert len(uncertain) == 8
    assert all(r.dot_at for r in daemon.report(cid, "uncertain").recipients)
    assert_exactly_once(relay, campaign_addresses(200))  # the relay has them all, once

    daemon.ctl("resume", str(cid))
    report = daemon.wait_done(cid)
    assert report.counts.uncertain == 8
    assert max(relay.count_by_rcpt().values()) == 1  # plain resume sent nobody again

    relay.set_faults(Faults())
    daemon.ctl("resume", str(cid), "--include-uncertain")
    report = daemon.wait_done(cid)
    assert report.counts.sent == 200 and report.counts.uncertain == 0
    counts = relay.count_by_rcpt()
    assert {a for a, n in counts.items() if n == 2} == uncertain
    assert all(n == 1 for a, n in counts.items() if a not in uncertain)


def test_kill_9_of_the_process_group_then_restart_and_resume(
        tmp_path, relay_factory, daemon_factory):
    relay = relay_factory(Faults(reply_delay=0.002))
    daemon = daemon_factory({"isp": relay_server(relay, connections=3)}).start()
    cid = daemon.send_campaign(tmp_path / "c", 600)
    wait_until(lambda: len(relay.messages()) >= 150, 60, "150 messages at the relay")
    daemon.kill_group()
    received_at_kill = len(relay.messages())
    assert received_at_kill < 600

    daemon.start()
    report = daemon.report(cid)
    assert report.counts.sending == 0
    assert report.counts.uncertain <= 3
    daemon.ctl("resume", str(cid))
    report = daemon.wait_done(cid, timeout=90)
    assert_nobody_lost_or_sent_twice(relay.count_by_rcpt(), daemon.emails(cid, "uncertain"),
                                     campaign_addresses(600), report.counts.sent,
                                     report.counts.uncertain)


def test_kill_9_of_one_worker_mid_campaign(tmp_path, relay_factory, daemon_factory):
    relay = relay_factory(Faults(reply_delay=0.002))
    daemon = daemon_factory({"isp": relay_server(relay, connections=3)}).start()
    cid = daemon.send_campaign(tmp_path / "c", 500)
    wait_until(lambda: len(relay.messages()) >= 100, 60, "100 messages at the relay")
    victim = daemon.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in daemon.worker_pids() and len(daemon.worker_pids()) == 3,
               30, "the worker to be respawned")
    report = daemon.wait_done(cid, timeout=90)
    assert report.counts.uncertain <= 1
    assert_nobody_lost_or_sent_twice(relay.count_by_rcpt(), daemon.emails(cid, "uncertain"),
                                     campaign_addresses(500), report.counts.sent,
                                     report.counts.uncertain)
    status = daemon.status()
    assert sum(w.restarts for s in status.servers for w in s.workers) == 1


def test_temporary_failures_are_retried_and_permanent_ones_reported(
        tmp_path, relay_factory, daemon_factory):
    relay = relay_factory(Faults(tempfail_first=True, reject_domains=["bad.example"]))
    daemon = daemon_factory({"isp": relay_server(relay)}).start()
    extra = [f"user{i}@bad.example,Bad{i},X" for i in range(3)]
    extra += ["not-an-address,Broken,X", ",Empty,X", "user1@EXAMPLE.com,Dup,X", "x@y.com,too,many,fields"]
    cid = daemon.send_campaign(tmp_path / "c", 30, extra_rows=extra)
    report = daemon.wait_done(cid, timeout=60)
    assert report.counts.sent == 30
    assert report.counts.failed == 3
    assert report.counts.invalid == 4
    assert set(relay.count_by_rcpt()) == campaign_addresses(30)
    assert max(relay.count_by_rcpt().values()) == 1

    sent = daemon.report(cid, "sent").recipients
    assert all(r.attempts == 2 for r in sent)  # 451 first, then accepted
    failed = daemon.report(cid, "failed").recipients
    assert {r.email for r in failed} == {f"user{i}@bad.example" for i in range(3)}
    assert all(r.code == 550 and "User unknown" in r.reply for r in failed)

    invalid = {r.line: r.reply for r in daemon.report(cid, "invalid").recipients}
    assert sorted(invalid) == [35, 36, 37, 38]
    assert "@" in invalid[35] or "not valid" in invalid[35].lower()
    assert invalid[36] == "empty email"
    assert invalid[37] == "duplicate of line 3"  # the domain's case does not matter
    assert "expected 3 fields" in invalid[38]

    text = daemon.ctl("report", str(cid), "--state", "failed").stdout
    assert "user0@bad.example" in text and "550" in text


def test_pause_stops_new_transactions_resume_continues_cancel_is_final(
        tmp_path, relay_factory, daemon_factory):
    relay = relay_factory(Faults(reply_delay=0.01))
    daemon = daemon_factory({"isp": relay_server(relay, connections=2)}).start()
    cid = daemon.send_campaign(tmp_path / "c", 400)
    wait_until(lambda: len(relay.messages()) >= 20, 30, "20 messages")
    daemon.ctl("pause", str(cid))
    # within a second nothing new starts: at most the in-flight ones complete
    wait_until(lambda: daemon.report(cid).counts.sending == 0, 2, "in-flight work to finish")
    paused_at = len(relay.messages())
    report = daemon.report(cid)
    assert report.state == "paused"
    assert report.counts.sent == paused_at
    wait_until(lambda: not sending_workers(daemon), 5, "every worker to be idle")
    wait_a_second(daemon)  # a real interval in which a pause that did not hold would send
    assert len(relay.messages()) == paused_at
    assert daemon.report(cid).counts.sent == paused_at

    daemon.ctl("resume", str(cid))
    wait_until(lambda: len(relay.messages()) >= paused_at + 20, 30, "sending to resume")
    daemon.ctl("cancel", str(cid))
    wait_until(lambda: daemon.report(cid).counts.sending == 0, 5, "cancel to settle")
    cancelled_at = len(relay.messages())
    report = daemon.report(cid)
    assert report.state == "cancelled"
    assert report.counts.sent == cancelled_at < 400
    refused = daemon.ctl("resume", str(cid), check=False)
    assert refused.returncode == 1 and "cancelled" in refused.stderr
    wait_until(lambda: not sending_workers(daemon), 5, "every worker to be idle")
    wait_a_second(daemon)
    assert len(relay.messages()) == cancelled_at
    assert max(relay.count_by_rcpt().values()) == 1


def test_resume_is_idempotent_on_a_done_campaign(tmp_path, relay_factory, daemon_factory):
    relay = relay_factory(Faults(reject_domains=["bad.example"]))
    daemon = daemon_factory({"isp": relay_server(relay)}).start()
    cid = daemon.send_campaign(tmp_path / "c", 10, extra_rows=["x@bad.example,X,Y"])
    daemon.wait_done(cid)
    for _ in range(3):
        daemon.ctl("resume", str(cid))
        daemon.wait_done(cid)
    assert Counter(relay.count_by_rcpt().values()) == Counter({1: 10})
    relay.set_faults(Faults())
    # the "550 5.1.1 ... User unknown" put the address on the suppression list
    # ([suppression] auto_bounce): it must come off before a retry can reach it
    assert "x@bad.example,bounced," in daemon.ctl("suppress", "list").stdout
    daemon.ctl("suppress", "remove", "x@bad.example")
    daemon.ctl("resume", str(cid), "--retry-failed")
    report = daemon.wait_done(cid)
    assert report.counts.sent == 11 and report.counts.failed == 0
    assert relay.count_by_rcpt()["x@bad.example"] == 1


def test_connection_level_failures_do_not_count_as_attempts(
        tmp_path, relay_factory, daemon_factory):
    # drop_after=2: the session dies between messages, so every third MAIL hits a
    # dead connection (requeue, no attempt). close_mid_data: the relay hangs up
    # inside DATA; whether our "." left before we saw that is a race, so such a
    # recipient is either requeued or uncertain, never sent twice, never failed.
    relay = relay_factory(Faults(drop_after=2, close_mid_data_every=5))
    daemon = daemon_factory({"isp": relay_server(relay, connections=2)}).start()
    cid = daemon.send_campaign(tmp_path / "c", 60)
    report = daemon.wait_done(cid, timeout=60)
    assert report.counts.failed == report.counts.deferred == 0
    assert report.counts.sent + report.counts.uncertain == 60
    assert all(r.attempts == 1 for r in daemon.report(cid, "sent").recipients)
    uncertain = daemon.emails(cid, "uncertain")
    assert not uncertain & set(relay.count_by_rcpt())  # the relay recorded none of them
    assert relay.drops >= 10  # every 5th DATA is cut (12+); drop_after ones depend on what was learned

    relay.set_faults(Faults())
    daemon.ctl("resume", str(cid), "--include-uncertain")
    report = daemon.wait_done(cid)
    assert report.counts.sent == 60
    assert_exactly_once(relay, campaign_addresses(60))


def test_sigterm_drains_and_exits_zero(tmp_path, relay_factory, daemon_factory):
    relay = relay_factory(Faults(reply_delay=0.005))
    daemon = daemon_factory({"isp": relay_server(relay, connections=2)}).start()
    cid = daemon.send_campaign(tmp_path / "c", 300)
    wait_until(lambda: len(relay.messages()) >= 30, 30, "30 messages")
    assert daemon.terminate() == 0
    daemon.start()
    report = daemon.report(cid)
    assert report.counts.uncertain == 0 and report.counts.sending == 0
    assert report.counts.sent == len(relay.messages())
    daemon.ctl("resume", str(cid))
    daemon.wait_done(cid)
    assert_exactly_once(relay, campaign_addresses(300))
