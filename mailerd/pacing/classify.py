"""What a relay's refusal means: whom it is about, and which limit it names.

A reply is read with the stage it answered (connect, mail, rcpt, data, dot):
a temporary refusal before RCPT is about the session or the account whatever
its words; after that its words (wordings.py, plus `[patterns]` from the config)
and its RFC 3463 enhanced code decide whether it names a relay limit (too many
sessions, rate, quota, session length) or is about the recipient.
"""

from __future__ import annotations

import enum
import re
from typing import NamedTuple

from mailerd.schema.config import PatternConfig

from mailerd.pacing.wordings import DEFAULT_WORDINGS


class Cause(str, enum.Enum):
    SESSIONS = "too many sessions"
    RATE = "rate"
    QUOTA = "quota"
    SESSION_LENGTH = "session length"


class Scope(str, enum.Enum):
    """Whom a refusal is about."""

    ACCOUNT = "account"  # the session or the sending account: no attempt charged to anyone
    RECIPIENT = "recipient"  # this recipient (or this message): deferred or failed as usual
    NONE = "none"  # not a refusal


# Stages of an SMTP session, as the worker reports them. Everything before MAIL FROM
# is reported as "connect" (TCP, greeting, EHLO, STARTTLS, AUTH).
SESSION_STAGES = ("connect", "mail")
RECIPIENT_STAGES = ("rcpt", "data", "dot")
STAGES = SESSION_STAGES + RECIPIENT_STAGES


# The cause each PatternConfig field adds patterns for, in the order they are tried.
_FIELD_CAUSES: dict[str, Cause] = {
    "too_many_sessions": Cause.SESSIONS,
    "rate": Cause.RATE,
    "quota": Cause.QUOTA,
    "session_length": Cause.SESSION_LENGTH,
}

# The relay's hint of when to retry (also a rate wording in wordings.py).
_TRY_AGAIN = r"try again in (\d+) ?(s|sec|seconds?|m|min|minutes?)\b"
_HINT = re.compile(_TRY_AGAIN, re.IGNORECASE)

# RFC 3463 enhanced status code (class.subject.detail), first in the text.
_ENHANCED = re.compile(r"(?:^|[\s-])([245])\.(\d{1,3})\.(\d{1,3})(?=[\s:;,.]|$)")

# Replies about the recipient's own mailbox, whatever else their words say
# ("452 4.2.2 mailbox over quota" is the recipient's quota, not ours).
_RECIPIENT_WORDS = re.compile(r"mailbox (is )?(full|over ?quota)|over ?quota\b.*mailbox"
                              r"|user.{0,20}over ?quota|receiving mail (at a rate|too quickly)",
                              re.IGNORECASE)
# RFC 3463 subjects about the recipient: X.1.* addressing, X.2.1 mailbox disabled,
# X.2.2 mailbox full (X.2.0 is left out: Microsoft uses 5.2.0 for the sender's quota).
_RECIPIENT_SUBJECTS = ("1.", "2.1", "2.2")


class Rule(NamedTuple):
    pattern: re.Pattern[str]
    cause: Cause
    closing_only: bool
    source: str


class Verdict(NamedTuple):
    """How a reply is read: whom it is about, the limit it names, and why."""

    stage: str
    code: int | None
    enhanced: str | None  # RFC 3463 code in the text, e.g. "4.7.1"
    scope: Scope
    cause: Cause | None  # the relay limit the reply names, if any
    reason: str  # why, in words, for logs and `mailerctl explain`
    pattern: str | None = None  # the wording that matched
    source: str | None = None  # where that wording comes from

    @property
    def charges_recipient(self) -> bool:
        return self.scope is Scope.RECIPIENT

    @property
    def spares_recipient(self) -> bool:
        """About the account or the session: the recipient goes back, no attempt counted."""
        return self.scope is Scope.ACCOUNT


def enhanced_code(text: str) -> str | None:
    match = _ENHANCED.search(text)
    return f"{match[1]}.{match[2]}.{match[3]}" if match else None


def _default_rules() -> list[Rule]:
    return [Rule(re.compile(w.pattern, re.IGNORECASE), _FIELD_CAUSES[w.cause], w.closing_only,
                 w.source) for w in DEFAULT_WORDINGS]


class Classifier:
    def __init__(self, extra: PatternConfig | None = None) -> None:
        extra = extra or PatternConfig()
        self._rules = [Rule(re.compile(p, re.IGNORECASE), cause, False, "[patterns] in the config")
                       for field, cause in _FIELD_CAUSES.items() for p in getattr(extra, field)]
        self._rules += _default_rules()

    def classify(self, stage: str, code: int | None, text: str) -> Verdict:
        """Read a reply given at `stage` (see STAGES).

        A 4xx before RCPT is about the session or the account, never the
        recipient. A 4xx to RCPT or after the "." is the recipient's unless its
        words name a limit. A 5xx is a failure unless it names a rate or quota.
        """
        enhanced = enhanced_code(text)
        if code is None or not 400 <= code < 600:
            return Verdict(stage, code, enhanced, Scope.NONE, None, "not a refusal")
        recipient_stage = stage in RECIPIENT_STAGES
        if recipient_stage and self._about_the_mailbox(enhanced, text):
            return Verdict(stage, code, enhanced, Scope.RECIPIENT, None,
                           "about the recipient's address or mailbox")
        rule = self._matching_rule(code, text)
        if rule is not None:
            return Verdict(stage, code, enhanced, Scope.ACCOUNT, rule.cause,
                           f"its words name a relay limit ({rule.cause.value})",
                           rule.pattern.pattern, rule.source)
        if code >= 500 or recipient_stage:
            return Verdict(stage, code, enhanced, Scope.RECIPIENT, None,
                           "a permanent refusal" if code >= 500
                           else "a temporary refusal of this recipient or message")
        return self._session_refusal(stage, code, enhanced)

    @staticmethod
    def _about_the_mailbox(enhanced: str | None, text: str) -> bool:
        if enhanced is not None and enhanced[2:].startswith(_RECIPIENT_SUBJECTS):
            return True
        return bool(_RECIPIENT_WORDS.search(text))

    def _matching_rule(self, code: int, text: str) -> Rule | None:
        for rule in self._rules:
            if rule.closing_only and code != 421:
                continue
            if rule.pattern.search(text):
                if code >= 500 and rule.cause not in (Cause.QUOTA, Cause.RATE):
                    return None  # "554 5.7.1 Too many connections" is a rejection, not pacing
                return rule
        return None

    @staticmethod
    def _session_refusal(stage: str, code: int, enhanced: str | None) -> Verdict:
        """A 4xx before RCPT with no limit in its words."""
        subject = enhanced[2:] if enhanced else ""
        if subject == "3.2" or (stage == "connect" and code in (421, 432)):
            return Verdict(stage, code, enhanced, Scope.ACCOUNT, Cause.SESSIONS,
                           "a session refused before any mail (RFC 3463 X.3.2 or 421/432 at connect)")
        if code == 421:
            return Verdict(stage, code, enhanced, Scope.ACCOUNT, None,
                           "the relay closed the session before RCPT")
        return Verdict(stage, code, enhanced, Scope.ACCOUNT, Cause.RATE,
                       f"a temporary refusal at {stage}, before any recipient: the account is "
                       "being held back")


_REPLY = re.compile(r"^\s*([2-5]\d\d)(?:[ -]|$)\s*(.*)$", re.DOTALL)


def split_reply(reply: str) -> tuple[int, str] | None:
    """'450 4.7.1 too much mail' -> (450, '4.7.1 too much mail'); None without a code."""
    match = _REPLY.match(reply)
    return (int(match[1]), match[2].strip()) if match else None


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
