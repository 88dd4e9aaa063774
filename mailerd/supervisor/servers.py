"""One relay account as the supervisor sees it: its worker slots and its pacer."""

from __future__ import annotations

import asyncio

from mailerd import wire
from mailerd.pacing.classify import Cause
from mailerd.schema.config import ServerConfig
from mailerd.schema.records import Claimed
from mailerd.pacing.pacer import Pacer
from mailerd.schema.control import ServerInfo, WorkerInfo
from mailerd.supervisor.spawner import WorkerProcess
from mailerd.schema.workers import Stop, ToWorker

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

    @property
    def accepting(self) -> bool:
        return self.writer is not None and self.state in ACCEPTING_STATES and not self.retired

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def send(self, message: ToWorker) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(wire.pack(message))

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
        state, reason, until = self.pacer.state(now)
        learned = self.pacer.learned
        return ServerInfo(
            name=self.name, host=self.config.host, port=self.config.port,
            connections=self.config.connections,
            effective_connections=self.pacer.effective_connections(),
            state=state, reason=reason, until=until,
            windows=self.pacer.window_counts(now),
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
            sessions_ended=self.sessions_ended, drops=self.drops, refused=self.refused,
            workers=[s.info() for s in self.slots if not s.retired or s.alive],
        )
