"""Native journald output for mailerd's events.

When systemd connects stderr to the journal it says so in $JOURNAL_STREAM
("<st_dev>:<st_ino>" of that stream); then every event goes to journald as one
entry with structured fields instead of a text line:

    MESSAGE=sent campaign=3 recipient=a@example.org server=isp smtp_code=250 ...
    PRIORITY=6
    MAILERD_EVENT=sent
    MAILERD_CAMPAIGN=3  MAILERD_RECIPIENT=a@example.org  MAILERD_SERVER=isp
    SMTP_CODE=250  SMTP_REPLY=2.0.0 Ok: queued as ...

so `journalctl -u mailerd MAILERD_CAMPAIGN=3 SMTP_CODE=550` finds the failures of
one campaign. Other fields become MAILERD_<NAME>. The handler runs on log.py's
listener thread, so a journald that blocks its writers never stalls the event loop.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
from typing import Any, Callable

# fields with names of their own in the journal
FIELD_NAMES = {
    "campaign": "MAILERD_CAMPAIGN",
    "recipient": "MAILERD_RECIPIENT",
    "server": "MAILERD_SERVER",
    "smtp_code": "SMTP_CODE",
    "smtp_reply": "SMTP_REPLY",
}

PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
              logging.CRITICAL: 2}

_NOT_FIELD_CHAR = re.compile(r"[^A-Z0-9_]")
SECRET_NAME = re.compile(r"pass|secret|credential|key|token", re.IGNORECASE)

Sender = Callable[..., Any]


def stderr_is_journal(stream: Any = None) -> bool:
    """True when $JOURNAL_STREAM names the device and inode of our stderr."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    stream = sys.stderr if stream is None else stream
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


@functools.lru_cache(maxsize=1024)
def field_name(key: str) -> str:
    if key in FIELD_NAMES:
        return FIELD_NAMES[key]
    name = "MAILERD_" + _NOT_FIELD_CHAR.sub("_", key.upper())
    return name[:64]


@functools.lru_cache(maxsize=1024)  # field names are few; each event asks for each of them
def is_secret(key: str) -> bool:
    return bool(SECRET_NAME.search(key))


def journal_fields(what: str, level: int, fields: dict[str, Any]) -> dict[str, str]:
    """The structured part of one entry (everything but MESSAGE and CODE_*)."""
    out = {"PRIORITY": str(PRIORITIES.get(level, 6)), "SYSLOG_IDENTIFIER": "mailerd",
           "MAILERD_EVENT": what}
    for key, value in fields.items():
        if value is None or is_secret(key):
            continue
        out[field_name(key)] = str(value)
    return out


class JournaldHandler(logging.Handler):
    """Sends each record with `systemd.journal.send` (or a given sender, for tests)."""

    def __init__(self, send: Sender | None = None,
                 message: Callable[[logging.LogRecord], str] | None = None) -> None:
        super().__init__()
        if send is None:
            from systemd import journal  # needs systemd-python (libsystemd)
            send = journal.send
        self.send = send
        self.message = message or (lambda record: record.getMessage())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, Any] = getattr(record, "fields", {})
            what = getattr(record, "event", None) or record.getMessage().split("\n", 1)[0]
            entry = journal_fields(what, record.levelno, fields)
            self.send(self.message(record), CODE_FILE=record.pathname,
                      CODE_LINE=record.lineno, CODE_FUNC=record.funcName, **entry)
        except Exception:
            self.handleError(record)


def available() -> bool:
    try:
        from systemd import journal  # noqa: F401
    except ImportError:
        return False
    return True
