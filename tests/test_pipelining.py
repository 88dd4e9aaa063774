"""PIPELINING (RFC 2920) and hostile relay text: a real daemon, a real fake relay.

The fake relay counts the commands that arrive in each of its reads; a pipelining
client shows groups such as (".", "MAIL", "RCPT", "DATA"): the final dot of one
message written together with the next message's commands.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import (
    assert_nobody_lost_or_sent_twice,
    campaign_addresses,
    make_campaign,
    relay_server,
    wait_until,
)
from mailerd.schema.workers import REPLY_MAX
from mailerd.testing.relay import Faults

GROUP = ("MAIL", "RCPT", "DATA")
CHAINED = (".", "MAIL", "RCPT", "DATA")


def reads_with(relay, verbs: tuple[str, ...]) -> int:
    """How many of the relay's reads brought exactly this group of commands."""
    return relay.command_groups()[verbs]


def assert_exactly_once(relay, expected: set[str]) -> None:
    counts = relay.count_by_rcpt()
    assert set(counts) == expected
    assert all(n == 1 for n in counts.values()), {a: n for a, n in counts.items() if n > 1}


def worker_restarts(daemon) -> int:
    return sum(w.restarts for s in daemon.status().servers for w in s.workers)


# ------------------------------------------------------------------ with and without PIPELINING


def test_a_pipelining_relay_gets_a_message_per_read(tmp_path, relay_factory, daemon_factory):
    relay = relay_factory()
    daemon = daemon_factory({"isp": relay_server(relay, connections=1)}).start()
    cid = daemon.send_campaign(tmp_path / "c", 40)
    report = daemon.wait_done(cid)
    assert report.counts.sent == 40
    assert_exactly_once(relay, campaign_addresses(40))
    groups = relay.command_groups()
    mails = sum(group.count("MAIL") for group in groups.elements())
    assert mails == 40
    # every MAIL came with its RCPT and DATA, most also behind the previous message's "."
    assert reads_with(relay, GROUP) + reads_with(relay, CHAINED) == 40, groups
    assert reads_with(relay, CHAINED) >= 30, groups
    assert max(len(group) for group in groups) > 1


def test_without_pipelining_one_command_a_read_and_everyone_once(tmp_path, relay_factory,
                                                                 daemon_factory):
    relay = relay_factory(Faults(no_pipelining=True, drop_after=7))
    daemon = daemon_factory({"isp": relay_server(relay, connections=2)}).start()
    cid = daemon.send_campaign(tmp_path / "c", 40)
    report = daemon.wait_done(cid)
    assert report.counts.sent == 40 and report.counts.uncertain == 0
    assert_exactly_once(relay, campaign_addresses(40))
    groups = relay.command_groups()
    assert groups and all(len(group) == 1 for group in groups), groups
    assert relay.drops >= 2  # and the sessions it cut were handled as today


# ------------------------------------------------------------------ mixed outcomes in a group


def test_refusals_inside_a_pipelined_group(tmp_path, relay_factory, daemon_factory):
    relay = relay_factory(Faults(mail_tempfail_every=10, reject_domains=["gone.example"],
                                 refuse_data_domains=["spam.example"]))
    # a 4xx to MAIL is the account's (issue 12): each one slows the server down; a short
    # clean_period lets the pace recover between them, as a real relay's window would
    daemon = daemon_factory({"isp": relay_server(relay, connections=1, clean_period="1s")}).start()
    extra = [f"r{i}@gone.example,R{i},X" for i in range(3)] + \
            [f"s{i}@spam.example,S{i},X" for i in range(3)]
    cid = daemon.send_campaign(tmp_path / "c", 30, extra_rows=extra)
    report = daemon.wait_done(cid, timeout=90)
    good = campaign_addresses(30)
    assert_exactly_once(relay, good)  # MAIL 451 put them back, then they went
    assert daemon.emails(cid, "sent") == good
    failed = {r.email: r for r in daemon.report(cid, "failed").recipients}
    assert set(failed) == {e.split(",")[0] for e in extra}
    assert {e: r.code for e, r in failed.items()} == {
        e: 550 if e.endswith("gone.example") else 554 for e in failed}, failed  # RCPT; DATA
    assert report.counts.uncertain == 0
    # a 4xx to MAIL FROM is about the account (issue 12): retried, never charged to anyone
    mails = sum(n * group.count("MAIL") for group, n in relay.command_groups().items())
    assert mails > 36, "some MAIL was refused with 451 and retried"
    assert all(r.attempts == 1 for r in daemon.report(cid, "sent").recipients)
    groups = relay.command_groups()
    # after a refusal the next transaction starts with RSET, in the same write
    assert any(group[:2] == ("RSET", "MAIL") or group[:3] == (".", "RSET", "MAIL")
               for group in groups), groups
    assert reads_with(relay, GROUP) + reads_with(relay, CHAINED) > 20, groups


def test_a_relay_closing_after_the_dots_reply(tmp_path, relay_factory, daemon_factory):
    relay = relay_factory(Faults(drop_after=1))
    daemon = daemon_factory({"isp": relay_server(relay, connections=1)}).start()
    cid = daemon.send_campaign(tmp_path / "c", 12)
    report = daemon.wait_done(cid, timeout=90)
    assert report.counts.sent == 12 and report.counts.uncertain == 0
    assert_exactly_once(relay, campaign_addresses(12))
    assert relay.drop_reasons["drop_after"] >= 11
    # the next message's commands were in flight when the relay closed, and came back
    # (until the pacer learns that the relay takes one message a session)
    assert relay.drops_with_mail_unread["drop_after"] >= 1


def test_a_drop_between_the_pipelined_dot_and_the_next_group(tmp_path, relay_factory,
                                                             daemon_factory):
    relay = relay_factory(Faults(swallow_every=5))  # takes every 5th message, then closes
    daemon = daemon_factory({"isp": relay_server(relay, connections=1)}).start()
    cid = daemon.send_campaign(tmp_path / "c", 20)
    report = daemon.wait_done(cid, timeout=90)
    swallowed = relay.drop_reasons["swallow"]
    assert swallowed == 4
    # the next message's MAIL, RCPT and DATA were already at the relay (not for the last)
    assert relay.drops_with_mail_unread["swallow"] >= 2
    uncertain = daemon.emails(cid, "uncertain")
    assert len(uncertain) == swallowed == report.counts.uncertain
    # exactly the ones whose "." was written before the drop: the 5th, 10th, ... message
    swallowed_rcpts = {m.rcpt for i, m in enumerate(relay.messages()) if i % 5 == 4}
    assert uncertain == swallowed_rcpts
    # the next ones were queued again and sent once
    assert_exactly_once(relay, campaign_addresses(20))
    assert daemon.emails(cid, "sent") == campaign_addresses(20) - uncertain


def test_kill_9_mid_campaign_on_a_pipelining_relay(tmp_path, relay_factory, daemon_factory):
    relay = relay_factory(Faults(reply_delay=0.002))
    daemon = daemon_factory({"isp": relay_server(relay, connections=3)}).start()
    cid = daemon.send_campaign(tmp_path / "c", 400)
    wait_until(lambda: len(relay.messages()) >= 100, 60, "100 messages at the relay")
    daemon.kill_group()
    assert len(relay.messages()) < 400
    daemon.start()
    report = daemon.report(cid)
    assert report.counts.sending == 0
    assert report.counts.uncertain <= 3  # at most one "." in flight per session
    daemon.ctl("resume", str(cid))
    report = daemon.wait_done(cid, timeout=90)
    assert_nobody_lost_or_sent_twice(relay.count_by_rcpt(), daemon.emails(cid, "uncertain"),
                                     campaign_addresses(400), report.counts.sent,
                                     report.counts.uncertain)
    assert reads_with(relay, CHAINED) > 100


# ------------------------------------------------------------------ relay text from a stranger


@pytest.mark.parametrize("stage, reply, outcome", [
    ("rcpt", b"550 5.1.1 Empf\xe4nger unbekannt\r\n", "failed"),
    ("dot", b"250 2.0.0 Ok: queued as \xff\xfe12AB\r\n", "sent"),
    ("greeting", b"421 4.3.2 Zu viele Verbindungen, bitte sp\xe4ter\r\n", "sent"),
])
def test_a_reply_that_is_not_utf8(tmp_path, relay_factory, daemon_factory, stage, reply, outcome):
    relay = relay_factory(Faults(odd_reply=reply, odd_reply_stage=stage,
                                 odd_reply_times=3 if stage == "greeting" else 1))
    daemon = daemon_factory({"isp": relay_server(relay, connections=1)}).start()
    cid = daemon.send_campaign(tmp_path / "c", 10)
    report = daemon.wait_done(cid, timeout=60)
    assert worker_restarts(daemon) == 0
    assert report.counts.uncertain == 0
    if outcome == "failed":
        failed = daemon.report(cid, "failed").recipients
        assert len(failed) == 1 and report.counts.sent == 9
        assert "Empf\ufffdnger unbekannt" in failed[0].reply
    else:
        assert report.counts.sent == 10
        assert_exactly_once(relay, campaign_addresses(10))
    if stage == "dot":
        queued_as = [r.reply for r in daemon.report(cid, "sent").recipients if "\ufffd" in r.reply]
        assert len(queued_as) == 1


def test_a_huge_reply_is_stored_cut(tmp_path, relay_factory, daemon_factory):
    fat = b"".join(b"550-5.1.1 " + b"x" * 1000 + b"\r\n" for _ in range(30)) + b"550 5.1.1 end\r\n"
    relay = relay_factory(Faults(odd_reply=fat, odd_reply_stage="rcpt", odd_reply_times=1))
    daemon = daemon_factory({"isp": relay_server(relay, connections=1)}).start()
    cid = daemon.send_campaign(tmp_path / "c", 3)
    daemon.wait_done(cid, timeout=60)
    failed = daemon.report(cid, "failed").recipients
    assert len(failed) == 1
    assert 900 < len(failed[0].reply) <= REPLY_MAX


REPLY_STAGES = ("greeting", "ehlo", "mail", "rcpt", "data", "dot")
reply_bytes = st.one_of(
    st.binary(max_size=120),
    st.tuples(st.sampled_from([b"250 ", b"250-", b"354 ", b"421 ", b"451 ", b"550 ", b"554 ", b"2"]),
              st.binary(max_size=80), st.sampled_from([b"\r\n", b"\n", b"", b"\r\n250 ok\r\n"]))
    .map(b"".join),
)


@pytest.fixture(scope="module")
def steady_daemon(tmp_path_factory):
    """One daemon and relay for every example of the property (starting one each is slow)."""
    from conftest import Daemon
    from mailerd.testing.relay import FakeRelay
    root = tmp_path_factory.mktemp("property")
    relay = FakeRelay(Faults())
    relay.start()
    daemon = Daemon(root, {"isp": relay_server(relay, connections=1, timeout="1s")},
                    delivery={"retry_initial": "0.2s", "retry_max": "0.5s"}).start()
    try:
        yield daemon, relay, root
        assert "Traceback" not in daemon.log(), daemon.log()[-3000:]
    finally:
        daemon.cleanup()
        relay.stop()


_examples = itertools.count()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stage=st.sampled_from(REPLY_STAGES), reply=reply_bytes)
def test_any_reply_bytes_at_any_stage_leave_the_worker_alive_and_the_recipient_settled(
        steady_daemon, stage, reply):
    daemon, relay, root = steady_daemon
    relay.set_faults(Faults(odd_reply=reply, odd_reply_stage=stage, odd_reply_times=1))
    n = next(_examples)  # a fresh address each time: a 5xx may suppress the last one
    cid = daemon.enqueue(*make_campaign(root / f"c{n}", 1, domain=f"e{n}.example"))
    final = wait_until(
        lambda: (r := daemon.report(cid)).counts.sent + r.counts.failed + r.counts.uncertain == 1
        and r, 30, f"the recipient to settle after {reply!r} at {stage}")
    assert worker_restarts(daemon) == 0
    if stage not in ("data", "dot"):  # only a "." may have gone out unanswered
        assert final.counts.uncertain == 0


# ------------------------------------------------------------------ over TLS


class _PipeliningRecorder:
    """aiosmtpd handler: offers PIPELINING, records each message's recipients."""

    def __init__(self) -> None:
        self.rcpts: list[str] = []
        self.tls_seen: list[bool] = []

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_DATA(self, server, session, envelope):
        self.rcpts.extend(envelope.rcpt_tos)
        self.tls_seen.append(session.ssl is not None)
        return "250 2.0.0 Ok: queued"


def test_pipelining_after_starttls(tmp_path, daemon_factory):
    """The pipelined exchange takes over the TLS transport aiosmtplib set up."""
    import socket
    import ssl
    import subprocess

    from aiosmtpd.controller import Controller

    cert, key = tmp_path / "relay.crt", tmp_path / "relay.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    handler = _PipeliningRecorder()
    with socket.socket() as probe:  # Controller checks readiness on the port it is given
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = Controller(handler, hostname="127.0.0.1", port=port, tls_context=context,
                            require_starttls=True)
    controller.start()
    try:
        daemon = daemon_factory({"isp": {"host": "127.0.0.1", "port": port, "connections": 1,
                                         "security": "starttls", "tls_verify": False}}).start()
        cid = daemon.send_campaign(tmp_path / "c", 15)
        report = daemon.wait_done(cid)
    finally:
        controller.stop()
    assert report.counts.sent == 15
    assert sorted(handler.rcpts) == sorted(campaign_addresses(15))
    assert all(handler.tls_seen)
