"""Reply classification against replies real relays sent (shared/reference/relay-replies.md)."""

from __future__ import annotations

import pytest

from mailerd.pacing.classify import Cause, Classifier, retry_hint, window_hint
from mailerd.schema.config import PatternConfig

S, R, Q, L = Cause.SESSIONS, Cause.RATE, Cause.QUOTA, Cause.SESSION_LENGTH

REAL_REPLIES = [
    (421, "4.7.0 Try again later, closing connection. (MAIL)", R),
    (550, "5.4.5 Daily user sending quota exceeded", Q),
    (550, "5.4.5 Daily user sending limit exceeded", Q),
    (454, "4.7.0 Too many login attempts, please try again later", S),
    (432, "4.3.2 Concurrent connections limit exceeded", S),
    (432, "4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded", S),
    (554, "5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException", Q),
    (451, "4.7.651 The mail server [203.0.113.9] has been temporarily rate limited due to IP "
          "reputation (S844)", R),
    (454, "Throttling failure: Maximum sending rate exceeded", R),
    (421, "4.4.2 Message submission rate for this client has exceeded the configured limit", R),
    (450, "4.7.0 Transmit rate limit exceeded, try again later (ACC)", R),
    (450, "Too many requests. Try again later. #MS-ST-G", R),
    (450, "Too many recipient attempts", R),
    (421, "Too many messages in this connection", L),
    (552, "5.3.4 Message would take you over your relay quota of 500", Q),
    (451, '4.7.1 Ratelimit "user" exceeded', R),
    (421, "Too many concurrent SMTP connections; please try again later", S),
    (421, "Too many connections", S),
    (422, "try again in 15 seconds", R),
    (421, "4.7.0 mx.example too many messages in one session", L),
    (421, "too many emails per connection", L),
    (421, "slow down connections", R),
    (421, "4.7.0 [TSS04] Messages from 203.0.113.9 temporarily deferred due to user complaints", R),
    (421, "4.7.0 quota exceeded", Q),
]

ORDINARY = [
    (451, "4.3.0 <a@example.com>: Temporary failure, please try again later"),  # greylisting
    (450, "4.2.0 <a@example.com>: Recipient address rejected: Greylisted"),
    (550, "5.1.1 <a@example.com>: Recipient address rejected: User unknown"),
    (421, "Service not available, closing transmission channel"),
    (451, "4.4.2 Timeout waiting for data from client"),
    (554, "5.7.1 Too many connections"),  # a permanent rejection is never pacing
    (250, "2.0.0 Ok: queued"),
]


@pytest.mark.parametrize("code, text, cause", REAL_REPLIES)
def test_real_relay_replies_are_recognised(code, text, cause):
    assert Classifier().classify(code, text) is cause


@pytest.mark.parametrize("code, text", ORDINARY)
def test_ordinary_replies_are_not_pacing(code, text):
    assert Classifier().classify(code, text) is None


def test_configured_patterns_extend_the_defaults():
    classifier = Classifier(PatternConfig(quota=[r"monthly allowance"], rate=[r"#TR-\d+"]))
    assert classifier.classify(452, "4.3.1 monthly allowance used up") is Cause.QUOTA
    assert classifier.classify(451, "busy #TR-17") is Cause.RATE
    assert Classifier().classify(452, "4.3.1 monthly allowance used up") is None


def test_hints():
    assert retry_hint("422 try again in 15 seconds") == 15
    assert retry_hint("try again in 2 minutes") == 120
    assert retry_hint("Too many connections") is None
    assert window_hint("Daily user sending quota exceeded") == 86400
    assert window_hint("hourly limit reached") == 3600
    assert window_hint("quota exceeded") is None
