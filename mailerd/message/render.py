"""Per-recipient message rendering.

The MIME skeleton of a campaign (part headers, boundaries) is serialised once by
the ``email`` package itself; per recipient only the personalised headers and the
encoded bodies are substituted.  The output is byte-for-byte what
``EmailMessage(policy=POLICY)`` + ``as_bytes()`` produce for the same values
(see tests/test_render.py::reference), at a fraction of the cost.

A message is, in this order: From, To, Subject, Date, Message-ID, Reply-To,
the campaign's own headers, List-Unsubscribe(-Post), then the MIME headers and
the bodies: text and/or html (multipart/alternative when both), inside a
multipart/mixed with the attachments when there are any.  Attachments are
base64-encoded once per campaign and spliced in per recipient.

Merge values can never add or split a header: every header value is checked for
CR, LF and the other controls, and for RFC 2047 encoded words that decode to
them (RenderError naming the field); it is then folded by the email package's
policy, which RFC 2047-encodes non-ASCII text (with ``smtputf8=True`` the
SMTPUTF8 policy writes it as UTF-8, RFC 6532, instead), and every line the policy
folds is checked again, as bytes, whatever the interpreter (headers.py says why).
Merge values with C0 controls other than tab and line breaks are refused for
bodies too (UnsafeValue naming the column).  HTML bodies autoescape merge values;
`|safe` marks trusted markup.  `check_headers` runs the header half of `render`,
which is what enqueue runs on every row so no row fails for its headers later.
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
import mimetypes
import re
from datetime import datetime, timezone
from email.headerregistry import UnstructuredHeader
from email.message import EmailMessage
from typing import Any, Iterable, NamedTuple

import jinja2
import jinja2.meta
from jinja2.sandbox import SandboxedEnvironment

from mailerd.message import tokens, verp
from mailerd.message.headers import (file_name_problem, folded_header_problem,
                                     header_value_problem, merge_value_problem)
from mailerd.schema.control import merge_field_names

__all__ = [
    "POLICY",
    "POLICY_SMTPUTF8",
    "Attachment",
    "RenderError",
    "Renderer",
    "TemplateError",
    "UnsafeValue",
    "content_type_for",
    "format_date",
    "header_name_problem",
    "message_id_for",
    "needs_smtputf8",
    "template_variables",
]


class _CheckedPolicy(email.policy.EmailPolicy):
    """email.policy.SMTP, except that a folded header line with a bare CR or LF, a
    line break not followed by white space, or another control is an error
    (ValueError) instead of output: the check is on the bytes the email package
    produced, so it holds on interpreters without the CVE-2024-6923 fix too."""

    def fold_binary(self, name: str, value: Any) -> bytes:
        return _refuse_unsafe_fold(name, super().fold_binary(name, value))

    def fold(self, name: str, value: Any) -> str:  # as_string(); mailerd itself uses bytes
        folded = super().fold(name, value)
        _refuse_unsafe_fold(name, folded.encode("utf-8", "surrogateescape"))
        return folded


def _refuse_unsafe_fold(name: str, folded: bytes) -> bytes:
    problem = folded_header_problem(folded)
    if problem is not None:
        raise ValueError(f"{name}: {problem}")
    return folded


# refold_source="none": a header stored with set_raw (only List-Unsubscribe, see
# _fold_list_unsubscribe) is written as it is; every other header is an object the
# policy folds.  The default would RFC 2047-encode a long URL, which breaks it.
POLICY = _CheckedPolicy(linesep="\r\n", cte_type="7bit", refold_source="none")
# For a message to or from an internationalised address, sent with SMTPUTF8:
# headers are UTF-8 (RFC 6532) instead of RFC 2047 encoded words.
POLICY_SMTPUTF8 = POLICY.clone(utf8=True)

_CRLF = "\r\n"
_MAX_LINE = POLICY.max_line_length

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


class UnsafeValue(RenderError):
    """A merge value that may not go into a message; the message names the column."""

    def __init__(self, column: str, why: str) -> None:
        super().__init__(f"column {column!r}: {why}")
        self.column = column
        self.why = why


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

def _new_environment(autoescape: bool = False) -> SandboxedEnvironment:
    """Text and headers are not markup: no escaping.  HTML bodies escape every value
    (a sign-up "name" must not become a link); `{{ x|safe }}` opts a trusted value out."""
    return SandboxedEnvironment(
        undefined=jinja2.StrictUndefined, autoescape=autoescape, keep_trailing_newline=True
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
    """template.render(context) without its per-call copy of the globals: `context`
    already holds them (see _base_context), and is shared, read-only, by the
    templates of one message."""
    try:
        return template.environment.concat(  # type: ignore[attr-defined]
            template.root_render_func(template.new_context(context, shared=True))
        )
    except jinja2.UndefinedError as exc:
        raise RenderError(f"{field}: {exc.message}") from exc
    except Exception as exc:  # sandbox violations, filters failing on the data, ...
        raise RenderError(f"{field}: template failed: {exc}") from exc


# ------------------------------------------------------------------------- headers

def _check_header_value(field: str, value: str) -> None:
    problem = header_value_problem(value)
    if problem is not None:
        raise RenderError(f"{field}: {problem}")


def _fold_with_email_package(field: str, name: str, value: str) -> bytes:
    return _fold_checked(POLICY, field, name, value)


def _fold_checked(policy: email.policy.EmailPolicy, field: str, name: str, value: str) -> bytes:
    """The header as the policy folds it; RenderError if the value or the folded line is unsafe."""
    _check_header_value(field, value)
    try:
        _, header = policy.header_store_parse(name, value)
        return policy.fold_binary(name, header)
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
    try:
        return POLICY.fold_binary("Date", header)
    except ValueError as exc:
        raise RenderError(f"date: {exc}") from exc


def message_id_for(campaign_uid: str, line: int, sender: str) -> str:
    """The Message-ID every copy of this recipient's message carries, resends included."""
    return _message_id(campaign_uid, line, _sender_domain(sender))


def _message_id(campaign_uid: str, line: int, domain: str) -> str:
    return f"<{campaign_uid}.{line}@{domain}>"


@functools.lru_cache(maxsize=64)  # a report asks for every recipient's Message-ID: parse once
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


# Headers a campaign may not set itself: mailerd writes them, or they would
# address the message to someone else.
_RESERVED_HEADERS = frozenset({
    "from", "to", "cc", "bcc", "subject", "date", "message-id", "reply-to", "sender",
    "mime-version", "content-type", "content-transfer-encoding", "content-disposition",
    "content-id", "content-description", "list-unsubscribe", "list-unsubscribe-post",
    "dkim-signature", "return-path", "received", "in-reply-to", "references",
})
_HEADER_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 ftext


def header_name_problem(name: str) -> str | None:
    """Why a campaign may not set a header of this name, or None if it may."""
    if not _HEADER_NAME.fullmatch(name):
        return f"{name!r} is not a valid header name (printable ASCII, no ':' or spaces)"
    lowered = name.lower()
    if lowered in _RESERVED_HEADERS or lowered.startswith("resent-"):
        return f"{name!r} is set by mailerd itself and cannot be given in headers"
    if not issubclass(POLICY.header_factory[lowered], UnstructuredHeader):
        return f"{name!r} is a structured header (addresses, dates, ...) and cannot be set"
    return None


_MIME_TYPES = mimetypes.MimeTypes()  # built-in table only: the same on every machine
_COMPRESSED = {"gzip": "application/gzip", "bzip2": "application/x-bzip2",
               "xz": "application/x-xz", "compress": "application/x-compress",
               "br": "application/x-brotli"}


def content_type_for(filename: str) -> str:
    """MIME type of an attachment, by its extension; application/octet-stream if unknown."""
    guessed, encoding = _MIME_TYPES.guess_type(filename.lower(), strict=False)
    if encoding is not None:
        return _COMPRESSED.get(encoding, "application/octet-stream")
    return guessed or "application/octet-stream"


def needs_smtputf8(*addresses: str) -> bool:
    """An internationalised address (RFC 6531) can only be sent with SMTPUTF8."""
    return not all(address.isascii() for address in addresses)


class Attachment(NamedTuple):
    name: str  # file name shown to the recipient
    content_type: str  # "maintype/subtype"
    data: bytes


def _attachment_wire(data: bytes) -> bytes:
    """What the generator writes for set_bytes_content(data, cte="base64")."""
    return _to_wire(email.contentmanager._encode_base64(data, _MAX_LINE))


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


def _build_message(
    headers: Iterable[tuple[str, str]],
    text: str | None,
    html: str | None,
    boundary: str,
    alt_boundary: str,
    attachments: Iterable[Attachment],
    policy: email.policy.EmailPolicy,
) -> bytes:
    """The whole message by the email package: the reference, and the rare slow path."""
    message = EmailMessage(policy=policy)
    for name, value in headers:
        try:
            if name in _RAW_HEADERS:
                message.set_raw(name, value)
            else:
                message[name] = value
        except (ValueError, TypeError) as exc:
            raise RenderError(f"{name.lower()}: {exc}") from exc
    _set_bodies(message, text, html, boundary, alt_boundary, tuple(attachments))
    try:
        return message.as_bytes()
    except (ValueError, TypeError, UnicodeError) as exc:
        raise RenderError(f"message: {exc}") from exc


def _set_bodies(
    message: EmailMessage,
    text: str | None,
    html: str | None,
    boundary: str,
    alt_boundary: str,
    attachments: tuple[Attachment, ...] = (),
    text_cte: str | None = None,
    html_cte: str | None = None,
) -> None:
    if text is not None and html is not None:
        message.set_content(text, cte=text_cte)
        message.add_alternative(html, subtype="html", cte=html_cte)
        message.set_boundary(alt_boundary if attachments else boundary)
    elif text is not None:
        message.set_content(text, cte=text_cte)
    elif html is not None:
        message.set_content(html, subtype="html", cte=html_cte)
    for attachment in attachments:
        maintype, _, subtype = attachment.content_type.partition("/")
        message.add_attachment(attachment.data, maintype=maintype, subtype=subtype,
                               filename=attachment.name)
    if attachments:
        message.set_boundary(boundary)


def _attachment_sentinel(index: int) -> bytes:
    return f"mailerd-skeleton-attachment-{index}-c4a1".encode("ascii")


def _serialise_skeleton(
    has_text: bool,
    has_html: bool,
    text_cte: str | None,
    html_cte: str | None,
    boundary: str,
    alt_boundary: str,
    attachments: tuple[Attachment, ...],
) -> tuple[bytes, ...]:
    """The body-independent bytes around the bodies, as the email package writes them.

    Returns the pieces between the variable parts, which are, in order: the text
    body (if any), the html body (if any), then each attachment's encoded payload
    (constant, but kept out of the skeleton so that each combination of CTEs does
    not hold its own copy).  The skeleton has no From..List-Unsubscribe headers;
    those come first in the reference and are prepended per recipient.
    """
    skeleton = EmailMessage(policy=POLICY)
    text = _TEXT_SENTINEL if has_text else None
    html = _HTML_SENTINEL if has_html else None
    stand_ins = tuple(
        a._replace(data=_attachment_sentinel(i)) for i, a in enumerate(attachments)
    )
    _set_bodies(skeleton, text, html, boundary, alt_boundary, stand_ins, text_cte, html_cte)
    raw = skeleton.as_bytes()
    markers = []
    if text is not None and text_cte is not None:
        markers.append(_forced_wire(text, text_cte))
    if html is not None and html_cte is not None:
        markers.append(_forced_wire(html, html_cte))
    markers += [_attachment_wire(a.data) for a in stand_ins]
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


class _HeaderTemplate:
    """A personalised header: its template and the last value's folded line."""

    __slots__ = ("name", "field", "template", "last")

    def __init__(self, env: SandboxedEnvironment, name: str, field: str, source: str) -> None:
        self.name = name
        self.field = field
        self.template = _compile_template(env, field, source)
        self.last: tuple[str, bytes] = ("", b"")

    def value(self, context: dict[str, Any]) -> str:
        return _render_template(self.field, self.template, context)

    def line(self, value: str) -> bytes:
        last_value, last_line = self.last
        if value == last_value and last_line:
            return last_line
        folded = _fold_unstructured(self.field, self.name, value)
        self.last = (value, folded)
        return folded


_RAW_HEADERS = frozenset({"List-Unsubscribe"})
_NOT_IN_URI = re.compile(r"[^!-~]|[<>]")


def list_unsubscribe_value(mailto: str | None, url: str | None) -> str:
    """`<mailto:...>, <https://...>` (RFC 2369) from the rendered parts, folded
    between the two (never inside a URI: the email package would RFC 2047-encode a
    long one, which no client decodes there).  RenderError for a URI with spaces,
    controls, angle brackets or non-ASCII: percent-encode merge values (|urlencode)."""
    targets = []
    if mailto:
        targets.append(mailto if mailto.lower().startswith("mailto:") else f"mailto:{mailto}")
    if url:
        targets.append(url)
    for target in targets:
        bad = _NOT_IN_URI.search(target)
        if bad is not None:
            raise RenderError(
                f"list_unsubscribe: {bad.group()!r} is not allowed in {target!r} "
                "(percent-encode merge values with |urlencode)")
    value = ", ".join(f"<{t}>" for t in targets)
    if _fits_one_line("List-Unsubscribe", value):
        return value
    return f",{_CRLF} ".join(f"<{t}>" for t in targets)


ONE_CLICK = "List-Unsubscribe=One-Click"  # RFC 8058


def _check_file_names(names: Iterable[str]) -> None:
    """TemplateError for an attachment name the email package cannot write (it raises
    deep inside the skeleton, which would kill every worker rendering the campaign)."""
    for i, name in enumerate(names):
        problem = file_name_problem(name)
        if problem is not None:
            raise TemplateError(f"attachments[{i}] ({name!r}): {problem}")


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
        reply_to: str | None = None,
        headers: dict[str, str] | None = None,
        list_unsubscribe_mailto: str | None = None,
        list_unsubscribe_url: str | None = None,
        attachments: Iterable[Attachment] = (),
        unsubscribe_key: bytes = b"",
        return_path: str | None = None,
    ) -> None:
        if text is None and html is None:
            raise TemplateError("text/html: at least one of text and html is required")
        why = verp.return_path_problem(return_path)
        if why:
            raise TemplateError(f"return_path: {why}")
        self._return_path = return_path
        env = _new_environment()
        self._globals: dict[str, Any] = dict(env.globals)
        self._subject_template = _compile_template(env, "subject", subject)
        self._text_template = None if text is None else _compile_template(env, "text", text)
        self._html_template = None if html is None else _compile_template(
            _new_environment(autoescape=True), "html", html)
        self._columns = list(columns)
        self._campaign_uid = campaign_uid
        self._sender = sender
        self._from_line = _fold_address("sender", "From", sender)
        self._domain = _sender_domain(sender)
        self._reply_to = reply_to
        self._reply_to_line = b"" if reply_to is None else _fold_address("reply_to", "Reply-To", reply_to)
        self._headers: list[_HeaderTemplate] = []
        for name, source in (headers or {}).items():
            problem = header_name_problem(name)
            if problem is not None:
                raise TemplateError(f"headers: {problem}")
            self._headers.append(_HeaderTemplate(env, name, f"headers.{name}", source))
        self._unsubscribe_mailto = None if not list_unsubscribe_mailto else _compile_template(
            env, "list_unsubscribe.mailto", list_unsubscribe_mailto)
        self._unsubscribe_url = None if not list_unsubscribe_url else _compile_template(
            env, "list_unsubscribe.url", list_unsubscribe_url)
        self._one_click_line = (
            f"List-Unsubscribe-Post: {ONE_CLICK}{_CRLF}".encode("ascii")
            if list_unsubscribe_url else b"")
        sources = [subject, text or "", html or "", *(headers or {}).values(),
                   list_unsubscribe_mailto or "", list_unsubscribe_url or ""]
        used = set().union(*(template_variables(s) for s in sources if s))
        self._uses_token = "token" in used
        # (index, column) of the merge values some template reads: those are checked
        self._used_columns = [(i, c) for i, c in enumerate(self._columns) if c in used]
        self._unsubscribe_key = unsubscribe_key
        self._attachments = tuple(attachments)
        _check_file_names(a.name for a in self._attachments)
        self._attachment_wires = tuple(_attachment_wire(a.data) for a in self._attachments)
        self._boundary = boundary if boundary is not None else default_boundary(campaign_uid)
        self._boundary_bytes = self._boundary.encode("ascii")
        # with attachments and both bodies there are two multiparts: mixed outside,
        # alternative inside
        self._alt_boundary = default_boundary(campaign_uid + "/alternative")
        self._alt_boundary_bytes = self._alt_boundary.encode("ascii")
        self._multipart = (text is not None and html is not None) or bool(self._attachments)
        self._message_id_is_plain = self._message_id_folds_to_itself()
        self._skeletons: dict[tuple[str | None, str | None], tuple[bytes, ...]] = {}
        self._text_cache = _PartCache("text")
        self._html_cache = _PartCache("html")
        self._last_subject: tuple[str, bytes] = ("", b"")
        self._last_date: tuple[str, bytes] = ("", b"")

    @classmethod
    def from_spec(cls, spec: Any, campaign_uid: str, attachments: Iterable[Attachment] = (),
                  unsubscribe_key: bytes = b"", return_path: str | None = None) -> "Renderer":
        """The renderer of a protocol.CampaignSpec (the one thing the daemon, the
        workers and `mailerctl preview` all build messages from)."""
        _check_file_names(info.name for info in spec.attachments)  # even without their bytes
        unsubscribe = spec.list_unsubscribe
        return cls(
            sender=spec.sender, subject=spec.subject, text=spec.text, html=spec.html,
            columns=merge_field_names(spec.columns),
            campaign_uid=campaign_uid, reply_to=spec.reply_to, headers=dict(spec.headers),
            list_unsubscribe_mailto=unsubscribe.mailto if unsubscribe else None,
            list_unsubscribe_url=unsubscribe.url if unsubscribe else None,
            attachments=attachments, unsubscribe_key=unsubscribe_key,
            return_path=spec.return_path or return_path,
        )

    @property
    def boundary(self) -> str:
        return self._boundary

    @property
    def alt_boundary(self) -> str:
        return self._alt_boundary

    def message_id(self, line: int) -> str:
        return _message_id(self._campaign_uid, line, self._domain)

    def envelope_sender(self, line: int) -> str | None:
        """Recipient `line`'s MAIL FROM address with a VERP return_path; None: the sender's."""
        if self._return_path is None:
            return None
        return verp.return_path(self._return_path, self._unsubscribe_key, self._campaign_uid, line)

    def token(self, email: str) -> str:
        return tokens.make(self._unsubscribe_key, self._campaign_uid, email)

    def render(self, *, line: int, email: str, fields: list[str], date: str,
               smtputf8: bool = False) -> bytes:
        context = self._context(email, fields, line)
        subject = _render_template("subject", self._subject_template, context)
        text = self._render_optional("text", self._text_template, context)
        html = self._render_optional("html", self._html_template, context)
        extra = [(h, h.value(context)) for h in self._headers]
        unsubscribe = self._list_unsubscribe(context)
        if smtputf8:
            return self._render_with_email_package(
                POLICY_SMTPUTF8, email, subject, text, html, date, line, extra, unsubscribe,
                self._boundary, self._alt_boundary)
        headers = b"".join((
            self._from_line,
            _fold_address("to", "To", email),
            self._subject_line(subject),
            self._date_line(date),
            self._message_id_line(line),
            self._reply_to_line,
            *[h.line(value) for h, value in extra],
            self._unsubscribe_line(unsubscribe),
            self._one_click_line,
        ))
        text_body = None if text is None else self._text_cache.encode(text)
        html_body = None if html is None else self._html_cache.encode(html)
        if self._multipart and self._collides(text_body, html_body):
            # The reference would happily emit a body line equal to the delimiter
            # and so produce a broken message; here (and only here) we build the
            # message with the email package and boundaries absent from the bodies.
            bodies = b"\n".join(b.wire for b in (text_body, html_body) if b is not None)
            return self._render_with_email_package(
                POLICY, email, subject, text, html, date, line, extra, unsubscribe,
                self._boundary_absent_from(self._boundary, bodies),
                self._boundary_absent_from(self._alt_boundary, bodies))
        pieces = self._skeleton(
            None if text_body is None else text_body.cte,
            None if html_body is None else html_body.cte,
        )
        if not self._attachments:
            if text_body is not None and html_body is not None:
                before, between, after = pieces
                return b"".join((headers, before, text_body.wire, between, html_body.wire, after))
            body = text_body if text_body is not None else html_body
            assert body is not None
            before, after = pieces
            return b"".join((headers, before, body.wire, after))
        parts = [b.wire for b in (text_body, html_body) if b is not None]
        parts += self._attachment_wires
        out = [headers, pieces[0]]
        for part, piece in zip(parts, pieces[1:]):
            out += (part, piece)
        return b"".join(out)

    def check_headers(self, *, email: str, fields: list[str], smtputf8: bool = False) -> None:
        """Render and fold this recipient's personalised headers exactly as `render`
        would, without the bodies: UnsafeValue or RenderError if `render` would fail
        on a merge value (bodies fail only on what _context refuses)."""
        context = self._context(email, fields)
        subject = _render_template("subject", self._subject_template, context)
        extra = [(h, h.value(context)) for h in self._headers]
        unsubscribe = self._list_unsubscribe(context)
        if smtputf8:
            headers = self._header_list(email, subject, "", 0, extra, unsubscribe)
            for field, (name, value) in zip(self._header_fields(extra), headers):
                if name not in ("Date", "Message-ID"):  # the daemon's own values
                    _fold_checked(POLICY_SMTPUTF8, field, name, value)
            return
        _fold_address("to", "To", email)
        self._subject_line(subject)
        for header, value in extra:
            header.line(value)

    def _context(self, email: str, fields: list[str], line: int = 0) -> dict[str, Any]:
        for index, column in self._used_columns:
            if index < len(fields):
                problem = merge_value_problem(fields[index])
                if problem is not None:
                    raise UnsafeValue(column, problem)
        context = self._globals.copy()
        context.update(zip(self._columns, fields))
        context["email"] = email
        context["campaign_uid"] = self._campaign_uid  # for unsubscribe links (mailerd.unsubscribe)
        context["line"] = line  # for a List-Unsubscribe mailto address (mailerd/bounces/classify.py)
        if self._uses_token:
            context["token"] = self.token(email)
        return context

    @staticmethod
    def _render_optional(
        field: str, template: jinja2.Template | None, context: dict[str, Any]
    ) -> str | None:
        return None if template is None else _render_template(field, template, context)

    def _list_unsubscribe(self, context: dict[str, Any]) -> str | None:
        if self._unsubscribe_mailto is None and self._unsubscribe_url is None:
            return None
        mailto = self._render_optional("list_unsubscribe.mailto", self._unsubscribe_mailto, context)
        url = self._render_optional("list_unsubscribe.url", self._unsubscribe_url, context)
        return list_unsubscribe_value(mailto, url)

    @staticmethod
    def _unsubscribe_line(value: str | None) -> bytes:
        return b"" if value is None else f"List-Unsubscribe: {value}{_CRLF}".encode("ascii")

    def _header_list(self, email: str, subject: str, date: str, line: int,
                     extra: list[tuple[_HeaderTemplate, str]],
                     unsubscribe: str | None) -> list[tuple[str, str]]:
        headers = [("From", self._sender), ("To", email), ("Subject", subject), ("Date", date),
                   ("Message-ID", self.message_id(line))]
        if self._reply_to is not None:
            headers.append(("Reply-To", self._reply_to))
        headers += [(h.name, value) for h, value in extra]
        if unsubscribe is not None:
            headers.append(("List-Unsubscribe", unsubscribe))
            if self._one_click_line:
                headers.append(("List-Unsubscribe-Post", ONE_CLICK))
        return headers

    def _header_fields(self, extra: list[tuple[_HeaderTemplate, str]]) -> list[str]:
        """The field names of _header_list's headers, in its order (as errors name them),
        up to the campaign's own headers."""
        fields = ["sender", "to", "subject", "date", "message_id"]
        if self._reply_to is not None:
            fields.append("reply_to")
        fields += [h.field for h, _ in extra]
        return fields  # not List-Unsubscribe: list_unsubscribe_value checked and folded it

    def _collides(self, text_body: EncodedBody | None, html_body: EncodedBody | None) -> bool:
        for body in (text_body, html_body):
            if body is not None and (self._boundary_bytes in body.wire
                                     or self._alt_boundary_bytes in body.wire):
                return True
        return False

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
            try:
                skeleton = _serialise_skeleton(
                    self._text_template is not None,
                    self._html_template is not None,
                    text_cte,
                    html_cte,
                    self._boundary,
                    self._alt_boundary,
                    self._attachments,
                )
            except (ValueError, TypeError, UnicodeError) as exc:
                # campaign-level: checked at enqueue, so not expected; but never a crash
                raise RenderError(f"message: {exc}") from exc
            self._skeletons[key] = skeleton
        return skeleton

    def _render_with_email_package(
        self,
        policy: email.policy.EmailPolicy,
        email: str,
        subject: str,
        text: str | None,
        html: str | None,
        date: str,
        line: int,
        extra: list[tuple[_HeaderTemplate, str]],
        unsubscribe: str | None,
        boundary: str,
        alt_boundary: str,
    ) -> bytes:
        headers = self._header_list(email, subject, date, line, extra, unsubscribe)
        for field, (name, value) in zip(self._header_fields(extra), headers):
            _check_header_value(field, value)
        return _build_message(headers, text, html, boundary, alt_boundary, self._attachments,
                              policy)

    @staticmethod
    def _boundary_absent_from(base: str, bodies: bytes) -> str:
        # Same scheme as email.generator.Generator._make_boundary.
        if base.encode("ascii") not in bodies:
            return base
        counter = 0
        while True:
            candidate = f"{base}.{counter}"
            if candidate.encode("ascii") not in bodies:
                return candidate
            counter += 1
