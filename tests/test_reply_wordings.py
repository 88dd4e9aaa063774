"""Every relay wording the issue lists, read with the stage it answered (issue 12).

The replies are the relays' own texts: Postfix 3.7's from its smtpd/postscreen
binaries (and seen live in test_real_postfix.py), the others as reported in
shared/reference/relay-replies.md or documented by the provider.
"""

from __future__ import annotations

import msgspec
import pytest

from conftest import relay_server
from mailerd.pacing.classify import Cause, Classifier, Scope, enhanced_code, retry_hint, window_hint
from mailerd.pacing.pacer import Pacer
from mailerd.schema.config import PatternConfig, ServerConfig

S, R, Q, L = Cause.SESSIONS, Cause.RATE, Cause.QUOTA, Cause.SESSION_LENGTH
ACC, RCP = Scope.ACCOUNT, Scope.RECIPIENT

# (who says it, stage, code, text, scope, cause)
WORDINGS = [
    # Postfix anvil (smtpd) and postscreen
    ("postfix anvil connection count/rate", "connect", 421,
     "4.7.0 relay.test Error: too many connections from 127.0.0.1", ACC, S),
    ("postfix anvil message rate", "mail", 450, "4.7.1 Error: too much mail from 127.0.0.1", ACC, R),
    ("postfix anvil recipient rate", "rcpt", 450, "4.7.1 Error: too many recipients from 127.0.0.1",
     ACC, R),
    ("postfix anvil AUTH rate", "connect", 450, "4.7.1 Error: too many AUTH commands from 127.0.0.1",
     ACC, S),
    ("postfix anvil new TLS sessions", "connect", 421,
     "4.7.0 relay.test Error: too many new TLS sessions from 127.0.0.1", ACC, S),
    ("postfix hard error limit", "rcpt", 421, "4.7.0 relay.test Error: too many errors", ACC, L),
    ("postscreen too many connections", "connect", 421, "4.7.0 Error: too many connections", ACC, S),
    ("postscreen ports busy", "connect", 421, "4.3.2 All server ports are busy", ACC, S),
    ("postscreen unavailable", "connect", 450, "4.3.2 Service currently unavailable", ACC, S),
    # Exim
    ("exim ratelimit ACL", "mail", 450, "4.7.0 Sender rate 51.2 / 1h exceeds the limit", ACC, R),
    ("exim ratelimit ACL at RCPT", "rcpt", 451, "4.7.1 rate limited, try again later", ACC, R),
    ("exim smtp_accept_max_per_host", "connect", 421,
     "Too many concurrent SMTP connections from this IP address; please try again later", ACC, S),
    ("exim smtp_accept_max", "connect", 421,
     "Too many concurrent SMTP connections; please try again later", ACC, S),
    # Sendmail
    ("sendmail conncontrol", "connect", 421, "4.3.2 Too many open connections.", ACC, S),
    ("sendmail ratecontrol", "connect", 421, "4.3.2 Connection rate limit exceeded.", ACC, S),
    # Exchange / Microsoft 365
    ("exchange concurrent connections", "connect", 421,
     "4.3.2 The maximum number of concurrent server connections has exceeded a limit, closing "
     "transmission channel", ACC, S),
    ("m365 concurrent connections (aiosmtplib SMTPDataError)", "dot", 432,
     "4.3.2 Concurrent connections limit exceeded", ACC, S),
    ("m365 sender thread limit", "dot", 432,
     "4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded", ACC, S),
    ("m365 submission quota", "dot", 554,
     "5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException", ACC, Q),
    ("m365 submission rate", "dot", 450, "4.5.127 Excessive message rate from sender", ACC, R),
    ("m365 server busy", "mail", 451, "4.7.500 Server busy. Please try again later", ACC, R),
    ("outlook.com IP reputation", "rcpt", 451,
     "4.7.651 The mail server [203.0.113.9] has been temporarily rate limited due to IP "
     "reputation (S844)", ACC, R),
    # Gmail / Google Workspace
    ("gmail 4.7.28 unusual rate", "dot", 421,
     "4.7.28 [203.0.113.9] Our system has detected an unusual rate of unsolicited mail", ACC, R),
    ("gmail 4.7.0 unusual rate (rcpt)", "rcpt", 450,
     "4.7.0 Our system has detected an unusual rate of unsolicited mail", ACC, R),
    ("gmail try again later, closing", "mail", 421, "4.7.0 Try again later, closing connection. (MAIL)",
     ACC, R),
    ("gmail try again later at EHLO", "connect", 421, "4.7.0 Try again later, closing connection. (EHLO)",
     ACC, R),
    ("gmail daily quota", "dot", 550, "5.4.5 Daily user sending quota exceeded", ACC, Q),
    ("gmail daily limit (rcpt)", "rcpt", 550, "5.4.5 Daily user sending limit exceeded", ACC, Q),
    ("gmail too many logins", "connect", 454, "4.7.0 Too many login attempts, please try again later",
     ACC, S),
    # Yahoo
    ("yahoo TSS04", "connect", 421,
     "4.7.0 [TSS04] Messages from 203.0.113.9 temporarily deferred due to user complaints", ACC, R),
    ("yahoo TSS04 after the dot", "dot", 421,
     "4.7.0 [TSS04] Messages from 203.0.113.9 temporarily deferred due to user complaints", ACC, R),
    # Amazon SES
    ("ses throttling", "mail", 454, "Throttling failure: Maximum sending rate exceeded.", ACC, R),
    ("ses throttling after the dot", "dot", 454, "Throttling failure: Maximum sending rate exceeded",
     ACC, R),
    ("ses daily quota", "dot", 454, "Throttling failure: Daily message quota exceeded.", ACC, Q),
    ("ses daily quota, permanent", "mail", 554, "Throttling failure: Daily message quota exceeded.",
     ACC, Q),
    # SendGrid / Mailgun / MailerSend
    ("sendgrid credits", "connect", 451, "Authentication failed: Maximum credits exceeded", ACC, Q),
    ("sendgrid credits, permanent", "mail", 550, "Maximum credits exceeded", ACC, Q),
    ("mailgun too many requests", "rcpt", 421, "Too many requests", ACC, R),
    ("mailgun sending limit", "mail", 550, "5.4.0 Sending limit reached", ACC, Q),
    ("mailersend", "rcpt", 450, "Too many requests. Try again later. #MS-ST-G", ACC, R),
    # the rest of relay-replies.md
    ("listmonk#164", "dot", 421,
     "4.4.2 Message submission rate for this client has exceeded the configured limit", ACC, R),
    ("strato", "mail", 450, "4.7.0 Transmit rate limit exceeded, try again later (ACC)", ACC, R),
    ("listmonk#1300", "rcpt", 450, "Too many recipient attempts", ACC, R),
    ("listmonk#1181", "dot", 421, "Too many messages in this connection", ACC, L),
    ("hosting relay quota", "dot", 552, "5.3.4 Message would take you over your relay quota of 500",
     ACC, Q),
    ("mailcow rspamd", "rcpt", 451, '4.7.1 Ratelimit "user" exceeded', ACC, R),
    ("shared host", "connect", 421, "Too many concurrent SMTP connections; please try again later",
     ACC, S),
    ("yagmail#117", "connect", 421, "Too many connections", ACC, S),
    ("gophish#521", "dot", 422, "try again in 15 seconds", ACC, R),
    ("barracuda", "dot", 421, "4.7.0 mx.example too many messages in one session", ACC, L),
    ("postal#1200", "dot", 421, "too many emails per connection", ACC, L),
    ("E-F-A", "connect", 421, "slow down connections", ACC, R),
    ("generic quota", "dot", 421, "4.7.0 quota exceeded", ACC, Q),
    ("hourly limit", "mail", 451, "4.7.1 hourly sending limit reached for this account", ACC, Q),
]

# Replies that are about the recipient (or only the session), never a limit.
ORDINARY = [
    ("greylisting", "rcpt", 451, "4.3.0 <a@example.com>: Temporary failure, please try again later",
     RCP, None),
    ("greylisted", "rcpt", 450, "4.2.0 <a@example.com>: Recipient address rejected: Greylisted",
     RCP, None),
    ("postfix access map 450", "rcpt", 450,
     "4.7.1 <later@example.com>: Recipient address rejected: mailbox busy", RCP, None),
    ("user unknown", "rcpt", 550, "5.1.1 <a@example.com>: Recipient address rejected: User unknown",
     RCP, None),
    ("recipient's mailbox over quota", "rcpt", 452, "4.2.2 Mailbox over quota", RCP, None),
    ("recipient's mailbox full, no code", "dot", 552, "Mailbox full, quota exceeded", RCP, None),
    ("gmail recipient receiving too fast", "rcpt", 450,
     "4.2.1 The user you are trying to contact is receiving mail at a rate that prevents additional "
     "messages from being delivered", RCP, None),
    ("timeout after the dot", "dot", 451, "4.4.2 Timeout waiting for data from client", RCP, None),
    ("permanent 'too many connections'", "dot", 554, "5.7.1 Too many connections", RCP, None),
    ("closing, no words, at MAIL", "mail", 421, "Service not available, closing transmission channel",
     ACC, None),
    ("unnamed 4xx at MAIL: the account, slowed", "mail", 451, "4.3.0 Temporary lookup error", ACC, R),
    ("refused at the greeting", "connect", 421, "Service not available, closing transmission channel",
     ACC, S),
    ("sent", "dot", 250, "2.0.0 Ok: queued as 4Xyz", Scope.NONE, None),
]


@pytest.mark.parametrize("who, stage, code, text, scope, cause", WORDINGS + ORDINARY,
                         ids=[w[0] for w in WORDINGS + ORDINARY])
def test_every_wording_is_read_with_its_stage(who, stage, code, text, scope, cause):
    verdict = Classifier().classify(stage, code, text)
    assert (verdict.scope, verdict.cause) == (scope, cause), verdict.reason
    if cause is not None and verdict.pattern is not None:
        assert verdict.source  # every default pattern cites where its wording comes from


@pytest.mark.parametrize("stage", ["connect", "mail"])
def test_a_4xx_before_rcpt_never_charges_the_recipient(stage):
    for code, text in [(450, "4.1.1 <a@example.com>: Recipient address rejected"),
                       (451, "local error"), (452, "4.3.1 Insufficient system storage")]:
        assert not Classifier().classify(stage, code, text).charges_recipient


def test_a_4xx_after_mail_is_the_recipients_unless_it_names_a_limit():
    classifier = Classifier()
    assert classifier.classify("rcpt", 450, "4.7.1 no").charges_recipient
    assert classifier.classify("dot", 451, "4.3.0 try later").charges_recipient
    assert not classifier.classify("rcpt", 450, "4.7.1 Error: too much mail from x").charges_recipient


def test_enhanced_codes_are_read():
    assert enhanced_code("4.7.1 Error: too much mail") == "4.7.1"
    assert enhanced_code("421-4.7.28 [1.2.3.4] unusual rate") == "4.7.28"
    assert enhanced_code("Service not available") is None
    assert enhanced_code("queued as 1.2.3.4") is None  # an IP address is not a status code


def test_configured_patterns_extend_the_defaults():
    classifier = Classifier(PatternConfig(quota=[r"monthly allowance"], rate=[r"#TR-\d+"]))
    assert classifier.classify("rcpt", 452, "4.3.1 monthly allowance used up").cause is Q
    assert classifier.classify("dot", 451, "busy #TR-17").cause is R
    assert Classifier().classify("rcpt", 452, "4.3.1 monthly allowance used up").cause is None
    assert classifier.classify("dot", 451, "busy #TR-17").source == "[patterns] in the config"


def test_hints():
    assert retry_hint("422 try again in 15 seconds") == 15
    assert retry_hint("try again in 2 minutes") == 120
    assert retry_hint("Too many connections") is None
    assert window_hint("Daily user sending quota exceeded") == 86400
    assert window_hint("hourly limit reached") == 3600
    assert window_hint("quota exceeded") is None


def test_the_pacer_takes_a_reply_once_and_decides():
    pacer = Pacer("isp", ServerConfig(connections=4))
    reaction = pacer.on_reply("mail", 450, "4.7.1 Error: too much mail from 127.0.0.1", 1000.0)
    assert not reaction.verdict.charges_recipient
    assert reaction.decision is not None and reaction.decision.action == "slow down"
    assert pacer.next_start(1000.0) > 1000.0  # paused
    session = pacer.on_reply("connect", 421, "421 4.7.0 x Error: too many connections from y", 1000.0)
    assert session.decision is not None and pacer.effective_connections() == 2
    assert pacer.on_reply("rcpt", 550, "5.1.1 unknown user", 1000.0).decision is None


def test_explain_through_a_real_daemon_uses_its_configured_patterns(tmp_path, relay_factory,
                                                                    daemon_factory):
    daemon = daemon_factory({"isp": relay_server(relay_factory())})
    daemon.config.write_text(daemon.config.read_text() + '[patterns]\nrate = ["#TR-\\\\d+"]\n')
    daemon.start()

    postfix = daemon.ctl("explain", "450 4.7.1 Error: too much mail from 192.0.2.1", "--stage", "mail")
    assert "at mail: account, rate" in postfix.stdout
    assert "no attempt counted" in postfix.stdout and "slow this server" in postfix.stdout
    assert "postfix 3.7 smtpd" in postfix.stdout  # the wording's source

    custom = msgspec.json.decode(daemon.ctl("explain", "451 busy #TR-17", "--stage", "dot",
                                            "--json").stdout)
    assert custom["code"] == 451
    [reading] = custom["readings"]
    assert (reading["scope"], reading["cause"], reading["source"]) == \
        ("account", "rate", "[patterns] in the config")

    busy = daemon.ctl("explain", "450 4.2.0 <a@example.com>: mailbox busy", "--stage", "rcpt")
    assert "at rcpt: recipient:" in busy.stdout and "an attempt counted" in busy.stdout

    every = daemon.ctl("explain", "421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred")
    assert [line.split(":")[0] for line in every.stdout.splitlines() if line.startswith("at ")] == \
        ["at connect", "at mail", "at rcpt", "at data", "at dot"]

    no_code = daemon.ctl("explain", "too many connections", check=False)
    assert no_code.returncode == 1 and "with its code" in no_code.stderr
    assert "Traceback" not in no_code.stderr


def test_a_refused_probe_for_one_more_session_undoes_only_that_step():
    pacer = Pacer("isp", ServerConfig(connections=4, clean_period=60))
    refusal = "421 4.7.0 relay.test Error: too many connections from 127.0.0.1"
    pacer.on_reply("connect", 421, refusal, 1000.0)
    assert pacer.effective_connections() == 2
    pacer.tick(1061.0)  # a clean period later: try one more
    assert pacer.effective_connections() == 3
    pacer.on_reply("connect", 421, refusal, 1062.0)
    assert pacer.effective_connections() == 2  # not 3 // 2 == 1
