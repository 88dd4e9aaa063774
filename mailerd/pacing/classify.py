"""What a relay's refusal means: too many sessions, rate, quota or session length.

Relays say the same few things in many words (see the README's pacing section for
the replies this was built from). The default patterns recognise the common ones;
`[patterns]` in the config adds more. A reply that matches none is an ordinary
SMTP reply and is handled by its code alone.
"""

from __future__ import annotations

import enum
import re

from mailerd.schema.config import PatternConfig


class Cause(str, enum.Enum):
    SESSIONS = "too many sessions"
    RATE = "rate"
    QUOTA = "quota"
    SESSION_LENGTH = "session length"


# The cause each PatternConfig field adds patterns for, in the order they are tried.
_FIELD_CAUSES: dict[str, Cause] = {
    "too_many_sessions": Cause.SESSIONS,
    "rate": Cause.RATE,
    "quota": Cause.QUOTA,
    "session_length": Cause.SESSION_LENGTH,
}


# The relay's hint of when to retry: a rate pattern, and read by retry_hint.
_TRY_AGAIN = r"try again in (\d+) ?(s|sec|seconds?|m|min|minutes?)\b"

# Checked in this order: the first cause with a matching pattern wins, so the more
# specific wordings ("too many messages in this connection") come before the
# general ones ("too many ...").
DEFAULT_PATTERNS: dict[Cause, list[str]] = {
    Cause.SESSION_LENGTH: [
        r"too many (messages|mails|e-?mails) (in|per|for) (this |one |a |the )?(smtp )?(connection|session)",
        r"(messages|mails|e-?mails) per (smtp )?(connection|connect|session)",
        r"in one session",
    ],
    Cause.QUOTA: [
        r"quota",
        r"daily (user )?sending limit",
        r"sending limit exceeded",
        r"(daily|hourly|per day|per hour) .*limit",
    ],
    Cause.SESSIONS: [
        r"too many (concurrent |simultaneous |parallel )?(smtp )?connections",
        r"concurrent connections? limit",
        r"connection limit",
        r"thread limit",
        r"too many (login|auth\w*) attempts",
        r"too many sessions",
    ],
    Cause.RATE: [
        r"rate[ -]?limit",
        r"throttl",
        r"too many requests",
        r"too many recipient",
        r"(sending|submission|transmit|message) rate",
        r"slow down",
        _TRY_AGAIN,
    ],
}

# Wordings that are pacing only when the relay is also closing the session (421);
# from a 450/451 they are ordinary greylisting or a per-recipient deferral.
CLOSING_ONLY_PATTERNS: dict[Cause, list[str]] = {
    Cause.RATE: [r"temporarily deferred", r"try again later"],
}

_HINT = re.compile(_TRY_AGAIN, re.IGNORECASE)


class Classifier:
    def __init__(self, extra: PatternConfig | None = None) -> None:
        extra = extra or PatternConfig()
        extras = {cause: getattr(extra, field) for field, cause in _FIELD_CAUSES.items()}
        self._rules: list[tuple[re.Pattern[str], Cause, bool]] = []
        for table, closing_only in ((extras, False), (DEFAULT_PATTERNS, False),
                                    (CLOSING_ONLY_PATTERNS, True)):
            for cause, patterns in table.items():
                self._rules += [(re.compile(p, re.IGNORECASE), cause, closing_only)
                                for p in patterns]

    def classify(self, code: int | None, text: str) -> Cause | None:
        """The cause a reply names, or None for an ordinary reply.

        Only refusals are classified: 4xx, and 5xx that name a quota (relays use
        550/552/554 for daily limits). A 2xx or an ordinary 5xx is never pacing.
        """
        if code is not None and not 400 <= code < 600:
            return None
        for pattern, cause, closing_only in self._rules:
            if closing_only and code != 421:
                continue
            if pattern.search(text):
                if code is not None and code >= 500 and cause is not Cause.QUOTA:
                    return None
                return cause
        return None


def retry_hint(text: str) -> float | None:
    """Seconds from a reply such as '422 try again in 15 seconds'."""
    match = _HINT.search(text)
    if not match:
        return None
    seconds = float(match[1])
    return seconds * 60 if match[2].lower().startswith("m") else seconds


def window_hint(text: str) -> float | None:
    """The quota window a reply names: a day or an hour, else unknown."""
    lowered = text.lower()
    if "daily" in lowered or "per day" in lowered or "24 hour" in lowered:
        return 86400.0
    if "hourly" in lowered or "per hour" in lowered:
        return 3600.0
    return None
