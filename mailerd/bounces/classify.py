"""What a message in the bounce mailbox says, and whom it is about.

Read with the `email` package where a standard exists: RFC 3464 delivery status
notifications (multipart/report; report-type=delivery-status) and RFC 5965 abuse
reports (report-type=feedback-report). Everything else goes to flufl.bounce, the
detectors of GNU Mailman, which know the many non-standard formats (old Postfix,
Exim, qmail, Exchange, Yahoo ...). Classified as:

  hard        5.x.x, or a permanent failure flufl.bounce found
  soft        4.x.x, an Action "delayed", or a temporary failure flufl.bounce found
  complaint   an ARF report (any Feedback-Type but "not-spam")
  auto-reply  an out-of-office or other automatic answer (RFC 3834): ignored
  unknown     a report that names a recipient but no status to go by: kept, no effect

Whom it is about: an authentic VERP tag (message/verp.py) in the addresses the
report was sent to or names; else mailerd's Message-ID <uid.line@domain> of the
original, which the journal only accepts together with the recipient's address.

A message sent to a List-Unsubscribe mailto address that ends its local part with
`{{ campaign_uid }}-{{ line }}-{{ token }}` is no report but an unsubscribe request
(RFC 2369): `unsubscribe_requests` finds those parts in the addresses the message was
sent to, and the caller checks the token (`genuine`) against the recipient the journal
has at that line, as the one-click endpoint does with its link.
"""

from __future__ import annotations

import email
import email.message
import email.parser
import email.utils
import hashlib
import hmac
import logging
import re
from typing import Iterator, NamedTuple

from flufl.bounce import all_failures

from mailerd.message import tokens, verp
from mailerd.schema.records import BounceTarget

# flufl.bounce logs each detector it runs, and a detector's exception with its traceback, to
# the root logger; a failing detector only means "not this format" here (_flufl_findings)
logging.getLogger("flufl.bounce").addHandler(logging.NullHandler())
logging.getLogger("flufl.bounce").propagate = False

_STATUS = re.compile(r"\b([245])\.\d{1,3}\.\d{1,3}\b")
_MAILERD_MESSAGE_ID = re.compile(r"<([0-9a-f]{16})\.(\d{1,12})@[^>]+>", re.IGNORECASE)
_SEVERITY = {"complaint": 4, "hard": 3, "soft": 2, "unknown": 1}
_AUTO_REPLY_SUBJECT = re.compile(
    r"^\s*(auto(matic)?[ -]?(reply|response|antwort)|out of (the )?office|abwesenheit|"
    r"absence|vacation|autoreply|auto:)", re.IGNORECASE)
# where the address a report was sent to (our VERP return path) shows up
_ENVELOPE_HEADERS = ("To", "Delivered-To", "X-Original-To", "Envelope-To", "X-Envelope-To",
                     "Return-Path", "Original-Mail-From", "Original-Envelope-Id", "Cc")
_DIAGNOSTIC_MAX = 500
# where the List-Unsubscribe mailto address shows up (not Return-Path: that is the sender's)
_RECIPIENT_HEADERS = ("To", "Cc", "Delivered-To", "X-Original-To", "Envelope-To", "X-Envelope-To")
# CAMPAIGN_UID-LINE-TOKEN at the end of a local part; any case (MTAs may fold it)
_UNSUBSCRIBE = re.compile(r"(?<![0-9a-z])([0-9a-f]{16})-([0-9]{1,12})-([a-z0-9_-]{22})@",
                          re.IGNORECASE)


class Finding(NamedTuple):
    kind: str
    address: str | None  # the original recipient the report names
    status: str | None
    diagnostic: str


class Reading(NamedTuple):
    """A mailbox message, read."""

    format: str  # "dsn", "arf", "flufl", "auto-reply", "none"
    findings: list[Finding]
    tag: verp.Tagged | None
    message_ids: list[tuple[str, int]]  # mailerd Message-IDs of the original: (uid, line)
    summary: str  # for the user: From and Subject of the mailbox message


class Unreadable(ValueError):
    """Nothing in the message says what it is or whom it is about: it stays in the mailbox."""


def source_id(raw: bytes) -> str:
    """The identity of a mailbox message: the same bytes read twice are applied once."""
    return hashlib.sha256(raw).hexdigest()


def read(raw: bytes, key: bytes) -> Reading:
    message = email.message_from_bytes(raw)
    summary = _summary(message)
    originals = list(_original_headers(message))
    tag = _find_tag(key, message, originals)
    message_ids = _message_ids(message, originals)
    report_type = (message.get_param("report-type") or "").lower() if message.get_content_type() \
        == "multipart/report" else ""
    if report_type == "feedback-report":
        return Reading("arf", _arf_findings(message, originals), tag, message_ids, summary)
    if report_type == "delivery-status":
        findings = _dsn_findings(message)
        if findings:
            return Reading("dsn", findings, tag, message_ids, summary)
    findings = _flufl_findings(message)  # before the auto-reply test: bounces are auto-replied too
    if findings:
        return Reading("flufl", findings, tag, message_ids, summary)
    if _is_auto_reply(message):
        return Reading("auto-reply", [], tag, message_ids, summary)
    if tag or message_ids:
        return Reading("none", [Finding("unknown", None, None, summary)], tag, message_ids, summary)
    raise Unreadable(f"neither a bounce, a complaint nor an automatic reply, and no VERP tag or "
                     f"Message-ID of mailerd in it ({summary})")


class UnsubscribeRequest(NamedTuple):
    """The parts of a List-Unsubscribe mailto address a message was sent to."""

    campaign_uid: str
    line: int
    token: str


class Understood(NamedTuple):
    """A mailbox message, ready for Journal.apply_bounce (or apply_unsubscribe)."""

    source: str
    format: str
    summary: str
    targets: list[BounceTarget]
    unsubscribes: tuple[UnsubscribeRequest, ...] = ()


def understand(raw: bytes, key: bytes) -> Understood:
    """Read and match one mailbox message; Unreadable if it must stay in the mailbox."""
    message = email.message_from_bytes(raw)
    requests = unsubscribe_requests(message)
    if requests:
        return Understood(source_id(raw), "unsubscribe", _summary(message), [], requests)
    reading = read(raw, key)
    return Understood(source_id(raw), reading.format, reading.summary, targets(reading))


def unsubscribe_requests(message: email.message.Message) -> tuple[UnsubscribeRequest, ...]:
    """The unsubscribe parts in the addresses the message itself was sent to (never in a
    returned original: a bounce quotes the List-Unsubscribe header it carried)."""
    values = [str(v) for name in _RECIPIENT_HEADERS for v in message.get_all(name, [])]
    found = {UnsubscribeRequest(m.group(1).lower(), int(m.group(2)), m.group(3)): None
             for m in _UNSUBSCRIBE.finditer("\n".join(values))}
    return tuple(found)


def genuine(key: bytes, request: UnsubscribeRequest, address: str) -> bool:
    """True if the request's token is the one mailerd made for `address` in that campaign
    (tokens.make, compared without case: a mail system may fold an address's case, and
    the token keeps over 100 bits of its 128 without it)."""
    expected = tokens.make(key, request.campaign_uid, address).lower()
    return hmac.compare_digest(expected.encode(), request.token.lower().encode("ascii", "replace"))


def targets(reading: Reading) -> list[BounceTarget]:
    """The recipients the reading is about, each with the worst finding for it."""
    if not reading.findings:
        return []
    worst = max(reading.findings, key=lambda f: _SEVERITY.get(f.kind, 0))
    if reading.tag is not None:  # VERP: one envelope, one recipient
        return [BounceTarget(reading.tag.campaign_uid, reading.tag.line, worst.kind, worst.status,
                             worst.diagnostic)]
    addresses = tuple(sorted({f.address.casefold() for f in reading.findings if f.address}))
    return [BounceTarget(uid, line, worst.kind, worst.status, worst.diagnostic, addresses)
            for uid, line in reading.message_ids if addresses]


# ------------------------------------------------------------------ formats


def _dsn_findings(message: email.message.Message) -> list[Finding]:
    findings = []
    for part in message.walk():
        if part.get_content_type() != "message/delivery-status":
            continue
        blocks = _field_blocks(part)
        for block in blocks[1:]:  # the first block is about the message, the rest per recipient
            finding = _dsn_recipient(block)
            if finding is not None:
                findings.append(finding)
    return findings


def _dsn_recipient(block: email.message.Message) -> Finding | None:
    action = (block.get("Action") or "").strip().lower()
    if action in ("delivered", "relayed", "expanded"):
        return None  # a success notice, not a bounce
    address = _typed_address(block.get("Original-Recipient")) or _typed_address(
        block.get("Final-Recipient"))
    diagnostic = _clean(block.get("Diagnostic-Code") or "")
    status_match = _STATUS.search(block.get("Status") or "") or _STATUS.search(diagnostic)
    status = status_match.group(0) if status_match else None
    if status and status.startswith("5"):
        kind = "hard"
    elif (status and status.startswith("4")) or action == "delayed":
        kind = "soft"
    elif status and status.startswith("2"):
        return None
    else:
        kind = "unknown"
    return Finding(kind, address, status, diagnostic or (block.get("Status") or "").strip())


def _arf_findings(message: email.message.Message,
                  originals: list[email.message.Message]) -> list[Finding]:
    fields = next((b for part in message.walk() if part.get_content_type() ==
                   "message/feedback-report" for b in _field_blocks(part)), None)
    feedback_type = ((fields.get("Feedback-Type") if fields else None) or "abuse").strip().lower()
    if feedback_type == "not-spam":
        return []
    addresses = [a for a in (_typed_address(fields.get("Original-Rcpt-To")) if fields else None,) if a]
    for original in originals:
        addresses += [a for _, a in email.utils.getaddresses(original.get_all("To", [])) if a]
    diagnostic = f"feedback report: {feedback_type}"
    if fields and fields.get("User-Agent"):
        diagnostic += f" from {_clean(fields['User-Agent'])}"
    return [Finding("complaint", a, None, diagnostic) for a in addresses] or [
        Finding("complaint", None, None, diagnostic)]


def _flufl_findings(message: email.message.Message) -> list[Finding]:
    try:
        temporary, permanent = all_failures(message)
    except Exception:  # a heuristic detector tripping over an odd message is not our failure
        return []
    subject = _clean(message.get("Subject") or "")
    return ([Finding("hard", _text(a), None, subject) for a in sorted(permanent)]
            + [Finding("soft", _text(a), None, subject) for a in sorted(temporary - permanent)])


def _is_auto_reply(message: email.message.Message) -> bool:
    auto = (message.get("Auto-Submitted") or "no").strip().lower()
    precedence = (message.get("Precedence") or "").strip().lower()
    return (auto.startswith("auto-replied") or precedence == "auto_reply"
            or any(message.get(h) for h in ("X-Autoreply", "X-Autorespond", "X-Auto-Response-Suppress"))
            or bool(_AUTO_REPLY_SUBJECT.match(message.get("Subject") or "")))


# ------------------------------------------------------------------ whom it is about


def _find_tag(key: bytes, message: email.message.Message,
              originals: list[email.message.Message]) -> verp.Tagged | None:
    values: list[str] = []
    for headers in (message, *originals):
        for name in _ENVELOPE_HEADERS:
            values += [str(v) for v in headers.get_all(name, [])]
    for part in message.walk():
        if part.get_content_type() == "message/feedback-report":
            values += [str(v) for b in _field_blocks(part) for v in b.values()]
    return verp.find_tag(key, "\n".join(values))


def _message_ids(message: email.message.Message,
                 originals: list[email.message.Message]) -> list[tuple[str, int]]:
    values = [str(o.get("Message-ID", "")) for o in originals]
    values += [str(message.get(h, "")) for h in ("In-Reply-To", "References")]
    found: dict[tuple[str, int], None] = {}
    for value in values:
        for match in _MAILERD_MESSAGE_ID.finditer(value):
            found[(match.group(1).lower(), int(match.group(2)))] = None
    return list(found)


def _original_headers(message: email.message.Message) -> Iterator[email.message.Message]:
    """The headers of the original message a report returns (message/rfc822 or text/rfc822-headers)."""
    for part in message.walk():
        kind = part.get_content_type()
        if kind in ("message/rfc822", "message/rfc822-headers"):
            payload = part.get_payload()
            if isinstance(payload, list) and payload:
                yield payload[0]
        elif kind == "text/rfc822-headers":
            yield email.parser.HeaderParser().parsestr(_decoded_text(part))


def _field_blocks(part: email.message.Message) -> list[email.message.Message]:
    """The header blocks of a message/delivery-status or message/feedback-report part."""
    payload = part.get_payload()
    if isinstance(payload, list):
        return [p for p in payload if isinstance(p, email.message.Message)]
    text = _decoded_text(part)
    return [email.parser.HeaderParser().parsestr(block + "\n")
            for block in re.split(r"\r?\n\s*\r?\n", text) if block.strip()]


def _decoded_text(part: email.message.Message) -> str:
    data = part.get_payload(decode=True)
    if isinstance(data, bytes):
        return data.decode("utf-8", "replace")
    return str(part.get_payload())


def _typed_address(value: object) -> str | None:
    """`rfc822; user@example.com` -> user@example.com."""
    if not value:
        return None
    address = str(value).split(";", 1)[-1].strip().strip("<>").strip()
    return address if "@" in address else None


def _summary(message: email.message.Message) -> str:
    return _clean(f"from {message.get('From', '?')}: {message.get('Subject', '(no subject)')}")


def _clean(text: str) -> str:
    return " ".join(str(text).split())[:_DIAGNOSTIC_MAX]


def _text(address: bytes | str) -> str:
    return address.decode("utf-8", "replace") if isinstance(address, bytes) else address
