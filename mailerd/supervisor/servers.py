"""One relay account as the supervisor sees it: its worker slots and its pacer."""

from __future__ import annotations

import asyncio
import collections
import time

from mailerd import wire
from mailerd.pacing.classify import Cause
from mailerd.schema.config import ServerConfig
from mailerd.schema.records import Claimed
from mailerd.pacing.pacer import DAY, HOUR, Pacer, count_since, forget_before
from mailerd.schema.control import ServerInfo, ServerPlan, WorkerInfo
from mailerd.supervisor.spawner import WorkerProcess
from mailerd.schema.workers import Done, DotAck, FromWorker, SessionState, Stop, ToWorker

PREFETCH = 2  # jobs a worker holds: the one in flight and the next
ACCEPTING_STATES = ("ready", "idle", "sending")


class WorkerSlot:
    """One worker process of one server, and what it holds."""

    def __init__(self, server_name: str, slot: int) -> None:
        self.server_name = server_name
        self.slot = slot
        self.process: WorkerProcess | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.jobs: dict[tuple[int, int], Claimed] = {}
        self.campaigns_known: set[int] = set()
        self.state = "starting"
        self.detail = ""
        self.connected = False
        self.sent = 0
        self.restarts = 0
        self.respawn_delay = 0.5
        self.started_at = 0.0
        self.retired = False  # connections were lowered by configuration: stop for good
        self.refusal: Cause | None = None  # what the last Done's reply told the pacer
        self.in_use = False  # a life is scheduled, starting or running here (processes.py)
        self.reached_relay = False  # this life reported a connected session or a result
        self.silent_since = 0.0  # monotonic: the liveness clock (processes.py), while it holds jobs
        self.acks_owed: set[tuple[int, int]] = set()  # DotRequests still being journaled: the clock waits
        self._held: list[bytes] = []  # frames made while an ack is owed: they go with it

    def started(self, process: WorkerProcess, writer: asyncio.StreamWriter) -> None:
        """A new life in this slot."""
        self.process, self.writer = process, writer
        self.state, self.detail, self.connected = "starting", "", False
        self.started_at = self.silent_since = time.monotonic()
        self.reached_relay = False
        self.acks_owed.clear()
        self._held.clear()
        self.campaigns_known.clear()

    def heard(self, message: FromWorker) -> None:
        """Any frame from the worker restarts its liveness clock."""
        self.silent_since = time.monotonic()
        if isinstance(message, Done) or (isinstance(message, SessionState) and message.connected):
            self.reached_relay = True

    def hold(self, claimed: Claimed) -> None:
        """A job handed to this worker; the liveness clock starts with its first one."""
        if not self.jobs:
            self.silent_since = time.monotonic()
        self.jobs[(claimed.campaign, claimed.line)] = claimed

    def silent_for(self, now: float) -> float:
        """How long it has held a job without a word (0 while we owe it a DotAck)."""
        if not self.jobs or self.acks_owed or not self.alive:
            return 0.0
        return now - self.silent_since

    @property
    def accepting(self) -> bool:
        return self.writer is not None and self.state in ACCEPTING_STATES and not self.retired

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def send(self, message: ToWorker) -> None:
        """While the worker waits for a DotAck, what else it is sent (the next Job, mostly)
        waits too and leaves in the DotAck's write: one send() and one wake-up of the
        worker a message, not two. It needs that Job only once the DotAck lets its "."
        go (with PIPELINING, the next MAIL goes in the same write); order is kept."""
        if self.writer is None or self.writer.is_closing():
            return
        self._held.append(wire.pack(message))
        if self.acks_owed and not isinstance(message, DotAck):
            return
        frames = b"".join(self._held) if len(self._held) > 1 else self._held[0]
        self._held.clear()
        self.writer.write(frames)

    def lost(self) -> None:
        """The worker is gone: what it was owed or was to be sent is moot."""
        self.acks_owed.clear()
        self._held.clear()

    def retire(self) -> None:
        """Connections were lowered by configuration: this worker stops for good."""
        self.retired = True
        self.send(Stop())

    def info(self) -> WorkerInfo:
        detail = self.detail
        if self.state == "sending" and self.jobs:
            detail = next(iter(self.jobs.values())).email  # the oldest job is the one in flight
        return WorkerInfo(
            server=self.server_name, slot=self.slot, pid=self.process.pid if self.alive else None,
            state=self.state, detail=detail, sent=self.sent, restarts=self.restarts,
        )


class ServerRun:
    """A server account's slots, pacer, which slots may hold sessions, and counters."""

    def __init__(self, name: str, config: ServerConfig, pacer: Pacer) -> None:
        self.name = name
        self.config = config
        self.pacer = pacer
        self.slots: list[WorkerSlot] = []
        self.active: set[int] = set()
        self.sessions_ended = 0
        self.drops = 0
        self.refused = 0
        self.overrides: dict[str, str] = {}
        self.failed_starts = 0  # worker lives in a row that ended before reaching the relay
        self.broken: str | None = None  # why its workers are no longer respawned (processes.py)
        self.delivered: collections.deque[float] = collections.deque()  # 250s after the "."

    def note_delivered(self, now: float) -> None:
        self.delivered.append(now)
        forget_before(self.delivered, now - DAY)

    def delivered_counts(self, now: float) -> dict[str, int]:
        """Messages the relay accepted (250 after the ".") in the last minute, hour, day."""
        forget_before(self.delivered, now - DAY)
        return {"minute": count_since(self.delivered, now - 60),
                "hour": count_since(self.delivered, now - HOUR),
                "day": count_since(self.delivered, now - DAY)}

    def pacing_state(self, now: float) -> tuple[str, str, float | None]:
        """The pacer's state, unless the server is broken (then nothing is sent at all)."""
        if self.broken is not None:
            return "broken", self.broken, None
        return self.pacer.state(now)

    def plan(self, now: float, observed: float) -> ServerPlan:
        state, reason, _ = self.pacing_state(now)
        rate = 0.0 if self.broken is not None else self.pacer.capacity(now, observed)
        return ServerPlan(server=self.name, rate=rate, state=state, reason=reason)

    def prefetch(self) -> int:
        """Paced servers get one job at a time, so a job's hand-out is its start."""
        server = self.config
        paced = bool(server.rate or server.group_size or server.hourly_quota
                     or server.daily_quota or self.pacer.learned.rate)
        return 1 if paced else PREFETCH

    def choose_active(self) -> set[int]:
        """The slots allowed to hold a session: live sessions first, then those not just
        refused (a session still in STARTTLS/AUTH is not yet `connected`), then by number."""
        wanted = self.pacer.effective_connections()
        candidates = [s for s in self.slots if not s.retired]
        candidates.sort(key=lambda s: (not s.connected, s.state in ("refused", "backoff"), s.slot))
        self.active = {s.slot for s in candidates[:wanted]}
        return self.active

    def info(self, now: float) -> ServerInfo:
        state, reason, until = self.pacing_state(now)
        learned = self.pacer.learned
        return ServerInfo(
            name=self.name, host=self.config.host, port=self.config.port,
            connections=self.config.connections,
            effective_connections=self.pacer.effective_connections(),
            state=state, reason=reason, until=until,
            windows=self.delivered_counts(now),
            learned={k: v for k, v in {
                "connections": learned.connections,
                "messages_per_connection": learned.messages_per_connection,
                "rate": learned.rate and round(learned.rate, 3),
                "hourly_quota": learned.hourly_quota,
                "daily_quota": learned.daily_quota,
            }.items() if v is not None},
            settings=dict(self.overrides),
            messages_per_connection=self.pacer.messages_per_connection(),
            rate=self.pacer.effective_rate(),
            account_rate=self.pacer.account_rate(), hosts=self.pacer.hosts,
            sessions_ended=self.sessions_ended, drops=self.drops, refused=self.refused,
            workers=[s.info() for s in self.slots if not s.retired or s.alive],
            broken=self.broken,
        )
