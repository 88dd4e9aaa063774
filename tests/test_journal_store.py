"""The journal's state machine (journal/store.py) on a real SQLite file and on a real
PostgreSQL database (journal/postgres.py): every test runs on both backends.

What matters to a user: a recipient the relay may have is never handed out again
without a decision (uncertain), one the relay cannot have goes back to the queue,
a late or replayed answer never overwrites a final one, and recipients are handed
out in list order, retries when their time has come.
"""

from __future__ import annotations

import pytest

from conftest import same_journal
from mailerd.journal.backend import JournalStore
from mailerd.journal.store import (
    UNCERTAIN_AFTER_RESTART,
    JournalError,
    bounce_rule,
)
from mailerd.schema.config import SuppressionConfig
from mailerd.schema.control import CampaignSpec
from mailerd.schema.records import NewRecipient, Outcome

SPEC = CampaignSpec(name="t", sender="news@example.org", subject="s", text="t", columns=["email"])


def reopened(journal: JournalStore):
    """Close and open the same journal again, as a restarted daemon does."""
    journal.close()
    again = same_journal(journal)
    recovery = again.open()
    return again, recovery


def add_campaign(journal: JournalStore, count: int, domain: str = "example.com") -> int:
    campaign = journal.begin_campaign(f"uid-{domain}", SPEC)
    journal.add_recipients(campaign, [
        NewRecipient(line, f"user{line}@{domain}", f"user{line}@{domain}", b"\x90", "queued", None)
        for line in range(1, count + 1)])
    journal.commit_campaign(campaign)
    return campaign


def states(journal: JournalStore, campaign: int) -> dict[str, str]:
    return {r.email: r.state for r in journal.recipients(campaign, None, None)}


def attempts(journal: JournalStore, campaign: int) -> dict[int, int]:
    return {r.line: r.attempts for r in journal.recipients(campaign, None, None)}


def test_restart_requeues_sending_and_makes_data_sent_uncertain(journal):
    campaign = add_campaign(journal, 4)
    journal.mark_sending([(campaign, 1, "isp"), (campaign, 2, "isp"), (campaign, 3, "isp")])
    journal.mark_data_sent([(campaign, 2, "isp")])
    journal.record_outcomes([Outcome(campaign, 3, "sent", 250, "ok")])

    journal, recovery = reopened(journal)
    try:
        assert (recovery.requeued, recovery.uncertain) == (1, 1)
        assert states(journal, campaign) == {
            "user1@example.com": "queued",     # the relay discarded the unfinished transaction
            "user2@example.com": "uncertain",  # the "." may have been written: a decision is needed
            "user3@example.com": "sent",
            "user4@example.com": "queued",
        }
        uncertain = journal.recipients(campaign, "uncertain", None)[0]
        assert uncertain.reply == UNCERTAIN_AFTER_RESTART
        assert [c.line for c in journal.claim(campaign, 0, 10, 0.0, set()).recipients] == [1, 4]
    finally:
        journal.close()


def test_restart_discards_a_campaign_that_was_still_loading(journal):
    loading = journal.begin_campaign("uid-loading", SPEC)
    journal.add_recipients(loading, [NewRecipient(1, "a@example.com", "a@example.com", None,
                                                  "queued", None)])
    kept = add_campaign(journal, 1)

    journal, recovery = reopened(journal)
    try:
        assert recovery.discarded_campaigns == 1
        assert [row.id for row in journal.campaigns()] == [kept]
        assert journal.recipients(loading, None, None) == []
    finally:
        journal.close()


def test_a_lost_worker_leaves_uncertain_what_it_may_have_sent(journal):
    campaign = add_campaign(journal, 4)
    journal.mark_sending([(campaign, line, "isp") for line in (1, 2, 3)])
    journal.mark_data_sent([(campaign, 2, "isp")])
    journal.record_outcomes([Outcome(campaign, 3, "sent", 250, "ok")])

    held = [(campaign, line) for line in (1, 2, 3, 4)]
    lost, requeued = journal.settle_lost_worker(held)
    assert [(r.campaign, r.line, r.email) for r in lost] == [(campaign, 2, "user2@example.com")]
    assert "worker process died" in lost[0].reply and requeued == 1
    assert states(journal, campaign) == {
        "user1@example.com": "queued", "user2@example.com": "uncertain",
        "user3@example.com": "sent", "user4@example.com": "queued"}
    assert attempts(journal, campaign) == {1: 0, 2: 1, 3: 1, 4: 0}
    assert journal.settle_lost_worker(held) == ([], 0)  # a second report changes nothing


def test_a_replayed_or_late_outcome_never_overwrites_a_final_state(journal):
    campaign = add_campaign(journal, 3)
    journal.mark_sending([(campaign, line, "isp") for line in (1, 2, 3)])
    journal.mark_data_sent([(campaign, line, "isp") for line in (1, 2, 3)])
    first = [Outcome(campaign, 1, "sent", 250, "ok"),
             Outcome(campaign, 2, "failed", 550, "no"),
             Outcome(campaign, 3, "deferred", 451, "later", next_at=100.0)]
    journal.record_outcomes(first)
    before = journal.recipients(campaign, None, None)

    journal.record_outcomes(first)  # the same write, replayed after a storage failure
    journal.record_outcomes([Outcome(campaign, 1, "deferred", 421, "late"),
                             Outcome(campaign, 2, "sent", 250, "late")])

    assert journal.recipients(campaign, None, None) == before
    assert journal.counts(campaign).sent == 1


def test_the_final_dot_is_refused_for_a_recipient_that_is_no_longer_sendable(journal):
    campaign = add_campaign(journal, 2)
    journal.mark_sending([(campaign, 1, "isp"), (campaign, 2, "isp")])
    journal.mark_data_sent([(campaign, 1, "isp")])
    journal.record_outcomes([Outcome(campaign, 1, "sent", 250, "ok")])

    with pytest.raises(JournalError, match="line 1 is not in a sendable state"):
        journal.mark_data_sent([(campaign, 1, "isp")])
    journal.mark_data_sent([(campaign, 2, "isp")])  # still in flight: allowed


def test_claim_hands_out_queued_in_list_order_then_retries_whose_time_has_come(journal):
    campaign = add_campaign(journal, 6)
    journal.mark_sending([(campaign, line, "isp") for line in (1, 2, 3)])
    journal.record_outcomes([
        Outcome(campaign, 1, "deferred", 451, "later", next_at=30.0),
        Outcome(campaign, 2, "deferred", 451, "later", next_at=10.0),
        Outcome(campaign, 3, "deferred", 451, "later", next_at=999.0),
    ])

    first = journal.claim(campaign, 0, 2, now=50.0, skip=set())
    assert [c.line for c in first.recipients] == [4, 5]
    assert first.cursor == 5
    rest = journal.claim(campaign, first.cursor, 10, now=50.0, skip=set())
    assert [c.line for c in rest.recipients] == [6, 2, 1]  # deferred ones by their retry time
    in_memory = journal.claim(campaign, 0, 10, now=50.0, skip={4, 6, 2})
    assert [c.line for c in in_memory.recipients] == [5, 1]
    assert journal.claim(campaign, 6, 10, now=5.0, skip=set()).recipients == []


def test_claim_leaves_out_an_address_suppressed_after_enqueue(journal):
    campaign = add_campaign(journal, 3)
    journal.add_suppressions([("user2@example.com", "user2@example.com", "unsubscribed", None)])

    result = journal.claim(campaign, 0, 10, now=0.0, skip=set())
    assert [c.line for c in result.recipients] == [1, 3]
    assert result.suppressed == [(campaign, 2, "unsubscribed")]
    assert journal.mark_suppressed(result.suppressed) == 1
    assert states(journal, campaign)["user2@example.com"] == "suppressed"


def test_a_matching_permanent_failure_suppresses_the_address_once(journal):
    journal.bounce_rule = bounce_rule(SuppressionConfig())
    campaign = add_campaign(journal, 3)
    journal.mark_sending([(campaign, line, "isp") for line in (1, 2, 3)])
    bounced = [Outcome(campaign, 1, "failed", 550, "5.1.1 user unknown"),
               Outcome(campaign, 2, "failed", 550, "message looks like spam"),
               Outcome(campaign, 3, "deferred", 450, "mailbox unavailable", next_at=1.0)]
    journal.record_outcomes(bounced)
    journal.record_outcomes(bounced)  # replayed

    rows, total = journal.list_suppressions("", 10)
    assert total == 1 and [(r[0], r[2]) for r in rows] == [("user1@example.com", "bounced")]
    later = add_campaign(journal, 1, domain="example.com")
    assert journal.claim(later, 0, 10, 0.0, set()).suppressed == [(later, 1, "bounced")]


def test_no_bounce_rule_when_auto_bounce_is_off():
    assert bounce_rule(SuppressionConfig(auto_bounce=False)) is None
    assert bounce_rule(SuppressionConfig(bounce_patterns=[])) is None


def test_one_host_holds_at_most_limit_sessions_and_is_never_fenced(journal):
    assert [journal.acquire_session_slot("isp", 2) for _ in range(3)] == [0, 1, None]
    journal.release_session_slot("isp", 0)
    assert journal.acquire_session_slot("isp", 2) == 0
    assert journal.renew_lease() and journal.take_over_expired(0.0) == []
    [host] = journal.hosts()
    assert (host.host, host.sessions, host.alive) == ("host-a", 2, True)
