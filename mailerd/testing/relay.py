"""A misbehaving-on-purpose SMTP relay for tests, benchmarks and demos.

`FakeRelay` runs an aiosmtpd server on its own event-loop thread, bound to a
loopback address only, records every message it takes and injects the faults
described by `Faults`.  Each fault's exact semantics are documented on
`Faults`.

Terms used throughout:

* *session*: one TCP connection.  Every connection gets a session id
  (1, 2, 3, ... in accept order), refused ones included.
* *accepted message*: the final dot was read and the relay replied 250.
* *swallowed message*: the final dot was read, the message was recorded, and
  the relay closed the connection without replying (`Faults.swallow_every`).
* *recorded*: present in `FakeRelay.messages()`, one `Received` per accepted
  recipient.  Accepted and swallowed messages are recorded, nothing else.
  Recording happens as soon as the final dot has been read, i.e. *before*
  `Faults.reply_delay` and before the 250 is sent: a client that gives up
  while waiting for the reply has nevertheless delivered the message.
* *fault epoch*: `FakeRelay.set_faults` starts a new epoch.  All fault
  bookkeeping (the every-N counters, the tempfail memory, the quota counter
  and quota block) restarts from zero; observations (recorded messages,
  session counters, drops) are kept.

Command line (foreground, until SIGINT/SIGTERM)::

    python -m mailerd.testing.relay --port 2525 [--drop-after K]
        [--max-sessions C] [--swallow-every N] [--tempfail-first]
        [--reject-domain D ...] [--quiet] [--record FILE] ...

Limits: no STARTTLS/AUTH; body lines longer than 1000 octets (plus CRLF) get
aiosmtpd's "500 Line too long" reply after the final dot, as RFC 5321
requires; the total message size is unlimited unless `data_size_limit` is
given.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ipaddress
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType, TracebackType
from typing import NamedTuple, NoReturn, TypeVar

import msgspec
from aiosmtpd.smtp import SMTP, Envelope, Session

__all__ = ["FakeRelay", "Faults", "Received", "main"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

RELAY_HOSTNAME = "fakerelay.localhost"
"""Host name announced in the 220 greeting (avoids a DNS lookup per session)."""

GREETING_421_REPLY = "421 4.3.2 Service not available, closing transmission channel"
TOO_MANY_SESSIONS_REPLY = "421 4.7.0 Too many concurrent SMTP connections"
TEMPFAIL_REPLY = "451 4.3.0 <{addr}>: Temporary failure, please try again later"
REJECT_REPLY = "550 5.1.1 <{addr}>: Recipient address rejected: User unknown"
ACCEPT_REPLY = "250 2.0.0 Ok: queued as {queue_id}"
OK_REPLY = "250 2.1.0 Ok"
DATA_GO_AHEAD_REPLY = "354 End data with <CR><LF>.<CR><LF>"
MAIL_TEMPFAIL_REPLY = "451 4.3.0 Sender temporarily refused"
DATA_REFUSED_REPLY = "554 5.7.1 Message refused by policy"
ODD_REPLY_STAGES = ("greeting", "ehlo", "mail", "rcpt", "data", "dot")

START_TIMEOUT = 5.0
STOP_TIMEOUT = 5.0


class Faults(msgspec.Struct, kw_only=True):
    """Faults injected by `FakeRelay`; every field's default means "off".

    Counters marked *relay-wide* are shared by all sessions and restart at
    zero whenever `FakeRelay.set_faults` is called.  Several faults may be
    combined; they are checked in the order listed here.

    greeting_421
        Every new session gets ``GREETING_421_REPLY`` (421 4.3.2) instead of
        the 220 greeting and is closed.  Counted in ``sessions_refused``.
    max_sessions = C
        A session is *active* from its 220 greeting until the relay has
        processed its disconnect.  A connection arriving while C sessions are
        active gets "421 4.7.0 Too many concurrent SMTP connections" instead
        of the greeting and is closed; it is counted in ``sessions_refused``
        and never becomes active.
    quota_after = Q, quota_seconds = S, quota_reply = R
        Relay-wide count of recorded messages (accepted + swallowed).  When it
        reaches Q the quota trips: for the next S seconds every MAIL FROM (on
        any session) is answered with R and the connection is closed right
        after that reply (a drop with reason ``"quota"``).  S == 0 means
        "until the next set_faults".  When the block expires the count
        restarts at 0, so the quota trips again after another Q messages.
        Messages already past MAIL FROM when the quota trips are still
        accepted and do not count towards the next window.
    reject_domains = [D, ...]
        RCPT TO an address whose domain (the part after the last "@",
        compared case-insensitively, exact match, no subdomains) is listed
        gets "550 5.1.1 <addr>: Recipient address rejected: User unknown".
        The session continues.
    tempfail_first
        The first RCPT TO for each address (compared case-insensitively,
        relay-wide, across sessions) gets "451 4.3.0 <addr>: Temporary
        failure, please try again later"; every later RCPT for that address
        is accepted.  Addresses rejected by ``reject_domains`` are never
        tempfailed and not remembered.
    close_mid_data_every = N
        Relay-wide count of DATA commands that get the 354 go-ahead.  For
        the N-th, 2N-th, ... one the relay sends 354, reads exactly one line
        of the body (or the first part of it, if the line is longer than the
        stream limit) and then closes the connection.  The rest of the body,
        the final dot and the reply never happen; nothing is recorded.  (If
        the client sends an empty body, the one line read is the final dot
        itself; the relay still closes without recording or replying.)
        Drop reason ``"close_mid_data"``.
    swallow_every = N
        Relay-wide count of complete messages (final dot read).  The N-th,
        2N-th, ... message is recorded like an accepted one, then the relay
        waits ``reply_delay`` and closes the connection without sending any
        reply.  Drop reason ``"swallow"``.
    reply_delay = T
        Seconds slept after the final dot of every complete message, before
        the 250 reply (or before the swallow close).  The message is already
        recorded while the relay sleeps.
    drop_after = K
        Per-session count of accepted messages (250 sent).  Right after the
        250 for the K-th accepted message of a session has been written, the
        relay closes the connection, so the client's next command (RSET,
        MAIL, QUIT, ...) gets no reply.  Because the session ends there,
        "every K-th" and "the K-th" are the same thing.  Drop reason
        ``"drop_after"``.
    session_limit = K, session_limit_reply = R
        Per-session count of accepted messages.  Once a session has had K
        messages accepted, its next MAIL FROM is answered with R (by default
        Barracuda's "too many messages in one session" wording) and the relay
        closes the connection after that reply.  Drop reason
        ``"session_limit"``.
    no_pipelining
        The EHLO reply does not offer PIPELINING (RFC 2920).  The relay
        reads commands the same way either way: several commands arriving in
        one read are answered in order (see `FakeRelay.command_groups`).
    mail_tempfail_every = N
        Relay-wide count of MAIL commands.  The N-th, 2N-th, ... one gets
        ``MAIL_TEMPFAIL_REPLY`` (451 4.3.0); the session continues, so in a
        pipelined group the RCPT and DATA that follow get aiosmtpd's 503.
    refuse_data_domains = [D, ...]
        DATA for a transaction with a recipient in domain D (as
        reject_domains) gets ``DATA_REFUSED_REPLY`` (554 5.7.1) instead of
        354; the session continues.
    odd_reply = B, odd_reply_stage = S, odd_reply_times = N
        The first N times (relay-wide) stage S is reached, the relay writes
        the raw bytes B (anything at all: not UTF-8, not SMTP) instead of its
        reply and closes the connection (drop reason ``"odd_reply"``).
        S is one of greeting, ehlo, mail, rcpt, data (the reply to DATA),
        dot (the reply after the final "."; the message is recorded first).
    """

    drop_after: int = 0
    max_sessions: int = 0
    greeting_421: bool = False
    close_mid_data_every: int = 0
    swallow_every: int = 0
    tempfail_first: bool = False
    reject_domains: list[str] = []
    reply_delay: float = 0.0
    quota_after: int = 0
    quota_seconds: float = 0.0
    quota_reply: str = "421 4.7.0 Daily user sending quota exceeded"
    limits_mailmax: int = 0  # advertise RFC 9422 "LIMITS MAILMAX=n" in the EHLO reply
    tempfail_every: int = 0  # every N-th RCPT (relay-wide count) gets the 451 tempfail reply
    session_limit: int = 0
    session_limit_reply: str = "421 4.7.0 Too many messages in one session, closing connection"
    no_pipelining: bool = False
    mail_tempfail_every: int = 0
    refuse_data_domains: list[str] = []
    odd_reply: bytes = b""
    odd_reply_stage: str = ""
    odd_reply_times: int = 1


class Received(NamedTuple):
    """One recipient of one recorded message."""

    mail_from: str
    rcpt: str
    data: bytes
    t: float
    session: int


MessageCallback = Callable[[tuple[Received, ...]], None]
"""Called on the relay thread once per recorded message, with its entries."""


# --------------------------------------------------------------------------
# Fault configuration helpers
# --------------------------------------------------------------------------


def _validate_faults(faults: Faults) -> None:
    """Raise ValueError if `faults` holds a value the relay cannot honour."""
    counts = ("drop_after", "max_sessions", "close_mid_data_every", "swallow_every", "quota_after",
              "session_limit", "mail_tempfail_every", "odd_reply_times")
    for name in counts:
        value = getattr(faults, name)
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"Faults.{name} must be an int >= 0, got {value!r}")
    for name in ("reply_delay", "quota_seconds"):
        value = getattr(faults, name)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"Faults.{name} must be a finite number >= 0, got {value!r}")
    for name in ("quota_reply", "session_limit_reply"):
        reply = getattr(faults, name)
        if len(reply) < 3 or not reply[:3].isdigit() or "\r" in reply or "\n" in reply:
            raise ValueError(f"Faults.{name} must be a one-line SMTP reply, got {reply!r}")
    if faults.odd_reply_stage not in ("", *ODD_REPLY_STAGES):
        raise ValueError(f"Faults.odd_reply_stage must be one of {ODD_REPLY_STAGES}, "
                         f"got {faults.odd_reply_stage!r}")


def _copy_faults(faults: Faults) -> Faults:
    """Return a private copy so later mutation by the caller has no effect."""
    return msgspec.structs.replace(faults, reject_domains=list(faults.reject_domains),
                                   refuse_data_domains=list(faults.refuse_data_domains))


def _domain_of(address: str) -> str:
    """Lowercased domain part of `address` ("" if there is none)."""
    _, at, domain = address.rpartition("@")
    return domain.lower() if at else ""


def _check_loopback(host: str) -> str:
    """Return `host` as a literal loopback address, or raise ValueError."""
    if host.lower() == "localhost":
        return "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"FakeRelay host must be a loopback IP address, got {host!r}") from None
    if not ip.is_loopback:
        raise ValueError(f"FakeRelay refuses to bind to non-loopback address {host!r}")
    return str(ip)


# --------------------------------------------------------------------------
# Shared, thread-safe relay state
# --------------------------------------------------------------------------


@dataclass
class _Epoch:
    """Fault bookkeeping that set_faults() resets."""

    data_commands: int = 0
    complete_messages: int = 0
    tempfail_seen: set[str] = field(default_factory=set)
    rcpt_commands: int = 0
    quota_count: int = 0
    quota_blocked_until: float | None = None
    mail_commands: int = 0
    odd_replies: int = 0


class _State:
    """Counters, recorded messages and fault decisions, guarded by one lock.

    Decisions are made on the relay thread; observations are read from any
    thread.  Every change notifies `cond` so `FakeRelay.wait_for` wakes up.
    """

    def __init__(self, faults: Faults, on_message: MessageCallback | None) -> None:
        self.cond = threading.Condition(threading.RLock())
        self.faults = faults
        self.reject: frozenset[str] = frozenset(d.lower() for d in faults.reject_domains)
        self.epoch = _Epoch()
        self.on_message = on_message
        self.received: list[Received] = []
        self.message_count = 0
        self.next_session_id = 1
        self.active = 0
        self.sessions_opened = 0
        self.sessions_refused = 0
        self.max_concurrent_seen = 0
        self.drop_reasons: collections.Counter[str] = collections.Counter()
        self.command_groups: collections.Counter[tuple[str, ...]] = collections.Counter()
        self.drops_with_mail_unread: collections.Counter[str] = collections.Counter()
        self.queue_id = 0
        # Only touched on the relay thread: live protocol objects, for stop().
        self.protocols: set[_FaultySMTP] = set()

    def set_faults(self, faults: Faults) -> None:
        with self.cond:
            self.faults = faults
            self.reject = frozenset(d.lower() for d in faults.reject_domains)
            self.epoch = _Epoch()
            self.cond.notify_all()

    def open_session(self) -> tuple[int, str | None]:
        """Register a new connection; return (session id, refusal reply or None)."""
        with self.cond:
            session_id = self.next_session_id
            self.next_session_id += 1
            refusal = self._greeting_refusal()
            if refusal is None:
                self.active += 1
                self.sessions_opened += 1
                self.max_concurrent_seen = max(self.max_concurrent_seen, self.active)
            else:
                self.sessions_refused += 1
            self.cond.notify_all()
            return session_id, refusal

    def _greeting_refusal(self) -> str | None:
        if self.faults.greeting_421:
            return GREETING_421_REPLY
        limit = self.faults.max_sessions
        if limit and self.active >= limit:
            return TOO_MANY_SESSIONS_REPLY
        return None

    def close_session(self) -> None:
        with self.cond:
            self.active -= 1
            self.cond.notify_all()

    def quota_refusal(self) -> str | None:
        """Reply for a MAIL FROM while the quota is tripped, else None."""
        with self.cond:
            return self.faults.quota_reply if self._quota_blocked() else None

    def _quota_blocked(self) -> bool:
        until = self.epoch.quota_blocked_until
        if until is None:
            return False
        if time.monotonic() < until:
            return True
        self.epoch.quota_blocked_until = None
        self.epoch.quota_count = 0
        return False

    def rcpt_refusal(self, address: str) -> str | None:
        """Reply refusing RCPT TO `address`, or None to accept it."""
        with self.cond:
            if _domain_of(address) in self.reject:
                return REJECT_REPLY.format(addr=address)
            if self.faults.tempfail_first:
                key = address.lower()
                if key not in self.epoch.tempfail_seen:
                    self.epoch.tempfail_seen.add(key)
                    return TEMPFAIL_REPLY.format(addr=address)
            self.epoch.rcpt_commands += 1
            every = self.faults.tempfail_every
            if every and self.epoch.rcpt_commands % every == 0:
                return TEMPFAIL_REPLY.format(addr=address)
            return None

    def data_started(self) -> bool:
        """Count a DATA that gets 354; True if this one must be cut mid-body."""
        with self.cond:
            self.epoch.data_commands += 1
            every = self.faults.close_mid_data_every
            return bool(every) and self.epoch.data_commands % every == 0

    def record(self, session_id: int, envelope: Envelope) -> tuple[tuple[Received, ...], bool, float]:
        """Record a complete message; return (entries, swallow it?, reply delay)."""
        data = envelope.original_content or b""
        mail_from = envelope.mail_from or ""
        now = time.monotonic()
        entries = tuple(Received(mail_from, rcpt, data, now, session_id) for rcpt in envelope.rcpt_tos)
        with self.cond:
            self.received.extend(entries)
            self.message_count += 1
            self.epoch.complete_messages += 1
            every = self.faults.swallow_every
            swallow = bool(every) and self.epoch.complete_messages % every == 0
            self._count_towards_quota(now)
            self.cond.notify_all()
            return entries, swallow, self.faults.reply_delay

    def _count_towards_quota(self, now: float) -> None:
        limit = self.faults.quota_after
        if not limit or self._quota_blocked():
            return
        self.epoch.quota_count += 1
        if self.epoch.quota_count >= limit:
            seconds = self.faults.quota_seconds
            self.epoch.quota_blocked_until = now + seconds if seconds > 0 else math.inf
            self.epoch.quota_count = 0

    def mail_refusal(self) -> str | None:
        """MAIL_TEMPFAIL_REPLY for every mail_tempfail_every-th MAIL, else None."""
        with self.cond:
            self.epoch.mail_commands += 1
            every = self.faults.mail_tempfail_every
            return MAIL_TEMPFAIL_REPLY if every and self.epoch.mail_commands % every == 0 else None

    def data_refusal(self, recipients: list[str]) -> str | None:
        with self.cond:
            refused = {d.lower() for d in self.faults.refuse_data_domains}
            return DATA_REFUSED_REPLY if any(_domain_of(r) in refused for r in recipients) else None

    def odd_reply(self, stage: str) -> bytes | None:
        """The raw bytes to answer at `stage` instead of a reply, the first N times."""
        with self.cond:
            faults = self.faults
            if faults.odd_reply_stage != stage or self.epoch.odd_replies >= faults.odd_reply_times:
                return None
            self.epoch.odd_replies += 1
            return faults.odd_reply

    def note_group(self, verbs: tuple[str, ...]) -> None:
        with self.cond:
            self.command_groups[verbs] += 1
            self.cond.notify_all()

    def drop_after_limit(self) -> int:
        with self.cond:
            return self.faults.drop_after

    def session_limit_refusal(self, accepted_in_session: int) -> str | None:
        """Reply for a MAIL FROM on a session that has had its fill, else None."""
        with self.cond:
            limit = self.faults.session_limit
            return self.faults.session_limit_reply if limit and accepted_in_session >= limit else None

    def next_queue_id(self) -> int:
        with self.cond:
            self.queue_id += 1
            return self.queue_id

    def note_drop(self, reason: str, mail_unread: bool = False) -> None:
        with self.cond:
            self.drop_reasons[reason] += 1
            if mail_unread:
                self.drops_with_mail_unread[reason] += 1
            self.cond.notify_all()


# --------------------------------------------------------------------------
# aiosmtpd glue: protocol subclass (connection faults) and handler (message faults)
# --------------------------------------------------------------------------


class _HungUp(asyncio.CancelledError):
    """Ends a session task after the relay closed the connection on purpose.

    aiosmtpd's command loop treats CancelledError as "connection gone": it
    closes its writer and re-raises, so the task ends quietly without any
    reply being written and without a logged traceback.
    """


class _FaultySMTP(SMTP):
    """aiosmtpd SMTP protocol with connection-level faults.

    Handles the greeting refusals, session accounting, the mid-DATA close and
    the "reply, then close" faults (drop_after, quota).
    """

    def __init__(
        self, state: _State, handler: _Handler, *, data_size_limit: int | None, loop: asyncio.AbstractEventLoop
    ) -> None:
        super().__init__(
            handler, data_size_limit=data_size_limit, enable_SMTPUTF8=True, hostname=RELAY_HOSTNAME, loop=loop
        )
        self.relay_state = state
        self.session_id = 0
        self.accepted_in_session = 0
        self.hangup_after_reply: str | None = None
        self._refusal: str | None = None
        self._counted = False
        # commands per read: the byte offset at which each read ended, and the
        # verbs (".": the end of a message's data) that came in the current one
        self._received = 0
        self._read_ends: collections.deque[int] = collections.deque()
        self._reads_done = 0
        self._group: list[str] = []
        self._group_read = -1

    # -- connection lifecycle ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.session_id, self._refusal = self.relay_state.open_session()
        self._counted = self._refusal is None
        self.relay_state.protocols.add(self)
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._received += len(data)
        self._read_ends.append(self._received)
        super().data_received(data)

    def note_command(self, verb: str) -> None:
        """Count `verb` in the read that brought the end of its line, which the command
        loop has just consumed; the verbs of one read form a group."""
        consumed = self._received - len(self._reader._buffer)
        while self._read_ends and self._read_ends[0] < consumed:
            self._read_ends.popleft()
            self._reads_done += 1
        if self._reads_done != self._group_read:
            self._flush_group()
            self._group_read = self._reads_done
        self._group.append(verb)

    def _flush_group(self) -> None:
        if self._group:
            self.relay_state.note_group(tuple(self._group))
            self._group = []

    def connection_lost(self, error: Exception | None) -> None:
        self._flush_group()
        self.relay_state.protocols.discard(self)
        if self._counted:
            self._counted = False
            self.relay_state.close_session()
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        if self._refusal is not None:
            await self._refuse(self._refusal)
            return
        odd = self.relay_state.odd_reply("greeting")
        if odd is not None:
            self._write_raw(odd)
            self.relay_state.note_drop("odd_reply")
            self.abort(graceful=True)
            return
        try:
            await super()._handle_client()
        except ConnectionError:
            log.debug("session %d: client vanished", self.session_id)

    async def _refuse(self, reply: str) -> None:
        log.info("session %d: refused at greeting: %s", self.session_id, reply)
        try:
            await self.push(reply)
        except ConnectionError:
            pass
        self.abort(graceful=True)

    def abort(self, graceful: bool = False) -> None:
        """Close the connection (flushing pending output if `graceful`)."""
        transport = self.transport
        if transport is None:
            return
        if graceful:
            transport.close()
        else:
            assert isinstance(transport, asyncio.Transport)
            transport.abort()

    def hang_up(self, reason: str) -> NoReturn:
        """Close the connection now, without any further reply, and end the task."""
        log.info("session %d: closing connection (%s)", self.session_id, reason)
        unread = bytes(self._reader._buffer[:4096]).upper()
        self.relay_state.note_drop(reason, unread.startswith(b"MAIL") or b"\nMAIL" in unread)
        self.abort(graceful=True)
        raise _HungUp(reason)

    def _write_raw(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            assert isinstance(self.transport, asyncio.WriteTransport)
            self.transport.write(data)

    def answer_oddly_at(self, stage: str) -> None:
        """If the odd_reply fault is due at `stage`: write its bytes and hang up."""
        odd = self.relay_state.odd_reply(stage)
        if odd is not None:
            self._write_raw(odd)
            self.hang_up("odd_reply")

    def _hang_up_if_pending(self) -> None:
        reason, self.hangup_after_reply = self.hangup_after_reply, None
        if reason is not None:
            self.hang_up(reason)

    # -- commands --------------------------------------------------------------

    async def smtp_EHLO(self, hostname: str) -> None:
        self.note_command("EHLO")
        self.answer_oddly_at("ehlo")
        await super().smtp_EHLO(hostname)

    async def smtp_MAIL(self, arg: str | None) -> None:
        self.note_command("MAIL")
        self.answer_oddly_at("mail")
        await super().smtp_MAIL(arg)
        self._hang_up_if_pending()

    async def smtp_RCPT(self, arg: str | None) -> None:
        self.note_command("RCPT")
        self.answer_oddly_at("rcpt")
        await super().smtp_RCPT(arg)

    async def smtp_RSET(self, arg: str) -> None:
        self.note_command("RSET")
        await super().smtp_RSET(arg)

    async def smtp_QUIT(self, arg: str) -> None:
        self.note_command("QUIT")
        await super().smtp_QUIT(arg)

    async def smtp_DATA(self, arg: str) -> None:
        self.note_command("DATA")
        self.answer_oddly_at("data")
        if self._data_would_start(arg):
            assert self.envelope is not None
            refusal = self.relay_state.data_refusal(self.envelope.rcpt_tos)
            if refusal is not None:
                await self.push(refusal)
                return
            if self.relay_state.data_started():
                await self._cut_mid_data()
        await super().smtp_DATA(arg)
        self._hang_up_if_pending()

    def _data_would_start(self, arg: str | None) -> bool:
        """True if aiosmtpd is about to answer this DATA with 354."""
        assert self.session is not None and self.envelope is not None
        return bool(self.session.host_name) and bool(self.envelope.rcpt_tos) and not arg

    async def _cut_mid_data(self) -> NoReturn:
        """354, read one body line, then close without recording or replying."""
        await self.push(DATA_GO_AHEAD_REPLY)
        try:
            await self._reader.readuntil(b"\r\n")
        except asyncio.LimitOverrunError:
            pass  # a very long first line: the body is arriving, good enough
        except asyncio.IncompleteReadError:
            pass  # client closed first; hang_up is then a no-op close
        self.hang_up("close_mid_data")


class _Handler:
    """aiosmtpd handler hooks implementing the message-level faults."""

    def __init__(self, state: _State) -> None:
        self.state = state

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        mailmax = self.state.faults.limits_mailmax
        if mailmax:
            responses.insert(-1, f"250-LIMITS MAILMAX={mailmax}")
        if not self.state.faults.no_pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        assert isinstance(server, _FaultySMTP)
        refusal = self.state.quota_refusal()
        if refusal is not None:
            server.hangup_after_reply = "quota"
            return refusal
        refusal = self.state.session_limit_refusal(server.accepted_in_session)
        if refusal is not None:
            server.hangup_after_reply = "session_limit"
            return refusal
        refusal = self.state.mail_refusal()
        if refusal is not None:
            return refusal
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return OK_REPLY

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        refusal = self.state.rcpt_refusal(address)
        if refusal is not None:
            return refusal
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(server, _FaultySMTP)
        server.note_command(".")
        entries, swallow, delay = self.state.record(server.session_id, envelope)
        self._notify(entries)
        server.answer_oddly_at("dot")
        if delay > 0:
            await asyncio.sleep(delay)
        if swallow:
            server.hang_up("swallow")
        server.accepted_in_session += 1
        limit = self.state.drop_after_limit()
        if limit and server.accepted_in_session % limit == 0:
            server.hangup_after_reply = "drop_after"
        return ACCEPT_REPLY.format(queue_id=self.state.next_queue_id())

    def _notify(self, entries: tuple[Received, ...]) -> None:
        callback = self.state.on_message
        if callback is None:
            return
        try:
            callback(entries)
        except Exception:
            log.exception("FakeRelay on_message callback failed")


# --------------------------------------------------------------------------
# Public controller
# --------------------------------------------------------------------------


class FakeRelay:
    """Fault-injecting SMTP relay on a background thread, loopback only.

    ``FakeRelay(faults, host="127.0.0.1", port=0, *, data_size_limit=None,
    on_message=None)``.  Port 0 picks a free port; after `start` the real one
    is in `port`.  ``data_size_limit`` (bytes) makes oversized messages get
    "552 Error: Too much mail data" (None = unlimited).  ``on_message`` is
    called on the relay thread once per recorded message.

    All observation methods/properties are thread-safe and return snapshots.
    """

    def __init__(
        self,
        faults: Faults | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        data_size_limit: int | None = None,
        on_message: MessageCallback | None = None,
    ) -> None:
        faults = _copy_faults(faults if faults is not None else Faults())
        _validate_faults(faults)
        self.host = _check_loopback(host)
        self.port = port
        self._data_size_limit = data_size_limit
        self._state = _State(faults, on_message)
        self._handler = _Handler(self._state)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Bind and start serving; returns once the port is listening."""
        if self._thread is not None:
            raise RuntimeError("FakeRelay already started")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=self._run_loop, args=(loop,), name="fakerelay", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            future = asyncio.run_coroutine_threadsafe(self._open_server(loop), loop)
            self._server = future.result(timeout=START_TIMEOUT)
        except BaseException:
            self.stop()
            raise
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        """Close the listener and every open session; never blocks long."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            future = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
            future.result(timeout=STOP_TIMEOUT)
        except Exception:
            log.warning("FakeRelay shutdown did not complete cleanly", exc_info=True)
        try:
            loop.call_soon_threadsafe(loop.stop)
        except RuntimeError:
            pass  # loop already closed
        thread.join(STOP_TIMEOUT)
        if thread.is_alive():
            log.warning("FakeRelay thread did not exit within %.0f s", STOP_TIMEOUT)
        self._loop = self._thread = self._server = None

    def __enter__(self) -> FakeRelay:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    async def _open_server(self, loop: asyncio.AbstractEventLoop) -> asyncio.Server:
        def factory() -> _FaultySMTP:
            return _FaultySMTP(self._state, self._handler, data_size_limit=self._data_size_limit, loop=loop)

        return await loop.create_server(factory, host=self.host, port=self.port)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for protocol in list(self._state.protocols):
            protocol.abort()
        current = asyncio.current_task()
        tasks = [task for task in asyncio.all_tasks() if task is not current]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_TIMEOUT / 2)
        await asyncio.sleep(0)  # let connection_lost callbacks run

    # -- faults ----------------------------------------------------------------

    def set_faults(self, faults: Faults) -> None:
        """Replace the faults live and start a new fault epoch (see module doc)."""
        faults = _copy_faults(faults)
        _validate_faults(faults)
        self._state.set_faults(faults)

    @property
    def faults(self) -> Faults:
        with self._state.cond:
            return _copy_faults(self._state.faults)

    # -- observations ----------------------------------------------------------

    def messages(self) -> list[Received]:
        """Snapshot of everything recorded, one entry per recipient, in order."""
        with self._state.cond:
            return list(self._state.received)

    @property
    def received(self) -> list[Received]:
        """Same as `messages()`."""
        return self.messages()

    def count_by_rcpt(self) -> collections.Counter[str]:
        """Lowercased recipient address -> number of times recorded."""
        return collections.Counter(entry.rcpt.lower() for entry in self.messages())

    @property
    def message_count(self) -> int:
        """Number of recorded messages (not recipients)."""
        return self._read(lambda s: s.message_count)

    @property
    def sessions_opened(self) -> int:
        """Connections that got the 220 greeting."""
        return self._read(lambda s: s.sessions_opened)

    @property
    def sessions_refused(self) -> int:
        """Connections refused with 421 at greeting (greeting_421, max_sessions)."""
        return self._read(lambda s: s.sessions_refused)

    @property
    def active_sessions(self) -> int:
        """Greeted sessions whose disconnect the relay has not processed yet."""
        return self._read(lambda s: s.active)

    @property
    def max_concurrent_seen(self) -> int:
        """Peak of `active_sessions`."""
        return self._read(lambda s: s.max_concurrent_seen)

    @property
    def drops(self) -> int:
        """Connections closed on purpose after the greeting (all reasons)."""
        return self._read(lambda s: sum(s.drop_reasons.values()))

    @property
    def drop_reasons(self) -> collections.Counter[str]:
        """Drops by reason: drop_after, close_mid_data, swallow, quota, session_limit."""
        return self._read(lambda s: collections.Counter(s.drop_reasons))

    @property
    def drops_with_mail_unread(self) -> collections.Counter[str]:
        """Drops by reason where a MAIL command had already arrived, unanswered: the
        client had pipelined its next transaction behind the message the drop cut."""
        return self._read(lambda s: collections.Counter(s.drops_with_mail_unread))

    def command_groups(self) -> collections.Counter[tuple[str, ...]]:
        """Commands that arrived in one read, in order (".": a message's final dot), and
        how many reads brought each such group: ("MAIL", "RCPT", "DATA") proves a
        pipelined client. Counted per read of the relay, so a client's one write may
        rarely show as two groups, never two writes as one unless the client wrote them
        before reading the replies between them."""
        return self._read(lambda s: collections.Counter(s.command_groups))

    def wait_for(self, predicate: Callable[[FakeRelay], bool], timeout: float = 5.0) -> bool:
        """Block until ``predicate(self)`` is true or `timeout` passes; return its last value."""
        with self._state.cond:
            return self._state.cond.wait_for(lambda: predicate(self), timeout)

    def _read(self, getter: Callable[[_State], _T]) -> _T:
        with self._state.cond:
            return getter(self._state)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mailerd.testing.relay",
        description="Misbehaving-on-purpose SMTP relay (loopback only). See mailerd.testing.relay.Faults.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=2525)
    parser.add_argument("--drop-after", type=int, default=0, metavar="K")
    parser.add_argument("--max-sessions", type=int, default=0, metavar="C")
    parser.add_argument("--greeting-421", action="store_true")
    parser.add_argument("--close-mid-data-every", type=int, default=0, metavar="N")
    parser.add_argument("--swallow-every", type=int, default=0, metavar="N")
    parser.add_argument("--tempfail-first", action="store_true")
    parser.add_argument("--reject-domain", action="append", default=[], metavar="D", dest="reject_domains")
    parser.add_argument("--reply-delay", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument("--quota-after", type=int, default=0, metavar="Q")
    parser.add_argument("--quota-seconds", type=float, default=0.0, metavar="S")
    parser.add_argument("--session-limit", type=int, default=0, metavar="K",
                        help="refuse MAIL with 'too many messages in one session' after K per session")
    parser.add_argument("--no-pipelining", action="store_true", help="do not offer PIPELINING")
    parser.add_argument("--quiet", action="store_true", help="no per-message or per-fault lines")
    parser.add_argument("--record", metavar="FILE",
                        help="append each recorded recipient to FILE, one address a line")
    return parser.parse_args(argv)


def _faults_from_args(args: argparse.Namespace) -> Faults:
    return Faults(
        drop_after=args.drop_after,
        max_sessions=args.max_sessions,
        greeting_421=args.greeting_421,
        close_mid_data_every=args.close_mid_data_every,
        swallow_every=args.swallow_every,
        tempfail_first=args.tempfail_first,
        reject_domains=list(args.reject_domains),
        reply_delay=args.reply_delay,
        quota_after=args.quota_after,
        quota_seconds=args.quota_seconds,
        session_limit=args.session_limit,
        no_pipelining=args.no_pipelining,
    )


def _header(data: bytes, name: str) -> str:
    """Value of header `name` in the first 64 KiB of `data` ("" if absent)."""
    head = data[:65536].split(b"\r\n\r\n", 1)[0]
    prefix = name.lower().encode() + b":"
    for line in head.split(b"\r\n"):
        if line.lower().startswith(prefix):
            return line[len(prefix) :].strip().decode("utf-8", "replace")
    return ""


def _print_message(entries: tuple[Received, ...]) -> None:
    if not entries:
        return
    first = entries[0]
    rcpts = ",".join(f"<{entry.rcpt}>" for entry in entries)
    msgid = _header(first.data, "Message-ID") or "-"
    print(
        f"session={first.session} from=<{first.mail_from}> to={rcpts} size={len(first.data)} msgid={msgid}",
        flush=True,
    )


def _summary(relay: FakeRelay) -> str:
    counts = relay.count_by_rcpt()
    deliveries = sum(counts.values())
    duplicates = deliveries - len(counts)
    duplicated = sum(1 for n in counts.values() if n > 1)
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(relay.drop_reasons.items())) or "none"
    return (
        f"messages received: {relay.message_count} ({deliveries} recipient deliveries)\n"
        f"distinct recipients: {len(counts)}\n"
        f"duplicates: {duplicates} extra deliveries to {duplicated} recipients\n"
        f"sessions: {relay.sessions_opened} opened, {relay.sessions_refused} refused, "
        f"peak {relay.max_concurrent_seen} concurrent; drops: {reasons}"
    )


def _wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    while not stop.wait(0.5):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run the relay in the foreground until SIGINT/SIGTERM; print a summary."""
    args = _parse_args(argv)
    if not args.quiet:
        logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
        log.setLevel(logging.INFO)
    record = open(args.record, "a", encoding="utf-8") if args.record else None

    def on_message(entries: tuple[Received, ...]) -> None:
        if record is not None:
            record.write("".join(f"{entry.rcpt}\n" for entry in entries))
            record.flush()
        if not args.quiet:
            _print_message(entries)

    try:
        relay = FakeRelay(
            _faults_from_args(args), host=args.host, port=args.port,
            on_message=on_message if (record is not None or not args.quiet) else None,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        relay.start()
    except OSError as exc:
        print(f"error: cannot listen on {relay.host}:{relay.port}: {exc}", file=sys.stderr)
        return 1
    print(f"fake relay listening on {relay.host}:{relay.port}", flush=True)
    try:
        _wait_for_signal()
    finally:
        relay.stop()
    print(_summary(relay), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
