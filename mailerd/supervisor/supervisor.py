"""The supervisor: worker processes, and which recipient goes to which of them.

This class builds the collaborators and answers the rest of the daemon (daemon.py,
control/); each job lives in its own module, and each gets the others handed in:

- processes.py: spawning, serving, reaping and respawning workers; the restart
  limit and the liveness rule (like Postfix's master(8));
- results.py: what workers report, turned into journal writes and pacing (qmgr's feedback);
- dispatch.py: campaign buffers and the hand-out of recipients to free slots (qmgr);
- journal/outbox.py: journal writes nobody waits for, replayed after a storage failure;
- tasks.py: the background tasks;
- cluster.py: the host's part among several on one PostgreSQL journal (lease,
  takeover, campaigns of other hosts, the relay accounts' session slots).

Here stay the servers' lifetime (added, reconfigured by `mailerctl set` or a
reload), the once-a-second tick, and the read-only views (status, plan). All
state changes go through the committer, in order, so the journal always tells
the truth a restart needs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

import msgspec

from mailerd.config import ConfigError, apply_setting, read_password
from mailerd.schema.config import Config, ServerConfig
from mailerd.journal.committer import Committer
from mailerd.journal.outbox import Outbox
from mailerd.journal.backend import JournalStore
from mailerd.journal.store import bounce_rule
from mailerd.pacing.pacer import DAY, Pacer
from mailerd.schema.records import Learned
from mailerd.schema.control import CampaignSpec, HostInfo, ServerInfo, ServerPlan
from mailerd.schema.workers import Stop
from mailerd.supervisor.campaignrun import CampaignRun
from mailerd.supervisor.cluster import Cluster
from mailerd.supervisor.dispatch import Dispatch, log_decision
from mailerd.supervisor.identity import Identity
from mailerd.supervisor.processes import Processes
from mailerd.supervisor.results import Results
from mailerd.supervisor.servers import ServerRun, WorkerSlot
from mailerd.supervisor.spawner import stop_template
from mailerd.supervisor.tasks import Tasks
from mailerd.system.log import event

TICK = 1.0
PRUNE_EVERY = 3600.0  # drop send times older than the longest quota window (a day)
CONNECTION_KEYS = ("host", "port", "security", "username", "password_file", "tls_verify",
                   "tls_ca_file", "tls_server_name", "allow_plaintext_auth",
                   "timeout", "helo_name")

_learned_decoder = msgspec.msgpack.Decoder(Learned)
_overrides_decoder = msgspec.msgpack.Decoder(dict[str, str])


class Supervisor:
    def __init__(self, config: Config, journal: JournalStore, committer: Committer,
                 sent_before: int = 0, on_fenced: Callable[[], None] = lambda: None) -> None:
        self.config = config
        self.journal = journal
        self.committer = committer
        journal.bounce_rule = bounce_rule(config.suppression)  # 5xx "no such user" -> suppressed
        self.servers: dict[str, ServerRun] = {}
        self.identity = Identity(config)  # unsubscribe key, servers' DKIM keys (issue 6)
        self.passwords = {
            name: read_password(name, server) for name, server in config.servers.items()
        }
        self.tasks = Tasks()
        self.outbox = Outbox(committer, journal.probe_write, on_writable=lambda: self.kick())
        self.dispatch = Dispatch(self.servers, journal, committer, self.outbox, self.tasks,
                                 is_stopping=lambda: self.processes.stopping,
                                 may_use=lambda server, slot: self.cluster.may_use(server, slot))
        self.results = Results(self.servers, self.dispatch, journal, committer, self.outbox,
                               self.tasks, config=lambda: self.config, sent_before=sent_before)
        self.processes = Processes(self.servers, self.results, self.tasks, lambda: self.config,
                                   self.passwords, self.identity)
        self.cluster = Cluster(journal, committer, self.outbox, self.dispatch, self.tasks,
                               self.servers, clustered=config.journal.backend == "postgresql",
                               lease=config.journal.lease, on_fenced=on_fenced,
                               on_server_state=self.follow_server_state)
        self._last_prune = time.time()

    # ------------------------------------------------------------ what the daemon reads

    @property
    def campaigns(self) -> dict[int, CampaignRun]:
        return self.dispatch.campaigns

    @property
    def status_changed(self) -> asyncio.Event:
        """Set when a campaign started, paused or ended (for systemd's STATUS=)."""
        return self.dispatch.status_changed

    @property
    def storage_error(self) -> str | None:
        """Set while the journal cannot be written: nothing is sent meanwhile."""
        return self.outbox.error

    @property
    def sent_total(self) -> int:
        return self.results.sent_total

    @property
    def stopping(self) -> bool:
        return self.processes.stopping

    def all_slots(self) -> list[WorkerSlot]:
        return self.dispatch.all_slots()

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        for row in self.journal.campaigns(("running", "paused")):
            self.campaigns[row.id] = CampaignRun(row.id, row.uid, row.spec, row.state)
        for name, server in self.config.servers.items():
            await self._add_server(name, server)
        self.cluster.start()
        self.tasks.spawn(self._tick_forever())

    async def stop(self, timeout: float) -> None:
        """Graceful: workers finish their transaction, give back the rest, QUIT, exit."""
        await self.processes.stop(timeout)
        self.tasks.cancel_all()  # the journal's close gives this host's session slots back
        await asyncio.to_thread(stop_template)

    # ------------------------------------------------------------ servers

    async def _add_server(self, name: str, config: ServerConfig) -> None:
        learned_blob, overrides_blob = await self.committer.read(self.journal.server_state, name)
        learned = _learned_decoder.decode(learned_blob) if learned_blob else Learned()
        overrides = _overrides_decoder.decode(overrides_blob) if overrides_blob else {}
        config = self._with_overrides(name, config, overrides)
        sends = await self.committer.read(self.journal.sends_since, name, time.time() - DAY)
        server = ServerRun(name, config, Pacer(name, config, learned, sends, self.config.patterns))
        server.overrides = overrides
        self.servers[name] = server
        self.cluster.pace(server)
        self.processes.resize(server)
        server.choose_active()

    @staticmethod
    def _with_overrides(name: str, config: ServerConfig, overrides: dict[str, str]) -> ServerConfig:
        for key, value in overrides.items():
            try:
                config = apply_setting(config, key, value)
            except ConfigError as exc:
                event("setting_ignored", logging.WARNING, server=name, setting=key, error=str(exc))
        return config

    def _reconfigure(self, server: ServerRun, config: ServerConfig, restart: bool = False) -> None:
        restart = restart or any(getattr(config, k) != getattr(server.config, k)
                                 for k in CONNECTION_KEYS)
        if restart or server.broken is not None:  # first: an unreadable file changes nothing
            self.passwords[server.name] = read_password(server.name, config)
        server.config = config
        server.pacer.configure(config)
        self.processes.repair(server)
        self.processes.resize(server)
        if restart:
            for slot in server.slots:
                slot.send(Stop())  # respawned at once with the new Setup
        self.results.apply_pacing(server)

    def _configured_server(self, name: str) -> ServerRun:
        server = self.servers.get(name)
        if server is None or name not in self.config.servers:
            raise ConfigError(f"no server named {name!r} (configured: "
                              f"{', '.join(self.config.servers)})")
        return server

    async def set_pacing(self, name: str, settings: dict[str, str], who: str) -> ServerRun:
        """`mailerctl set`: change pacing now; journaled so it outlives a restart."""
        server = self._configured_server(name)
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
        await self._journal_overrides(name, server.overrides, "set",
                                      f"server={name} {settings} forget={bool(forget)} {who}")
        event("pacing_set", server=name, settings=" ".join(f"{k}={v}" for k, v in settings.items())
              or None, learned="forgotten" if forget else None)
        self._reconfigure(server, config)
        return server

    async def _journal_overrides(self, name: str, overrides: dict[str, str], action: str,
                                 detail: str) -> None:
        """The server's run-time settings, stored once for every host, with the audit line."""
        blob = msgspec.msgpack.encode(overrides) if overrides else None

        def journal_it() -> None:
            self.journal.save_overrides(name, blob)
            self.journal.audit(None, action, detail)

        await self.committer.run(journal_it)

    async def reset_pacing(self, name: str, keys: list[str], who: str) -> list[str]:
        """`mailerctl set --reset`: the run-time settings named (all when none is) are
        dropped, the config file's values apply again, on every host (the journal's
        servers row, which the other hosts follow). The keys dropped."""
        server = self._configured_server(name)
        unknown = [key for key in keys if key not in server.overrides]
        if unknown:
            now_set = ", ".join(sorted(server.overrides)) or "none"
            raise ConfigError(f"{', '.join(unknown)}: not set at run time (set now: {now_set})")
        dropped = sorted(keys or server.overrides)
        overrides = {k: v for k, v in server.overrides.items() if k not in dropped}
        await self._journal_overrides(name, overrides, "reset", f"server={name} {dropped} {who}")
        server.overrides = overrides
        event("pacing_reset", server=name, settings=" ".join(dropped) or None)
        self._reconfigure(server, self._with_overrides(name, self.config.servers[name], overrides))
        return dropped

    def follow_server_state(self, name: str, learned_blob: bytes | None,
                            overrides_blob: bytes | None) -> None:
        """Another host's `mailerctl set` or learned limits (cluster.py): applied here as
        a local `mailerctl set` is; what this host learned and has not saved yet wins."""
        server = self.servers.get(name)
        if server is None or name not in self.config.servers:
            return
        overrides = _overrides_decoder.decode(overrides_blob) if overrides_blob else {}
        if overrides != server.overrides:
            server.overrides = overrides
            event("pacing_followed", server=name, host=self.journal.host_id,
                  settings=" ".join(f"{k}={v}" for k, v in overrides.items()) or None)
            self._reconfigure(server, self._with_overrides(name, self.config.servers[name],
                                                           overrides))
        learned = _learned_decoder.decode(learned_blob) if learned_blob else Learned()
        pacer = server.pacer
        if not pacer.changed and learned != pacer.learned:
            now = time.time()
            if learned.connections != pacer.learned.connections:
                pacer.last_sessions_signal = now  # its recovery starts from here, as there
            if learned.rate != pacer.learned.rate:
                pacer.last_rate_signal = now
            pacer.learned = learned
            event("learned_followed", server=name, host=self.journal.host_id)
            self.results.apply_pacing(server)

    async def reload(self, config: Config) -> None:
        """SIGHUP: the config file is the truth again; run-time settings are dropped
        (on several hosts they are the cluster's, kept and applied over the file)."""
        rotated = self.identity.reload(config)  # first: a key it cannot use changes nothing
        self.config = config
        self.journal.bounce_rule = bounce_rule(config.suppression)
        for name, server_config in config.servers.items():
            try:
                await self._reload_server(name, server_config, name in rotated)
            except ConfigError as exc:  # its password file: the other servers still reload
                event("config_reload_failed", logging.ERROR, server=name, error=str(exc))
        for name in set(self.servers) - set(config.servers):
            for slot in self.servers[name].slots:
                slot.retire()
        event("config_reloaded", path=config.path, servers=",".join(config.servers))
        self.kick()

    async def _reload_server(self, name: str, config: ServerConfig, key_rotated: bool) -> None:
        if name not in self.servers:
            self.passwords[name] = read_password(name, config)
            await self._add_server(name, config)
            return
        server = self.servers[name]
        server.pacer.set_patterns(self.config.patterns)
        if self.cluster.clustered:  # stored once for every host: one host's reload keeps them
            config = self._with_overrides(name, config, server.overrides)
        elif server.overrides:
            server.overrides = {}
            await self.committer.run(self.journal.save_overrides, name, None)
        self._reconfigure(server, config, restart=key_rotated)

    # ------------------------------------------------------------ once a second

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            await self.tick()

    async def tick(self) -> None:
        """Once a second: hung workers, pacing recovery, due retries, finished campaigns."""
        self.processes.check_liveness()
        self.cluster.tick()
        if self.outbox.error is not None:
            await self.outbox.retry()
            if self.outbox.error is not None:
                return
        now = time.time()
        if now - self._last_prune >= PRUNE_EVERY:
            self._last_prune = now
            for name in self.servers:
                self.outbox.write(self.journal.prune_sends, name, now - DAY)
        for server in self.servers.values():
            decisions = server.pacer.tick(now)
            for decision in decisions:
                log_decision(server, decision)
            if decisions:
                self.results.apply_pacing(server)
        await self.dispatch.tick()
        self.kick()

    # ------------------------------------------------------------ campaign control

    def kick(self) -> None:
        self.dispatch.kick()

    def add_campaign(self, campaign: int, uid: str, spec: CampaignSpec) -> None:
        self.cluster.noted(campaign)
        self.dispatch.add_campaign(campaign, uid, spec)

    def resume_campaign(self, campaign: int, uid: str, spec: CampaignSpec) -> None:
        self.cluster.noted(campaign)
        self.dispatch.resume_campaign(campaign, uid, spec)

    def halt_campaign(self, campaign: int, state: str) -> None:
        """Pause or cancel: no new transactions; unstarted jobs come back."""
        self.cluster.noted(campaign)
        self.dispatch.halt_campaign(campaign, state)

    def rate(self, campaign: int) -> float:
        return self.dispatch.rate(campaign)

    # ------------------------------------------------------------ views

    async def hosts(self) -> list[HostInfo]:
        """The hosts on the same PostgreSQL journal (none on SQLite)."""
        return await self.cluster.hosts()

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
        plans = [server.plan(now, rate) for server, rate in zip(servers, observed)]
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

    def drop_suppressed(self, keys: set[str]) -> list[tuple[int, int]]:
        """Suppressed addresses out of the dispatch buffers (control/suppression.py)."""
        return self.dispatch.drop_suppressed(keys)
