"""Bounce intake: each [bounces] mailbox polled, each message read into the journal.

For every message: read it (classify.py), commit what it means (Journal.apply_bounce,
through the committer), and only then move it to done_folder or delete it. A crash
between the commit and the move re-reads it at the next poll; the journal knows its
sha256 and changes nothing twice. A message that cannot be read is left in the
mailbox, logged once and listed in `mailerctl status`, never lost.
"""

from __future__ import annotations

import asyncio
import imaplib
import logging
import ssl
import time
from typing import Awaitable, Callable

from mailerd.bounces import classify
from mailerd.bounces.imap import ImapMailbox, MailboxError
from mailerd.journal.committer import Committer
from mailerd.journal.store import Journal
from mailerd.message.addresses import suppression_key
from mailerd.schema.config import BouncesConfig, MailboxConfig
from mailerd.schema.control import MailboxInfo
from mailerd.system.log import event

MAX_PER_POLL = 1000  # messages read in one poll; the rest wait for the next
MAX_LEFT_SHOWN = 20

# (newly suppressed keys, reason) -> recipients taken out of the dispatch buffers
SkipSuppressed = Callable[[set[str], str], Awaitable[int]]


class Intake:
    """Reads one mailbox message into the journal; the pollers share it."""

    def __init__(self, journal: Journal, committer: Committer, key: bytes,
                 config: BouncesConfig, skip_suppressed: SkipSuppressed) -> None:
        self.journal = journal
        self.committer = committer
        self.key = key
        self.config = config
        self.skip_suppressed = skip_suppressed

    async def take(self, mailbox: str, raw: bytes) -> str | None:
        """None once the journal has committed what the message means; else why it stays."""
        try:
            understood = classify.understand(raw, self.key)
        except classify.Unreadable as exc:
            return str(exc)
        applied = await self.committer.run(
            self.journal.apply_bounce, understood.source, mailbox, understood.format,
            understood.summary, understood.targets, self.config.soft_bounce_limit)
        if not applied.new:
            event("bounce_seen_before", mailbox=mailbox, source=understood.source[:16])
            return None
        if not applied.matched:
            event("bounce_unmatched", logging.WARNING, mailbox=mailbox, format=understood.format,
                  summary=understood.summary)
        for campaign, address, kind in applied.matched:
            event("bounce_recorded", mailbox=mailbox, campaign=campaign, address=address, kind=kind,
                  format=understood.format)
        for reason in {r for _, r in applied.suppressed}:
            keys = {k for a, r in applied.suppressed if r == reason and (k := suppression_key(a))}
            for address in sorted(a for a, r in applied.suppressed if r == reason):
                event("bounce_suppressed", mailbox=mailbox, address=address, reason=reason)
            await self.skip_suppressed(keys, reason)
        return None


class MailboxPoller:
    """One mailbox, polled every poll_interval: one IMAP connection a poll."""

    def __init__(self, name: str, config: MailboxConfig, intake: Intake, interval: float) -> None:
        self.name = name
        self.config = config
        self.intake = intake
        self.interval = interval
        self.last_poll: float | None = None
        self.last_error: str | None = None
        self.read = 0
        self.left: dict[tuple[int, int], str] = {}  # (uidvalidity, uid) -> why it stays
        self.wake = asyncio.Event()
        self._mailbox: ImapMailbox | None = None

    def info(self) -> MailboxInfo:
        left = [f"uid {uid}: {why}" for (_, uid), why in sorted(self.left.items())]
        return MailboxInfo(name=self.name, last_poll=self.last_poll, last_error=self.last_error,
                           read=self.read, left=left[:MAX_LEFT_SHOWN])

    async def run(self) -> None:
        while True:
            await self.poll()
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), self.interval)
            except asyncio.TimeoutError:
                pass

    async def poll(self) -> None:
        mailbox = self._mailbox = ImapMailbox(self.config)
        try:
            await asyncio.to_thread(mailbox.open)
            uids = await asyncio.to_thread(mailbox.uids)
            present = {(mailbox.uidvalidity, uid) for uid in uids}
            self.left = {where: why for where, why in self.left.items() if where in present}
            todo = [uid for uid in uids if (mailbox.uidvalidity, uid) not in self.left]
            for uid in todo[:MAX_PER_POLL]:
                await self._one(mailbox, uid)
            self.last_error = None
        except (MailboxError, OSError, imaplib.IMAP4.error, ssl.SSLError) as exc:
            if str(exc) != self.last_error:
                event("bounce_mailbox_failed", logging.WARNING, mailbox=self.name, error=str(exc))
            self.last_error = str(exc) or type(exc).__name__
        finally:
            await asyncio.to_thread(mailbox.close)
            self._mailbox = None
            self.last_poll = time.time()

    async def _one(self, mailbox: ImapMailbox, uid: int) -> None:
        where = (mailbox.uidvalidity, uid)
        raw = await asyncio.to_thread(mailbox.fetch, uid)
        if raw is None:
            return
        why = await self.intake.take(self.name, raw)
        if why is not None:
            self.left[where] = why
            event("bounce_left_in_mailbox", logging.WARNING, mailbox=self.name, uid=uid, why=why)
            return
        await asyncio.to_thread(mailbox.file_away, uid)
        self.read += 1

    def abort(self) -> None:
        if self._mailbox is not None:
            self._mailbox.abort()


class BounceIntake:
    """The pollers of every [bounces] mailbox, as tasks of the daemon."""

    def __init__(self, journal: Journal, committer: Committer, key: bytes, config: BouncesConfig,
                 skip_suppressed: SkipSuppressed) -> None:
        intake = Intake(journal, committer, key, config, skip_suppressed)
        self.pollers = [MailboxPoller(name, mailbox, intake, config.poll_interval)
                        for name, mailbox in config.mailboxes.items()]
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self.tasks = [asyncio.create_task(p.run(), name=f"bounces-{p.name}") for p in self.pollers]

    async def stop(self) -> None:
        for poller in self.pollers:
            poller.abort()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def info(self) -> list[MailboxInfo]:
        return [p.info() for p in self.pollers]
