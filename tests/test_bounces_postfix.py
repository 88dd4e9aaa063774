"""Soft bounces written by a real Postfix (issue 14): "delayed mail" DSNs, end to end.

A campaign goes through a private Postfix (tests/postfix.py). Mail for slow.example is
routed (transport_maps) to a second sink that answers every RCPT with 451 4.3.0, so
Postfix keeps it queued and, with DELAY_NOTICES, sends its own RFC 3464 "delayed mail"
warning (Action: delayed) to each message's VERP return path within seconds. Those
warnings go to the first sink, which hands them to the private Dovecot mailbox as a
local delivery agent would; mailerd's intake reads them from there over IMAPS.

What a user cares about: exactly those recipients are recorded `soft`; nobody is
suppressed by the first round; once every one of the last `soft_bounce_limit`
campaigns soft-bounced for an address, that address (and nobody else) is suppressed
and the next campaign skips it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable

import pytest

import postfix as private_postfix
from conftest import Daemon, make_campaign
from dovecot_imap import PrivateDovecot
from mailerd.testing.relay import Faults, FakeRelay, Received
from mailerd.testing.waiting import wait_until
from test_bounces import (IMAP_WHY_NOT, RELAY_PASSWORD, RELAY_USER, dovecot,  # noqa: F401
                          mailbox_settings, postfix_relay_settings, suppression_reasons,
                          with_mailbox)

WHY_NOT = private_postfix.missing() or IMAP_WHY_NOT
SLOW = {f"slow{i}@slow.example" for i in range(5)}  # their mailboxes answer 451 for ever
FINE = 20
SOFT_BOUNCE_LIMIT = 2

pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")


def bounces_of(daemon: Daemon, campaign: int) -> list[dict[str, Any]]:
    return json.loads(daemon.ctl("bounces", str(campaign), "--json").stdout)["bounces"]


def soft_bounces_arrived(daemon: Daemon, campaign: int) -> list[dict[str, Any]] | None:
    bounces = bounces_of(daemon, campaign)
    return bounces if len(bounces) >= len(SLOW) else None


def to_the_mailbox(mailbox: PrivateDovecot) -> Callable[[Iterable[Received]], None]:
    """The first sink's on_message: mail to a VERP return path goes into the bounce mailbox."""
    def deliver(entries: Iterable[Received]) -> None:
        for entry in entries:
            if entry.rcpt.startswith("bounces+"):
                sender = entry.mail_from.strip("<>")  # "" for a DSN's null sender
                mailbox.deliver(f"Return-Path: <{sender}>\nDelivered-To: {entry.rcpt}\n"
                                .encode() + entry.data)
    return deliver


def test_postfix_delay_notices_are_soft_and_suppress_only_after_the_limit(
        tmp_path: Path, daemon_factory: Callable[..., Daemon], dovecot: PrivateDovecot) -> None:  # noqa: F811
    sink = FakeRelay(Faults(), on_message=to_the_mailbox(dovecot))
    slow = FakeRelay(Faults(tempfail_every=1))  # every RCPT: 451 4.3.0 ... try again later
    sink.start()
    slow.start()
    postfix = private_postfix.PrivatePostfix(
        sink.port, users={RELAY_USER: RELAY_PASSWORD}, settings=private_postfix.DELAY_NOTICES,
        transports={"slow.example": f"smtp:[127.0.0.1]:{slow.port}"})
    try:
        postfix.start()
        server = postfix_relay_settings(postfix, tmp_path, connections=2)
        daemon = with_mailbox(daemon_factory({"postfix": server}), mailbox_settings(dovecot, tmp_path),
                              soft_bounce_limit=SOFT_BOUNCE_LIMIT).start()
        files = make_campaign(tmp_path / "c", FINE, extra_rows=[f"{a},Slow,S" for a in sorted(SLOW)])

        def campaign_with_delay_notices() -> tuple[int, list[dict[str, Any]]]:
            campaign = daemon.enqueue(*files)
            daemon.wait_done(campaign, timeout=120)
            bounces = wait_until(lambda: soft_bounces_arrived(daemon, campaign), 90,
                                 f"Postfix's delay notices for campaign {campaign} in the journal "
                                 f"(maillog: {postfix.count('sender delay notification')} sent)")
            return campaign, bounces

        # first round: Postfix took all 25; the slow ones come back as delayed, nobody suppressed
        first, bounces = campaign_with_delay_notices()
        report = daemon.report(first)
        assert report.counts.sent == FINE + len(SLOW)
        assert {b["email"] for b in bounces} == SLOW and len(bounces) == len(SLOW)
        assert {b["kind"] for b in bounces} == {"soft"}
        assert {b["status"] for b in bounces} == {"4.3.0"}
        assert all("451 4.3.0" in b["diagnostic"] for b in bounces), bounces
        assert report.counts.bounced == 0  # soft ones are listed, not counted as bounced
        assert suppression_reasons(daemon) == {}
        wait_until(lambda: postfix.count("sender delay notification") == len(SLOW), 10,
                   "Postfix's log to show it wrote them")
        wait_until(lambda: len(dovecot.messages(".done")) == len(SLOW) and not dovecot.messages(),
                   30, "the delay notices to be moved to the done folder")

        # second round: everybody is mailed again; the second soft bounce in a row suppresses
        second, bounces = campaign_with_delay_notices()
        assert daemon.emails(second, "suppressed") == set()
        assert daemon.report(second).counts.sent == FINE + len(SLOW)
        assert {(b["email"], b["kind"]) for b in bounces} == {(a, "soft") for a in SLOW}
        assert suppression_reasons(daemon) == {a: "bounced" for a in SLOW}  # nobody else

        # the next campaign skips them
        third = daemon.enqueue(*files)
        daemon.wait_done(third, timeout=120)
        assert daemon.emails(third, "suppressed") == SLOW
        assert daemon.report(third).counts.sent == FINE
        assert daemon.log_line("bounce_suppressed", "slow0@slow.example", "reason=bounced")
    finally:
        postfix.stop()
        postfix.remove()
        slow.stop()
        sink.stop()
