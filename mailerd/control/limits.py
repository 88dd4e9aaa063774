"""What the control socket's clients may hold: connections, request bytes, and what
running out of descriptors writes to the log (security review M4, L2).

- Connections: at most MAX_CLIENTS in all, and MAX_CLIENTS_PER_UID per user other
  than root and the daemon's own (they are trusted: they could stop the daemon); one
  more gets an Error saying so and is closed at once, so its descriptor comes back.
- Request bytes: a frame larger than SMALL_FRAME (enqueue chunks, attachments) is
  counted against BUFFER_BUDGET from its header until its body is in; a frame that
  does not fit is refused. Small frames (every other request) are always read: the
  connection cap bounds what they hold.
- A refusal, and a failing accept(), is logged when it starts, not once per attempt;
  asyncio would otherwise log six lines per failed accept() (M4's log storm).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any

from mailerd.control.access import Peer
from mailerd.system.log import event

MAX_CLIENTS = 256
MAX_CLIENTS_PER_UID = 64
SMALL_FRAME = 64 * 1024
BUFFER_BUDGET = 64 * 1024 * 1024
ACCEPT_FAILED = "socket.accept() out of system resource"  # asyncio's message (selector_events)
QUIET = 2.0  # asyncio retries a failed accept() after 1 s: 2 s without one ends the episode
REPEAT = 60.0


class ConnectionLimits:
    def __init__(self, trusted_uids: set[int], total: int = MAX_CLIENTS,
                 per_uid: int = MAX_CLIENTS_PER_UID) -> None:
        self.trusted_uids = trusted_uids  # not capped per uid
        self.total = total
        self.per_uid = per_uid
        self.open: collections.Counter[int] = collections.Counter()
        self._capped = False  # refusing since the last admitted connection (logged once)

    def admit(self, peer: Peer) -> str | None:
        """None, and the connection counts as open (release it); else the refusal."""
        total = sum(self.open.values())
        if total >= self.total:
            refusal = f"too many control connections ({total} open); try again later"
        elif self.open[peer.uid] >= self.per_uid and peer.uid not in self.trusted_uids:
            refusal = (f"too many control connections from uid {peer.uid} "
                       f"({self.open[peer.uid]} open); close some and try again")
        else:
            self.open[peer.uid] += 1
            self._capped = False
            return None
        if not self._capped:
            self._capped = True
            event("control_connections_capped", logging.WARNING, open=total,
                  open_for_uid=self.open[peer.uid], **peer.log_fields)
        return refusal

    def release(self, peer: Peer) -> None:
        self.open[peer.uid] -= 1
        if not self.open[peer.uid]:
            del self.open[peer.uid]


class BufferFull(Exception):
    """A large frame does not fit the budget now; the message says so."""


class BufferBudget:
    """The bytes of large frames being read, on all connections together."""

    def __init__(self, limit: int = BUFFER_BUDGET) -> None:
        self.limit = limit
        self.used = 0
        self._short = False  # refusing since the last frame that fitted (logged once)

    def take(self, size: int, peer: Peer) -> None:
        """Count `size` bytes as held (give them back); BufferFull if they do not fit."""
        if size <= SMALL_FRAME:
            return
        if self.used + size > self.limit:
            if not self._short:
                self._short = True
                event("control_buffer_full", logging.WARNING, held=self.used, asked=size,
                      **peer.log_fields)
            raise BufferFull(f"the daemon is reading {self.used} bytes of large requests, and "
                             f"{size} more would exceed its {self.limit}-byte budget; "
                             "try again later")
        self.used += size
        self._short = False

    def give_back(self, size: int) -> None:
        if size > SMALL_FRAME:
            self.used -= size


class AcceptErrorLog:
    """A loop exception handler: failing accept() calls of the control socket are one
    event when they start (again every REPEAT seconds while they go on, with the count),
    and one more when an accept() succeeds QUIET seconds after the last failure."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.failures = 0
        self._last_failure = 0.0
        self._last_logged = 0.0
        self._previous = loop.get_exception_handler()

    def install(self) -> None:
        self.loop.set_exception_handler(self._handle)

    def uninstall(self) -> None:
        self.loop.set_exception_handler(self._previous)

    def accepted(self) -> None:
        if self.failures and time.monotonic() - self._last_failure > QUIET:
            event("control_accept_recovered", failures=self.failures)
            self.failures = 0

    def _handle(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != ACCEPT_FAILED:
            if self._previous is not None:
                self._previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        now = time.monotonic()
        self.failures += 1
        self._last_failure = now
        if self.failures == 1 or now - self._last_logged >= REPEAT:
            self._last_logged = now
            event("control_accept_failed", logging.ERROR, error=str(context.get("exception")),
                  failures=self.failures)
