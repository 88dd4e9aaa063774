"""The supervisor: worker processes, and which recipient goes to which of them.

Like gunicorn's arbiter it keeps a fixed set of worker slots (`connections` per
server), spawns a process into each, reaps the dead and respawns them with a
growing delay. Unlike it, it also owns the dispatch of work: running campaigns
keep a small in-memory buffer of recipients claimed from the journal, and every
free worker slot is fed from those buffers. All state changes go through the
committer, in order, so the journal always tells the truth a restart needs.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import sys
import time
from typing import Callable

import msgspec

from . import wire
from .committer import Committer
from .config import Config, read_password
from .journal import Claimed, Journal, Outcome
from .log import event
from .protocol import CampaignSpec, ServerInfo, WorkerInfo
from .workerproto import (
    AnyFromWorker,
    CampaignTemplate,
    Done,
    DotAck,
    DotRequest,
    Job,
    Released,
    Revoke,
    SessionState,
    Setup,
    Stop,
    ToWorker,
)

PREFETCH = 2  # jobs a worker holds: the one in flight and the next
BUFFER_LOW = 64
CLAIM_BATCH = 512
TICK = 1.0
RESPAWN_MAX = 30.0
ACCEPTING_STATES = ("ready", "idle", "sending")


class CampaignRun:
    """A running campaign's place in the dispatch: its buffer and read cursor."""

    def __init__(self, campaign: int, uid: str, spec: CampaignSpec, state: str) -> None:
        self.id = campaign
        self.uid = uid
        self.spec = spec
        self.state = state
        self.servers = set(spec.servers) if spec.servers else None
        self.buffer: collections.deque[Claimed] = collections.deque()
        self.held: set[int] = set()  # lines buffered here or held by a worker
        self.attempts: dict[int, int] = {}
        self.cursor = 0
        self.exhausted = False
        self.refilling = False
        self.sent_times: collections.deque[float] = collections.deque()

    def uses(self, server: str) -> bool:
        return self.servers is None or server in self.servers

    def rescan(self) -> None:
        self.cursor = 0
        self.exhausted = False

    def note_sent(self, now: float) -> None:
        self.sent_times.append(now)
        while self.sent_times and self.sent_times[0] < now - 60:
            self.sent_times.popleft()

    def rate(self, now: float) -> float:
        recent = [t for t in self.sent_times if t >= now - 60]
        if len(recent) < 2:
            return 0.0
        span = max(now - recent[0], 1.0)
        return len(recent) / span


class WorkerSlot:
    """One worker process of one server, and what it holds."""

    def __init__(self, server_name: str, slot: int) -> None:
        self.server_name = server_name
        self.slot = slot
        self.process: asyncio.subprocess.Process | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.jobs: dict[tuple[int, int], Claimed] = {}
        self.campaigns_known: set[int] = set()
        self.state = "starting"
        self.detail = ""
        self.until: float | None = None
        self.sent = 0
        self.restarts = 0
        self.respawn_delay = 0.5
        self.started_at = 0.0

    @property
    def accepting(self) -> bool:
        return self.writer is not None and self.state in ACCEPTING_STATES

    def send(self, message: ToWorker) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(wire.pack(message))

    def info(self) -> WorkerInfo:
        pid = self.process.pid if self.process and self.process.returncode is None else None
        return WorkerInfo(
            server=self.server_name, slot=self.slot, pid=pid, state=self.state,
            detail=self.detail, sent=self.sent, restarts=self.restarts,
        )


class Supervisor:
    def __init__(self, config: Config, journal: Journal, committer: Committer) -> None:
        self.config = config
        self.journal = journal
        self.committer = committer
        self.campaigns: dict[int, CampaignRun] = {}
        self.slots = [
            WorkerSlot(name, i)
            for name, server in config.servers.items()
            for i in range(server.connections)
        ]
        self.passwords = {
            name: read_password(name, server) for name, server in config.servers.items()
        }
        self.stopping = False
        self._dispatch_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._rr = 0
        self.on_campaign_done: Callable[[int], None] = lambda campaign: None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        for row in self.journal.campaigns(("running", "paused")):
            self.campaigns[row.id] = CampaignRun(row.id, row.uid, row.spec, row.state)
        for slot in self.slots:
            self._spawn_soon(slot, 0)
        self._spawn_task(self._tick_forever())

    async def stop(self, timeout: float) -> None:
        """Graceful: workers finish their transaction, give back the rest, QUIT, exit."""
        self.stopping = True
        for slot in self.slots:
            slot.send(Stop())
        deadline = time.monotonic() + timeout
        for slot in self.slots:
            await self._wait_exit(slot, deadline)
        for task in list(self._tasks):
            task.cancel()

    async def _wait_exit(self, slot: WorkerSlot, deadline: float) -> None:
        process = slot.process
        if process is None or process.returncode is not None:
            return
        try:
            await asyncio.wait_for(process.wait(), max(0.1, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            event("worker_killed", logging.WARNING, server=slot.server_name, slot=slot.slot,
                  pid=process.pid, reason="did not stop in time")
            process.kill()
            await process.wait()
        await self._settle_slot(slot)

    def _spawn_task(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_ended)

    def _task_ended(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            event("supervisor_task_failed", logging.ERROR, error=repr(exc),
                  exc_info=(type(exc), exc, exc.__traceback__))

    def _spawn_soon(self, slot: WorkerSlot, delay: float) -> None:
        async def later() -> None:
            if delay:
                await asyncio.sleep(delay)
            if not self.stopping:
                await self._spawn(slot)
        self._spawn_task(later())

    async def _spawn(self, slot: WorkerSlot) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "mailerd.worker", str(child.fileno()),
                pass_fds=(child.fileno(),), stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            child.close()
        reader, writer = await asyncio.open_unix_connection(sock=parent, limit=wire.MAX_FRAME)
        slot.process, slot.writer = process, writer
        slot.state, slot.detail, slot.started_at = "starting", "", time.monotonic()
        slot.campaigns_known.clear()
        server = self.config.servers[slot.server_name]
        slot.send(Setup(slot.server_name, slot.slot, server, self.config.delivery,
                        self.passwords[slot.server_name], self.config.daemon.log_level))
        event("worker_started", server=slot.server_name, slot=slot.slot, pid=process.pid)
        self._spawn_task(self._serve_worker(slot, reader, process))

    async def _serve_worker(self, slot: WorkerSlot, reader: asyncio.StreamReader,
                            process: asyncio.subprocess.Process) -> None:
        decoder = wire.Decoder(AnyFromWorker)
        try:
            while True:
                self._handle(slot, decoder.decode(await wire.read_frame(reader)))
        except (wire.ConnectionClosed, wire.FrameError, ConnectionError) as exc:
            if isinstance(exc, wire.FrameError):
                event("worker_protocol_error", logging.ERROR, server=slot.server_name,
                      slot=slot.slot, error=str(exc))
                process.kill()
        code = await process.wait()
        if slot.writer is not None:
            slot.writer.close()
            slot.writer = None
        slot.state = "stopped" if self.stopping else "dead"
        await self._settle_slot(slot)
        if self.stopping:
            return
        self._respawn(slot, code)

    def _respawn(self, slot: WorkerSlot, code: int) -> None:
        healthy_for = time.monotonic() - slot.started_at
        if healthy_for > 60:
            slot.respawn_delay = 0.5
        delay = slot.respawn_delay
        slot.respawn_delay = min(slot.respawn_delay * 2, RESPAWN_MAX)
        slot.restarts += 1
        slot.detail = f"exited with {code}, respawn in {delay:.1f}s"
        event("worker_exited", logging.WARNING, server=slot.server_name, slot=slot.slot,
              code=code, respawn_in=round(delay, 1))
        self._spawn_soon(slot, delay)

    async def _settle_slot(self, slot: WorkerSlot) -> None:
        """What a dead worker held: data-sent -> uncertain, the rest back to the queue."""
        held, slot.jobs = slot.jobs, {}
        if not held:
            return
        uncertain, requeued = await self.committer.run(
            self.journal.settle_lost_worker, list(held)
        )
        for campaign, line in held:
            run = self.campaigns.get(campaign)
            if run is not None:
                run.held.discard(line)
                run.rescan()
        if uncertain or requeued:
            event("worker_jobs_settled", server=slot.server_name, slot=slot.slot,
                  uncertain=uncertain, requeued=requeued)
        self.kick()

    # ------------------------------------------------------------ worker messages

    def _handle(self, slot: WorkerSlot, message: AnyFromWorker) -> None:
        if isinstance(message, DotRequest):
            self._confirm_data_sent(slot, message)
        elif isinstance(message, Done):
            self._finish(slot, message)
        elif isinstance(message, SessionState):
            self._session_state(slot, message)
        elif isinstance(message, Released):
            self._released(slot, message.jobs)

    def _confirm_data_sent(self, slot: WorkerSlot, message: DotRequest) -> None:
        key = (message.campaign, message.line)
        future = self.committer.run(self.journal.mark_data_sent, [key])

        def acknowledge(done: asyncio.Future[None]) -> None:
            ok = not done.cancelled() and done.exception() is None
            if not ok:
                event("journal_error", logging.ERROR, campaign=message.campaign,
                      error=str(done.exception()))
            slot.send(DotAck(message.campaign, message.line, ok))

        future.add_done_callback(acknowledge)

    def _session_state(self, slot: WorkerSlot, message: SessionState) -> None:
        previous = slot.state
        slot.state, slot.detail, slot.until = message.state, message.detail, message.until
        if message.state == "backoff":
            event("session_backoff", logging.WARNING, server=slot.server_name, slot=slot.slot,
                  reason=message.detail, until=round(message.until or 0, 1))
        if slot.accepting and previous not in ACCEPTING_STATES:
            self.kick()

    def _finish(self, slot: WorkerSlot, done: Done) -> None:
        key = (done.campaign, done.line)
        claimed = slot.jobs.pop(key, None)
        run = self.campaigns.get(done.campaign)
        if done.result == "requeue":
            self._requeue(run, claimed, done)
        else:
            outcome = self._outcome(claimed, done)
            self._watch(self.committer.run(self.journal.record_outcomes, [outcome]))
            if run is not None:
                run.held.discard(done.line)
                if outcome.state == "sent":
                    slot.sent += 1
                    run.note_sent(time.time())
            event(outcome.state, campaign=done.campaign,
                  recipient=claimed.email if claimed else None, server=slot.server_name,
                  smtp_code=done.code, smtp_reply=done.reply)
        self.kick()

    def _outcome(self, claimed: Claimed | None, done: Done) -> Outcome:
        attempts = (claimed.attempts if claimed else 0) + 1
        delivery = self.config.delivery
        state, next_at = done.result, None
        if state == "deferred":
            if attempts >= delivery.max_attempts:
                state = "failed"
            else:
                delay = min(delivery.retry_initial * 2 ** (attempts - 1), delivery.retry_max)
                next_at = time.time() + delay
        return Outcome(done.campaign, done.line, state, done.code, done.reply, next_at)

    def _requeue(self, run: CampaignRun | None, claimed: Claimed | None, done: Done) -> None:
        """The session broke before the '.': the relay has nothing; send it again at once."""
        self._watch(self.committer.run(self.journal.requeue, [(done.campaign, done.line)]))
        if run is None or claimed is None:
            return
        if run.state == "running":
            run.buffer.appendleft(claimed)
        else:
            run.held.discard(done.line)

    def _released(self, slot: WorkerSlot, jobs: list[tuple[int, int]]) -> None:
        returned = []
        for campaign, line in jobs:
            claimed = slot.jobs.pop((campaign, line), None)
            returned.append((campaign, line))
            run = self.campaigns.get(campaign)
            if run is None or claimed is None:
                continue
            if run.state == "running":
                run.buffer.appendleft(claimed)
            else:
                run.held.discard(line)
        self._watch(self.committer.run(self.journal.requeue, returned))
        self.kick()

    def _watch(self, future: asyncio.Future[object]) -> None:
        def check(done: asyncio.Future[object]) -> None:
            if not done.cancelled() and done.exception() is not None:
                event("journal_error", logging.ERROR, error=str(done.exception()))
        future.add_done_callback(check)

    # ------------------------------------------------------------ dispatch

    def kick(self) -> None:
        if not self._dispatch_scheduled and not self.stopping:
            self._dispatch_scheduled = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._dispatch_scheduled = False
        assigned: list[tuple[int, int, str]] = []
        for slot in self.slots:
            while slot.accepting and len(slot.jobs) < PREFETCH:
                claimed = self._next_for(slot.server_name)
                if claimed is None:
                    break
                self._assign(slot, claimed)
                assigned.append((claimed.campaign, claimed.line, slot.server_name))
        if assigned:
            self._watch(self.committer.run(self.journal.mark_sending, assigned))
        for run in self.campaigns.values():
            if run.state == "running" and len(run.buffer) < BUFFER_LOW:
                self._refill(run)

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
            slot.send(CampaignTemplate(run.id, run.uid, run.spec))
            slot.campaigns_known.add(claimed.campaign)
        slot.jobs[(claimed.campaign, claimed.line)] = claimed
        slot.send(Job(claimed.campaign, claimed.line, claimed.email, msgspec.Raw(claimed.fields)))

    def _refill(self, run: CampaignRun) -> None:
        if run.refilling or run.exhausted:
            return
        run.refilling = True
        self._spawn_task(self._claim(run))

    async def _claim(self, run: CampaignRun) -> None:
        try:
            result = await self.committer.run(
                self.journal.claim, run.id, run.cursor, CLAIM_BATCH, time.time(), set(run.held)
            )
        except Exception as exc:  # journal trouble: try again at the next tick
            event("journal_error", logging.ERROR, campaign=run.id, error=str(exc))
            return
        finally:
            run.refilling = False
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

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            await self.tick()

    async def tick(self) -> None:
        """Once a second: pick up due retries and notice finished campaigns."""
        for run in list(self.campaigns.values()):
            if run.state != "running":
                continue
            run.exhausted = False  # deferred recipients may have come due
            if not run.buffer and not run.held and not run.refilling:
                await self._finish_if_done(run)
        self.kick()

    async def _finish_if_done(self, run: CampaignRun) -> None:
        if await self.committer.run(self.journal.has_pending, run.id):
            return
        if run.buffer or run.held or run.state != "running":
            return
        await self.committer.run(self.journal.set_campaign_state, run.id, "done")
        run.state = "done"
        del self.campaigns[run.id]
        event("campaign_done", campaign=run.id, name=run.spec.name)
        self.on_campaign_done(run.id)

    # ------------------------------------------------------------ campaign control

    def add_campaign(self, campaign: int, uid: str, spec: CampaignSpec) -> None:
        self.campaigns[campaign] = CampaignRun(campaign, uid, spec, "running")
        self.kick()

    def resume_campaign(self, campaign: int, uid: str, spec: CampaignSpec) -> None:
        run = self.campaigns.get(campaign)
        if run is None:
            run = self.campaigns[campaign] = CampaignRun(campaign, uid, spec, "running")
        run.state = "running"
        run.rescan()
        self.kick()

    def halt_campaign(self, campaign: int, state: str) -> None:
        """Pause or cancel: no new transactions; unstarted jobs come back."""
        run = self.campaigns.get(campaign)
        if run is None:
            return
        run.state = state
        for claimed in run.buffer:
            run.held.discard(claimed.line)
        run.buffer.clear()
        for slot in self.slots:
            if any(c == campaign for c, _ in slot.jobs):
                slot.send(Revoke(campaign))
        if state == "cancelled" and not run.held:
            del self.campaigns[campaign]

    def in_flight(self, campaign: int) -> int:
        return sum(1 for slot in self.slots for c, _ in slot.jobs if c == campaign)

    def rate(self, campaign: int) -> float:
        run = self.campaigns.get(campaign)
        return run.rate(time.time()) if run else 0.0

    def server_info(self) -> list[ServerInfo]:
        infos = []
        for name, server in self.config.servers.items():
            infos.append(ServerInfo(
                name=name, host=server.host, port=server.port, connections=server.connections,
                workers=[s.info() for s in self.slots if s.server_name == name],
            ))
        return infos

    def worker_pids(self) -> list[int]:
        return [s.process.pid for s in self.slots if s.process and s.process.returncode is None]
