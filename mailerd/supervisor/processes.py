"""Worker processes: spawned into slots, served, reaped, respawned (like Postfix's master(8)).

Each server has `connections` slots; each slot holds one worker process at a time
(the worker's own side of this contract is in mailerd/worker/session.py). A worker
that exits is respawned, at once if it exited 0 (stopped on purpose), otherwise
after a delay that doubles from 0.5 s up to RESPAWN_MAX (back to 0.5 s once a life
lasted a minute). A spawn that fails (socketpair or fork: EMFILE, EAGAIN) is retried
the same way, so a slot is never left empty.

Restart limit. A worker life *reached the relay* once the worker reported a connected
SMTP session or the result of a transaction. A life that ends with a non-zero exit
before that is a failed start. RESTART_LIMIT failed starts in a row on one server
(any of its slots; a life of any of its slots reaching the relay resets the count)
mark the server `broken`: its workers are no longer respawned, `mailerctl status`
shows the server as broken with the reason, and the log has a `server_broken` event.
A relay that is down or refuses us does not count: the worker stays alive and backs
off. `mailerctl set` on the server or a reload (SIGHUP: `systemctl reload`) repair it (its
password file is read again) and its slots are spawned afresh.

Liveness rule. While a worker holds a job it must not stay silent for longer than
SILENT_REPLIES times its server's SMTP `timeout` plus LIVENESS_MARGIN: between two of
its frames a live worker waits for at most SILENT_REPLIES relay answers (opening a
session: greeting, EHLO, HELO after a refused EHLO, STARTTLS, the TLS handshake, EHLO
again, AUTH LOGIN's three replies; a transaction needs fewer: RSET, MAIL, RCPT, DATA,
or the "." pipelined with the next ones), and aiosmtplib bounds each by `timeout`;
the margin covers rendering and compiling a template. The clock
starts when the slot gets its first job, restarts at every frame, and stands still
while the supervisor owes the worker a DotAck (the journal write is ours, not its).
A worker past the limit is killed (SIGKILL) and its jobs are settled by the usual
rules: `sending` -> `queued`, `data-sent` -> `uncertain`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Callable

from mailerd import wire
from mailerd.schema.config import Config
from mailerd.schema.workers import AnyFromWorker, Setup, Stop
from mailerd.supervisor.identity import Identity
from mailerd.supervisor.results import Results, limits
from mailerd.supervisor.servers import ServerRun, WorkerSlot
from mailerd.supervisor.spawner import WorkerProcess, spawn_worker
from mailerd.supervisor.tasks import Tasks
from mailerd.system.log import event

RESPAWN_FIRST = 0.5
RESPAWN_MAX = 30.0
LONG_LIFE = 60.0  # a life this long starts the respawn delay again from RESPAWN_FIRST
RESTART_LIMIT = 5
SILENT_REPLIES = 9
LIVENESS_MARGIN = 10.0


class Processes:
    def __init__(self, servers: dict[str, ServerRun], results: Results, tasks: Tasks,
                 config: Callable[[], Config], passwords: dict[str, str | None],
                 identity: Identity) -> None:
        self.servers = servers
        self.results = results
        self.tasks = tasks
        self.config = config
        self.passwords = passwords
        self.identity = identity
        self.stopping = False
        self._spawning: set[asyncio.Future[None]] = set()

    # ------------------------------------------------------------ slots

    def resize(self, server: ServerRun) -> None:
        """Spawn or retire worker slots until there are `connections` of them."""
        live = [s for s in server.slots if not s.retired]
        wanted = server.config.connections
        for number in range(len(live), wanted):
            slot = WorkerSlot(server.name, self._free_slot_number(server, number))
            server.slots.append(slot)
            self.spawn_soon(slot, 0)
        for slot in live[wanted:]:
            slot.retire()

    @staticmethod
    def _free_slot_number(server: ServerRun, start: int) -> int:
        used = {s.slot for s in server.slots}
        number = start
        while number in used:
            number += 1
        return number

    # ------------------------------------------------------------ one life of a slot

    def spawn_soon(self, slot: WorkerSlot, delay: float) -> None:
        slot.in_use = True

        async def later() -> None:
            if delay:
                await asyncio.sleep(delay)
            if self.stopping or slot.retired or self.servers[slot.server_name].broken:
                slot.in_use = False
                return
            spawning = asyncio.ensure_future(self._spawn(slot))
            self._spawning.add(spawning)
            spawning.add_done_callback(self._spawning.discard)
            await asyncio.shield(spawning)  # stop() waits for it, never cancels it
        self.tasks.spawn(later())

    async def _spawn(self, slot: WorkerSlot) -> None:
        server = self.servers[slot.server_name]
        try:
            process, reader, writer = await self._start_process()
        except (OSError, EOFError) as exc:  # EMFILE, EAGAIN, ENOMEM: try again later
            self._spawn_failed(slot, exc)
            return
        slot.started(process, writer)
        slot.send(Setup(server.config, self.config().delivery, self.passwords[slot.server_name],
                        self.identity.unsubscribe_key,
                        self.identity.server_dkim(slot.server_name, server.config)))
        slot.send(limits(server))
        event("worker_started", server=slot.server_name, slot=slot.slot, pid=process.pid)
        self.tasks.spawn(self._serve_worker(slot, reader, process))

    @staticmethod
    async def _start_process() -> tuple[WorkerProcess, asyncio.StreamReader, asyncio.StreamWriter]:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = await asyncio.to_thread(spawn_worker, child)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        try:
            reader, writer = await asyncio.open_unix_connection(sock=parent, limit=wire.MAX_FRAME)
        except BaseException:
            parent.close()
            process.kill()
            raise
        return process, reader, writer

    def _spawn_failed(self, slot: WorkerSlot, exc: BaseException) -> None:
        delay = self._next_delay(slot)
        slot.state, slot.detail = "dead", f"could not start: {exc}, retry in {delay:.1f}s"
        event("worker_spawn_failed", logging.ERROR, server=slot.server_name, slot=slot.slot,
              error=str(exc) or type(exc).__name__, retry_in=round(delay, 1))
        self.spawn_soon(slot, delay)

    async def _serve_worker(self, slot: WorkerSlot, reader: asyncio.StreamReader,
                            process: WorkerProcess) -> None:
        server = self.servers[slot.server_name]
        decoder = wire.Decoder(AnyFromWorker)
        frames = wire.FrameReader(reader)
        try:
            while True:
                for body in await frames.read():
                    message = decoder.decode(body)
                    slot.heard(message)
                    if slot.reached_relay:
                        server.failed_starts = 0
                    self.results.handle(slot, message)
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
        await self.results.settle_slot(slot)
        if self.stopping or slot.server_name not in self.servers:
            slot.in_use = False
            return
        if slot.retired:
            slot.in_use = False
            server.slots.remove(slot)
            server.choose_active()
            return
        self._respawn(slot, server, code)

    def _respawn(self, slot: WorkerSlot, server: ServerRun, code: int) -> None:
        if code == 0:  # stopped on purpose (a restart for new connection settings)
            self.spawn_soon(slot, 0)
            return
        slot.restarts += 1
        if not slot.reached_relay:
            server.failed_starts += 1
            if server.failed_starts >= RESTART_LIMIT and server.broken is None:
                self._mark_broken(server, code)
        if server.broken is not None:
            slot.in_use = False
            slot.detail = f"exited with {code}; not respawned: the server is broken"
            return
        delay = self._next_delay(slot)
        slot.detail = f"exited with {code}, respawn in {delay:.1f}s"
        event("worker_exited", logging.WARNING, server=slot.server_name, slot=slot.slot,
              code=code, respawn_in=round(delay, 1))
        self.spawn_soon(slot, delay)

    @staticmethod
    def _next_delay(slot: WorkerSlot) -> float:
        if time.monotonic() - slot.started_at > LONG_LIFE:
            slot.respawn_delay = RESPAWN_FIRST
        delay = slot.respawn_delay
        slot.respawn_delay = min(slot.respawn_delay * 2, RESPAWN_MAX)
        return delay

    # ------------------------------------------------------------ restart limit

    def _mark_broken(self, server: ServerRun, code: int) -> None:
        server.broken = (f"{server.failed_starts} workers in a row exited before reaching the "
                         f"relay, the last with code {code}; mailerctl set or SIGHUP to retry")
        event("server_broken", logging.ERROR, server=server.name, failed_starts=server.failed_starts,
              exit_code=code, action="workers not respawned until mailerctl set or SIGHUP")

    def repair(self, server: ServerRun) -> None:
        """`mailerctl set` or a reload: a broken server gets fresh workers."""
        if server.broken is None:
            return
        server.broken = None
        server.failed_starts = 0
        event("server_repaired", server=server.name)
        for slot in server.slots:
            if not slot.retired and not slot.in_use:
                slot.respawn_delay = RESPAWN_FIRST
                self.spawn_soon(slot, 0)

    # ------------------------------------------------------------ liveness

    def check_liveness(self) -> None:
        """Kill a worker that holds a job and has said nothing for too long."""
        now = time.monotonic()
        for server in self.servers.values():
            limit = SILENT_REPLIES * server.config.timeout + LIVENESS_MARGIN
            for slot in server.slots:
                silent = slot.silent_for(now)
                if silent > limit and slot.process is not None:
                    event("worker_killed", logging.WARNING, server=slot.server_name, slot=slot.slot,
                          pid=slot.process.pid, reason="silent while holding a job",
                          silent=round(silent, 1), limit=round(limit, 1), jobs=len(slot.jobs))
                    slot.process.kill()
                    slot.silent_since = now  # once: its end is on the way

    # ------------------------------------------------------------ stop

    async def stop(self, timeout: float) -> None:
        """Graceful: workers finish their transaction, give back the rest, QUIT, exit."""
        self.stopping = True
        if self._spawning:  # a worker being forked right now must be stopped too
            await asyncio.wait(self._spawning)
        slots = [slot for server in self.servers.values() for slot in server.slots]
        for slot in slots:
            slot.send(Stop())
        deadline = time.monotonic() + timeout
        for slot in slots:
            await self._wait_exit(slot, deadline)

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
        await self.results.settle_slot(slot)
