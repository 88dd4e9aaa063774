from __future__ import annotations

import email.contentmanager
import email.parser
import email.policy
import re
from email.message import EmailMessage
from email.parser import BytesParser

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mailerd.message.headers import encoded_word_problem
from mailerd.message.render import (
    POLICY,
    RenderError,
    Renderer,
    TemplateError,
    _encode_text,
    _fold_address,
    _fold_unstructured,
    default_boundary,
    format_date,
    template_variables,
)

HYPOTHESIS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SENDER = "News <news@example.org>"
DATE = "Mon, 01 Jan 2024 00:00:00 +0000"
COLUMNS = ["subject", "text", "html"]
HEADER_CONTROLS = "\r\n\x0b\x0c\x00\x1b\x1c\x7f\x85\u2028\u2029"


def reference(sender, to, subject, text, html, date, msgid, boundary):
    m = EmailMessage(policy=POLICY)
    m["From"] = sender; m["To"] = to; m["Subject"] = subject; m["Date"] = date; m["Message-ID"] = msgid
    if text is not None and html is not None:
        m.set_content(text); m.add_alternative(html, subtype="html"); m.set_boundary(boundary)
    elif text is not None: m.set_content(text)
    else: m.set_content(html, subtype="html")
    return m.as_bytes()


# ---------------------------------------------------------------------- strategies

ACCENTS = "éèàüñçÅØßœ"
CJK = "日本語中文한국어"
EMOJI = "😀🎉👍🏽"
ASCII_PRINTABLE = "".join(chr(c) for c in range(0x20, 0x7F))
BODY_CHARS = ASCII_PRINTABLE + "\t" + ACCENTS + CJK + EMOJI

special_lines = st.sampled_from([
    "", " ", ".", "..", ".hidden dot line", "From the editor", "From ", ">From x",
    "trailing space ", "trailing tab\t", "=", "==", "a=b", "=3D", "--", "-- ",
    "x" * 77, "x" * 78, "x" * 79, "é" * 39, "é" * 40, "y" * 999, "z" * 1200,
])
long_lines = st.integers(60, 1100).flatmap(
    lambda n: st.text(alphabet="ab =\té", min_size=n, max_size=n)
)
# Lines whose trailing blank lands right at a quoted-printable wrap position.
wrap_edge_lines = st.builds(
    lambda n, fill, blank: fill * n + blank,
    st.integers(60, 240), st.sampled_from(["x", "=", "é", "ab"]), st.sampled_from([" ", "\t", "  "]),
)
lines = st.one_of(
    st.text(alphabet=BODY_CHARS, max_size=90), special_lines, long_lines, wrap_edge_lines,
    st.text(max_size=40),  # any non-surrogate code point, control characters included
)
line_ends = st.sampled_from(["\n", "\n", "\n", "\r\n", "\r"])


def join_lines(parts: list[tuple[str, str]], final_newline: bool) -> str:
    if final_newline or not parts:
        return "".join(line + end for line, end in parts)
    return "".join(line + end for line, end in parts[:-1]) + parts[-1][0]


bodies = st.builds(join_lines, st.lists(st.tuples(lines, line_ends), max_size=14), st.booleans())
# Bodies that arrive as merge values: the renderer refuses C0 controls but tab and line breaks in those
merge_bodies = bodies.map(lambda body: re.sub("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", "", body))

special_subjects = st.sampled_from([
    "", " ", "  leading spaces", " leading", "trailing ", "double  space", "tab\there",
    "\tleading tab", "x" * 69, "x" * 70, "word " * 20, "x" * 120, "=?utf-8?q?hi?=",
    "a =?utf-8?q?hi?= b", "Re: [list] (comment) <x@y.org> \"quoted\", a;b",
    "Prix spécial pour vous, " + "très " * 12, "日本語の件名" * 8, "🎉 Party 🎉",
])
subjects = st.one_of(
    special_subjects,
    st.text(alphabet=ASCII_PRINTABLE + "\t", max_size=90),
    st.text(alphabet=BODY_CHARS, max_size=120),
)
unsafe_subjects = st.one_of(
    st.sampled_from([
        "Hi\r\nBcc: evil@example.com", "Hi\nBcc: evil@example.com", "Hi\rX-Evil: 1",
        "trailing newline\n", "trailing crlf\r\n", "\r\nBcc: evil@example.com", "nul\x00",
        "vt\x0bhere", "trailing vt\x0b", "ls\u2028Bcc: x@y.z",
        # RFC 2047 encoded CR/LF: the email package of CPython < 3.11.10 writes them out raw
        "=?utf-8?q?x=0D=0ABcc:_evil@example.com?=", "hi =?utf-8?b?eA0KQmNjOiBldmlsQGV4YW1wbGUuY29t?=",
        "=?utf-8?q?=0D=0A=0D=0A.=0D=0A?=", '"=?utf-8?q?a=0D=0Ab?=" <x@y>',
    ]),
    st.text(alphabet=ASCII_PRINTABLE + HEADER_CONTROLS, max_size=60),
)

atext = st.text(alphabet="abcXYZ0189!#$%&'*+/=?^_`{|}~-", min_size=1, max_size=12)
plain_addresses = st.builds(
    lambda local, labels: ".".join(local) + "@" + ".".join(labels),
    st.lists(atext, min_size=1, max_size=4),
    st.lists(st.from_regex(r"[a-zA-Z0-9-]{1,20}", fullmatch=True), min_size=1, max_size=4),
)
recipients = st.one_of(
    plain_addresses,
    st.sampled_from([
        "alice@example.com", "Ä@b.com", "a@bü.com", '"a b"@x.io', "a@[1.2.3.4]",
        "a..b@x.io", "o'neil@example.com", "x" * 70 + "@example.com", "not-an-address",
        "a@b.com, c@d.com", "=?utf-8?q?x?=@x.io",
    ]),
)

display_names = st.text(alphabet="ABCxyz .'\"" + ACCENTS + CJK, min_size=1, max_size=30)
senders = st.one_of(
    st.just(SENDER),
    display_names.map(lambda n: '"' + n.replace("\\", "").replace('"', '\\"') + '" <news@example.org>'),
    st.sampled_from([
        'Ñews "Q" <news@example.org>', "Zoë Müller <zoe@example.org>", "news@example.org",
        '"O\'Brien, Pat" <pat@example.org>', "日本語ニュース <news@example.jp>",
        "A very long display name that will certainly need folding somewhere <news@example.org>",
    ]),
)
layouts = st.sampled_from(["text", "html", "both"])
dates = st.one_of(st.just(DATE), st.integers(0, 2**32).map(format_date))


# ------------------------------------------------------------------------- helpers

def make_renderer(layout: str, sender: str = SENDER) -> Renderer:
    return Renderer(
        sender=sender,
        subject="{{ subject }}",
        text="{{ text }}" if layout in ("text", "both") else None,
        html="{{ html|safe }}" if layout in ("html", "both") else None,  # the reference: no escaping
        columns=COLUMNS,
        campaign_uid="c0ffee42",
    )


def expected_header_names(layout: str) -> list[str]:
    names = ["From", "To", "Subject", "Date", "Message-ID"]
    if layout == "both":
        return names + ["MIME-Version", "Content-Type"]
    return names + ["Content-Type", "Content-Transfer-Encoding", "MIME-Version"]


def assert_renders_like_reference(
    renderer: Renderer, layout: str, sender: str, line: int, to: str,
    subject: str, text: str, html: str, date: str,
) -> bytes:
    out = renderer.render(line=line, email=to, fields=[subject, text, html], date=date)
    expected = reference(
        sender, to, subject,
        text if layout in ("text", "both") else None,
        html if layout in ("html", "both") else None,
        date, renderer.message_id(line), renderer.boundary,
    )
    assert out == expected
    return out


def header_names(raw: bytes) -> list[str]:
    return BytesParser(policy=email.policy.default).parsebytes(raw).keys()


def boundary_collides(renderer: Renderer, text: str, html: str) -> bool:
    return renderer.boundary in text or renderer.boundary in html


# --------------------------------------------------------------- byte equality

@HYPOTHESIS
@given(layouts, st.data())
def test_render_is_byte_identical_to_email_package(layout: str, data: st.DataObject) -> None:
    sender = data.draw(senders)
    renderer = make_renderer(layout, sender)
    for line in range(1, 3):  # twice, so the per-renderer caches are exercised
        text, html = data.draw(merge_bodies), data.draw(merge_bodies)
        assume(not boundary_collides(renderer, text, html))
        out = assert_renders_like_reference(
            renderer, layout, sender, line, data.draw(recipients),
            data.draw(subjects), text, html, data.draw(dates),
        )
        assert header_names(out) == expected_header_names(layout)


@HYPOTHESIS
@given(st.text(alphabet=ASCII_PRINTABLE + "\t", max_size=90) | subjects)
def test_subject_fast_path_matches_folding(subject: str) -> None:
    expected = POLICY.fold_binary("Subject", POLICY.header_factory("Subject", subject))
    assert _fold_unstructured("subject", "Subject", subject) == expected


@HYPOTHESIS
@given(recipients)
def test_to_fast_path_matches_folding(address: str) -> None:
    expected = POLICY.fold_binary("To", POLICY.header_factory("To", address))
    assert _fold_address("to", "To", address) == expected


@HYPOTHESIS
@given(bodies)
def test_body_encoding_matches_email_package(body: str) -> None:
    assert_body_encoding_matches(body)


def assert_body_encoding_matches(body: str) -> None:
    cte, payload = email.contentmanager._encode_text(body, "utf-8", None, POLICY)
    encoded = _encode_text(body)
    assert (encoded.cte, encoded.wire) == (cte, re.sub(r"\r\n|\r|\n", "\r\n", payload).encode("ascii"))


@pytest.mark.parametrize("fill", ["x", "=", "é", "x=", "xé"])
@pytest.mark.parametrize("blank", [" ", "\t", "  "])
def test_body_encoding_at_every_wrap_position(fill: str, blank: str) -> None:
    # A leading non-ASCII line forces quoted-printable; the trailing blank then
    # meets every position relative to the 78-column soft line breaks.
    for width in range(1, 260):
        line = (fill * width)[:width] + blank
        assert_body_encoding_matches("é\n" + line + "\n")
        assert_body_encoding_matches("é\n" + line)


@pytest.mark.parametrize("layout", ["text", "html", "both"])
@pytest.mark.parametrize("body", [
    "", "\n", "plain ascii\n", "no final newline", "é", "café\n" * 12, "日本語\n" * 30,
    "😀" * 300, "x" * 78 + "\n", "x" * 79, "y" * 999 + "\n" + "z" * 1000, ".\n.dot\nFrom me\n",
    "a=b " * 40 + "\t", ("é" * 25 + "=" + " ") * 9,
])
def test_examples_are_byte_identical(layout: str, body: str) -> None:
    renderer = make_renderer(layout)
    assert_renders_like_reference(
        renderer, layout, SENDER, 7, "bob@example.com", "Héllo  wörld", body, body + "<p>", DATE
    )


def test_constant_parts_and_merge_fields_across_recipients() -> None:
    text = "Bonjour {{ first }} — café {{ city }}\n" + "Ligne fixe éàü.\n" * 20
    html = "<p>Hello {{ first }}</p>\n" + "<p>" + "x" * 100 + "</p>\n" + "<p>{{ email }}</p>"
    sender = "Zoë <news@example.org>"
    renderer = Renderer(sender=sender, subject="Hi {{ first }}", text=text, html=html,
                        columns=["first", "city"], campaign_uid="abc")
    for line, (first, city) in enumerate([("Ann", "Paris"), ("Ann", "Paris"), ("Zoë", "Łódź"),
                                          ("陳", "東京"), ("Bob", "")]):
        to = f"user{line}@example.com"
        out = renderer.render(line=line, email=to, fields=[first, city], date=DATE)
        ctx = {"first": first, "city": city, "email": to}
        expected = reference(
            sender, to, f"Hi {first}",
            text.replace("{{ first }}", first).replace("{{ city }}", city),
            html.replace("{{ first }}", first).replace("{{ email }}", to),
            DATE, renderer.message_id(line), renderer.boundary,
        )
        assert out == expected, ctx


# ----------------------------------------------------------- header injection

@HYPOTHESIS
@given(layouts, unsafe_subjects, st.sampled_from(["alice@example.com", "a@b.com\r\nBcc: x@y.z"]))
def test_control_characters_never_create_headers(layout: str, subject: str, to: str) -> None:
    renderer = make_renderer(layout)
    try:
        out = renderer.render(line=1, email=to, fields=[subject, "body\n", "<p>body</p>"], date=DATE)
    except RenderError as exc:
        assert re.search(f"[{re.escape(HEADER_CONTROLS)}]", subject + to) or encoded_word_problem(subject)
        # the header's field, or for controls refused in any merge value, the column
        assert str(exc).startswith(("subject:", "to:", "column 'subject':"))
        return
    assert header_names(out) == expected_header_names(layout)
    assert out == reference(SENDER, to, subject, "body\n" if layout != "html" else None,
                            "<p>body</p>" if layout != "text" else None, DATE,
                            renderer.message_id(1), renderer.boundary)


def test_crlf_in_subject_is_rejected_naming_the_field() -> None:
    renderer = make_renderer("text")
    with pytest.raises(RenderError, match="^subject:"):
        renderer.render(line=1, email="a@b.com", fields=["Hi\r\nBcc: evil@x.org", "", ""], date=DATE)
    with pytest.raises(RenderError, match="^subject:"):
        renderer.render(line=1, email="a@b.com", fields=["Hi\n", "", ""], date=DATE)


def test_crlf_in_recipient_is_rejected() -> None:
    with pytest.raises(RenderError, match="^to:"):
        make_renderer("text").render(line=1, email="a@b.com\r\nBcc: x@y.z", fields=["s", "", ""], date=DATE)


def test_crlf_in_body_is_just_content() -> None:
    renderer = make_renderer("both")
    body = "line\r\nBcc: evil@example.com\r\n\r\nmore"
    out = assert_renders_like_reference(renderer, "both", SENDER, 1, "a@b.com", "s", body, body, DATE)
    assert header_names(out) == expected_header_names("both")


def test_invalid_date_is_rejected() -> None:
    with pytest.raises(RenderError, match="^date:"):
        make_renderer("text").render(line=1, email="a@b.com", fields=["s", "", ""], date="yesterday")


# ------------------------------------------------------------------ boundaries

def test_body_containing_boundary_still_yields_valid_message() -> None:
    renderer = make_renderer("both")
    text = f"see\n--{renderer.boundary}\nnot a part\n--{renderer.boundary}--\n"
    html = "<p>fine</p>\n"
    out = renderer.render(line=3, email="a@b.com", fields=["s", text, html], date=DATE)
    message = BytesParser(policy=email.policy.default).parsebytes(out)
    assert message.get_boundary() != renderer.boundary
    parts = list(message.iter_parts())
    assert [p.get_content().replace("\r\n", "\n") for p in parts] == [text, html]
    assert out == reference(SENDER, "a@b.com", "s", text, html, DATE,
                            renderer.message_id(3), message.get_boundary())


def test_default_boundary_is_deterministic_and_in_email_package_format() -> None:
    boundary = default_boundary("c0ffee42")
    assert boundary == default_boundary("c0ffee42") != default_boundary("c0ffee43")
    assert re.fullmatch(r"={15}\d{19}==", boundary)
    assert make_renderer("both").boundary == boundary


def test_explicit_boundary_is_used() -> None:
    renderer = Renderer(sender=SENDER, subject="s", text="t", html="h", columns=[],
                        campaign_uid="x", boundary="===============0000000000000000042==")
    out = renderer.render(line=1, email="a@b.com", fields=[], date=DATE)
    assert b'boundary="===============0000000000000000042=="' in out


# ------------------------------------------------------------------- templates

def test_template_variables_finds_output_and_condition_names() -> None:
    source = "Hi {{ first_name }}{% if vip %}, VIP{% endif %}{% set x = 1 %}{{ x }}"
    assert template_variables(source) == {"first_name", "vip"}


def test_template_variables_reports_syntax_errors() -> None:
    with pytest.raises(TemplateError, match="syntax"):
        template_variables("Hi {{ first_name ")


def test_renderer_names_the_field_with_a_syntax_error() -> None:
    with pytest.raises(TemplateError, match="^html:"):
        Renderer(sender=SENDER, subject="s", text="ok", html="{% if %}", columns=[], campaign_uid="x")
    with pytest.raises(TemplateError):
        Renderer(sender=SENDER, subject="s", text=None, html=None, columns=[], campaign_uid="x")


def test_missing_variable_raises_naming_field_and_variable() -> None:
    renderer = Renderer(sender=SENDER, subject="Hi {{ nickname }}", text="Hello {{ first_name }}",
                        html=None, columns=["first_name"], campaign_uid="x")
    with pytest.raises(RenderError, match="subject.*nickname"):
        renderer.render(line=1, email="a@b.com", fields=["Ann"], date=DATE)


def test_context_has_columns_and_email() -> None:
    renderer = Renderer(sender=SENDER, subject="{{ a }}/{{ email }}", text="{{ b }}", html=None,
                        columns=["a", "b"], campaign_uid="x")
    out = renderer.render(line=1, email="z@example.com", fields=["A", "B"], date=DATE)
    assert b"Subject: A/z@example.com\r\n" in out and out.endswith(b"\r\n\r\nB\r\n")


def test_sandbox_violation_is_a_render_error() -> None:
    renderer = Renderer(sender=SENDER, subject="{{ email.__class__.__mro__ }}", text="t",
                        html=None, columns=[], campaign_uid="x")
    with pytest.raises(RenderError, match="^subject:"):
        renderer.render(line=1, email="a@b.com", fields=[], date=DATE)


# ------------------------------------------------------------- ids and dates

def test_message_id_is_deterministic() -> None:
    first, second = make_renderer("text"), make_renderer("text")
    assert first.message_id(12) == second.message_id(12) == "<c0ffee42.12@example.org>"
    assert first.message_id(12) != first.message_id(13)
    out = first.render(line=12, email="a@b.com", fields=["s", "t", ""], date=DATE)
    assert b"\r\nMessage-ID: <c0ffee42.12@example.org>\r\n" in out


def test_message_id_of_idn_sender_is_ascii() -> None:
    renderer = Renderer(sender="Zoë <news@bücher.example>", subject="s", text="t", html=None,
                        columns=[], campaign_uid="x")
    assert renderer.message_id(1) == "<x.1@xn--bcher-kva.example>"
    renderer.render(line=1, email="a@b.com", fields=[], date=DATE)


def test_format_date_is_rfc5322_utc_and_cached_per_second() -> None:
    assert format_date(0) == "Thu, 01 Jan 1970 00:00:00 +0000"
    assert format_date(1_700_000_000.1) == format_date(1_700_000_000.9) == "Tue, 14 Nov 2023 22:13:20 +0000"
    assert format_date(1_700_000_001.0) == "Tue, 14 Nov 2023 22:13:21 +0000"


# ------------------------------------------- issue 6: attachments, headers, unsubscribe

from mailerd.message import tokens  # noqa: E402
from mailerd.message.render import (  # noqa: E402
    POLICY_SMTPUTF8,
    Attachment,
    content_type_for,
    header_name_problem,
    list_unsubscribe_value,
)

KEY = b"k" * 32


def reference_full(sender, to, subject, text, html, date, msgid, boundary, alt_boundary, *,
                   reply_to=None, headers=(), list_unsubscribe=None, one_click=False,
                   attachments=(), policy=POLICY):
    """The email package's message for the full structure, header by header."""
    m = EmailMessage(policy=policy)
    m["From"] = sender; m["To"] = to; m["Subject"] = subject; m["Date"] = date; m["Message-ID"] = msgid
    if reply_to is not None:
        m["Reply-To"] = reply_to
    for name, value in headers:
        m[name] = value
    if list_unsubscribe is not None:
        m.set_raw("List-Unsubscribe", list_unsubscribe)  # folded between URIs, never inside
        if one_click:
            m["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    if text is not None and html is not None:
        m.set_content(text); m.add_alternative(html, subtype="html")
        m.set_boundary(alt_boundary if attachments else boundary)
    elif text is not None:
        m.set_content(text)
    else:
        m.set_content(html, subtype="html")
    for a in attachments:
        maintype, subtype = a.content_type.split("/")
        m.add_attachment(a.data, maintype=maintype, subtype=subtype, filename=a.name)
    if attachments:
        m.set_boundary(boundary)
    return m.as_bytes()


attachment_names = st.sampled_from(["report.pdf", "data.csv", "photo.JPG", "notes.txt", "archive.tar.gz",
                                    "Übersicht März.pdf", "no-extension", "日本語.docx", "a b.html"])
attachments_strategy = st.lists(
    st.builds(lambda name, data: Attachment(name, content_type_for(name), data),
              attachment_names, st.binary(max_size=400)),
    max_size=3,
)
reply_tos = st.sampled_from([None, "help@example.org", "Zoë Support <help@example.org>",
                             '"Help, Desk" <help@example.org>'])
header_values = st.one_of(st.text(alphabet=BODY_CHARS, max_size=100), special_subjects)


def full_renderer(layout, attachments, reply_to, with_unsubscribe):
    return Renderer(
        sender=SENDER, subject="{{ subject }}",
        text="{{ text }}" if layout in ("text", "both") else None,
        html="{{ html|safe }}" if layout in ("html", "both") else None,  # the reference: no escaping
        columns=COLUMNS + ["campaign"], campaign_uid="c0ffee42",
        reply_to=reply_to, headers={"X-Campaign": "{{ campaign }}", "X-Mailer-Note": "constant"},
        list_unsubscribe_mailto="unsubscribe@example.org" if with_unsubscribe else None,
        list_unsubscribe_url="https://example.org/u/{{ token }}" if with_unsubscribe else None,
        attachments=attachments, unsubscribe_key=KEY,
    )


def expected_full(renderer, layout, attachments, reply_to, with_unsubscribe, line, to, subject,
                  text, html, campaign, boundary=None, alt_boundary=None, policy=POLICY):
    token = tokens.make(KEY, "c0ffee42", to)
    unsubscribe = None
    if with_unsubscribe:
        unsubscribe = list_unsubscribe_value("unsubscribe@example.org", f"https://example.org/u/{token}")
    return reference_full(
        SENDER, to, subject,
        text if layout in ("text", "both") else None,
        html if layout in ("html", "both") else None,
        DATE, renderer.message_id(line), boundary or renderer.boundary,
        alt_boundary or renderer.alt_boundary,
        reply_to=reply_to, headers=[("X-Campaign", campaign), ("X-Mailer-Note", "constant")],
        list_unsubscribe=unsubscribe, one_click=with_unsubscribe, attachments=attachments,
        policy=policy,
    )


@HYPOTHESIS
@given(layouts, attachments_strategy, reply_tos, st.booleans(), st.data())
def test_full_structure_is_byte_identical_to_email_package(layout, attachments, reply_to,
                                                           with_unsubscribe, data) -> None:
    renderer = full_renderer(layout, attachments, reply_to, with_unsubscribe)
    for line in range(1, 3):
        text, html = data.draw(merge_bodies), data.draw(merge_bodies)
        assume(renderer.boundary not in text + html and renderer.alt_boundary not in text + html)
        to, subject, campaign = data.draw(plain_addresses), data.draw(subjects), data.draw(header_values)
        out = renderer.render(line=line, email=to, fields=[subject, text, html, campaign], date=DATE)
        assert out == expected_full(renderer, layout, attachments, reply_to, with_unsubscribe, line,
                                    to, subject, text, html, campaign)


def test_text_html_and_two_attachments_make_mixed_with_alternative_inside() -> None:
    pdf = Attachment("report.pdf", "application/pdf", bytes(range(256)) * 40)
    csv_ = Attachment("données.csv", "text/csv", "a;b\né;ü\n".encode())
    renderer = full_renderer("both", [pdf, csv_], "Zoë <help@example.org>", True)
    out = renderer.render(line=5, email="ann@example.com",
                          fields=["Grüße, Ann", "Hallo Ann\n", "<p>Hallo Ann</p>\n", "nov"], date=DATE)
    assert out == expected_full(renderer, "both", [pdf, csv_], "Zoë <help@example.org>", True, 5,
                                "ann@example.com", "Grüße, Ann", "Hallo Ann\n", "<p>Hallo Ann</p>\n", "nov")
    message = BytesParser(policy=email.policy.default).parsebytes(out)
    assert message.get_content_type() == "multipart/mixed"
    alternative, *files = message.iter_parts()
    assert alternative.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in alternative.iter_parts()] == ["text/plain", "text/html"]
    assert [(f.get_filename(), f.get_content_type(), f.get_payload(decode=True)) for f in files] == [
        ("report.pdf", "application/pdf", pdf.data), ("données.csv", "text/csv", csv_.data)]
    assert message["Subject"] == "Grüße, Ann" and b"=?utf-8?" in out.split(b"\r\n\r\n")[0]
    assert message["Reply-To"] == "Zoë <help@example.org>"


def test_body_colliding_with_either_boundary_still_parses() -> None:
    att = [Attachment("a.bin", "application/octet-stream", b"\x00\x01")]
    renderer = full_renderer("both", att, None, False)
    text = f"--{renderer.boundary}\n--{renderer.alt_boundary}\n"
    out = renderer.render(line=1, email="a@b.com", fields=["s", text, "<p>h</p>", "c"], date=DATE)
    message = BytesParser(policy=email.policy.default).parsebytes(out)
    alternative, attached = message.iter_parts()
    assert alternative.get_body(("plain",)).get_content().replace("\r\n", "\n") == text
    assert attached.get_content() == b"\x00\x01"


def test_list_unsubscribe_token_and_one_click() -> None:
    renderer = full_renderer("text", [], None, True)
    long_local = "someone.with.a.rather.long.address.for.folding" + "@example.com"
    for to in ("ann@example.com", long_local):
        out = renderer.render(line=1, email=to, fields=["s", "t", "", "c"], date=DATE)
        message = BytesParser(policy=email.policy.default).parsebytes(out)
        token = tokens.make(KEY, "c0ffee42", to)
        assert tokens.verify(KEY, "c0ffee42", to, token)
        assert tokens.verify(KEY, "c0ffee42", to.upper(), token)  # the address's case does not matter
        assert not tokens.verify(KEY, "c0ffee43", to, token)
        assert not tokens.verify(b"x" * 32, "c0ffee42", to, token)
        value = " ".join(str(message["List-Unsubscribe"]).split())
        assert value == f"<mailto:unsubscribe@example.org>, <https://example.org/u/{token}>"
        assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_long_unsubscribe_url_is_never_encoded_or_split() -> None:
    url = "https://example.org/unsubscribe/" + "x" * 120 + "/{{ token }}"
    renderer = Renderer(sender=SENDER, subject="s", text="t", html=None, columns=[], campaign_uid="u",
                        list_unsubscribe_mailto="unsubscribe@example.org", list_unsubscribe_url=url,
                        unsubscribe_key=KEY)
    out = renderer.render(line=1, email="a@b.com", fields=[], date=DATE)
    token = tokens.make(KEY, "u", "a@b.com")
    assert f"<https://example.org/unsubscribe/{'x' * 120}/{token}>".encode() in out
    assert b"=?" not in out.split(b"\r\n\r\n")[0]


@pytest.mark.parametrize("value", ["a b", "x\r\nBcc: v@x", "é", "<x>"])
def test_unsubscribe_merge_value_that_would_break_the_uri_is_refused(value) -> None:
    renderer = Renderer(sender=SENDER, subject="s", text="t", html=None, columns=["v"], campaign_uid="u",
                        list_unsubscribe_url="https://example.org/u?v={{ v }}")
    with pytest.raises(RenderError, match="^list_unsubscribe"):
        renderer.render(line=1, email="a@b.com", fields=[value], date=DATE)
    ok = Renderer(sender=SENDER, subject="s", text="t", html=None, columns=["v"], campaign_uid="u",
                  list_unsubscribe_url="https://example.org/u?v={{ v|urlencode }}")
    assert b"List-Unsubscribe: <https://example.org/u?v=" in ok.render(
        line=1, email="a@b.com", fields=[value], date=DATE)


@HYPOTHESIS
@given(unsafe_subjects)
def test_merge_values_in_custom_headers_never_create_headers(value: str) -> None:
    renderer = full_renderer("text", [], None, False)
    try:
        out = renderer.render(line=1, email="a@b.com", fields=["s", "t", "", value], date=DATE)
    except RenderError as exc:
        assert str(exc).startswith(("headers.X-Campaign:", "column 'campaign':"))
        return
    names = header_names(out)
    assert names == ["From", "To", "Subject", "Date", "Message-ID", "X-Campaign", "X-Mailer-Note",
                     "Content-Type", "Content-Transfer-Encoding", "MIME-Version"]


def test_conditionals_and_filters_work() -> None:
    renderer = Renderer(
        sender=SENDER, subject="{% if vip == 'yes' %}VIP: {% endif %}Hi {{ first | default('friend', true) }}",
        text="{{ first | upper }}{% for i in range(2) %}.{% endfor %}\n", html=None,
        columns=["first", "vip"], campaign_uid="u")
    out = renderer.render(line=1, email="a@b.com", fields=["", "yes"], date=DATE)
    assert b"Subject: VIP: Hi friend\r\n" in out
    out = renderer.render(line=2, email="a@b.com", fields=["ann", "no"], date=DATE)
    assert b"Subject: Hi ann\r\n" in out and out.endswith(b"ANN..\r\n")


def test_smtputf8_rendering_writes_utf8_headers() -> None:
    att = [Attachment("données.pdf", "application/pdf", b"%PDF")]
    renderer = full_renderer("both", att, "Zoë <help@example.org>", True)
    to = "zoë@bücher.example"
    out = renderer.render(line=3, email=to, fields=["Grüße", "t\n", "<p>h</p>", "c"], date=DATE,
                          smtputf8=True)
    assert out == expected_full(renderer, "both", att, "Zoë <help@example.org>", True, 3, to, "Grüße",
                                "t\n", "<p>h</p>", "c", policy=POLICY_SMTPUTF8)
    head = out.split(b"\r\n\r\n")[0]
    assert "To: zoë@bücher.example".encode() in head and "Subject: Grüße".encode() in head
    message = email.parser.Parser(policy=email.policy.default).parsestr(out.decode("utf-8"))
    assert message["To"].addresses[0].addr_spec == to
    assert message["Subject"] == "Grüße"


@pytest.mark.parametrize(("name", "problem"), [
    ("X-Campaign", None), ("Precedence", None), ("X Bad", "not a valid header name"),
    ("Bcc", "set by mailerd"), ("to", "set by mailerd"), ("Resent-From", "set by mailerd"),
    ("Content-Type", "set by mailerd"), ("Errors-To", None), ("Cc", "set by mailerd"),
])
def test_header_names(name, problem) -> None:
    found = header_name_problem(name)
    assert (found is None) if problem is None else (problem in found)


def test_content_type_by_extension() -> None:
    assert content_type_for("a.PDF") == "application/pdf"
    assert content_type_for("a.csv") == "text/csv"
    assert content_type_for("a.tar.gz") == "application/gzip"
    assert content_type_for("noext") == "application/octet-stream"


def test_render_speed_of_a_2kb_text_and_html_message() -> None:
    import time as time_
    text = "Dear {{ first }},\n" + "A line of constant text for the newsletter body.\n" * 18
    html = "<p>Dear {{ first }},</p>\n" + "<p>A line of constant html for the newsletter.</p>\n" * 16
    renderer = Renderer(sender=SENDER, subject="Hello {{ first }}", text=text, html=html,
                        columns=["first"], campaign_uid="u",
                        list_unsubscribe_url="https://example.org/u/{{ token }}", unsubscribe_key=KEY)
    assert len(renderer.render(line=0, email="u@example.com", fields=["x"], date=DATE)) > 2000
    best = 1.0
    for _ in range(5):
        start = time_.perf_counter()
        for i in range(500):
            renderer.render(line=i, email=f"user{i}@example.com", fields=[f"N{i}"], date=DATE)
        best = min(best, (time_.perf_counter() - start) / 500)
    assert best < 150e-6, f"{best * 1e6:.0f} us per message"
