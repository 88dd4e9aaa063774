"""Per-recipient message rendering.

The MIME skeleton of a campaign (part headers, boundaries) is serialised once by
the ``email`` package itself; per recipient only the personalised headers and the
encoded bodies are substituted.  The output is byte-for-byte what
``EmailMessage(policy=POLICY)`` + ``as_bytes()`` produce for the same values
(see tests/test_render.py::reference), at a fraction of the cost.
"""

from __future__ import annotations

import binascii
import email.contentmanager
import email.policy
import email.quoprimime
import email.utils
import functools
import hashlib
import math
import re
from datetime import datetime, timezone
from email.message import EmailMessage
from typing import Any, NamedTuple

import jinja2
import jinja2.meta
from jinja2.sandbox import SandboxedEnvironment

__all__ = [
    "POLICY",
    "RenderError",
    "Renderer",
    "TemplateError",
    "format_date",
    "template_variables",
]

POLICY = email.policy.SMTP.clone(cte_type="7bit")

_CRLF = "\r\n"
_MAX_LINE = POLICY.max_line_length

# Characters that make the email package either raise ("Header values may not
# contain linefeed or carriage return characters", for anything str.splitlines
# splits on, unless it is trailing) or, worse, emit them raw: a trailing "\r\n"
# in a Subject ends the header block early.  Other C0 controls and DEL are
# emitted raw as well, which no MTA should receive.  We reject them all.
_FORBIDDEN_IN_HEADER = re.compile("[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")

# Values for which folding is the identity ("Name: value\r\n"), established by
# reading email._header_value_parser and checked by tests/test_render.py:
# - unstructured (Subject): ASCII vchar/space/tab, non-empty, no "=?" (which the
#   parser decodes as an RFC 2047 encoded word), and the line fits in 78 chars.
# - address (To): a bare dot-atom addr-spec with an LDH domain, same length rule.
_PLAIN_UNSTRUCTURED = re.compile(r"[\t -~]+")
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_PLAIN_ADDR_SPEC = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*")

# Stand-ins for the bodies while serialising the skeleton; they are ASCII and
# short so every CTE keeps them on one line, and distinct so they can't collide.
_TEXT_SENTINEL = "mailerd-skeleton-text-body-7f3c1a"
_HTML_SENTINEL = "mailerd-skeleton-html-body-9b2e4d"


class TemplateError(ValueError):
    """A template does not compile; the message names the field."""


class RenderError(ValueError):
    """A message cannot be rendered for a recipient; the message names the field."""


class EncodedBody(NamedTuple):
    cte: str
    wire: bytes  # exactly what the generator writes for the payload


# --------------------------------------------------------------------------- dates

_last_date: tuple[int, str] = (-1, "")


def format_date(ts: float) -> str:
    """RFC 5322 date in UTC with a ``+0000`` zone, cached for the current second."""
    global _last_date
    second = math.floor(ts)
    cached_second, cached = _last_date
    if second == cached_second:
        return cached
    formatted = email.utils.format_datetime(datetime.fromtimestamp(second, timezone.utc))
    _last_date = (second, formatted)
    return formatted


# ----------------------------------------------------------------------- templates

def _new_environment() -> SandboxedEnvironment:
    return SandboxedEnvironment(
        undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True
    )


_PARSE_ENVIRONMENT = _new_environment()


def _syntax_problem(exc: jinja2.TemplateSyntaxError) -> str:
    return f"template syntax error at line {exc.lineno}: {exc.message}"


def template_variables(source: str) -> set[str]:
    """Names a template reads from its context (undeclared variables)."""
    try:
        ast = _PARSE_ENVIRONMENT.parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(_syntax_problem(exc)) from exc
    return set(jinja2.meta.find_undeclared_variables(ast))


def _compile_template(env: SandboxedEnvironment, field: str, source: str) -> jinja2.Template:
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"{field}: {_syntax_problem(exc)}") from exc


def _render_template(field: str, template: jinja2.Template, context: dict[str, Any]) -> str:
    try:
        return template.render(context)
    except jinja2.UndefinedError as exc:
        raise RenderError(f"{field}: {exc.message}") from exc
    except Exception as exc:  # sandbox violations, filters failing on the data, ...
        raise RenderError(f"{field}: template failed: {exc}") from exc


# ------------------------------------------------------------------------- headers

def _check_header_value(field: str, value: str) -> None:
    bad = _FORBIDDEN_IN_HEADER.search(value)
    if bad is not None:
        raise RenderError(
            f"{field}: control character {bad.group()!r} is not allowed in a header"
        )


def _fold_with_email_package(field: str, name: str, value: str) -> bytes:
    try:
        _, header = POLICY.header_store_parse(name, value)
        return POLICY.fold_binary(name, header)
    except (ValueError, TypeError) as exc:
        raise RenderError(f"{field}: {exc}") from exc


def _fits_one_line(name: str, value: str) -> bool:
    return len(name) + 2 + len(value) <= _MAX_LINE


def _fold_unstructured(field: str, name: str, value: str) -> bytes:
    _check_header_value(field, value)
    if (
        _fits_one_line(name, value)
        and _PLAIN_UNSTRUCTURED.fullmatch(value)
        and "=?" not in value
    ):
        return f"{name}: {value}{_CRLF}".encode("ascii")
    return _fold_with_email_package(field, name, value)


def _fold_address(field: str, name: str, value: str) -> bytes:
    _check_header_value(field, value)
    if _fits_one_line(name, value) and _PLAIN_ADDR_SPEC.fullmatch(value) and "=?" not in value:
        return f"{name}: {value}{_CRLF}".encode("ascii")
    return _fold_with_email_package(field, name, value)


def _fold_date(value: str) -> bytes:
    _check_header_value("date", value)
    header = POLICY.header_factory("Date", value)
    if header.datetime is None:
        raise RenderError(f"date: {value!r} is not an RFC 5322 date")
    return POLICY.fold_binary("Date", header)


def _sender_domain(sender: str) -> str:
    addresses = POLICY.header_factory("From", sender).addresses
    if len(addresses) != 1 or not addresses[0].domain:
        raise RenderError(f"sender: {sender!r} is not a single address with a domain")
    domain = addresses[0].domain
    # A Message-ID must be ASCII; the email package crashes on a non-ASCII one.
    return domain if domain.isascii() else domain.encode("idna").decode("ascii")


def default_boundary(campaign_uid: str) -> str:
    """A deterministic boundary in the email package's own format."""
    digest = hashlib.sha256(campaign_uid.encode("utf-8")).digest()
    number = int.from_bytes(digest[:8], "big") % 10**19
    return f"{'=' * 15}{number:019d}=="


# -------------------------------------------------------------------------- bodies

def _to_wire(payload: str) -> bytes:
    """What email.generator writes for a text payload: line ends become CRLF.

    The generator splits on \r\n|\r|\n, but encoded payloads only ever contain
    "\n": their lines come from bytes.splitlines() and QP/base64 escape the rest.
    """
    return payload.replace("\n", _CRLF).encode("ascii")


def _encode_body(field: str, content: str) -> EncodedBody:
    try:
        return _encode_text(content)
    except UnicodeError as exc:
        raise RenderError(f"{field}: cannot be encoded as UTF-8: {exc}") from exc


def _encode_text(content: str) -> EncodedBody:
    """Same CTE choice and payload as email.contentmanager._encode_text(content,
    "utf-8", None, POLICY), already converted to wire form.

    Re-implemented because the original quoted-printable-encodes the whole body
    (plus a sniff of the first 10 lines) on every call; its QP encoding is
    line-local, so here encoded lines are cached and the constant lines of a
    template are encoded once per process.  tests/test_render.py checks the
    equivalence against the private original.
    """
    lines = content.encode("utf-8").splitlines()
    if max(map(len, lines), default=0) <= _MAX_LINE:
        body = b"\r\n".join(lines) + b"\r\n"
        if body.isascii():
            return EncodedBody("7bit", body)
    qp_lines = [_qp_encode_line_cached(line) for line in lines]
    sniff_lines = lines[:10]
    # Lengths of the original's sniff_qp (lines joined and terminated by "\n")
    # and sniff_base64 (b2a_base64 of the CRLF-joined lines, with its "\n").
    sniff_qp_length = sum(map(len, qp_lines[:10])) + len(sniff_lines)
    sniff_base64_length = len(binascii.b2a_base64(b"\r\n".join(sniff_lines) + b"\r\n"))
    if sniff_qp_length > sniff_base64_length:
        data = b"\r\n".join(lines) + b"\r\n"
        payload = email.contentmanager._encode_base64(data, _MAX_LINE)
        return EncodedBody("base64", _to_wire(payload))
    return EncodedBody("quoted-printable", _to_wire("\n".join(qp_lines) + "\n"))


_QP_BODY_MAP = email.quoprimime._QUOPRI_BODY_ENCODE_MAP
_QP_SOFT_BREAK = "=\n"


def _quote(char: str) -> str:
    return "=%02X" % ord(char)


_QP_CACHED_LINE_LENGTH = 1024  # bounds the cache to a few MB


def _qp_encode_line_cached(raw_line: bytes) -> str:
    if len(raw_line) <= _QP_CACHED_LINE_LENGTH:
        return _qp_encode_short_line(raw_line)
    return _qp_encode_line(raw_line)


def _qp_encode_line(raw_line: bytes) -> str:
    """email.quoprimime.body_encode(line, maxlinelen=78) for one line without its
    line end; soft breaks inside are "\n".  Mirrors that loop statement by statement."""
    line = raw_line.decode("latin-1").translate(_QP_BODY_MAP)
    pieces: list[str] = []
    start = 0
    last_start = len(line) - 1 - _MAX_LINE
    while start <= last_start:
        stop = start + _MAX_LINE - 1
        # Never split an "=XX" escape.
        if line[stop - 2] == "=":
            pieces.append(line[start : stop - 1])
            start = stop - 2
        elif line[stop - 1] == "=":
            pieces.append(line[start:stop])
            start = stop - 1
        else:
            pieces.append(line[start:stop] + "=")
            start = stop
    if line and line[-1] in " \t":
        # Trailing whitespace must be escaped (or followed by a soft break).
        room = start - last_start
        if room >= 3:
            tail = _quote(line[-1])
        elif room == 2:
            tail = line[-1] + _QP_SOFT_BREAK
        else:
            tail = _QP_SOFT_BREAK + _quote(line[-1])
        pieces.append(line[start:-1] + tail)
    else:
        pieces.append(line[start:])
    return "\n".join(pieces)


_qp_encode_short_line = functools.lru_cache(maxsize=4096)(_qp_encode_line)


def _forced_wire(content: str, cte: str) -> bytes:
    return _to_wire(email.contentmanager._encode_text(content, "utf-8", cte, POLICY)[1])


def build_with_email_package(
    *,
    sender: str,
    to: str,
    subject: str,
    text: str | None,
    html: str | None,
    date: str,
    msgid: str,
    boundary: str,
) -> bytes:
    """The slow reference construction; used when the fast path can't be trusted."""
    message = EmailMessage(policy=POLICY)
    message["From"] = sender
    message["To"] = to
    message["Subject"] = subject
    message["Date"] = date
    message["Message-ID"] = msgid
    _set_bodies(message, text, html, boundary)
    return message.as_bytes()


def _set_bodies(
    message: EmailMessage,
    text: str | None,
    html: str | None,
    boundary: str,
    text_cte: str | None = None,
    html_cte: str | None = None,
) -> None:
    if text is not None and html is not None:
        message.set_content(text, cte=text_cte)
        message.add_alternative(html, subtype="html", cte=html_cte)
        message.set_boundary(boundary)
    elif text is not None:
        message.set_content(text, cte=text_cte)
    elif html is not None:
        message.set_content(html, subtype="html", cte=html_cte)


def _serialise_skeleton(
    has_text: bool, has_html: bool, text_cte: str | None, html_cte: str | None, boundary: str
) -> tuple[bytes, ...]:
    """The body-independent bytes around the bodies, as the email package writes them.

    Returns (before_first_body, between_bodies, after_last_body) for multipart and
    (before_body, after_body) for a single part.  The skeleton has no From..Message-ID
    headers; those come first in the reference and are prepended per recipient.
    """
    skeleton = EmailMessage(policy=POLICY)
    text = _TEXT_SENTINEL if has_text else None
    html = _HTML_SENTINEL if has_html else None
    _set_bodies(skeleton, text, html, boundary, text_cte, html_cte)
    raw = skeleton.as_bytes()
    markers = []
    if text is not None and text_cte is not None:
        markers.append(_forced_wire(text, text_cte))
    if html is not None and html_cte is not None:
        markers.append(_forced_wire(html, html_cte))
    pieces: list[bytes] = []
    rest = raw
    for marker in markers:
        if raw.count(marker) != 1:
            raise AssertionError(f"skeleton sentinel not unique in {raw!r}")
        head, rest = rest.split(marker)
        pieces.append(head)
    pieces.append(rest)
    return tuple(pieces)


# ------------------------------------------------------------------------ renderer

class _PartCache:
    """Remembers the last rendered body, so constant bodies are encoded once."""

    __slots__ = ("field", "last")

    def __init__(self, field: str) -> None:
        self.field = field
        # One tuple, replaced atomically, so concurrent renders never mix entries.
        self.last: tuple[str | None, EncodedBody] = (None, EncodedBody("", b""))

    def encode(self, content: str) -> EncodedBody:
        last_content, last_encoded = self.last
        if content == last_content:
            return last_encoded
        encoded = _encode_body(self.field, content)
        self.last = (content, encoded)
        return encoded


class Renderer:
    def __init__(
        self,
        *,
        sender: str,
        subject: str,
        text: str | None,
        html: str | None,
        columns: list[str],
        campaign_uid: str,
        boundary: str | None = None,
    ) -> None:
        if text is None and html is None:
            raise TemplateError("text/html: at least one of text and html is required")
        env = _new_environment()
        self._subject_template = _compile_template(env, "subject", subject)
        self._text_template = None if text is None else _compile_template(env, "text", text)
        self._html_template = None if html is None else _compile_template(env, "html", html)
        self._columns = list(columns)
        self._campaign_uid = campaign_uid
        self._sender = sender
        self._from_line = _fold_address("sender", "From", sender)
        self._domain = _sender_domain(sender)
        self._boundary = boundary if boundary is not None else default_boundary(campaign_uid)
        self._boundary_bytes = self._boundary.encode("ascii")
        self._message_id_is_plain = self._message_id_folds_to_itself()
        self._skeletons: dict[tuple[str | None, str | None], tuple[bytes, ...]] = {}
        self._text_cache = _PartCache("text")
        self._html_cache = _PartCache("html")
        self._last_subject: tuple[str, bytes] = ("", b"")
        self._last_date: tuple[str, bytes] = ("", b"")

    @property
    def boundary(self) -> str:
        return self._boundary

    def message_id(self, line: int) -> str:
        return f"<{self._campaign_uid}.{line}@{self._domain}>"

    def render(self, *, line: int, email: str, fields: list[str], date: str) -> bytes:
        context: dict[str, Any] = dict(zip(self._columns, fields))
        context["email"] = email
        subject = _render_template("subject", self._subject_template, context)
        text = self._render_optional("text", self._text_template, context)
        html = self._render_optional("html", self._html_template, context)
        headers = b"".join((
            self._from_line,
            _fold_address("to", "To", email),
            self._subject_line(subject),
            self._date_line(date),
            self._message_id_line(line),
        ))
        text_body = None if text is None else self._text_cache.encode(text)
        html_body = None if html is None else self._html_cache.encode(html)
        if text_body is not None and html_body is not None:
            if self._boundary_bytes in text_body.wire or self._boundary_bytes in html_body.wire:
                # The reference would happily emit a body line equal to the delimiter
                # and so produce a broken message; here (and only here) we build the
                # message with the email package and a boundary absent from the bodies.
                return self._render_with_other_boundary(
                    email, subject, text, html, date, line, text_body, html_body
                )
            before, between, after = self._skeleton(text_body.cte, html_body.cte)
            return b"".join((headers, before, text_body.wire, between, html_body.wire, after))
        body = text_body if text_body is not None else html_body
        assert body is not None
        text_cte = body.cte if text_body is not None else None
        html_cte = body.cte if html_body is not None else None
        before, after = self._skeleton(text_cte, html_cte)
        return b"".join((headers, before, body.wire, after))

    @staticmethod
    def _render_optional(
        field: str, template: jinja2.Template | None, context: dict[str, Any]
    ) -> str | None:
        return None if template is None else _render_template(field, template, context)

    def _subject_line(self, subject: str) -> bytes:
        last_subject, last_line = self._last_subject
        if subject == last_subject and last_line:
            return last_line
        folded = _fold_unstructured("subject", "Subject", subject)
        self._last_subject = (subject, folded)
        return folded

    def _date_line(self, date: str) -> bytes:
        last_date, last_line = self._last_date
        if date == last_date and last_line:
            return last_line
        folded = _fold_date(date)
        self._last_date = (date, folded)
        return folded

    def _message_id_line(self, line: int) -> bytes:
        msgid = self.message_id(line)
        if self._message_id_is_plain and _fits_one_line("Message-ID", msgid):
            return f"Message-ID: {msgid}{_CRLF}".encode("ascii")
        return _fold_with_email_package("message_id", "Message-ID", msgid)

    def _message_id_folds_to_itself(self) -> bool:
        # Only the line number varies between Message-IDs, and digits never change
        # how the msg-id parses, so one sample decides it for every short line.
        sample = self.message_id(1234567)
        plain = f"Message-ID: {sample}{_CRLF}".encode("ascii", "replace")
        try:
            return _fold_with_email_package("message_id", "Message-ID", sample) == plain
        except (RenderError, UnicodeError):
            return False

    def _skeleton(self, text_cte: str | None, html_cte: str | None) -> tuple[bytes, ...]:
        key = (text_cte, html_cte)
        skeleton = self._skeletons.get(key)
        if skeleton is None:
            skeleton = _serialise_skeleton(
                self._text_template is not None,
                self._html_template is not None,
                text_cte,
                html_cte,
                self._boundary,
            )
            self._skeletons[key] = skeleton
        return skeleton

    def _render_with_other_boundary(
        self,
        email: str,
        subject: str,
        text: str,
        html: str,
        date: str,
        line: int,
        text_body: EncodedBody,
        html_body: EncodedBody,
    ) -> bytes:
        boundary = self._boundary_absent_from(text_body.wire + b"\n" + html_body.wire)
        return build_with_email_package(
            sender=self._sender,
            to=email,
            subject=subject,
            text=text,
            html=html,
            date=date,
            msgid=self.message_id(line),
            boundary=boundary,
        )

    def _boundary_absent_from(self, bodies: bytes) -> str:
        # Same scheme as email.generator.Generator._make_boundary.
        counter = 0
        while True:
            candidate = f"{self._boundary}.{counter}"
            if candidate.encode("ascii") not in bodies:
                return candidate
            counter += 1
