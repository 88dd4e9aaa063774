"""One host among several on one PostgreSQL journal (issue 16).

Every daemon on the same database holds a lease (its `hosts` row, journal/postgres.py):

- lease: renewed every lease/3. A renewal that finds this host's generation gone means
  another host took it over while it could not renew (frozen, partitioned): the host is
  fenced; it stops and the daemon exits with EXIT_FENCED, so that systemd starts it
  afresh as a new generation. The journal itself refuses `data-sent` for a row this
  generation no longer holds, so a fenced host writes no "." even before it notices.
- takeover: every lease/2, the hosts that have not renewed for a lease are taken over:
  their rows back to the queue, their `data-sent` ones uncertain (one `uncertain` event
  each), their session slots freed. A host takes nobody over until it has itself renewed
  without a failure for a whole lease: after an outage of the database every host's
  lease looks expired, and the first one back must give the others time to renew.
- campaigns: enqueued, paused, resumed or cancelled on any host, they reach the others
  within DISCOVER_EVERY (the journal's campaigns table is the truth).
- session slots: a relay account's `connections` is a ceiling for the whole cluster. A
  worker is handed jobs only while it holds one of the account's slots in the database;
  the slot goes back once the worker has neither jobs nor a session. A host keeps at most
  its fair share of the slots (the ceiling divided by the hosts sending through that
  account, rounded up): the sessions beyond it are held (Hold: QUIT once the job in
  flight is done), so every host gets to send.
- sending hosts: at every look each host records the accounts it has work for (a running
  campaign that uses the server), until a lease from now (journal `server_users`), and
  reads how many hosts send through each. A live host with nothing to send through an
  account takes no part of it.
- quotas: the hourly and daily quotas count every host's sends (the shared `sends` table).
- rate: each host paces at its part of the account's rate (the rate divided by the hosts
  sending through it, as session slots are shared), re-evaluated at every look. A host
  that dies is still counted until its lease has passed: the others send less meanwhile,
  never more. A host that starts sending through an account (it joined, or has work for
  it now) sends nothing paced by a rate for JOIN_WAIT after the look that recorded it, by
  which time the others have seen it and slowed to their new part; until that look, an
  account it does not send through is held back by JOIN_WAIT at every look. (Counting
  the shared `sends` of the last second instead would be a second old at every look:
  each host would see room the others had already used.)
- groups: a server's Group/Interval counts every host's messages. Before a start the
  dispatch needs a turn of the account's current group; a host asks the journal for a
  block of turns (at most as many as it can start now, one ask at a time per server),
  which grants what is left of the group and, once the group is full, records the
  pause on the database's clock. A turn not used within TURN_TTL of its ask is lost
  (the account sees fewer, never more), and the pause is TURN_TTL longer than
  group_interval, so the relay always gets a whole interval of silence. A host asking
  during the pause is told its end: every host's pacer shows it and holds its sessions
  before a long interval, as on one host.
- pacing settings: `mailerctl set` and the learned limits are the `servers` rows, stored
  once; every look reads them, and a row another host changed is followed here
  (on_server_state, the supervisor's: the same path as a local `mailerctl set`).

On SQLite (one host) none of this runs and every worker may hold a session.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from typing import Callable, NamedTuple

from mailerd.journal.backend import JournalStore
from mailerd.journal.committer import Committer
from mailerd.journal.outbox import Outbox
from mailerd.pacing.pacer import DAY, TURN_TTL, forget_before
from mailerd.schema.control import HostInfo
from mailerd.schema.records import CampaignRow, TakeOver
from mailerd.schema.workers import Hold
from mailerd.supervisor.dispatch import Dispatch
from mailerd.supervisor.results import log_uncertain
from mailerd.supervisor.servers import ServerRun, WorkerSlot
from mailerd.supervisor.tasks import Tasks
from mailerd.system.log import event

DISCOVER_EVERY = 1.0  # seconds between two looks at the shared campaigns (and the hosts)
SLOT_RETRY = 0.2  # seconds between two asks for a session slot while all are taken
ACTIVE_STATES = ("running", "paused")
JOIN_WAIT = 2 * DISCOVER_EVERY  # a joining host's first rate-paced send: after the others' look
ServerStateSeen = Callable[[str, bytes | None, bytes | None], None]


class HeldSlot(NamedTuple):
    server: str
    number: int


class Cluster:
    def __init__(self, journal: JournalStore, committer: Committer, outbox: Outbox,
                 dispatch: Dispatch, tasks: Tasks, servers: dict[str, ServerRun], *,
                 clustered: bool, lease: float, on_fenced: Callable[[], None],
                 on_server_state: ServerStateSeen = lambda name, learned, overrides: None
                 ) -> None:
        self.journal = journal
        self.committer = committer
        self.outbox = outbox
        self.dispatch = dispatch
        self.tasks = tasks
        self.servers = servers
        self.clustered = clustered
        self.lease = lease
        self.on_fenced = on_fenced
        self.on_server_state = on_server_state
        self._server_rows: dict[str, tuple[bytes | None, bytes | None]] = {}  # as last read
        self.fenced = False
        self.healthy_since: float | None = None  # monotonic: renewing without a failure since
        self.sending: set[str] = set()  # the accounts this host sends through, as last recorded
        self.senders: dict[str, int] = {}  # account -> hosts sending through it, as last read
        self.held: dict[WorkerSlot, HeldSlot] = {}
        self._asking: set[WorkerSlot] = set()
        self._holding: set[WorkerSlot] = set()  # told to Hold: they give their slot back
        self._lives: set[tuple[str, int, bool]] = set()  # (host, generation, alive) last seen
        self._changed_here: dict[int, float] = {}  # campaign -> monotonic time of a local change
        self._shared_sends: dict[str, collections.deque[float]] = {}
        self._sends_read_to: dict[str, float] = {}
        self._asking_turns: set[str] = set()  # servers whose group turns are being asked for

    @property
    def host_id(self) -> str:
        return self.journal.host_id

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if not self.clustered:
            return
        self.healthy_since = time.monotonic()  # open() has just registered this generation
        not_before = time.time() + JOIN_WAIT
        for server in self.servers.values():
            server.pacer.not_before = not_before
        self.dispatch.ask_turns = self.ask_turns
        self.tasks.spawn(self._renew_forever())
        self.tasks.spawn(self._take_over_forever())
        self.tasks.spawn(self._discover_forever())

    # ------------------------------------------------------------ lease

    async def _renew_forever(self) -> None:
        while not self.fenced:
            await asyncio.sleep(self.lease / 3)
            await self.renew()

    async def renew(self) -> None:
        try:
            current = await self.committer.run(self.journal.renew_lease)
        except Exception as exc:  # the database is away: nothing can be sent meanwhile
            if self.healthy_since is not None:
                event("lease_renewal_failed", logging.WARNING, host=self.host_id, error=str(exc))
            self.healthy_since = None
            return
        if not current:
            self.fenced = True
            event("fenced", logging.ERROR, host=self.host_id,
                  reason=f"another host took this host's recipients over: it did not renew its "
                         f"lease for {self.lease:g}s",
                  action="stopping; started again, it joins as a new generation")
            self.on_fenced()
            return
        if self.healthy_since is None:
            event("lease_renewed", host=self.host_id)
            self.healthy_since = time.monotonic()

    # ------------------------------------------------------------ takeover

    async def _take_over_forever(self) -> None:
        while not self.fenced:
            await asyncio.sleep(self.lease / 2)
            await self.take_over()

    async def take_over(self) -> None:
        if self.healthy_since is None or time.monotonic() - self.healthy_since < self.lease:
            return
        try:
            taken = await self.committer.run(self.journal.take_over_expired, self.lease)
        except Exception as exc:
            event("takeover_failed", logging.WARNING, host=self.host_id, error=str(exc))
            return
        for takeover in taken:
            log_takeover(self.host_id, takeover)
        if taken:
            self._rescan()

    # ------------------------------------------------------------ campaigns of every host

    def noted(self, campaign: int) -> None:
        """A campaign was changed by a command on this host: a look at the journal that
        began before it must not undo it."""
        self._changed_here[campaign] = time.monotonic()

    async def _discover_forever(self) -> None:
        while not self.fenced:  # a look at once: the live hosts decide this host's rate
            await self.discover()
            await asyncio.sleep(DISCOVER_EVERY)

    async def discover(self) -> None:
        began = time.monotonic()
        try:
            rows = await self.committer.read(self.journal.campaigns, ACTIVE_STATES)
            hosts = await self.committer.read(self.journal.hosts)
            gone = [c for c in self.dispatch.campaigns if c not in {row.id for row in rows}]
            ended = [await self.committer.read(self.journal.campaign, c) for c in gone]
            await self._read_shared_sends()
            server_rows = await self.committer.read(self.journal.server_states)
            sending = self._servers_with_work()
            senders = await self.committer.run(self.journal.share_servers, sorted(sending))
        except Exception as exc:  # the database is away: the next look tries again
            event("cluster_look_failed", logging.DEBUG, error=str(exc))
            return
        self._hold_back(sending)
        self.sending, self.senders = sending, senders
        for server in self.servers.values():
            self.pace(server)
        self._follow_server_rows(server_rows)
        lives = {(host.host, host.generation, host.alive) for host in hosts}
        hosts_changed, self._lives = lives != self._lives, lives
        changed = {c for c, at in self._changed_here.items() if at >= began}
        self._changed_here = {c: at for c, at in self._changed_here.items() if at >= began}
        for row in rows:
            if row.id not in changed:
                self._follow(row)
        for campaign, row in zip(gone, ended):
            if campaign not in changed:
                self._follow_ended(campaign, row)
        self._rescan(everything=hosts_changed)

    def _follow(self, row: CampaignRow) -> None:
        run = self.dispatch.campaigns.get(row.id)
        if row.state == "running" and (run is None or run.state != "running"):
            event("campaign_followed", campaign=row.id, state=row.state, host=self.host_id)
            self.dispatch.resume_campaign(row.id, row.uid, row.spec)
        elif row.state == "paused" and run is not None and run.state == "running":
            event("campaign_followed", campaign=row.id, state=row.state, host=self.host_id)
            self.dispatch.halt_campaign(row.id, "paused")

    def _follow_ended(self, campaign: int, row: CampaignRow | None) -> None:
        run = self.dispatch.campaigns.get(campaign)
        if run is None:
            return
        state = row.state if row is not None else "cancelled"
        if state == "cancelled" and run.state != "cancelled":
            event("campaign_followed", campaign=campaign, state=state, host=self.host_id)
            self.dispatch.halt_campaign(campaign, "cancelled")
        elif state == "done" and not run.held and not run.refilling:
            del self.dispatch.campaigns[campaign]  # another host saw it finish
            self.dispatch.status_changed.set()

    def _rescan(self, everything: bool = True) -> None:
        """Recipients can come back to the queue behind this host's read cursor: a takeover
        or a host's clean stop frees the rows it held. Read the running campaigns from the
        start again: all of them when a host came, went or was taken over, else those whose
        buffer ran dry (a read from the start re-takes the rows a buffer holds: not at
        every look)."""
        for run in self.dispatch.campaigns.values():
            if run.state == "running" and (everything or not run.buffer):
                run.rescan()
        self.dispatch.kick()

    # ------------------------------------------------------------ shared pacing

    def pace(self, server: ServerRun) -> None:
        """This host's part of the account's rate and sessions: one of the hosts sending
        through it (itself counted also before it was recorded as one: erring low)."""
        if not self.clustered:
            server.pacer.hosts = 1
            return
        server.pacer.shared_groups = True
        others = self.senders.get(server.name, 0) - (server.name in self.sending)
        server.pacer.hosts = max(1, others + 1)

    def _servers_with_work(self) -> set[str]:
        """The accounts this host sends through: a running campaign uses them, and they
        have workers that may send (not broken, not removed by a reload)."""
        running = [run for run in self.dispatch.campaigns.values() if run.state == "running"]
        return {name for name, server in self.servers.items()
                if server.broken is None and any(not slot.retired for slot in server.slots)
                and any(run.uses(name) for run in running)}

    def _hold_back(self, sending: set[str]) -> None:
        """No rate-paced send through an account before the other hosts have seen this one
        among its senders: JOIN_WAIT after the look that records it. An account without
        work here is held back at every look, so that work arriving between two looks
        waits for the next one."""
        not_before = time.time() + JOIN_WAIT
        for name, server in self.servers.items():
            if name not in sending or name not in self.sending:
                server.pacer.not_before = max(server.pacer.not_before, not_before)

    def _follow_server_rows(self, rows: dict[str, tuple[bytes | None, bytes | None]]) -> None:
        """A server row that changed since the last look (written by any host, this one
        too) goes to the supervisor, which applies what differs from this host's."""
        for name, row in rows.items():
            if name in self.servers and self._server_rows.get(name) != row:
                try:
                    self.on_server_state(name, *row)
                except Exception as exc:  # one server's row must not stop the looks
                    event("pacing_follow_failed", logging.WARNING, server=name,
                          host=self.host_id, error=str(exc) or type(exc).__name__)
        self._server_rows = rows

    async def _read_shared_sends(self) -> None:
        """Every host's send times of the servers that have a quota, for their pacers:
        what the journal holds, then this host's starts not yet in it."""
        now = time.time()
        for name, server in self.servers.items():
            server.pacer.starts_shared = bool(server.pacer.quotas())
            if not server.pacer.starts_shared:
                continue
            last = self._sends_read_to.get(name)
            fresh = await self.committer.read(self.journal.sends_since, name,
                                              now - DAY if last is None else last)
            sends = self._shared_sends.setdefault(name, collections.deque())
            sends.extend(fresh if last is None else [t for t in fresh if t > last])
            forget_before(sends, now - DAY)
            if sends:
                self._sends_read_to[name] = sends[-1]
            newest = sends[-1] if sends else now - DAY
            server.pacer.starts = collections.deque(
                [*sends, *(t for t in server.pacer.starts if t > newest)])

    # ------------------------------------------------------------ the account's groups

    def ask_turns(self, server: ServerRun, want: int) -> None:
        """Turns of the account's current group for this host, `want` at most (one ask
        at a time per server); the dispatch is kicked once they are there."""
        if self.fenced or server.name in self._asking_turns:
            return
        self._asking_turns.add(server.name)
        self.tasks.spawn(self._take_turns(server, max(1, min(want, self.share(server)))))

    async def _take_turns(self, server: ServerRun, want: int) -> None:
        config = server.config
        asked_at = time.time()  # a turn's life starts before the journal grants it
        try:
            granted, pause_left = await self.committer.run(
                self.journal.take_group_turns, server.name, want, config.group_size,
                config.group_interval + TURN_TTL)
        except Exception as exc:  # the database is away: asked again at the next kick
            event("group_turns_failed", logging.DEBUG, server=server.name, error=str(exc))
            return
        finally:
            self._asking_turns.discard(server.name)
        decision = server.pacer.grant_turns(granted, pause_left, asked_at, time.time())
        if decision is not None:
            self.dispatch.group_pause(server, decision)
        self.dispatch.kick()

    # ------------------------------------------------------------ session slots

    def share(self, server: ServerRun) -> int:
        """How many of the account's sessions this host may hold."""
        return max(1, math.ceil(server.pacer.effective_connections() / server.pacer.hosts))

    def may_use(self, server: ServerRun, slot: WorkerSlot) -> bool:
        """May this worker be handed a job now: it holds one of the account's slots.
        If not, one is asked for and the dispatch is kicked once it is there."""
        if not self.clustered:
            return True
        if self.fenced or slot in self._holding:
            return False
        if slot in self.held:
            return self._within_share(server, slot)
        if slot not in self._asking and self._count(server.name) < self.share(server):
            self._asking.add(slot)
            self.tasks.spawn(self._acquire(server, slot))
        return False

    def _within_share(self, server: ServerRun, slot: WorkerSlot) -> bool:
        """The first `share` of this host's held slots of the account may carry jobs (by
        slot number); the others are being given back."""
        mine = sorted(s.slot for s, held in self.held.items() if held.server == server.name)
        return slot.slot in mine[:self.share(server)]

    def _count(self, server: str) -> int:
        return sum(1 for held in self.held.values() if held.server == server) + sum(
            1 for slot in self._asking if slot.server_name == server)

    async def _acquire(self, server: ServerRun, slot: WorkerSlot) -> None:
        try:
            while not self.fenced and not slot.retired and slot.accepting:
                limit = server.pacer.effective_connections()
                try:
                    number = await self.committer.run(self.journal.acquire_session_slot,
                                                      server.name, limit)
                except Exception as exc:
                    event("session_slot_failed", logging.DEBUG, server=server.name, error=str(exc))
                    number = None
                if number is not None:
                    self.held[slot] = HeldSlot(server.name, number)
                    self.dispatch.kick()
                    return
                await asyncio.sleep(SLOT_RETRY)
        finally:
            self._asking.discard(slot)

    def tick(self) -> None:
        """Once a second: slots of workers without jobs or session go back; sessions
        beyond this host's share, or idle with nothing to send, are held."""
        if not self.clustered:
            return
        for slot, held in list(self.held.items()):
            server = self.servers.get(held.server)
            if not slot.jobs and not slot.connected and slot.state != "connecting":
                del self.held[slot]
                self._holding.discard(slot)
                # through the outbox: a release lost to a database outage is replayed, or
                # the slot would stay taken for good
                self.outbox.write(self.journal.release_session_slot, held.server, held.number)
            elif (server is not None and slot not in self._holding and slot.connected
                  and (not self._within_share(server, slot)
                       or (not slot.jobs and not self._has_work(held.server)))):
                self._holding.add(slot)
                slot.send(Hold())

    def _has_work(self, server: str) -> bool:
        return any(run.buffer for run in self.dispatch.campaigns.values()
                   if run.state == "running" and run.uses(server))

    # ------------------------------------------------------------ views

    async def hosts(self) -> list[HostInfo]:
        if not self.clustered:
            return []
        return await self.committer.read(self.journal.hosts)


def log_takeover(host: str, takeover: TakeOver) -> None:
    event("host_taken_over", logging.WARNING, host=takeover.host, by=host,
          requeued=takeover.requeued, uncertain=len(takeover.uncertain))
    for lost in takeover.uncertain:
        log_uncertain(lost, host=takeover.host)
