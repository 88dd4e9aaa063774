"""What comes back (issue 14): bounces and complaints, read into the journal.

Samples are generated here the way Postfix, Exim, Sendmail and feedback loops
write them (RFC 3464 DSNs, RFC 5965 ARF reports, Exim's plain-text bounces, an
out-of-office reply). What a user cares about: a hard bounce or a complaint puts
exactly that address on the suppression list and shows in the report, soft ones
only after soft_bounce_limit in a row, a forged bounce changes nothing, the same
mailbox message read twice changes nothing twice.
"""

from __future__ import annotations

import email.utils
import json
from email.message import EmailMessage
from pathlib import Path

import pytest

import dovecot_imap
import postfix as private_postfix
from conftest import make_campaign, relay_server
from mailerd.bounces import classify
from mailerd.journal.store import _MIGRATIONS, Journal
from mailerd.message import tokens, verp
from mailerd.message.render import message_id_for
from mailerd.schema.control import CampaignSpec, Status, SuppressList
from mailerd.testing.daemon import toml_value
from mailerd.testing.relay import Faults, FakeRelay
from mailerd.testing.waiting import wait_until
from mailerd.schema.records import NewRecipient, Outcome

KEY = b"k" * 32
RETURN_PATH = "bounces+{{ tag }}@example.org"
SPEC = CampaignSpec(name="t", sender="news@example.org", subject="s", text="t", columns=["email"],
                    return_path=RETURN_PATH)


# ---------------------------------------------------------------- samples


def original_headers(uid: str, line: int, rcpt: str) -> str:
    return (f"Return-Path: <{verp.return_path(RETURN_PATH, KEY, uid, line)}>\n"
            f"From: News <news@example.org>\nTo: {rcpt}\nSubject: Hello\n"
            f"Message-ID: {message_id_for(uid, line, 'news@example.org')}\n")


def multipart_report(report_type: str, headers: dict[str, str], parts: list[tuple[str, str]]) -> bytes:
    """A multipart/report written out as text, the way MTAs write them."""
    boundary = "=_report_boundary_42"
    lines = [f"{name}: {value}" for name, value in headers.items()]
    lines += ["MIME-Version: 1.0",
              f'Content-Type: multipart/report; report-type={report_type}; boundary="{boundary}"', "",
              "This is a MIME-encapsulated message.", ""]
    for content_type, body in parts:
        lines += [f"--{boundary}", f"Content-Type: {content_type}", "", body.rstrip("\n"), ""]
    lines += [f"--{boundary}--", ""]
    return "\n".join(lines).encode()


def dsn(rcpt: str, status: str, *, action: str = "failed", to: str = "bounces@example.org",
        original: str = "", diagnostic: str = "smtp; 550 5.1.1 <x>: Recipient address rejected",
        mta: str = "mx.example.com", headers_part: str = "text/rfc822-headers") -> bytes:
    """An RFC 3464 report as Postfix and Sendmail write it."""
    headers = {"From": f"MAILER-DAEMON@{mta} (Mail Delivery System)", "To": to,
               "Subject": "Undelivered Mail Returned to Sender", "Auto-Submitted": "auto-replied",
               "Date": email.utils.formatdate()}
    parts = [("text/plain", "I'm sorry to have to inform you that your message could not be delivered."),
             ("message/delivery-status",
              f"Reporting-MTA: dns; {mta}\nArrival-Date: {email.utils.formatdate()}\n\n"
              f"Final-Recipient: rfc822; {rcpt}\nOriginal-Recipient: rfc822;{rcpt}\n"
              f"Action: {action}\nStatus: {status}\nDiagnostic-Code: {diagnostic}\n")]
    if original:
        parts.append((headers_part, original + ("\nbody\n" if headers_part == "message/rfc822" else "")))
    return multipart_report("delivery-status", headers, parts)


def arf(rcpt: str, *, to: str = "bounces@example.org", original: str = "",
        feedback_type: str = "abuse") -> bytes:
    """An RFC 5965 feedback report, as a mailbox provider's feedback loop sends it."""
    headers = {"From": "fbl@isp.example", "To": to, "Subject": "FW: Hello"}
    parts = [("text/plain", "This is an email abuse report for an email message received."),
             ("message/feedback-report",
              f"Feedback-Type: {feedback_type}\nUser-Agent: SomeFBL/1.0\nVersion: 1\n"
              f"Original-Rcpt-To: {rcpt}\nArrival-Date: {email.utils.formatdate()}\n"),
             ("message/rfc822", original + "\nthe message\n")]
    return multipart_report("feedback-report", headers, parts)


def exim_bounce(rcpt: str, to: str, original: str) -> bytes:
    """Exim's plain-text bounce (no DSN part): only flufl.bounce reads those."""
    return (f"Return-path: <>\nTo: {to}\nFrom: Mail Delivery System <Mailer-Daemon@mx.example.net>\n"
            "Subject: Mail delivery failed: returning message to sender\n"
            "X-Failed-Recipients: " + rcpt + "\nAuto-Submitted: auto-replied\n\n"
            "This message was created automatically by mail delivery software.\n\n"
            "A message that you sent could not be delivered to one or more of its\n"
            "recipients. This is a permanent error. The following address(es) failed:\n\n"
            f"  {rcpt}\n    SMTP error from remote mail server after RCPT TO:<{rcpt}>:\n"
            "    550 5.1.1 User unknown\n\n------ This is a copy of the message, including all the headers. ------\n\n"
            + original + "\nbody\n").encode()


def out_of_office(to: str, original_id: str) -> bytes:
    message = EmailMessage()
    message["From"] = "user1@example.com"
    message["To"] = to
    message["Subject"] = "Automatic reply: Hello"
    message["Auto-Submitted"] = "auto-replied"
    message["In-Reply-To"] = original_id
    message.set_content("I am out of the office until Monday.\n")
    return message.as_bytes()


# ---------------------------------------------------------------- a journal with sent campaigns


def sent_campaign(journal: Journal, uid: str, count: int) -> int:
    """A campaign whose `count` recipients (user1..) the relay took."""
    campaign = journal.begin_campaign(uid, SPEC)
    journal.add_recipients(campaign, [
        NewRecipient(line, f"user{line}@example.com", f"user{line}@example.com", b"\x90", "queued", None)
        for line in range(1, count + 1)])
    journal.commit_campaign(campaign)
    items = [(campaign, line, "isp") for line in range(1, count + 1)]
    journal.mark_sending(items)
    journal.mark_data_sent(items)
    journal.record_outcomes([Outcome(campaign, line, "sent", 250, "2.0.0 Ok") for line in range(1, count + 1)])
    return campaign


def take(journal: Journal, raw: bytes, limit: int = 3, key: bytes = KEY):
    understood = classify.understand(raw, key)
    return journal.apply_bounce(understood.source, "test", understood.format, understood.summary,
                                understood.targets, limit)


def suppressed(journal: Journal) -> dict[str, str]:
    rows, _ = journal.list_suppressions("", 1000)
    return {email: reason for email, _, reason, _, _ in rows}


UID = "0123456789abcdef"
UID2 = "fedcba9876543210"
UID3 = "00112233445566aa"


def tagged(uid: str, line: int) -> str:
    return verp.return_path(RETURN_PATH, KEY, uid, line)


# ---------------------------------------------------------------- the VERP tag


def test_the_tag_names_campaign_and_recipient_and_cannot_be_forged():
    address = tagged(UID, 7)
    assert address.startswith("bounces+") and address.endswith("@example.org")
    assert verp.find_tag(KEY, address) == verp.Tagged(UID, 7)
    assert verp.find_tag(KEY, address.upper()) == verp.Tagged(UID, 7)  # case folded on the way
    assert verp.find_tag(b"another key" * 3, address) is None
    forged_line = address.replace(f"{UID}-7-", f"{UID}-8-")
    assert verp.find_tag(KEY, forged_line) is None


# ---------------------------------------------------------------- reading


def test_a_postfix_dsn_for_an_unknown_user_is_a_hard_bounce_for_that_recipient():
    raw = dsn("user3@example.com", "5.1.1", to=tagged(UID, 3))
    reading = classify.read(raw, KEY)
    assert reading.format == "dsn"
    assert reading.tag == verp.Tagged(UID, 3)
    assert reading.findings == [classify.Finding(
        "hard", "user3@example.com", "5.1.1", "smtp; 550 5.1.1 <x>: Recipient address rejected")]


def test_a_delayed_dsn_is_soft_and_a_delivered_one_is_nothing():
    soft = classify.read(dsn("u@example.com", "4.4.7", action="delayed", to=tagged(UID, 1)), KEY)
    assert [f.kind for f in soft.findings] == ["soft"]
    delivered = dsn("u@example.com", "2.0.0", action="delivered", to=tagged(UID, 1))
    assert classify.targets(classify.read(delivered, KEY)) == []


def test_an_arf_report_is_a_complaint_matched_through_the_original_return_path():
    raw = arf("user2@example.com", original=original_headers(UID, 2, "user2@example.com"))
    reading = classify.read(raw, KEY)
    assert reading.format == "arf" and reading.tag == verp.Tagged(UID, 2)
    assert {f.kind for f in reading.findings} == {"complaint"}


def test_exim_plain_text_bounce_is_read_by_flufl_bounce():
    raw = exim_bounce("user4@example.com", tagged(UID, 4), original_headers(UID, 4, "user4@example.com"))
    reading = classify.read(raw, KEY)
    assert reading.format == "flufl"
    assert [(f.kind, f.address) for f in reading.findings] == [("hard", "user4@example.com")]


def test_an_out_of_office_reply_is_ignored():
    raw = out_of_office(tagged(UID, 1), message_id_for(UID, 1, "news@example.org"))
    reading = classify.read(raw, KEY)
    assert reading.format == "auto-reply" and classify.targets(reading) == []


def test_a_message_that_is_no_report_and_names_nobody_is_unreadable():
    message = EmailMessage()
    message["From"] = "someone@example.net"
    message["Subject"] = "hello there"
    message.set_content("nothing to see\n")
    with pytest.raises(classify.Unreadable, match="hello there"):
        classify.read(message.as_bytes(), KEY)


# ---------------------------------------------------------------- into the journal


def test_hard_bounces_and_complaints_suppress_and_show_in_the_report(journal):
    campaign = sent_campaign(journal, UID, 5)
    take(journal, dsn("user3@example.com", "5.1.1", to=tagged(UID, 3)))
    take(journal, arf("user2@example.com", original=original_headers(UID, 2, "user2@example.com")))
    assert suppressed(journal) == {"user3@example.com": "bounced", "user2@example.com": "complained"}
    counts = journal.counts(campaign)
    assert (counts.sent, counts.bounced, counts.complained) == (5, 1, 1)  # they stay sent
    bounced = journal.recipients(campaign, "bounced", None)
    assert [(r.email, r.state) for r in bounced] == [("user3@example.com", "sent")]
    assert "5.1.1" in (bounced[0].reply or "")
    assert [r.email for r in journal.recipients(campaign, "complained", None)] == ["user2@example.com"]
    listed = journal.bounce_list(campaign, 100)
    assert {(b.email, b.kind, b.status) for b in listed} == {
        ("user3@example.com", "hard", "5.1.1"), ("user2@example.com", "complaint", None)}


def test_the_same_mailbox_message_read_twice_changes_nothing_twice(journal):
    campaign = sent_campaign(journal, UID, 3)
    raw = dsn("user1@example.com", "5.1.1", to=tagged(UID, 1))
    assert take(journal, raw).new
    again = take(journal, raw)
    assert not again.new and again.matched == [] and again.suppressed == []
    assert len(journal.bounce_list(campaign, 100)) == 1


def test_forged_bounces_change_nothing(journal):
    campaign = sent_campaign(journal, UID, 3)
    forged_tag = tagged(UID, 2).replace(f"{UID}-2-", f"{UID}-1-")  # someone else's line, old mac
    wrong_key = verp.return_path(RETURN_PATH, b"z" * 32, UID, 1)
    other_campaign = tagged(UID2, 1)  # authentic tag of a campaign this journal does not have
    for to in (forged_tag, wrong_key, other_campaign):
        take(journal, dsn("user1@example.com", "5.1.1", to=to))
    # a Message-ID is no secret to its recipient: alone, it needs the address it was sent to
    take(journal, dsn("user3@example.com", "5.1.1",
                      original=original_headers(UID, 1, "user1@example.com").replace(
                          "Return-Path", "X-Old-Return-Path")))
    assert suppressed(journal) == {}
    assert journal.bounce_list(campaign, 100) == []
    assert len(journal.unmatched_bounces(100)) == 4
    assert journal.counts(campaign).bounced == 0


def test_a_bounce_that_lost_its_envelope_is_matched_by_message_id_and_address(journal):
    campaign = sent_campaign(journal, UID, 3)
    headers = original_headers(UID, 2, "user2@example.com").replace("Return-Path", "X-Old-Return-Path")
    take(journal, dsn("user2@example.com", "5.1.1", original=headers, headers_part="message/rfc822"))
    assert suppressed(journal) == {"user2@example.com": "bounced"}
    assert journal.counts(campaign).bounced == 1


def test_soft_bounces_suppress_only_after_the_limit_in_a_row(journal):
    uids = [UID, UID2, UID3]
    campaigns = [sent_campaign(journal, uid, 2) for uid in uids]
    for n, uid in enumerate(uids, start=1):
        take(journal, dsn("user1@example.com", "4.2.2", action="delayed", to=tagged(uid, 1)))
        # the same campaign's second delay notice does not count twice
        take(journal, dsn("user1@example.com", "4.2.2", action="delayed", to=tagged(uid, 1),
                          mta="mx2.example.com"))
        if n < 3:
            assert suppressed(journal) == {}, n
    assert suppressed(journal) == {"user1@example.com": "bounced"}
    assert all(journal.counts(c).bounced == 0 for c in campaigns)  # soft ones are listed, not counted


def test_a_campaign_without_a_soft_bounce_breaks_the_row(journal):
    uids = [UID, UID2, UID3]
    for uid in uids:
        sent_campaign(journal, uid, 2)
    take(journal, dsn("user1@example.com", "4.2.2", action="delayed", to=tagged(UID, 1)))
    take(journal, dsn("user1@example.com", "4.2.2", action="delayed", to=tagged(UID3, 1)))
    assert suppressed(journal) == {}
    take(journal, dsn("user1@example.com", "4.2.2", action="delayed", to=tagged(UID2, 1)))
    assert suppressed(journal) == {"user1@example.com": "bounced"}


def test_a_version_3_journal_is_migrated_and_keeps_its_campaigns(tmp_path):
    import sqlite3
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript("BEGIN;" + "".join(sql for v, sql in _MIGRATIONS if v <= 3)
                     + "PRAGMA user_version=3;COMMIT;")
    db.execute("INSERT INTO campaigns (uid, name, state, spec, created, updated) "
               "VALUES ('u', 'old', 'done', x'80', 0, 0)")
    db.close()
    journal = Journal(path)
    journal.open()
    try:
        assert journal._db.execute("PRAGMA user_version").fetchone()[0] == 4
        assert journal._db.execute("SELECT name FROM campaigns").fetchall() == [("old",)]
        assert journal.bounce_list(None, 10) == []
    finally:
        journal.close()


# ---------------------------------------------------------------- the envelope a real daemon sends


def test_each_recipient_gets_its_own_authentic_return_path(tmp_path, relay_factory, daemon_factory):
    relay = relay_factory()
    server_path = "srv-bounces+{{ tag }}@example.org"
    daemon = daemon_factory({"isp": relay_server(relay, return_path=server_path),
                             "other": relay_server(relay_factory())}).start()
    campaign_file, recipients = make_campaign(tmp_path / "c", 5, servers=["isp"])
    verp_campaign = daemon.enqueue(campaign_file, recipients)
    daemon.wait_done(verp_campaign)
    campaign_file, recipients = make_campaign(tmp_path / "own", 3, servers=["isp"], domain="own.example")
    campaign_file.write_text(campaign_file.read_text() + f'return_path = "{RETURN_PATH}"\n')
    own_campaign = daemon.enqueue(campaign_file, recipients)
    daemon.wait_done(own_campaign)
    key = tokens.load_or_create_key(daemon.state_dir)
    lines = {r.email: r.line for c in (verp_campaign, own_campaign)
             for r in daemon.report(c, "sent").recipients}
    by_server, by_campaign = {}, {}
    for received in relay.messages():
        tag = verp.find_tag(key, received.mail_from)
        assert tag is not None, received.mail_from
        assert tag.line == lines[received.rcpt], (received.mail_from, received.rcpt)
        target = by_server if received.mail_from.startswith("srv-bounces+") else by_campaign
        target[received.rcpt] = tag.campaign_uid
    assert len(by_server) == 5 and len(set(by_server.values())) == 1
    assert len(by_campaign) == 3 and set(by_campaign.values()).isdisjoint(by_server.values())


# ---------------------------------------------------------------- a real IMAP mailbox (Dovecot)

IMAP_WHY_NOT = dovecot_imap.missing()
needs_dovecot = pytest.mark.skipif(IMAP_WHY_NOT is not None, reason=IMAP_WHY_NOT or "")


@pytest.fixture
def dovecot():
    server = dovecot_imap.PrivateDovecot().start()
    yield server
    server.stop()
    server.remove()


def mailbox_settings(server: dovecot_imap.PrivateDovecot, tmp_path: Path, **extra) -> dict:
    password_file = tmp_path / "imap-password"
    password_file.write_text(server.password + "\n")
    password_file.chmod(0o600)
    return {"host": dovecot_imap.NAME, "port": server.tls_port, "security": "tls",
            "tls_ca_file": str(server.ca_file), "username": server.user,
            "password_file": str(password_file), "done_folder": "done", **extra}


def with_mailbox(daemon, mailbox: dict, **bounces):
    """The daemon (not started yet) reads bounces from the mailbox "box"."""
    sections = {"bounces": {"poll_interval": "0.5s", **bounces}, "bounces.mailboxes.box": mailbox}
    with open(daemon.config, "a") as config:
        for name, values in sections.items():
            config.write(f"\n[{name}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()))
    return daemon


def bounce_daemon(daemon_factory, relay, mailbox: dict, **bounces):
    """A daemon sending through `relay` with VERP, reading bounces from the mailbox "box"."""
    daemon = daemon_factory({"isp": relay_server(relay, return_path=RETURN_PATH)})
    return with_mailbox(daemon, mailbox, **bounces).start()


def suppression_reasons(daemon) -> dict[str, str]:
    return {e.email: e.reason for e in daemon.call(SuppressList(after="", limit=1000)).entries}


@needs_dovecot
def test_bounces_in_an_imap_mailbox_reach_the_journal_and_leave_the_inbox(
        tmp_path, relay_factory, daemon_factory, dovecot):
    relay = relay_factory()
    daemon = bounce_daemon(daemon_factory, relay, mailbox_settings(dovecot, tmp_path))
    campaign = daemon.enqueue(*make_campaign(tmp_path / "c", 10))
    daemon.wait_done(campaign)
    return_paths = {r.rcpt: r.mail_from for r in relay.messages()}
    key = tokens.load_or_create_key(daemon.state_dir)
    line = {r.email: r.line for r in daemon.report(campaign, "sent").recipients}
    uid = verp.find_tag(key, return_paths["user3@example.com"]).campaign_uid

    hard = dsn("user3@example.com", "5.1.1", to=return_paths["user3@example.com"])
    dovecot.deliver(hard)
    dovecot.deliver(arf("user5@example.com", original=(
        f"Return-Path: <{return_paths['user5@example.com']}>\nTo: user5@example.com\n"
        f"Message-ID: {message_id_for(uid, line['user5@example.com'], 'news@example.org')}\n")))
    dovecot.deliver(out_of_office(return_paths["user1@example.com"], "<x@y>"))
    forged = return_paths["user2@example.com"].replace(
        f"-{line['user2@example.com']}-", f"-{line['user4@example.com']}-")
    dovecot.deliver(dsn("user4@example.com", "5.1.1", to=forged))
    unreadable = b"From: someone@example.net\nTo: bounces@example.org\nSubject: hi\n\njust hi\n"
    dovecot.deliver(unreadable)

    wait_until(lambda: len(dovecot.messages()) == 1 and len(dovecot.messages(".done")) == 4,
               30, "4 messages moved to the done folder, the unreadable one left in INBOX")
    assert dovecot.messages() == [unreadable]
    assert suppression_reasons(daemon) == {"user3@example.com": "bounced",
                                           "user5@example.com": "complained"}
    report = daemon.report(campaign)
    assert (report.counts.sent, report.counts.bounced, report.counts.complained) == (10, 1, 1)
    bounced = daemon.ctl("report", str(campaign), "--state", "bounced", "--json")
    assert [r["email"] for r in json.loads(bounced.stdout)["recipients"]] == ["user3@example.com"]
    listed = json.loads(daemon.ctl("bounces", "--json").stdout)
    assert {(b["email"], b["kind"]) for b in listed["bounces"]} == {
        ("user3@example.com", "hard"), ("user5@example.com", "complaint")}
    assert len(listed["unmatched"]) == 2  # the forged bounce and the out-of-office reply
    box = daemon.call(Status()).mailboxes[0]
    assert box.last_error is None and box.read == 4 and len(box.left) == 1
    assert "neither a bounce" in box.left[0]
    assert "left in the mailbox 1" in daemon.ctl("status").stdout

    # the same bounce again (a crash between commit and move re-reads it): nothing changes twice
    dovecot.deliver(hard)
    wait_until(lambda: len(dovecot.messages(".done")) == 5, 30, "the repeated bounce to be moved")
    assert len(json.loads(daemon.ctl("bounces", str(campaign), "--json").stdout)["bounces"]) == 2
    assert daemon.report(campaign).counts.bounced == 1

    # the next campaign to the same list skips them
    nxt = daemon.enqueue(*make_campaign(tmp_path / "c2", 10))
    daemon.wait_done(nxt)
    assert daemon.emails(nxt, "suppressed") == {"user3@example.com", "user5@example.com"}


@needs_dovecot
def test_without_a_done_folder_a_read_bounce_is_deleted_after_the_commit(
        tmp_path, relay_factory, daemon_factory, dovecot):
    relay = relay_factory()
    daemon = bounce_daemon(daemon_factory, relay, mailbox_settings(dovecot, tmp_path, done_folder=""))
    campaign = daemon.enqueue(*make_campaign(tmp_path / "c", 3))
    daemon.wait_done(campaign)
    to = next(r.mail_from for r in relay.messages() if r.rcpt == "user1@example.com")
    dovecot.deliver(dsn("user1@example.com", "5.2.1", to=to))
    wait_until(lambda: daemon.report(campaign).counts.bounced == 1, 30, "the bounce in the journal")
    wait_until(lambda: dovecot.messages() == [], 30, "the bounce to be deleted")
    assert suppression_reasons(daemon) == {"user1@example.com": "bounced"}


@needs_dovecot
def test_a_wrong_password_is_reported_in_status_and_the_daemon_keeps_running(
        tmp_path, relay_factory, daemon_factory, dovecot):
    settings = mailbox_settings(dovecot, tmp_path, security="starttls", port=dovecot.port)
    Path(settings["password_file"]).write_text("wrong\n")
    daemon = bounce_daemon(daemon_factory, relay_factory(), settings)
    dovecot.deliver(dsn("user3@example.com", "5.1.1"))
    box = wait_until(lambda: (b := daemon.call(Status()).mailboxes[0]).last_error and b,
                     30, "the failed login in status")
    assert "secret" not in box.last_error and "wrong" not in box.last_error
    assert "AUTHENTICATIONFAILED" in box.last_error or "failed" in box.last_error.lower()
    assert len(dovecot.messages()) == 1  # untouched
    daemon.log_line("bounce_mailbox_failed", "mailbox=box")


# ---------------------------------------------------------------- end to end with a real Postfix

POSTFIX_WHY_NOT = private_postfix.missing() or IMAP_WHY_NOT
RELAY_USER, RELAY_PASSWORD = "relayuser", "S3cret-relay-pw"


def postfix_relay_settings(postfix, tmp_path: Path, connections: int) -> dict:
    """[servers.postfix] for a campaign through the private Postfix, with the VERP return path."""
    secret = tmp_path / "relay.secret"
    secret.write_text(RELAY_PASSWORD + "\n")
    return {"host": "127.0.0.1", "port": postfix.port, "security": "starttls",
            "tls_ca_file": str(postfix.ca_file), "tls_server_name": private_postfix.TLS_NAME,
            "username": RELAY_USER, "password_file": str(secret), "connections": connections,
            "timeout": "10s", "return_path": RETURN_PATH}


@pytest.mark.skipif(POSTFIX_WHY_NOT is not None, reason=POSTFIX_WHY_NOT or "")
def test_postfix_bounces_unknown_users_and_the_next_campaign_skips_them(
        tmp_path, daemon_factory, dovecot):
    """A campaign of 200 through a real Postfix; the next hop knows no one at gone.example,
    so Postfix sends 20 real DSNs to their VERP return paths; the next hop hands those to
    the Dovecot mailbox as a local delivery agent would."""
    def deliver_bounces(entries) -> None:
        for entry in entries:
            if entry.rcpt.startswith("bounces+"):
                dovecot.deliver(f"Return-Path: <{entry.mail_from}>\nDelivered-To: {entry.rcpt}\n"
                                .encode() + entry.data)

    sink = FakeRelay(Faults(reject_domains=["gone.example"]), on_message=deliver_bounces)
    sink.start()
    postfix = private_postfix.PrivatePostfix(sink.port, users={RELAY_USER: RELAY_PASSWORD})
    try:
        postfix.start()
        server = postfix_relay_settings(postfix, tmp_path, connections=4)
        daemon = with_mailbox(daemon_factory({"postfix": server}),
                              mailbox_settings(dovecot, tmp_path)).start()
        gone = {f"lost{i}@gone.example" for i in range(20)}
        files = make_campaign(tmp_path / "c", 180, extra_rows=[f"{a},Lost,L" for a in sorted(gone)])
        first = daemon.enqueue(*files)
        daemon.wait_done(first, timeout=120)
        assert daemon.report(first).counts.sent == 200  # Postfix took them all

        report = wait_until(lambda: (r := daemon.report(first)).counts.bounced == 20 and r, 120,
                            "20 DSNs from Postfix to be read from the mailbox")
        assert daemon.emails(first, "bounced") == gone
        assert report.counts.sent == 200 and report.counts.complained == 0
        assert {a for a, r in suppression_reasons(daemon).items() if r == "bounced"} == gone
        assert len(suppression_reasons(daemon)) == 20  # nobody else touched
        # each is moved after its commit: the last one may still be on its way
        wait_until(lambda: len(dovecot.messages()) == 0 and len(dovecot.messages(".done")) == 20,
                   30, "the 20 DSNs moved to the done folder")
        statuses = {b["status"] for b in json.loads(daemon.ctl("bounces", str(first), "--json").stdout)["bounces"]}
        assert statuses == {"5.1.1"}

        second = daemon.enqueue(*files)
        daemon.wait_done(second, timeout=120)
        assert daemon.emails(second, "suppressed") == gone
        assert daemon.report(second).counts.sent == 180
    finally:
        postfix.stop()
        postfix.remove()
        sink.stop()


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize("text, error", [
    ('[servers.isp]\nreturn_path = "bounces@example.org"\n',
     "key servers.isp.return_path: 'bounces@example.org' must hold {{ tag }} exactly once"),
    ('[bounces]\nsoft_bounce_limit = 0\n', "bounces.soft_bounce_limit"),
    ('[bounces.mailboxes.box]\nhost = "imap.example.org"\nusername = "u"\n'
     'password_file = "/p"\nsecurity = "none"\n', "key bounces.mailboxes.box.security"),
    ('[bounces.mailboxes.box]\nhost = "imap.example.org"\nusername = "u"\n',
     "password_file"),
    ('[bounces.mailboxes.box]\nprotocol = "pop3"\nhost = "pop.example.org"\nusername = "u"\n'
     'password_file = "/p"\ndone_folder = "done"\n',
     "key bounces.mailboxes.box.done_folder: POP3 has no folders"),
    ('[bounces.mailboxes.box]\nprotocol = "pop2"\nhost = "pop.example.org"\nusername = "u"\n'
     'password_file = "/p"\n', "key bounces.mailboxes.box.protocol"),
    ('[bounces.mailboxes.box]\nhost = "imap.example.org"\nusername = "u"\n'
     'password_file = "/p"\nidle_renew = "30m"\n', "key bounces.mailboxes.box.idle_renew"),
])
def test_bad_bounce_settings_are_named(tmp_path, text, error):
    from mailerd.config import ConfigError, load_config

    path = tmp_path / "mailerd.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert error in str(raised.value) and str(path) in str(raised.value)


def test_a_campaign_with_a_return_path_without_its_tag_is_refused(tmp_path, relay_factory, daemon_factory):
    daemon = daemon_factory({"isp": relay_server(relay_factory())}).start()
    campaign_file, recipients = make_campaign(tmp_path / "c", 2)
    campaign_file.write_text(campaign_file.read_text() + 'return_path = "bounces@example.org"\n')
    refused = daemon.ctl("enqueue", str(campaign_file), "--recipients", str(recipients), check=False)
    assert refused.returncode != 0
    assert "return_path" in refused.stderr and "{{ tag }}" in refused.stderr
    assert "Traceback" not in refused.stderr


# ---------------------------------------------------------------- POP3, IDLE, reload, mailto (issue 14)

POP3_WHY_NOT = dovecot_imap.missing(pop3=True)
needs_pop3 = pytest.mark.skipif(POP3_WHY_NOT is not None, reason=POP3_WHY_NOT or "")
MAILTO = "unsubscribe+{{ campaign_uid }}-{{ line }}-{{ token }}@example.org"


@pytest.fixture
def dovecot_pop3():
    server = dovecot_imap.PrivateDovecot(pop3=True).start()
    yield server
    server.stop()
    server.remove()


def pop3_settings(server: dovecot_imap.PrivateDovecot, tmp_path: Path, security: str = "tls") -> dict:
    settings = mailbox_settings(server, tmp_path, protocol="pop3", security=security,
                                port=server.pop3s_port if security == "tls" else server.pop3_port)
    del settings["done_folder"]
    return settings


def mailbox_status(daemon, name: str = "box"):
    return next(b for b in daemon.call(Status()).mailboxes if b.name == name)


def reload_config(daemon, expect: str) -> None:
    """SIGHUP, and wait for the daemon's verdict (`config_reloaded` or `config_reload_failed`)."""
    import signal
    count = daemon.log().count(expect)
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: daemon.log().count(expect) > count, 30, f"{expect} after SIGHUP")


def set_bounces(daemon, mailboxes: dict[str, dict], **bounces) -> None:
    """Rewrite the config's [bounces] (everything after its first [bounces] line)."""
    text = daemon.config.read_text()
    text = text[:text.index("\n[bounces]")] if "\n[bounces]" in text else text
    sections = {"bounces": {"poll_interval": "0.5s", **bounces},
                **{f"bounces.mailboxes.{n}": v for n, v in mailboxes.items()}}
    for name, values in sections.items():
        text += f"\n[{name}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items())
    daemon.config.write_text(text)


def sent_to(relay) -> dict[str, str]:
    """Recipient -> the envelope sender (VERP return path) the relay got for them."""
    return {r.rcpt: r.mail_from for r in relay.messages()}


@needs_pop3
@pytest.mark.parametrize("security", ["tls", "starttls"])
def test_bounces_in_a_pop3_mailbox_are_deleted_only_after_the_commit(
        tmp_path, relay_factory, daemon_factory, dovecot_pop3, security):
    relay = relay_factory()
    daemon = bounce_daemon(daemon_factory, relay, pop3_settings(dovecot_pop3, tmp_path, security))
    campaign = daemon.enqueue(*make_campaign(tmp_path / "c", 5))
    daemon.wait_done(campaign)
    to = sent_to(relay)
    hard = dsn("user1@example.com", "5.1.1", to=to["user1@example.com"])
    dovecot_pop3.deliver(hard)
    unreadable = b"From: someone@example.net\nTo: bounces@example.org\nSubject: hi\n\njust hi\n"
    dovecot_pop3.deliver(unreadable)
    dovecot_pop3.deliver(arf("user2@example.com", to=to["user2@example.com"]))

    wait_until(lambda: len(dovecot_pop3.messages()) == 1, 30, "the two reports deleted over POP3")
    assert dovecot_pop3.messages() == [unreadable]
    assert suppression_reasons(daemon) == {"user1@example.com": "bounced",
                                           "user2@example.com": "complained"}
    box = mailbox_status(daemon)
    assert (box.protocol, box.idle, box.last_error, box.read) == ("pop3", "off", None, 2)
    assert len(box.left) == 1 and box.left[0].startswith("uidl ") and "neither a bounce" in box.left[0]
    assert "bounce mailbox box (pop3)" in daemon.ctl("status").stdout

    # the same bounce again (a session that dropped before QUIT): deleted, nothing changes twice
    dovecot_pop3.deliver(hard)
    wait_until(lambda: len(dovecot_pop3.messages()) == 1, 30, "the repeated bounce deleted")
    assert daemon.report(campaign).counts.bounced == 1
    assert len(json.loads(daemon.ctl("bounces", str(campaign), "--json").stdout)["bounces"]) == 2
    daemon.log_line("bounce_seen_before", "mailbox=box")


@needs_dovecot
def test_with_idle_a_bounce_is_read_at_once_not_after_the_poll_interval(
        tmp_path, relay_factory, daemon_factory, dovecot):
    relay = relay_factory()
    daemon = bounce_daemon(daemon_factory, relay, mailbox_settings(dovecot, tmp_path),
                           poll_interval="300s")
    campaign = daemon.enqueue(*make_campaign(tmp_path / "c", 3))
    daemon.wait_done(campaign)
    wait_until(lambda: mailbox_status(daemon).idle == "on" and mailbox_status(daemon).last_poll,
               30, "the IDLE connection up and the first poll done")
    dovecot.deliver(dsn("user1@example.com", "5.1.1", to=sent_to(relay)["user1@example.com"]))
    wait_until(lambda: daemon.report(campaign).counts.bounced == 1, 10,
               "the bounce read within seconds (the poll interval is 5 minutes)")
    wait_until(lambda: len(dovecot.messages(".done")) == 1, 10, "the bounce moved")
    daemon.log_line("bounce_idle_started", "mailbox=box")
    assert "idle on since" in daemon.ctl("status").stdout


@needs_dovecot
def test_idle_is_renewed_on_time_and_comes_back_after_the_server_drops(
        tmp_path, relay_factory, daemon_factory, dovecot):
    relay = relay_factory()
    daemon = bounce_daemon(daemon_factory, relay, mailbox_settings(dovecot, tmp_path, idle_renew="1s"),
                           poll_interval="300s")
    campaign = daemon.enqueue(*make_campaign(tmp_path / "c", 3))
    daemon.wait_done(campaign)
    logins = lambda: dovecot.log().count("Login: user=<bounces>")  # noqa: E731
    first = logins()
    wait_until(lambda: logins() >= first + 3, 30, "IDLE re-issued every second on a new login")

    dovecot.stop()
    wait_until(lambda: mailbox_status(daemon).idle == "failing", 30, "the dropped IDLE in status")
    assert mailbox_status(daemon).idle_error
    dovecot.launch()
    wait_until(lambda: mailbox_status(daemon).idle == "on", 30, "IDLE back after the reconnect")
    to = sent_to(relay)
    dovecot.deliver(dsn("user2@example.com", "5.1.1", to=to["user2@example.com"]))
    wait_until(lambda: daemon.report(campaign).counts.bounced == 1, 10, "the bounce read at once")
    daemon.log_line("bounce_idle_failed", "state=failing")


@needs_dovecot
def test_without_idle_offered_the_mailbox_is_polled(tmp_path, relay_factory, daemon_factory):
    server = dovecot_imap.PrivateDovecot(
        extra="imap_capability = IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE LITERAL+ UIDPLUS MOVE\n"
    ).start()
    try:
        relay = relay_factory()
        daemon = bounce_daemon(daemon_factory, relay, mailbox_settings(server, tmp_path))
        campaign = daemon.enqueue(*make_campaign(tmp_path / "c", 3))
        daemon.wait_done(campaign)
        box = wait_until(lambda: (b := mailbox_status(daemon)).idle == "not offered" and b, 30,
                         "IDLE not offered in status")
        assert "does not offer IDLE" in box.idle_error
        server.deliver(dsn("user0@example.com", "5.1.1", to=sent_to(relay)["user0@example.com"]))
        wait_until(lambda: daemon.report(campaign).counts.bounced == 1, 30, "the bounce polled")
    finally:
        server.stop()
        server.remove()


@needs_pop3
def test_a_reload_adds_removes_and_changes_mailboxes_and_a_bad_one_changes_nothing(
        tmp_path, relay_factory, daemon_factory, dovecot_pop3):
    relay = relay_factory()
    imap = mailbox_settings(dovecot_pop3, tmp_path)
    daemon = bounce_daemon(daemon_factory, relay, imap)
    campaign = daemon.enqueue(*make_campaign(tmp_path / "c", 6))
    daemon.wait_done(campaign)
    to = sent_to(relay)
    wait_until(lambda: mailbox_status(daemon).last_poll, 30, "the first poll")

    # removed "box", added "pop" (POP3): its bounce is deleted, not moved
    set_bounces(daemon, {"pop": pop3_settings(dovecot_pop3, tmp_path)})
    reload_config(daemon, "config_reloaded")
    assert [b.name for b in daemon.call(Status()).mailboxes] == ["pop"]
    dovecot_pop3.deliver(dsn("user1@example.com", "5.1.1", to=to["user1@example.com"]))
    wait_until(lambda: daemon.report(campaign).counts.bounced == 1, 30, "read over POP3")
    wait_until(lambda: dovecot_pop3.messages() == [], 30, "deleted over POP3")
    assert dovecot_pop3.messages(".done") == []
    daemon.log_line("bounces_reloaded", "added=pop", "removed=box")

    # a bad [bounces] (an unreadable password file; an unknown key) fails the reload: "pop" stays
    for bad in ({"pop": {**pop3_settings(dovecot_pop3, tmp_path), "password_file": "/nonexistent"}},
                {"pop": {**pop3_settings(dovecot_pop3, tmp_path), "folders": "x"}}):
        set_bounces(daemon, bad)
        failed = daemon.log().count("config_reload_failed")
        reload_config(daemon, "config_reload_failed")
        assert daemon.log().count("config_reload_failed") == failed + 1
    assert "bounces.mailboxes.pop" in daemon.log_line("config_reload_failed", "/nonexistent")
    assert [b.name for b in daemon.call(Status()).mailboxes] == ["pop"]
    dovecot_pop3.deliver(dsn("user2@example.com", "5.1.1", to=to["user2@example.com"]))
    wait_until(lambda: daemon.report(campaign).counts.bounced == 2, 30, "the old mailbox still read")

    # changed: "pop" becomes an IMAP mailbox that moves what it read
    set_bounces(daemon, {"pop": imap})
    reload_config(daemon, "bounces_reloaded")
    daemon.log_line("bounces_reloaded", "changed=pop")
    assert mailbox_status(daemon, "pop").protocol == "imap"
    dovecot_pop3.deliver(dsn("user3@example.com", "5.1.1", to=to["user3@example.com"]))
    wait_until(lambda: len(dovecot_pop3.messages(".done")) == 1, 30, "moved over IMAP")
    assert daemon.report(campaign).counts.bounced == 3


def unsubscribe_addresses(relay) -> dict[str, str]:
    """Recipient -> the mailto address of the List-Unsubscribe header they received."""
    import re
    addresses = {}
    for entry in relay.messages():
        header = email.message_from_bytes(entry.data)["List-Unsubscribe"]
        addresses[entry.rcpt] = re.search(r"<mailto:([^>]+)>", str(header)).group(1)
    return addresses


def unsubscribe_mail(sender: str, to: str) -> bytes:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = "unsubscribe"
    message.set_content("This message was automatically generated by Gmail.\n")
    return message.as_bytes()


@needs_dovecot
def test_a_mail_to_the_list_unsubscribe_address_unsubscribes_and_a_forged_one_does_not(
        tmp_path, relay_factory, daemon_factory, dovecot):
    relay = relay_factory()
    daemon = bounce_daemon(daemon_factory, relay, mailbox_settings(dovecot, tmp_path))
    campaign_file, recipients = make_campaign(tmp_path / "c", 6)
    campaign_file.write_text(campaign_file.read_text()
                             + f'list_unsubscribe = {{ mailto = "{MAILTO}" }}\n')
    campaign = daemon.enqueue(campaign_file, recipients)
    daemon.wait_done(campaign)
    mailto = unsubscribe_addresses(relay)
    assert mailto["user1@example.com"].startswith("unsubscribe+")

    # user1 from another address of theirs (a forwarded mailbox); user2's mail system folded case
    dovecot.deliver(unsubscribe_mail("someone.else@example.net", mailto["user1@example.com"]))
    dovecot.deliver(unsubscribe_mail("user2@example.com", mailto["user2@example.com"].upper()))
    # forged: user3's line with user4's token, and a token with one character changed
    line3 = mailto["user3@example.com"].split("-")[1]
    parts4 = mailto["user4@example.com"].split("-", 2)
    dovecot.deliver(unsubscribe_mail("x@example.net", f"{parts4[0]}-{line3}-{parts4[2]}"))
    token5 = mailto["user5@example.com"]
    last = token5[-len("@example.org") - 1]  # the token's last character, changed (not its case)
    changed = token5[:-len("@example.org") - 1] + ("A" if last.lower() != "a" else "B") + "@example.org"
    dovecot.deliver(unsubscribe_mail("user5@example.com", changed))

    wait_until(lambda: len(dovecot.messages(".done")) == 4, 30, "the four mails read and moved")
    assert suppression_reasons(daemon) == {"user1@example.com": "unsubscribed",
                                           "user2@example.com": "unsubscribed"}
    unmatched = json.loads(daemon.ctl("bounces", "--json").stdout)["unmatched"]
    assert sorted(u["format"] for u in unmatched) == ["unsubscribe", "unsubscribe"]
    daemon.log_line("bounce_unsubscribed", f"campaign={campaign}", "address=user1@example.com",
                    "reason=unsubscribed")
    assert daemon.report(campaign).counts.bounced == 0  # an unsubscribe is no bounce

    nxt = daemon.enqueue(*make_campaign(tmp_path / "c2", 6))
    daemon.wait_done(nxt)
    assert daemon.emails(nxt, "suppressed") == {"user1@example.com", "user2@example.com"}


def test_a_bounce_quoting_the_list_unsubscribe_header_is_no_unsubscribe():
    address = f"unsubscribe+{UID}-3-{tokens.make(KEY, UID, 'user3@example.com')}@example.org"
    original = original_headers(UID, 3, "user3@example.com") + f"List-Unsubscribe: <mailto:{address}>\n"
    understood = classify.understand(dsn("user3@example.com", "5.1.1", to=tagged(UID, 3),
                                         original=original), KEY)
    assert understood.format == "dsn" and understood.unsubscribes == ()
    request = classify.understand(unsubscribe_mail("a@example.net", address), KEY)
    token = address.split("-", 2)[2].removesuffix("@example.org")
    assert request.unsubscribes == (classify.UnsubscribeRequest(UID, 3, token),)
    assert classify.genuine(KEY, request.unsubscribes[0], "user3@example.com")
    assert classify.genuine(KEY, request.unsubscribes[0]._replace(
        token=request.unsubscribes[0].token.swapcase()), "USER3@example.com")
    assert not classify.genuine(KEY, request.unsubscribes[0], "user4@example.com")


def test_an_unsubscribe_mail_read_twice_changes_nothing_twice(journal):
    campaign = sent_campaign(journal, UID, 3)
    address = journal.recipient_at(UID, 2)
    assert address == (campaign, "user2@example.com")
    assert journal.recipient_at(UID, 9) is None and journal.recipient_at(UID2, 2) is None
    first = journal.apply_unsubscribe("s" * 64, "box", "from x: unsubscribe", [(*address, "detail")])
    assert first.new and first.suppressed == [("user2@example.com", "unsubscribed")]
    again = journal.apply_unsubscribe("s" * 64, "box", "from x: unsubscribe", [(*address, "detail")])
    assert not again.new and again.suppressed == []
    assert suppressed(journal) == {"user2@example.com": "unsubscribed"}
    assert journal.unmatched_bounces(10) == []
