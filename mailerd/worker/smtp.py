"""SMTP helpers shared by the workers and `mailerctl test-send`: what a relay said and
relay text made safe, dot-stuffing, the relay's limits (connect.py opens the session).

Relay text is bytes from a stranger. aiosmtplib decodes replies with `surrogateescape`,
so a Latin-1 reply becomes a str that msgspec cannot encode; every relay string that
leaves a worker goes through `relay_text` first: valid UTF-8, at most REPLY_MAX
characters.
"""

from __future__ import annotations

import re

import aiosmtplib

from mailerd.schema.workers import REPLY_MAX

_PERIOD_AT_LINE_START = re.compile(rb"(?m)^\.")
_MAILMAX = re.compile(r"\bMAILMAX=(\d+)", re.IGNORECASE)
_CUT_MARK = " [cut]"


def relay_text(text: str | bytes) -> str:
    """A relay's words as valid UTF-8 (undecodable bytes become U+FFFD), cut to REPLY_MAX."""
    if isinstance(text, str):
        text = text.encode("utf-8", "surrogateescape")
    decoded = text.decode("utf-8", "replace")
    if len(decoded) > REPLY_MAX:
        decoded = decoded[:REPLY_MAX - len(_CUT_MARK)] + _CUT_MARK
    return decoded


def dot_stuff(message: bytes) -> bytes:
    """Transparency (RFC 5321 4.5.2); the message already has CRLF line ends."""
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    return _PERIOD_AT_LINE_START.sub(b"..", message)


def relay_mailmax(smtp: aiosmtplib.SMTP) -> int:
    """RFC 9422 `LIMITS MAILMAX=n` from the EHLO reply, or 0."""
    match = _MAILMAX.search(smtp.esmtp_extensions.get("limits", ""))
    return int(match[1]) if match else 0


def smtputf8_refusal(sender: str, recipient: str) -> str:
    """Why a message that needs SMTPUTF8 cannot go through a relay that lacks it."""
    address = recipient if not recipient.isascii() else sender
    return f"relay does not offer SMTPUTF8, required for <{address}>"


def code_of(exc: BaseException) -> int | None:
    return exc.code if isinstance(exc, aiosmtplib.SMTPResponseException) else None


def describe(exc: BaseException) -> str:
    """What went wrong, as safe relay text (the relay's reply, if it gave one)."""
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return relay_text(f"{exc.code} {exc.message}")
    return relay_text(str(exc) or type(exc).__name__)
