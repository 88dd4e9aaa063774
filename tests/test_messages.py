"""Issue 6 end to end: messages parsed back at the relay (MIME, personalisation,
header safety, DKIM, List-Unsubscribe, Message-IDs), suppression, CSV lists,
preview, test-send and report --csv."""

from __future__ import annotations

import base64
import csv
import email
import email.parser
import email.policy
import io
import socket
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import dkim
import nacl.signing
from aiosmtpd.controller import Controller

from conftest import relay_server, wait_until
from mailerctl.campaign import RecipientList
from mailerd.message import tokens
from mailerd.testing.relay import Faults

RSA_KEY = """-----BEGIN RSA PRIVATE KEY-----
MIICXAIBAAKBgQDNHWBe8Z2Y7i63q7GRKDmunf0rGQme5srxygFu0dmiaKYukcpx
KZAFDHO8B2jiE3qO3/kFiBe+c6felgKeIvIoW0nfVfH1tBjcGuwMnrVIwQB63t/0
nNI6Xz2I3FNH40fXZhaUgCjzkqvwa5YJKmOPGt3Llkmic/I8PV9lLauoxwIDAQAB
AoGAX74JoOfJN3xeZC+JiActvZtTdE2QlxKFwo0XVCIyI0QT5gL5aw8KgcDJOQiA
ZZ7QA2b6dyGKa8TSo+yDtkr7mxKjQ0flOcHnV/Jk8pykAzfE+++5c6SYY+Nxu3Qu
q+QDjYkGLX/VkaIq9kx6x3J/Rndje5N77fE9UAs5pJ595ZECQQDxU0kJtQOLRIeR
phX4bgmQzMxKNpqIrMu0uXBqPF/mtOd+mkLHPuSfJGRjsNTiYtCfCpZZcN1uy5pK
hMqRUz5PAkEA2ZZmiZ/9X0Yb97AVhBI1aEkkJLrdL+vAsfvdrtXOpkZJIeiJNIhn
G2RUG+dY39FWQ/lpDBRVNSAPnO3WBHQICQJBAKAYJWsIJ+q7MsjACvE9ZqEmDBzr
rocfQyCIqPgBR4nQ14ZYphZyNc8RoHu2MvRgo4/uwSFiy7OV5Kys/Yl9VOcCQDj8
VuZ8bFNjfTelej0Yt7wUS88C0aMXT2RN3oVHodOSXNzwld6YSsi1wgF82Z3kqX8r
9wMe4CIFv5EOCRspeGECQCUjJdog9hlPaISxcPRhgCYh/XFJRqHaZ56fZz7MWvPX
4HqnqnDnBkdXQGaIBf+08IpRpB7Hc2Aks9c+vhNQEho=
-----END RSA PRIVATE KEY-----
"""
RSA_PUBLIC = ("MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDNHWBe8Z2Y7i63q7GRKDmunf0rGQme5srxygFu0dmia"
              "KYukcpxKZAFDHO8B2jiE3qO3/kFiBe+c6felgKeIvIoW0nfVfH1tBjcGuwMnrVIwQB63t/0nNI6Xz2I3FN"
              "H40fXZhaUgCjzkqvwa5YJKmOPGt3Llkmic/I8PV9lLauoxwIDAQAB")
ED_SEED = bytes(range(32))
ED_KEY = base64.b64encode(ED_SEED).decode() + "\n"  # dknewkey's format
ED_PUBLIC = base64.b64encode(bytes(nacl.signing.SigningKey(ED_SEED).verify_key)).decode()
# the least a campaign needs: its text file is "t.txt"
MINIMAL = ['name = "n"', 'from = "news@example.org"', 'subject = "s"', 'text = "t.txt"']


def parse(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)


def text_of(part) -> str:
    return part.get_content().replace("\r\n", "\n")


def dkim_verifies(data: bytes, kind: str, public: str, selector: str, domain: str) -> bool:
    def dns(name, timeout=5):
        assert name == f"{selector}._domainkey.{domain}.".encode(), name
        return f"v=DKIM1; k={kind}; p={public}".encode()
    return dkim.verify(data, dnsfunc=dns)


def write_campaign(directory: Path, lines: list[str], rows: list[str], files: dict[str, bytes | str] = {}
                   ) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (directory / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    campaign = directory / "campaign.toml"
    campaign.write_text("\n".join(lines) + "\n", encoding="utf-8")
    recipients = directory / "list.csv"
    recipients.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return campaign, recipients


def minimal_campaign(directory: Path, rows: list[str]) -> tuple[Path, Path]:
    """A MINIMAL campaign with the text "t" and these list rows (the header row first)."""
    return write_campaign(directory, MINIMAL, rows, {"t.txt": "t\n"})


def test_mime_personalisation_unsubscribe_and_rsa_dkim_at_the_relay(tmp_path, relay_factory, daemon_factory):
    relay = relay_factory()
    daemon = daemon_factory({"isp": relay_server(relay)}).start()
    pdf = bytes(range(256)) * 300  # 76.8 KB, binary
    cid = daemon.enqueue(*write_campaign(tmp_path / "c", [
        'name = "Rapport"', 'from = "Zoë Müller <news@example.org>"', 'reply_to = "help@example.org"',
        'subject = "{% if vip %}★ {% endif %}Grüße, {{ first_name | default(\'Freund\', true) }}"',
        'text = "body.txt"', 'html = "body.html"', 'attachments = ["rapport.pdf", "données.csv"]',
        'headers = { "X-Campaign" = "nov-{{ code }}" }',
        'list_unsubscribe = { mailto = "unsubscribe@example.org", url = "https://example.org/u/{{ token }}" }',
        'dkim = { domain = "example.org", selector = "s2024", key_file = "dkim.pem" }',
    ], ["email,first_name,code,vip", "ann@example.com,Ann,C1,", "bob@example.com,,C2,yes",
        "chloé@example.com,Chloé,C3,"],
        {"body.txt": "Hallo {{ first_name }}, Code {{ code }}.\n", "body.html": "<p>Hallo {{ first_name }}</p>\n",
         "rapport.pdf": pdf, "données.csv": "a;b\né;ü\n", "dkim.pem": RSA_KEY}))
    report = daemon.wait_done(cid)
    assert report.counts.sent == 3
    received = {r.rcpt: r for r in relay.messages()}
    assert set(received) == {"ann@example.com", "bob@example.com", "chloé@example.com"}
    key = (daemon.state_dir / tokens.KEY_FILE).read_bytes()
    uid = received["ann@example.com"].data.split(b"Message-ID: <", 1)[1].split(b".", 1)[0].decode()
    for rcpt, got in received.items():
        assert dkim_verifies(got.data, "rsa", RSA_PUBLIC, "s2024", "example.org"), rcpt
        message = parse(got.data)
        assert message.get_content_type() == "multipart/mixed"
        alternative, pdf_part, csv_part = message.iter_parts()
        assert alternative.get_content_type() == "multipart/alternative"
        assert pdf_part.get_filename() == "rapport.pdf" and pdf_part.get_content_type() == "application/pdf"
        assert pdf_part.get_payload(decode=True) == pdf
        assert csv_part.get_filename() == "données.csv"
        assert csv_part.get_payload(decode=True) == "a;b\né;ü\n".encode()
        assert str(message["From"]) == "Zoë Müller <news@example.org>"
        assert message["Reply-To"] == "help@example.org"
        assert message["MIME-Version"] == "1.0" and message["Date"]
        unsubscribe = " ".join(str(message["List-Unsubscribe"]).split())
        token = unsubscribe.rsplit("/u/", 1)[1].rstrip(">")
        assert unsubscribe == f"<mailto:unsubscribe@example.org>, <https://example.org/u/{token}>"
        assert tokens.verify(key, uid, rcpt, token)
        assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert message["DKIM-Signature"] and "list-unsubscribe" in message["DKIM-Signature"]
    ann = parse(received["ann@example.com"].data)
    assert ann["Subject"] == "Grüße, Ann" and ann["X-Campaign"] == "nov-C1"
    assert text_of(ann.get_body(("plain",))) == "Hallo Ann, Code C1.\n"
    assert text_of(ann.get_body(("html",))) == "<p>Hallo Ann</p>\n"
    assert parse(received["bob@example.com"].data)["Subject"] == "★ Grüße, Freund"
    chloe = received["chloé@example.com"]
    assert parse(chloe.data)["Subject"] == "Grüße, Chloé"
    # an internationalised address: sent with SMTPUTF8, its headers in UTF-8 (RFC 6532)
    assert "To: chloé@example.com\r\n".encode() in chloe.data
    assert ann["Message-ID"] == f"<{uid}.2@example.org>"


def test_merge_values_cannot_add_headers_at_the_relay(tmp_path, relay_factory, daemon_factory):
    relay = relay_factory()
    daemon = daemon_factory({"isp": relay_server(relay)}).start()
    evil = '"Hi\r\nBcc: victim@x.example"'
    campaign, recipients = write_campaign(tmp_path / "c", [
        'name = "n"', 'from = "news@example.org"', 'subject = "{{ s }}"', 'text = "t.txt"',
        'headers = { "X-Tag" = "{{ tag }}" }',
    ], ["email,s,tag", f"a@example.com,{evil},ok", f"b@example.com,fine,{evil}",
        "c@example.com,fine,ok", 'd@example.com,"Hi\nBcc: victim@x.example",ok'],
        {"t.txt": "Body with {{ s }}\n"})
    # found at enqueue (issue 15), not at send time: --skip-unsafe keeps those rows as invalid
    cid = int(daemon.ctl("enqueue", str(campaign), "--recipients", str(recipients), "--skip-unsafe").stdout)
    report = daemon.wait_done(cid)
    assert report.counts.sent == 1 and report.counts.invalid == 3 and report.counts.failed == 0
    assert [r.rcpt for r in relay.messages()] == ["c@example.com"]
    for got in relay.messages():
        assert "Bcc" not in parse(got.data) and b"victim" not in got.data
    invalid = {r.email: r.reply for r in daemon.report(cid, "invalid").recipients}
    assert "column 's': control character" in invalid["a@example.com"]
    assert "column 'tag': control character" in invalid["b@example.com"]


def test_ed25519_server_dkim_and_message_id_stable_across_a_forced_resend(
        tmp_path, relay_factory, daemon_factory):
    relay = relay_factory(Faults(swallow_every=4))
    key_file = tmp_path / "ed.key"
    key_file.write_text(ED_KEY)
    daemon = daemon_factory({"isp": relay_server(relay, dkim_domain="example.org", dkim_selector="ed",
                                                 dkim_key_file=str(key_file))}).start()
    cid = daemon.send_campaign(tmp_path / "c", 12)
    report = daemon.wait_done(cid)
    assert report.counts.uncertain == 3
    uncertain = daemon.emails(cid, "uncertain")
    relay.set_faults(Faults())
    daemon.ctl("resume", str(cid), "--include-uncertain")
    assert daemon.wait_done(cid).counts.sent == 12
    ids: dict[str, list[str]] = {}
    for got in relay.messages():
        assert dkim_verifies(got.data, "ed25519", ED_PUBLIC, "ed", "example.org"), got.rcpt
        assert "a=ed25519-sha256" in parse(got.data)["DKIM-Signature"]
        ids.setdefault(got.rcpt, []).append(parse(got.data)["Message-ID"])
    resent = {rcpt for rcpt, found in ids.items() if len(found) == 2}
    assert resent == uncertain
    assert all(len(set(found)) == 1 for found in ids.values())  # same ID on both copies
    assert len({found[0] for found in ids.values()}) == 12
    assert b"AAECAwQF" not in daemon.log_path.read_bytes()  # the key is never logged


def test_suppressed_addresses_are_never_received(tmp_path, relay_factory, daemon_factory):
    relay = relay_factory(Faults(reply_delay=0.02))
    daemon = daemon_factory({"isp": relay_server(relay, connections=1)}).start()
    daemon.ctl("suppress", "add", "User3@Example.com", "user5@example.com", "--reason", "unsubscribed")
    cid = daemon.send_campaign(tmp_path / "c", 200)
    wait_until(lambda: len(relay.messages()) >= 5, 30, "5 messages")
    late = [f"user{i}@example.com" for i in range(150, 200, 7)]  # still queued: suppressed now
    out = daemon.ctl("suppress", "add", *late).stdout
    assert f"added {len(late)} of {len(late)}" in out
    report = daemon.wait_done(cid, timeout=90)
    got = set(relay.count_by_rcpt())
    assert not got & {"user3@example.com", "user5@example.com", *late}
    assert report.counts.suppressed == 2 + len(late)
    assert report.counts.sent == 200 - 2 - len(late)
    suppressed = {r.email: r.reply for r in daemon.report(cid, "suppressed").recipients}
    assert "(unsubscribed)" in suppressed["user3@example.com"]
    assert "(manual)" in suppressed[late[-1]]
    text = daemon.ctl("report", str(cid), "--state", "suppressed").stdout
    assert "user5@example.com" in text
    listed = list(csv.DictReader(io.StringIO(daemon.ctl("suppress", "list").stdout)))
    assert {r["email"] for r in listed} >= {"User3@Example.com", *late}
    daemon.ctl("suppress", "remove", "user3@example.com")
    assert "User3@Example.com" not in daemon.ctl("suppress", "list").stdout


def test_suppress_import_of_100k_rows_is_fast(tmp_path, relay_factory, daemon_factory):
    relay = relay_factory()
    daemon = daemon_factory({"isp": relay_server(relay)}).start()
    path = tmp_path / "unsubscribed.csv"
    path.write_text("\ufeffemail;name\n" + "".join(f"u{i}@example.com;N{i}\n" for i in range(100_000))
                    + "not an address;x\n")
    started = time.monotonic()
    out = daemon.ctl("suppress", "import", str(path), "--reason", "unsubscribed", timeout=120).stdout
    elapsed = time.monotonic() - started
    assert "100001 addresses, 100000 added, 0 already listed, 1 invalid" in out
    assert elapsed < 30, f"import took {elapsed:.1f}s"
    cid = daemon.enqueue(*minimal_campaign(tmp_path / "c",
                                           ["email", "u99999@example.com", "u100000@example.com"]))
    report = daemon.wait_done(cid)
    assert report.counts.suppressed == 1 and report.counts.sent == 1
    assert set(relay.count_by_rcpt()) == {"u100000@example.com"}


def test_csv_edge_cases_bom_semicolons_quotes_and_newlines(tmp_path, relay_factory, daemon_factory):
    relay = relay_factory()
    daemon = daemon_factory({"isp": relay_server(relay)}).start()
    directory = tmp_path / "c"
    campaign, _ = write_campaign(directory, [
        'name = "n"', 'from = "news@example.org"', 'subject = "Hi {{ name }}"', 'text = "t.txt"'],
        ["email"], {"t.txt": "Address: {{ street }}\n"})
    recipients = directory / "semi.csv"
    recipients.write_bytes("\ufeffEmail;name;street\r\n"
                           'a@example.com;"Smith; Ann";"1 Main St,\r\nFlat 2"\r\n'
                           'b@example.com;"Bob ""the"" Builder";x\r\n'
                           'a@EXAMPLE.COM;dup;y\r\n'
                           'broken;z;z\r\n'.encode("utf-8"))
    cid = daemon.enqueue(campaign, recipients)
    report = daemon.wait_done(cid)
    assert report.counts.sent == 2 and report.counts.invalid == 2
    received = {r.rcpt: parse(r.data) for r in relay.messages()}
    assert received["a@example.com"]["Subject"] == "Hi Smith; Ann"
    assert text_of(received["a@example.com"]) == "Address: 1 Main St,\nFlat 2\n"
    assert received["b@example.com"]["Subject"] == 'Hi Bob "the" Builder'
    invalid = {r.line: r.reply for r in daemon.report(cid, "invalid").recipients}
    assert sorted(invalid) == [5, 6] and invalid[5] == "duplicate of line 2" and "@" in invalid[6]
    rows = list(csv.DictReader(io.StringIO(daemon.ctl("report", str(cid), "--csv").stdout)))
    assert [r["email"] for r in rows] == ["a@example.com", "b@example.com", "a@EXAMPLE.COM", "broken"]
    assert rows[0]["state"] == "sent" and rows[0]["code"] == "250" and rows[0]["sent_at"]
    assert rows[0]["attempts"] == "1" and "queued as" in rows[0]["reply"]
    assert rows[2]["state"] == "invalid" and rows[2]["sent_at"] == ""
    only_invalid = daemon.ctl("report", str(cid), "--csv", "--state", "invalid").stdout
    assert len(list(csv.DictReader(io.StringIO(only_invalid)))) == 2


def test_a_million_row_list_streams_in_bounded_memory(tmp_path):
    path = tmp_path / "big.csv"
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\ufeffemail;first_name;code\n")
        chunk = "".join(f'user{i}@example.com;"Name, {i}";C{i:07d}\n' for i in range(10_000))
        for _ in range(100):
            handle.write(chunk)
    tracemalloc.start()
    try:
        recipients = RecipientList(path)
        count = 0
        for row in recipients.rows():
            count += 1
        recipients.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 1_000_000 and recipients.delimiter == ";"
    assert peak < 4 * 1024 * 1024, f"peak {peak} bytes for a {path.stat().st_size} byte list"


def test_enqueue_errors_name_the_key(tmp_path, relay_factory, daemon_factory):
    relay = relay_factory()
    daemon = daemon_factory({"isp": relay_server(relay)}).start()
    cases = [
        (['attachments = ["missing.pdf"]'], "attachments[0] = 'missing.pdf': cannot read"),
        (['reply_to = "not an address"'], "reply_to"),
        (['dkim = { domain = "example.org", selector = "s", key_file = "bad.key" }'], "dkim"),
        (['dkim = { domain = "example.org", selector = "s", key_file = "none.key" }'], "dkim.key_file"),
        (['headers = { "Bcc" = "x@y.z" }'], "headers: 'Bcc' is set by mailerd"),
        (['list_unsubscribe = { url = "http://example.org/u" }'], "list_unsubscribe.url"),
        (['subject = "{{ nickname }}"'], "subject: template uses 'nickname'"),
        (['from = "bad"'], "from"),
    ]
    for number, (extra, expected) in enumerate(cases):
        keys = {line.split(" = ")[0] for line in extra}
        lines = [line for line in MINIMAL if line.split(" = ")[0] not in keys] + extra
        campaign, recipients = write_campaign(tmp_path / f"c{number}", lines, ["email", "a@example.com"],
                                              {"t.txt": "t\n", "bad.key": "garbage\n"})
        result = daemon.ctl("enqueue", str(campaign), "--recipients", str(recipients), check=False)
        assert result.returncode in (1, 2), (expected, result.stdout)
        assert expected in result.stderr, (expected, result.stderr)


def test_preview_prints_the_message_of_row_n(tmp_path):
    campaign, recipients = write_campaign(tmp_path / "c", [
        'name = "n"', 'from = "Zoë <news@example.org>"', 'subject = "Hi {{ name }}"', 'text = "t.txt"',
        'list_unsubscribe = { url = "https://example.org/u/{{ token }}" }', 'attachments = ["a.txt"]'],
        ["email,name", "a@example.com,Ann", "b@example.com,Bob"],
        {"t.txt": "Dear {{ name }}\n", "a.txt": "attached\n"})
    import subprocess
    result = subprocess.run([sys.executable, "-m", "mailerctl", "preview", str(campaign), "--recipients",
                             str(recipients), "--row", "2"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "campaign uid 'preview'" in result.stderr
    message = email.parser.Parser(policy=email.policy.default).parsestr(result.stdout)
    assert message["To"] == "b@example.com" and message["Subject"] == "Hi Bob"
    assert message["Message-ID"] == "<preview.3@example.org>"
    assert text_of(message.get_body(("plain",))) == "Dear Bob\n"
    assert [p.get_filename() for p in message.iter_attachments()] == ["a.txt"]


def test_test_send_goes_through_the_first_server_outside_any_campaign(tmp_path, relay_factory,
                                                                      daemon_factory):
    relay = relay_factory()
    daemon = daemon_factory({"isp": relay_server(relay)}).start()
    campaign, _ = write_campaign(tmp_path / "c", [
        'name = "n"', 'from = "news@example.org"', 'subject = "Hi {{ name }}"', 'text = "t.txt"'],
        ["email"], {"t.txt": "Dear {{ name }}\n"})
    out = daemon.ctl("test-send", str(campaign), "--to", "me@example.com", "--fields", "name=Tess").stdout
    assert out.startswith("isp: 250 ")
    [got] = relay.messages()
    assert got.rcpt == "me@example.com" and parse(got.data)["Subject"] == "Hi Tess"
    # an internationalised address needs SMTPUTF8, which the relay offers after EHLO
    out = daemon.ctl("test-send", str(campaign), "--to", "jörg@example.com", "--fields", "name=J").stdout
    assert out.startswith("isp: 250 ")
    assert [m.rcpt for m in relay.messages()] == ["me@example.com", "jörg@example.com"]
    refused = daemon.ctl("test-send", str(campaign), "--to", "me@example.com", check=False)
    assert refused.returncode == 1 and "name" in refused.stderr
    assert "no campaigns" in daemon.ctl("list").stdout


def _starttls_answered_250(port_ready: list[int], stop: "threading.Event") -> None:
    """A relay that offers STARTTLS and answers it with 250 (review L4): a client that
    took that for success would send nothing and report 250."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(0.2)
        port_ready.append(server.getsockname()[1])
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn, conn.makefile("rb") as lines:
                conn.sendall(b"220 relay.test ESMTP\r\n")
                for line in lines:
                    verb = line.split()[0].upper() if line.split() else b""
                    if verb == b"EHLO":
                        conn.sendall(b"250-relay.test\r\n250 STARTTLS\r\n")
                    elif verb == b"QUIT":
                        conn.sendall(b"221 bye\r\n")
                        break
                    else:
                        conn.sendall(b"250 ok\r\n")


def test_test_send_reports_success_only_for_a_250_after_the_dot(tmp_path, daemon_factory):
    ports: list[int] = []
    stop = threading.Event()
    relay = threading.Thread(target=_starttls_answered_250, args=(ports, stop), daemon=True)
    relay.start()
    try:
        wait_until(lambda: ports, 10, "the relay to listen")
        daemon = daemon_factory({"isp": {"host": "127.0.0.1", "port": ports[0],
                                         "security": "starttls"}}).start()
        campaign, _ = minimal_campaign(tmp_path / "c", ["email"])
        result = daemon.ctl("test-send", str(campaign), "--to", "me@example.com", check=False)
        assert result.returncode != 0, result.stdout
        assert "nothing was sent" in result.stderr and "250" not in result.stdout
    finally:
        stop.set()
        relay.join(10)


class _NoUtf8Handler:
    def __init__(self) -> None:
        self.rcpts: list[str] = []

    async def handle_DATA(self, server, session, envelope):
        self.rcpts += envelope.rcpt_tos
        return "250 OK"


def test_internationalised_address_fails_clearly_without_smtputf8(tmp_path, daemon_factory):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    handler = _NoUtf8Handler()
    controller = Controller(handler, hostname="127.0.0.1", port=port,
                            enable_SMTPUTF8=False)
    controller.start()
    try:
        daemon = daemon_factory({"plain": {"host": "127.0.0.1", "port": port, "security": "none"}}).start()
        cid = daemon.enqueue(*minimal_campaign(tmp_path / "c",
                                               ["email", "ascii@example.com", "jörg@example.com"]))
        report = daemon.wait_done(cid)
        assert report.counts.sent == 1 and report.counts.failed == 1
        [failed] = daemon.report(cid, "failed").recipients
        assert failed.reply == "relay does not offer SMTPUTF8, required for <jörg@example.com>"
        assert handler.rcpts == ["ascii@example.com"]
    finally:
        controller.stop()


def test_a_version_1_journal_is_upgraded_in_place(tmp_path):
    import sqlite3

    from mailerd.journal import store as journal_module
    from mailerd.journal.store import Journal
    path = tmp_path / "journal.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(f"BEGIN;{journal_module._SCHEMA}PRAGMA user_version=1;COMMIT;")
    db.close()
    journal = Journal(path)
    journal.open()
    try:
        assert journal.db.execute("PRAGMA user_version").fetchone()[0] == journal_module.SCHEMA_VERSION
        assert journal.add_suppressions([("a@b.org", "a@b.org", "manual", None)]) == 1
        assert journal.suppressed(["a@b.org", "c@d.org"]) == {"a@b.org": "manual"}
    finally:
        journal.close()


def test_bounce_patterns_are_configurable(tmp_path, relay_factory, daemon_factory):
    relay = relay_factory(Faults(reject_domains=["bad.example"]))
    daemon = daemon_factory({"isp": relay_server(relay)})
    config = daemon.config.read_text() + "\n[suppression]\nauto_bounce = false\n"
    daemon.config.write_text(config)
    daemon.start()
    cid = daemon.send_campaign(tmp_path / "c", 2, extra_rows=["x@bad.example,X,Y"])
    assert daemon.wait_done(cid).counts.failed == 1
    assert "x@bad.example" not in daemon.ctl("suppress", "list").stdout
