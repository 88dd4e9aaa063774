"""The supervisor: worker processes, and which recipient goes to which of them.

Like gunicorn's arbiter it keeps a set of worker slots (`connections` per
server), spawns a process into each, reaps the dead and respawns them with a
growing delay. It also owns the dispatch of work: running campaigns keep a small
in-memory buffer of recipients claimed from the journal, and every free worker
slot of every server is fed from those buffers, as far as that server's pacer
allows. All state changes go through the committer, in order, so the journal
always tells the truth a restart needs.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import time

import msgspec

from mailerd import wire
from mailerd.supervisor.campaignrun import CampaignRun
from mailerd.pacing.classify import Cause, Classifier
from mailerd.journal.committer import Committer, JournalWriteError
from mailerd.config import Config, ConfigError, ServerConfig, apply_setting, read_password
from mailerd.journal.store import Claimed, Journal, Outcome
from mailerd.supervisor.identity import Identity, template_messages
from mailerd.system.log import event
from mailerd.pacing.pacer import DAY, Decision, Learned, Pacer
from mailerd.schema.control import CampaignSpec, ServerInfo, ServerPlan
from mailerd.supervisor.servers import ServerRun, WorkerSlot
from mailerd.control.suppression import bounce_rule
from mailerd.supervisor.spawner import WorkerProcess, spawn_worker, stop_template
from mailerd.schema.workers import (
    AnyFromWorker,
    Done,
    DotAck,
    DotRequest,
    Hold,
    Job,
    Limits,
    Released,
    Revoke,
    SessionEnded,
    SessionState,
    Setup,
    Stop,
)

BUFFER_LOW = 64
CLAIM_BATCH = 512
TICK = 1.0
PRUNE_EVERY = 3600.0  # drop send times older than the longest quota window (a day)
RESPAWN_MAX = 30.0
CONNECTION_KEYS = ("host", "port", "security", "username", "password_file", "tls_verify",
                   "timeout", "helo_name")

_learned_decoder = msgspec.msgpack.Decoder(Learned)
_overrides_decoder = msgspec.msgpack.Decoder(dict[str, str])


class Supervisor:
    def __init__(self, config: Config, journal: Journal, committer: Committer) -> None:
        self.config = config
        self.journal = journal
        self.committer = committer
        self.classifier = Classifier(config.patterns)
        journal.bounce_rule = bounce_rule(config.suppression)  # 5xx "no such user" -> suppressed
        self.campaigns: dict[int, CampaignRun] = {}
        self.servers: dict[str, ServerRun] = {}
        self.identity = Identity(config)  # unsubscribe key, servers' DKIM keys (issue 6)
        self.passwords = {
            name: read_password(name, server) for name, server in config.servers.items()
        }
        self.stopping = False
        self.storage_error: str | None = None
        self.pending_writes: collections.deque[tuple[object, tuple[object, ...]]] = collections.deque()
        self.sent_total = 0
        self.status_changed = asyncio.Event()  # a campaign started, paused or ended (STATUS=)
        self._dispatch_scheduled = False
        self._wake_handle: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._spawning: set[asyncio.Future[None]] = set()
        self._rr = 0
        self._last_prune = time.time()

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        for row in self.journal.campaigns(("running", "paused")):
            self.campaigns[row.id] = CampaignRun(row.id, row.uid, row.spec, row.state)
        for name, server in self.config.servers.items():
            await self._add_server(name, server)
        self._spawn_task(self._tick_forever())

    async def stop(self, timeout: float) -> None:
        """Graceful: workers finish their transaction, give back the rest, QUIT, exit."""
        self.stopping = True
        if self._spawning:  # a worker being forked right now must be stopped too
            await asyncio.wait(self._spawning)
        slots = self.all_slots()
        for slot in slots:
            slot.send(Stop())
        deadline = time.monotonic() + timeout
        for slot in slots:
            await self._wait_exit(slot, deadline)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.to_thread(stop_template)

    def all_slots(self) -> list[WorkerSlot]:
        return [slot for server in self.servers.values() for slot in server.slots]

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
            assert exc is not None
            event("supervisor_task_failed", logging.ERROR, error=repr(exc),
                  exc_info=(type(exc), exc, exc.__traceback__))

    # ------------------------------------------------------------ servers

    async def _add_server(self, name: str, config: ServerConfig) -> None:
        learned_blob, overrides_blob = await self.committer.read(self.journal.server_state, name)
        learned = _learned_decoder.decode(learned_blob) if learned_blob else Learned()
        overrides = _overrides_decoder.decode(overrides_blob) if overrides_blob else {}
        config = self._with_overrides(name, config, overrides)
        sends = await self.committer.read(self.journal.sends_since, name, time.time() - DAY)
        server = ServerRun(name, config, Pacer(name, config, learned, sends))
        server.overrides = overrides
        self.servers[name] = server
        self._resize(server)
        server.choose_active()

    @staticmethod
    def _with_overrides(name: str, config: ServerConfig, overrides: dict[str, str]) -> ServerConfig:
        for key, value in overrides.items():
            try:
                config = apply_setting(config, key, value)
            except ConfigError as exc:
                event("setting_ignored", logging.WARNING, server=name, setting=key, error=str(exc))
        return config

    def _resize(self, server: ServerRun) -> None:
        """Spawn or retire worker slots until there are `connections` of them."""
        live = [s for s in server.slots if not s.retired]
        wanted = server.config.connections
        for number in range(len(live), wanted):
            slot = WorkerSlot(server.name, self._free_slot_number(server, number))
            server.slots.append(slot)
            self._spawn_soon(slot, 0)
        for slot in live[wanted:]:
            slot.retire()

    @staticmethod
    def _free_slot_number(server: ServerRun, start: int) -> int:
        used = {s.slot for s in server.slots}
        number = start
        while number in used:
            number += 1
        return number

    def _reconfigure(self, server: ServerRun, config: ServerConfig, restart: bool = False) -> None:
        restart = restart or any(getattr(config, k) != getattr(server.config, k)
                                 for k in CONNECTION_KEYS)
        server.config = config
        server.pacer.configure(config)
        self._resize(server)
        if restart:
            self.passwords[server.name] = read_password(server.name, config)
            for slot in server.slots:
                slot.send(Stop())  # respawned at once with the new Setup
        self._apply_pacing(server)

    async def set_pacing(self, name: str, settings: dict[str, str], who: str) -> ServerRun:
        """`mailerctl set`: change pacing now; journaled so it outlives a restart."""
        server = self.servers.get(name)
        if server is None:
            raise ConfigError(f"no server named {name!r} (configured: {', '.join(self.servers)})")
        config = server.config
        forget = settings.pop("learned", None)
        if forget not in (None, "forget"):
            raise ConfigError("learned=forget is the only value for learned")
        for key, value in settings.items():
            config = apply_setting(config, key, value)
        server.overrides.update(settings)
        if forget:
            server.pacer.learned = Learned()
            server.pacer.changed = True
        overrides = msgspec.msgpack.encode(server.overrides)

        def journal_it() -> None:
            self.journal.save_overrides(name, overrides)
            self.journal.audit(None, "set", f"server={name} {settings} forget={bool(forget)} {who}")

        await self.committer.run(journal_it)
        event("pacing_set", server=name, settings=" ".join(f"{k}={v}" for k, v in settings.items())
              or None, learned="forgotten" if forget else None)
        self._reconfigure(server, config)
        return server

    async def reload(self, config: Config) -> None:
        """SIGHUP: the config file is the truth again; run-time settings are dropped."""
        rotated = self.identity.reload(config)  # first: a key it cannot use changes nothing
        self.config = config
        self.classifier = Classifier(config.patterns)
        self.journal.bounce_rule = bounce_rule(config.suppression)
        for name, server_config in config.servers.items():
            if name not in self.servers:
                self.passwords[name] = read_password(name, server_config)
                await self._add_server(name, server_config)
                continue
            server = self.servers[name]
            if server.overrides:
                server.overrides = {}
                await self.committer.run(self.journal.save_overrides, name, None)
            self._reconfigure(server, server_config, restart=name in rotated)
        for name in set(self.servers) - set(config.servers):
            for slot in self.servers[name].slots:
                slot.retire()
        event("config_reloaded", path=config.path, servers=",".join(config.servers))
        self.kick()

    # ------------------------------------------------------------ worker processes

    def _spawn_soon(self, slot: WorkerSlot, delay: float) -> None:
        async def later() -> None:
            if delay:
                await asyncio.sleep(delay)
            if not self.stopping and not slot.retired:
                spawning = asyncio.ensure_future(self._spawn(slot))
                self._spawning.add(spawning)
                spawning.add_done_callback(self._spawning.discard)
                await asyncio.shield(spawning)  # stop() waits for it, never cancels it
        self._spawn_task(later())

    async def _spawn(self, slot: WorkerSlot) -> None:
        server = self.servers[slot.server_name]
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = await asyncio.to_thread(spawn_worker, child)
        finally:
            child.close()
        reader, writer = await asyncio.open_unix_connection(sock=parent, limit=wire.MAX_FRAME)
        slot.process, slot.writer = process, writer
        slot.state, slot.detail, slot.connected = "starting", "", False
        slot.started_at = time.monotonic()
        slot.campaigns_known.clear()
        slot.send(Setup(server.config, self.config.delivery, self.passwords[slot.server_name],
                        self.identity.unsubscribe_key,
                        self.identity.server_dkim(slot.server_name, server.config)))
        slot.send(self._limits(server))
        event("worker_started", server=slot.server_name, slot=slot.slot, pid=process.pid)
        self._spawn_task(self._serve_worker(slot, reader, process))

    async def _serve_worker(self, slot: WorkerSlot, reader: asyncio.StreamReader,
                            process: WorkerProcess) -> None:
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
        slot.state, slot.connected = ("stopped" if self.stopping else "dead"), False
        await self._settle_slot(slot)
        server = self.servers.get(slot.server_name)
        if self.stopping or server is None:
            return
        if slot.retired:
            server.slots.remove(slot)
            server.choose_active()
            return
        self._respawn(slot, code)

    def _respawn(self, slot: WorkerSlot, code: int) -> None:
        if code == 0:  # stopped on purpose (a restart for new connection settings)
            self._spawn_soon(slot, 0)
            return
        if time.monotonic() - slot.started_at > 60:
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
        try:
            uncertain, requeued = await self._write(self.journal.settle_lost_worker, list(held))
        except JournalWriteError:
            uncertain = requeued = 0  # kept by _write and replayed before anything is sent again
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
        elif isinstance(message, SessionEnded):
            self._session_ended(slot, message)
        elif isinstance(message, Released):
            self._released(slot, message.jobs)

    def _confirm_data_sent(self, slot: WorkerSlot, message: DotRequest) -> None:
        future = self.committer.run(
            self.journal.mark_data_sent, [(message.campaign, message.line, slot.server_name)]
        )

        def acknowledge(done: asyncio.Future[None]) -> None:
            ok = not done.cancelled() and done.exception() is None
            if not ok:
                event("journal_error", logging.ERROR, campaign=message.campaign,
                      error=str(done.exception()))
            slot.send(DotAck(message.campaign, message.line, ok))

        future.add_done_callback(acknowledge)

    def _session_state(self, slot: WorkerSlot, message: SessionState) -> None:
        was_accepting = slot.accepting
        slot.state, slot.detail = message.state, message.detail
        slot.connected = message.connected
        if message.state == "backoff":
            event("session_backoff", logging.WARNING, server=slot.server_name, slot=slot.slot,
                  reason=message.detail, until=round(message.until or 0, 1))
        if slot.accepting and not was_accepting:
            self.kick()

    def _session_ended(self, slot: WorkerSlot, ended: SessionEnded) -> None:
        server = self.servers[slot.server_name]
        server.sessions_ended += 1
        refusal, slot.refusal = slot.refusal, None
        slot.connected = False
        now = time.time()
        if ended.stage == "connect":
            server.refused += 1
            cause = self.classifier.classify(ended.code, ended.reply) if ended.code else None
            if cause is None and ended.code in (421, 432):
                cause = Cause.SESSIONS  # refused at the greeting
            if cause is not None:
                self._pacing_signal(server, cause, ended.reply, now)
            return
        if ended.dropped:
            server.drops += 1
        if refusal is Cause.SESSION_LENGTH and ended.messages:
            # the relay said "too many messages in this session": now we know how many
            decision = server.pacer.learn_session_length(ended.messages, ended.reply)
            if decision is not None:
                self._decided(server, decision)
            return
        if refusal is not None:
            return  # the Done's reply already told the pacer why
        others = any(s.connected for s in server.slots if s is not slot)
        decision = server.pacer.on_session_end(ended.messages, ended.dropped, ended.reply, now,
                                               others)
        if decision is not None:
            self._decided(server, decision)

    def _pacing_signal(self, server: ServerRun, cause: Cause, reply: str, now: float) -> None:
        decision = server.pacer.on_refusal(cause, reply, now)
        if decision is not None:
            self._decided(server, decision)

    def _decided(self, server: ServerRun, decision: Decision) -> None:
        self._log_decision(server, decision)
        self._apply_pacing(server)

    @staticmethod
    def _log_decision(server: ServerRun, decision: Decision) -> None:
        level = logging.DEBUG if decision.action == "note" else logging.INFO
        event("pacing", level, server=server.name, action=decision.action, cause=decision.cause,
              detail=decision.detail, smtp_reply=decision.reply)

    def _finish(self, slot: WorkerSlot, done: Done) -> None:
        server = self.servers[slot.server_name]
        claimed = slot.jobs.pop((done.campaign, done.line), None)
        run = self.campaigns.get(done.campaign)
        cause = self._refusal_cause(done)
        slot.refusal = cause
        if cause is not None:
            # the relay's limit, not the recipient's fault: no attempt counted
            self._pacing_signal(server, cause, f"{done.code} {done.reply}", time.time())
            self._requeue(run, claimed, done)
        elif done.result == "requeue":
            self._requeue(run, claimed, done)
        else:
            self._record(slot, run, claimed, done)
        self.kick()

    def _refusal_cause(self, done: Done) -> Cause | None:
        if done.result == "sent" or done.code is None:
            return None
        return self.classifier.classify(done.code, done.reply)

    def _record(self, slot: WorkerSlot, run: CampaignRun | None, claimed: Claimed | None,
                done: Done) -> None:
        outcome = self._outcome(claimed, done)
        written = self._write(self.journal.record_outcomes, [outcome])
        if run is not None:
            run.held.discard(done.line)
            if outcome.state == "sent":
                run.note_sent(time.time())
            if run.exhausted and not run.buffer and not run.held:
                # perhaps the last one: check once it is on disk, not at the next tick
                written.add_done_callback(lambda _: self._spawn_task(self._finish_if_done(run)))
        if outcome.state == "sent":
            slot.sent += 1
            self.sent_total += 1
        event(outcome.state, campaign=done.campaign,
              recipient=claimed.email if claimed else None, server=slot.server_name,
              smtp_code=done.code, smtp_reply=done.reply)

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
        """The relay does not have it: back to the queue at once, no attempt counted."""
        reply = f"{done.code} {done.reply}" if done.code and not done.reply.startswith(str(done.code)) \
            else done.reply
        self._write(self.journal.requeue, [(done.campaign, done.line)], reply)
        if run is not None and claimed is not None:
            run.put_back(claimed)

    def _released(self, slot: WorkerSlot, jobs: list[tuple[int, int]]) -> None:
        for campaign, line in jobs:
            claimed = slot.jobs.pop((campaign, line), None)
            run = self.campaigns.get(campaign)
            if run is not None and claimed is not None:
                run.put_back(claimed)
        self._write(self.journal.requeue, list(jobs))
        self.kick()

    def _write(self, fn, *args) -> asyncio.Future[object]:
        """A journal write nobody waits for; kept for retry if storage fails."""
        future = self.committer.run(fn, *args)

        def check(done: asyncio.Future[object]) -> None:
            error = None if done.cancelled() else done.exception()
            if isinstance(error, JournalWriteError):
                self._storage_failed(str(error))
                self.pending_writes.append((fn, args))
            elif error is not None:
                event("journal_error", logging.ERROR, error=str(error))
        future.add_done_callback(check)
        return future

    def _storage_failed(self, error: str) -> None:
        if self.storage_error is None:
            event("journal_unwritable", logging.ERROR, error=error,
                  action="sending stopped until the journal can be written again")
        self.storage_error = error

    async def _retry_writes(self) -> None:
        """Once a second while storage is failing: replay the writes that failed, in order."""
        try:
            await self.committer.run(self.journal.probe_write)
            while self.pending_writes:
                fn, args = self.pending_writes[0]
                await self.committer.run(fn, *args)
                self.pending_writes.popleft()
        except JournalWriteError as exc:
            self.storage_error = str(exc)
            return
        event("journal_writable", pending_replayed=True)
        self.storage_error = None
        self.kick()

    # ------------------------------------------------------------ pacing

    def _limits(self, server: ServerRun) -> Limits:
        return Limits(server.pacer.messages_per_connection(), server.config.idle_timeout)

    def _apply_pacing(self, server: ServerRun) -> None:
        """Tell the workers what the pacer now says; save what it learned."""
        before = server.active
        after = server.choose_active()
        now = time.time()
        parked = server.pacer.next_start(now) - now > server.config.idle_timeout
        limits = self._limits(server)
        for slot in server.slots:
            slot.send(limits)
            if slot.slot in before - after or (parked and slot.jobs):
                slot.send(Hold())
        if server.pacer.changed:
            server.pacer.changed = False
            learned = msgspec.msgpack.encode(server.pacer.learned)
            self._write(self.journal.save_learned, server.name, learned)
        self.kick()

    # ------------------------------------------------------------ dispatch

    def kick(self) -> None:
        if not self._dispatch_scheduled and not self.stopping:
            self._dispatch_scheduled = True
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
        self._dispatch_scheduled = False
        if self.storage_error is not None:
            return  # never send what the journal cannot record
        now = time.time()
        assigned: list[tuple[int, int, str]] = []
        for server in self.servers.values():
            self._feed(server, now, assigned)
        if assigned:
            self._write(self.journal.mark_sending, assigned)
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
                decision = server.pacer.take(now)
                self._assign(slot, claimed)
                assigned.append((claimed.campaign, claimed.line, server.name))
                if decision is not None:
                    self._group_pause(server, decision)

    def _group_pause(self, server: ServerRun, decision: Decision) -> None:
        self._log_decision(server, decision)
        if server.config.group_interval > server.config.idle_timeout:
            for slot in server.slots:  # the relay would cut an idle session: QUIT first
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
        slot.jobs[(claimed.campaign, claimed.line)] = claimed
        slot.send(Job(claimed.campaign, claimed.line, claimed.email, msgspec.Raw(claimed.fields)))

    def _refill(self, run: CampaignRun) -> None:
        if run.refilling or run.exhausted:
            return
        run.refilling = True
        self._spawn_task(self._claim(run))

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
            self._write(self.journal.mark_suppressed, result.suppressed)
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
        """Once a second: pacing recovery, due retries, finished campaigns."""
        if self.storage_error is not None:
            await self._retry_writes()
            if self.storage_error is not None:
                return
        now = time.time()
        if now - self._last_prune >= PRUNE_EVERY:
            self._last_prune = now
            for name in self.servers:
                self._write(self.journal.prune_sends, name, now - DAY)
        for server in self.servers.values():
            decisions = server.pacer.tick(now)
            for decision in decisions:
                self._log_decision(server, decision)
            if decisions:
                self._apply_pacing(server)
        for run in list(self.campaigns.values()):
            if run.state != "running":
                continue
            run.exhausted = False  # deferred recipients may have come due
            await self._finish_if_done(run)
        self.kick()

    async def _finish_if_done(self, run: CampaignRun) -> None:
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

    def server_info(self) -> list[ServerInfo]:
        now = time.time()
        return [server.info(now) for server in self.servers.values()
                if server.name in self.config.servers]

    def plan(self, spec: CampaignSpec, left: int) -> tuple[float | None, list[ServerPlan]]:
        """Estimated seconds to send `left` more over the campaign's servers, and why."""
        now = time.time()
        names = spec.servers or list(self.config.servers)
        servers = [self.servers[n] for n in names if n in self.servers]
        observed = [server.pacer.recent_rate(now) for server in servers]
        plans = []
        for server, rate in zip(servers, observed):
            state, reason, _ = server.pacer.state(now)
            plans.append(ServerPlan(server=server.name, rate=server.pacer.capacity(now, rate),
                                    state=state, reason=reason))
        total = sum(p.rate for p in plans)
        if left == 0:
            return 0.0, plans
        if not total:
            return None, plans
        estimates = []
        for server, plan, rate in zip(servers, plans, observed):
            if plan.rate:
                share = round(left * plan.rate / total)
                estimates.append(server.pacer.seconds_for(share, now, rate))
        known = [e for e in estimates if e is not None]
        return (max(known) if known else None), plans

    def status_line(self) -> str:
        running = sum(1 for r in self.campaigns.values() if r.state == "running")
        parked = sum(1 for s in self.servers.values() if s.pacer.state(time.time())[0] == "parked")
        return (f"{running} campaign{'s' if running != 1 else ''} running, "
                f"{self.sent_total:,} sent, {parked} server{'s' if parked != 1 else ''} parked")
