"""Which recipient goes to which worker (like Postfix's qmgr keeping "a limited window").

Running campaigns keep a small in-memory buffer of recipients claimed from the
journal (`CampaignRun.buffer`: refilled below BUFFER_LOW, CLAIM_BATCH at a time);
every free, active worker slot of every server is fed from those buffers in turn,
as far as that server's pacer allows. Nothing is handed out while the journal
cannot be written (`Outbox.error`): what it cannot record must not be sent.
On several hosts a server with Group/Interval also needs turns of the account's
group (pacer.needs_turns); `ask_turns` (cluster.py) asks the journal for them and
kicks the dispatch when they are there.
A campaign is done once the journal holds nothing pending for it and nothing of
it is buffered or held by a worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Iterator

import msgspec

from mailerd.journal.committer import Committer
from mailerd.journal.outbox import Outbox
from mailerd.journal.backend import JournalStore
from mailerd.message.addresses import suppression_key
from mailerd.pacing.pacer import Decision
from mailerd.schema.records import Claimed
from mailerd.schema.control import CampaignSpec
from mailerd.schema.workers import CampaignAttachment, CampaignTemplate, Hold, Job, Revoke, ToWorker
from mailerd.supervisor.campaignrun import CampaignRun
from mailerd.supervisor.servers import ServerRun, WorkerSlot
from mailerd.supervisor.tasks import Tasks
from mailerd.system.log import event

BUFFER_LOW = 64
CLAIM_BATCH = 512
CHUNK = 4 * 1024 * 1024  # attachment bytes per frame: well under wire.MAX_FRAME


def template_messages(campaign: int, uid: str, spec: CampaignSpec,
                      attachments: list[bytes] | None) -> Iterator[ToWorker]:
    """A campaign for a worker: its attachments' bytes in chunks, then the template."""
    for index, data in enumerate(attachments or ()):
        for start in range(0, len(data), CHUNK):  # an empty one: no chunk (the worker's b"")
            yield CampaignAttachment(campaign, index, data[start:start + CHUNK])
    yield CampaignTemplate(campaign, uid, spec)


def log_decision(server: ServerRun, decision: Decision) -> None:
    level = logging.DEBUG if decision.action == "note" else logging.INFO
    event("pacing", level, server=server.name, action=decision.action, cause=decision.cause,
          detail=decision.detail, smtp_reply=decision.reply)


class Dispatch:
    def __init__(self, servers: dict[str, ServerRun], journal: JournalStore,
                 committer: Committer, outbox: Outbox, tasks: Tasks,
                 is_stopping: Callable[[], bool],
                 may_use: Callable[[ServerRun, WorkerSlot], bool] = lambda server, slot: True
                 ) -> None:
        self.servers = servers
        self.journal = journal
        self.committer = committer
        self.outbox = outbox
        self.tasks = tasks
        self.is_stopping = is_stopping
        self.may_use = may_use  # the worker holds one of the account's sessions (cluster.py)
        # ask the journal for turns of the account's group (several hosts: cluster.py)
        self.ask_turns: Callable[[ServerRun, int], None] = lambda server, want: None
        self.campaigns: dict[int, CampaignRun] = {}
        self.status_changed = asyncio.Event()  # a campaign started, paused or ended (STATUS=)
        self._scheduled = False
        self._wake_handle: asyncio.TimerHandle | None = None
        self._rr = 0
        self._hold_when_done: set[WorkerSlot] = set()  # to QUIT before a long group pause

    def all_slots(self) -> list[WorkerSlot]:
        return [slot for server in self.servers.values() for slot in server.slots]

    # ------------------------------------------------------------ hand-out

    def kick(self) -> None:
        if not self._scheduled and not self.is_stopping():
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _wake_at(self, when: float) -> None:
        """Dispatch again when a pacing wait is over."""
        loop = asyncio.get_running_loop()
        delay = max(0.0, when - time.time())
        if self._wake_handle is not None and self._wake_handle.when() <= loop.time() + delay:
            return
        if self._wake_handle is not None:
            self._wake_handle.cancel()
        self._wake_handle = loop.call_later(delay, self._woken)

    def _woken(self) -> None:
        self._wake_handle = None
        self.kick()

    def _dispatch(self) -> None:
        self._scheduled = False
        if self.outbox.error is not None:
            return  # never send what the journal cannot record
        now = time.time()
        if self._hold_when_done:
            self._hold_the_done(now)
        assigned: list[tuple[int, int, str]] = []
        for server in self.servers.values():
            self._feed(server, now, assigned)
        if assigned:
            self.outbox.write(self.journal.mark_sending, assigned)
        for run in self.campaigns.values():
            if run.state == "running" and len(run.buffer) < BUFFER_LOW:
                self._refill(run)

    def _feed(self, server: ServerRun, now: float, assigned: list[tuple[int, int, str]]) -> None:
        """Hand recipients to this server's active, free slots, as its pacer allows."""
        prefetch = server.prefetch()
        for slot in server.slots:
            if slot.slot not in server.active:
                continue
            while slot.accepting and len(slot.jobs) < prefetch:
                start = server.pacer.next_start(now)
                if start > now:
                    self._wake_at(start)
                    return
                claimed = self._next_for(server.name)
                if claimed is None:
                    return
                if not self.may_use(server, slot):
                    self.campaigns[claimed.campaign].buffer.appendleft(claimed)
                    break
                if server.pacer.needs_turns(now):
                    self.campaigns[claimed.campaign].buffer.appendleft(claimed)
                    self.ask_turns(server, self._free_slots(server, prefetch))
                    return
                decision = server.pacer.take(now)
                self._assign(slot, claimed)
                assigned.append((claimed.campaign, claimed.line, server.name))
                if decision is not None:
                    self.group_pause(server, decision)

    @staticmethod
    def _free_slots(server: ServerRun, prefetch: int) -> int:
        """How many jobs this server's active slots could take now."""
        return sum(prefetch - len(slot.jobs) for slot in server.slots
                   if slot.slot in server.active and slot.accepting and len(slot.jobs) < prefetch)

    def group_pause(self, server: ServerRun, decision: Decision) -> None:
        """A pause after a full group began: logged; sessions that would sit idle past the
        relay's idle timeout are held (they QUIT), each once its jobs are done."""
        log_decision(server, decision)
        if server.config.group_interval > server.config.idle_timeout:
            self._hold_when_done.update(server.slots)  # the relay would cut an idle session
            self._hold_the_done(now=time.time())

    def _hold_the_done(self, now: float) -> None:
        """A Hold gives back the jobs a worker has not begun: the group's last ones, handed
        out a moment ago, are sent first (the group counted them)."""
        for slot in list(self._hold_when_done):
            if slot.jobs:
                continue
            self._hold_when_done.discard(slot)
            server = self.servers.get(slot.server_name)
            paused_until = server.pacer.paused_until if server is not None else None
            if paused_until is not None and paused_until > now:
                slot.send(Hold())

    def _next_for(self, server: str) -> Claimed | None:
        runs = [r for r in self.campaigns.values() if r.state == "running" and r.uses(server)]
        for i in range(len(runs)):
            run = runs[(self._rr + i) % len(runs)]
            if run.buffer:
                self._rr += 1
                return run.buffer.popleft()
        return None

    def _assign(self, slot: WorkerSlot, claimed: Claimed) -> None:
        if claimed.campaign not in slot.campaigns_known:
            run = self.campaigns[claimed.campaign]
            for message in template_messages(run.id, run.uid, run.spec, run.attachments):
                slot.send(message)  # attachments (in chunks), then CampaignTemplate
            slot.campaigns_known.add(claimed.campaign)
        slot.hold(claimed)
        slot.send(Job(claimed.campaign, claimed.line, claimed.email, msgspec.Raw(claimed.fields)))

    # ------------------------------------------------------------ the window on the journal

    def _refill(self, run: CampaignRun) -> None:
        if run.refilling or run.exhausted:
            return
        run.refilling = True
        self.tasks.spawn(self._claim(run))

    async def _claim(self, run: CampaignRun) -> None:
        try:
            if run.attachments is None:  # before anything of it can reach a worker
                run.attachments = await self.committer.read(self.journal.attachments, run.id)
            result = await self.committer.read(
                self.journal.claim, run.id, run.cursor, CLAIM_BATCH, time.time(), set(run.held)
            )
        except Exception as exc:  # journal trouble: try again at the next tick
            event("journal_error", logging.ERROR, campaign=run.id, error=str(exc))
            return
        finally:
            run.refilling = False
        if result.suppressed:
            self.outbox.write(self.journal.mark_suppressed, result.suppressed)
        if run.state != "running":
            return
        for claimed in result.recipients:
            if claimed.line not in run.held:
                run.held.add(claimed.line)
                run.buffer.append(claimed)
        run.cursor = max(run.cursor, result.cursor)
        run.exhausted = len(result.recipients) < CLAIM_BATCH
        if result.recipients:
            self.kick()

    async def tick(self) -> None:
        """Once a second: deferred recipients may have come due; finished campaigns end."""
        for run in list(self.campaigns.values()):
            if run.state != "running":
                continue
            run.exhausted = False
            await self.finish_if_done(run)

    async def finish_if_done(self, run: CampaignRun) -> None:
        """Called after the last outcome is written and on every tick: mark it done once."""
        if not self._may_be_done(run):
            return
        if await self.committer.read(self.journal.has_pending, run.id) or not self._may_be_done(run):
            return
        run.state = "done"  # before the write: a second caller stops at _may_be_done
        try:
            await self.committer.run(self.journal.set_campaign_state, run.id, "done")
        except Exception:
            run.state = "running"  # the next tick tries again
            raise
        del self.campaigns[run.id]
        self.status_changed.set()
        event("campaign_done", campaign=run.id, name=run.spec.name)

    def _may_be_done(self, run: CampaignRun) -> bool:
        return (run.state == "running" and self.campaigns.get(run.id) is run
                and not run.buffer and not run.held and not run.refilling)

    # ------------------------------------------------------------ campaign control

    def add_campaign(self, campaign: int, uid: str, spec: CampaignSpec) -> None:
        self.campaigns[campaign] = CampaignRun(campaign, uid, spec, "running")
        self.status_changed.set()
        self.kick()

    def resume_campaign(self, campaign: int, uid: str, spec: CampaignSpec) -> None:
        run = self.campaigns.get(campaign)
        if run is None:
            run = self.campaigns[campaign] = CampaignRun(campaign, uid, spec, "running")
        run.state = "running"
        run.rescan()
        self.status_changed.set()
        self.kick()

    def halt_campaign(self, campaign: int, state: str) -> None:
        """Pause or cancel: no new transactions; unstarted jobs come back."""
        run = self.campaigns.get(campaign)
        if run is None:
            return
        run.state = state
        run.drop_buffer()
        self.status_changed.set()
        for slot in self.all_slots():
            if any(c == campaign for c, _ in slot.jobs):
                slot.send(Revoke(campaign))
        if state == "cancelled" and not run.held:
            del self.campaigns[campaign]

    def rate(self, campaign: int) -> float:
        run = self.campaigns.get(campaign)
        return run.rate(time.time()) if run else 0.0

    def drop_suppressed(self, keys: set[str]) -> list[tuple[int, int]]:
        """Take the buffered recipients whose suppression key is in `keys` out of the
        dispatch buffers; their (campaign, line), for the caller to record."""
        dropped: list[tuple[int, int]] = []
        for run in self.campaigns.values():
            keep = []
            for claimed in run.buffer:
                if suppression_key(claimed.email) in keys:
                    run.held.discard(claimed.line)
                    dropped.append((claimed.campaign, claimed.line))
                else:
                    keep.append(claimed)
            if len(keep) != len(run.buffer):
                run.buffer.clear()
                run.buffer.extend(keep)
        return dropped
