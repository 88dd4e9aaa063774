"""Bounce intake: each [bounces] mailbox read, each message read into the journal.

For every message: read it (classify.py), commit what it means (JournalStore.apply_bounce,
or apply_unsubscribe for a mail to a List-Unsubscribe mailto address, through the
committer), and only then move it to done_folder or delete it. A crash between the
commit and the move re-reads it at the next poll; the journal knows its sha256 and
changes nothing twice. A message that cannot be read is left in the mailbox, logged
once and listed in `mailerctl status`, never lost.

A mailbox is polled every poll_interval (IMAP or POP3). An IMAP mailbox whose server
offers IDLE also has a second connection waiting in IDLE, which makes the poller
read at once when mail arrives; it is re-issued every idle_renew and, when it
drops, reconnected with a growing pause (polling goes on meanwhile). SIGHUP hands
a new [bounces] to `BounceIntake.reload`: added, removed and changed mailboxes take
effect at once, unchanged ones keep running.
"""

from __future__ import annotations

import asyncio
import imaplib
import logging
import os
import poplib
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Awaitable, Callable

from mailerd.bounces import classify
from mailerd.bounces.imap import IdleNotOffered, IdleWatch, ImapMailbox
from mailerd.bounces.mailbox import Entry, Mailbox, MailboxError, MessageError, files_problem
from mailerd.bounces.pop3 import Pop3Mailbox
from mailerd.journal.committer import Committer
from mailerd.journal.backend import JournalStore
from mailerd.message.addresses import suppression_key
from mailerd.schema.config import BouncesConfig, MailboxConfig
from mailerd.schema.control import MailboxInfo
from mailerd.schema.records import BounceApplied
from mailerd.system.log import event

MAX_PER_POLL = 1000  # messages read in one poll; the rest wait for the next
MAX_LEFT_SHOWN = 20
IDLE_RETRY_FIRST = 1.0  # seconds before reconnecting a dropped IDLE, doubled up to
IDLE_RETRY_MAX = 60.0
UNSUBSCRIBED = "unsubscribed"  # the suppression reason, as the one-click endpoint's
# what a mailbox session may raise besides MailboxError: a poll fails, the daemon goes on
SESSION_ERRORS = (MailboxError, OSError, ssl.SSLError, imaplib.IMAP4.error, poplib.error_proto)

# (newly suppressed keys, reason) -> recipients taken out of the dispatch buffers
SkipSuppressed = Callable[[set[str], str], Awaitable[int]]


def open_mailbox(config: MailboxConfig) -> Mailbox:
    return Pop3Mailbox(config) if config.protocol == "pop3" else ImapMailbox(config)


def mailbox_files_problems(config: BouncesConfig) -> tuple[list[str], list[str]]:
    """(problems, notes) of every mailbox's password and CA file, for a reload or
    --check-config: a file under an unset $CREDENTIALS_DIRECTORY is a note, not checked."""
    problems, notes = [], []
    for name, mailbox in config.mailboxes.items():
        files = f"{mailbox.password_file} {mailbox.tls_ca_file or ''}"
        if "CREDENTIALS_DIRECTORY" in files and not os.environ.get("CREDENTIALS_DIRECTORY"):
            notes.append(f"bounces.mailboxes.{name}: files not checked: $CREDENTIALS_DIRECTORY is "
                         "set only inside the service (`systemctl reload mailerd` checks them there)")
            continue
        problem = files_problem(mailbox)
        if problem:
            problems.append(f"bounces.mailboxes.{name}: {problem}")
    return problems, notes


class Intake:
    """Reads one mailbox message into the journal; the pollers share it."""

    def __init__(self, journal: JournalStore, committer: Committer, key: bytes,
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
        if understood.unsubscribes:
            applied = await self._unsubscribe(mailbox, understood)
        else:
            applied = await self.committer.run(
                self.journal.apply_bounce, understood.source, mailbox, understood.format,
                understood.summary, understood.targets, self.config.soft_bounce_limit)
        if not applied.new:
            event("bounce_seen_before", mailbox=mailbox, source=understood.source[:16])
            return None
        if not applied.matched:
            event("bounce_unmatched", logging.WARNING, mailbox=mailbox, format=understood.format,
                  summary=understood.summary)
        suppressed = {address for address, _ in applied.suppressed}
        for campaign, address, kind in applied.matched:
            if kind == "unsubscribe":
                event("bounce_unsubscribed", mailbox=mailbox, campaign=campaign, address=address,
                      reason=UNSUBSCRIBED, new=address in suppressed)
            else:
                event("bounce_recorded", mailbox=mailbox, campaign=campaign, address=address,
                      kind=kind, format=understood.format)
        await self._skip(mailbox, applied)
        return None

    async def _unsubscribe(self, mailbox: str, understood: classify.Understood) -> BounceApplied:
        """Each request whose token is genuine for the recipient at its line unsubscribes
        that recipient; a forged one changes nothing (the message is kept as unmatched)."""
        genuine = []
        for request in understood.unsubscribes:
            found = await self.committer.read(self.journal.recipient_at, request.campaign_uid,
                                              request.line)
            if found is not None and classify.genuine(self.key, request, found[1]):
                genuine.append((*found, f"mail to the List-Unsubscribe address, campaign "
                                        f"{request.campaign_uid}"))
        return await self.committer.run(self.journal.apply_unsubscribe, understood.source,
                                        mailbox, understood.summary, genuine)

    async def _skip(self, mailbox: str, applied: BounceApplied) -> None:
        """Newly suppressed addresses: logged, and taken out of the dispatch buffers."""
        for reason in {r for _, r in applied.suppressed}:
            keys = {k for a, r in applied.suppressed if r == reason and (k := suppression_key(a))}
            for address in sorted(a for a, r in applied.suppressed if r == reason):
                event("bounce_suppressed", mailbox=mailbox, address=address, reason=reason)
            await self.skip_suppressed(keys, reason)


class IdleState:
    """What the IDLE connection of a mailbox is doing, for `mailerctl status`."""

    def __init__(self, state: str) -> None:
        self.state = state  # "off" | "connecting" | "on" | "not offered" | "failing"
        self.since: float | None = None
        self.error: str | None = None


class MailboxPoller:
    """One mailbox: polled every poll_interval, and at once when its IDLE says so."""

    def __init__(self, name: str, config: MailboxConfig, intake: Intake, interval: float) -> None:
        self.name = name
        self.config = config
        self.intake = intake
        self.interval = interval
        self.last_poll: float | None = None
        self.last_error: str | None = None
        self.read = 0
        self.left: dict[str, str] = {}  # entry key -> "label: why it stays"
        self.wake = asyncio.Event()
        self.idle = IdleState("connecting" if self.uses_idle else "off")
        self._mailbox: Mailbox | None = None
        self._watch: IdleWatch | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def uses_idle(self) -> bool:
        return self.config.protocol == "imap" and self.config.idle

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self.run(), name=f"bounces-{self.name}")]
        if self.uses_idle:
            self._tasks.append(asyncio.create_task(self.watch(), name=f"bounces-idle-{self.name}"))

    async def stop(self) -> None:
        self.abort()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def info(self) -> MailboxInfo:
        left = list(self.left.values())  # in the mailbox's order
        return MailboxInfo(name=self.name, last_poll=self.last_poll, last_error=self.last_error,
                           read=self.read, left=left[:MAX_LEFT_SHOWN],
                           protocol=self.config.protocol, idle=self.idle.state,
                           idle_since=self.idle.since, idle_error=self.idle.error)

    # ------------------------------------------------------------ polling

    async def run(self) -> None:
        while True:
            self.wake.clear()  # before the poll: mail announced during it wakes the next one
            await self.poll()
            try:
                await asyncio.wait_for(self.wake.wait(), self.interval)
            except asyncio.TimeoutError:
                pass

    async def poll(self) -> None:
        mailbox = self._mailbox = open_mailbox(self.config)
        try:
            await asyncio.to_thread(mailbox.open)
            entries = await asyncio.to_thread(mailbox.entries)
            present = {entry.key for entry in entries}
            self.left = {key: why for key, why in self.left.items() if key in present}
            todo = [entry for entry in entries if entry.key is None or entry.key not in self.left]
            for entry in todo[:MAX_PER_POLL]:
                await self._one(mailbox, entry)
            self.last_error = None
        except MessageError:
            pass  # _one left it in the mailbox
        except SESSION_ERRORS as exc:
            error = str(exc) or type(exc).__name__
            if error != self.last_error:
                event("bounce_mailbox_failed", logging.WARNING, mailbox=self.name, error=error)
            self.last_error = error
        finally:
            await asyncio.to_thread(mailbox.close)
            self._mailbox = None
            self.last_poll = time.time()

    async def _one(self, mailbox: Mailbox, entry: Entry) -> None:
        try:
            raw = await asyncio.to_thread(mailbox.fetch, entry)
        except MessageError as exc:
            self._leave(entry, str(exc))
            if entry.key is not None:
                self.wake.set()  # the next poll, at once, passes this one by and reads the rest
            raise  # the session cannot go on
        if raw is None:
            return
        why = await self.intake.take(self.name, raw)
        if why is not None:
            self._leave(entry, why)
            return
        await asyncio.to_thread(mailbox.file_away, entry)
        self.read += 1

    def _leave(self, entry: Entry, why: str) -> None:
        if entry.key is not None:
            self.left[entry.key] = f"{entry.label}: {why}"
        event("bounce_left_in_mailbox", logging.WARNING, mailbox=self.name, message=entry.label,
              why=why)

    # ------------------------------------------------------------ IDLE

    async def watch(self) -> None:
        """Keep an IDLE connection; back off while it fails; stop if IDLE is not offered."""
        loop = asyncio.get_running_loop()
        pause = IDLE_RETRY_FIRST
        # a thread of its own: it blocks for up to idle_renew, which the shared pool must not
        thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"idle-{self.name}")
        try:
            while True:
                self._watch = IdleWatch(self.config, lambda: loop.call_soon_threadsafe(self._idling),
                                        lambda: loop.call_soon_threadsafe(self.wake.set))
                try:
                    await loop.run_in_executor(thread, self._watch.run)
                    pause = IDLE_RETRY_FIRST  # renewed: at once, on a fresh connection
                    continue
                except IdleNotOffered as exc:
                    self._idle_failed("not offered", str(exc))
                    return  # polling it is, until a reload
                except SESSION_ERRORS as exc:
                    self._idle_failed("failing", str(exc) or type(exc).__name__)
                finally:
                    self._watch = None
                await asyncio.sleep(pause)
                pause = min(pause * 2, IDLE_RETRY_MAX)
        finally:
            thread.shutdown(wait=False)  # abort() has ended its read; never wait on the loop

    def _idling(self) -> None:
        if self.idle.state != "on":
            event("bounce_idle_started", mailbox=self.name)
        self.idle.state, self.idle.since, self.idle.error = "on", time.time(), None
        self.wake.set()  # what arrived before the IDLE began

    def _idle_failed(self, state: str, error: str) -> None:
        if (state, error) != (self.idle.state, self.idle.error):
            event("bounce_idle_failed", logging.WARNING, mailbox=self.name, state=state, error=error)
        self.idle.state, self.idle.since, self.idle.error = state, time.time(), error

    def abort(self) -> None:
        if self._mailbox is not None:
            self._mailbox.abort()
        if self._watch is not None:
            self._watch.abort()


class BounceIntake:
    """The pollers of every [bounces] mailbox, as tasks of the daemon."""

    def __init__(self, journal: JournalStore, committer: Committer, key: bytes, config: BouncesConfig,
                 skip_suppressed: SkipSuppressed) -> None:
        self.intake = Intake(journal, committer, key, config, skip_suppressed)
        self.pollers = {name: self._poller(name, mailbox, config)
                        for name, mailbox in config.mailboxes.items()}
        self.started = False

    def _poller(self, name: str, mailbox: MailboxConfig, config: BouncesConfig) -> MailboxPoller:
        return MailboxPoller(name, mailbox, self.intake, config.poll_interval)

    def start(self) -> None:
        self.started = True
        for poller in self.pollers.values():
            poller.start()

    async def stop(self) -> None:
        self.started = False
        await asyncio.gather(*(poller.stop() for poller in self.pollers.values()))

    async def reload(self, config: BouncesConfig) -> None:
        """A new [bounces]: stop removed and changed mailboxes, start added and changed ones;
        the others keep their connection, only taking the new poll_interval."""
        old = self.pollers
        kept = {n: p for n, p in old.items() if config.mailboxes.get(n) == p.config}
        gone = [p for n, p in old.items() if n not in kept]
        await asyncio.gather(*(poller.stop() for poller in gone))
        self.intake.config = config
        self.pollers = {}
        for name, mailbox in config.mailboxes.items():
            poller = kept.get(name) or self._poller(name, mailbox, config)
            if name in kept and poller.interval != config.poll_interval:
                poller.interval = config.poll_interval
                poller.wake.set()  # the wait under way used the old interval
            elif name not in kept and self.started:
                poller.start()
            self.pollers[name] = poller
        event("bounces_reloaded", mailboxes=",".join(config.mailboxes),
              added=",".join(n for n in config.mailboxes if n not in old),
              removed=",".join(n for n in old if n not in config.mailboxes),
              changed=",".join(n for n in config.mailboxes if n in old and n not in kept))

    def info(self) -> list[MailboxInfo]:
        return [poller.info() for poller in self.pollers.values()]
