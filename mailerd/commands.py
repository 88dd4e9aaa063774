"""What each control request does. The socket handling lives in control.py."""

from __future__ import annotations

import logging
import os
import secrets
import time
from typing import NamedTuple

from . import __version__
from .committer import Committer
from .config import Config, ConfigError
from .enqueue import SpecError, check_spec, store_chunk
from .journal import Journal
from .log import event
from .protocol import (
    CampaignPlan,
    Plan,
    SetPacing,
    CampaignList,
    CampaignReport,
    DaemonStatus,
    Enqueued,
    EnqueueBegin,
    EnqueueCommit,
    EnqueueRows,
    Error,
    Ok,
    Pause,
    Reply,
    Report,
    Resume,
    Cancel,
)
from .supervisor import Supervisor

class Peer(NamedTuple):
    pid: int
    uid: int
    gid: int


class ClientSession:
    """Per-connection state: the campaign being loaded, if any."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.loading: int | None = None
        self.columns: list[str] = []


class Commands:
    def __init__(self, config: Config, journal: Journal, committer: Committer,
                 supervisor: Supervisor) -> None:
        self.config = config
        self.journal = journal
        self.committer = committer
        self.supervisor = supervisor
        self.started = time.time()

    # ------------------------------------------------------------ enqueue

    async def enqueue_begin(self, session: ClientSession, request: EnqueueBegin) -> Reply:
        if session.loading is not None:
            return Error(message="this connection is already loading a campaign")
        try:
            check_spec(request.spec, self.config)
        except SpecError as exc:
            return Error(message=f"campaign refused: {exc}")
        uid = secrets.token_hex(8)
        campaign = await self.committer.run(self.journal.begin_campaign, uid, request.spec)
        session.loading, session.columns = campaign, request.spec.columns
        self._log_change(session, "enqueue_started", campaign, name=request.spec.name)
        return Enqueued(campaign=campaign)

    async def enqueue_rows(self, session: ClientSession, request: EnqueueRows) -> Reply:
        if session.loading != request.campaign:
            return Error(message=f"campaign {request.campaign} is not being loaded on this connection")
        return await self.committer.run(
            store_chunk, self.journal, request.campaign, session.columns, request.rows
        )

    async def enqueue_commit(self, session: ClientSession, request: EnqueueCommit) -> Reply:
        if session.loading != request.campaign:
            return Error(message=f"campaign {request.campaign} is not being loaded on this connection")
        total = await self.committer.run(self.journal.commit_campaign, request.campaign)
        session.loading = None
        row = await self.committer.run(self.journal.campaign, request.campaign)
        assert row is not None
        self.supervisor.add_campaign(row.id, row.uid, row.spec)
        self._log_change(session, "campaign_enqueued", row.id, name=row.name, total=total)
        return await self._report(row.id)

    async def abandon(self, session: ClientSession) -> None:
        """The client went away mid-enqueue: nothing of that campaign is kept."""
        if session.loading is not None:
            campaign, session.loading = session.loading, None
            await self.committer.run(self.journal.discard_campaign, campaign)
            self._log_change(session, "enqueue_abandoned", campaign)

    # ------------------------------------------------------------ control

    async def pause(self, session: ClientSession, request: Pause) -> Reply:
        row = await self._campaign(request.campaign)
        if isinstance(row, Error):
            return row
        if row.state != "running":
            return Error(message=f"campaign {row.id} is {row.state}, not running")
        await self.committer.run(self.journal.set_campaign_state, row.id, "paused")
        self.supervisor.halt_campaign(row.id, "paused")
        self._log_change(session, "campaign_paused", row.id)
        return await self._report(row.id)

    async def resume(self, session: ClientSession, request: Resume) -> Reply:
        row = await self._campaign(request.campaign)
        if isinstance(row, Error):
            return row
        if row.state == "cancelled":
            return Error(message=f"campaign {row.id} was cancelled; it cannot be resumed")

        def resume_in_journal() -> int:
            changed = self.journal.resume(row.id, request.include_uncertain, request.retry_failed)
            self.journal.set_campaign_state(row.id, "running")
            self.journal.audit(row.id, "resume", _who(session.peer, request))
            return changed

        changed = await self.committer.run(resume_in_journal)
        self.supervisor.resume_campaign(row.id, row.uid, row.spec)
        self._log_change(session, "campaign_resumed", row.id, made_eligible=changed,
                         include_uncertain=request.include_uncertain,
                         retry_failed=request.retry_failed)
        return await self._report(row.id)

    async def cancel(self, session: ClientSession, request: Cancel) -> Reply:
        row = await self._campaign(request.campaign)
        if isinstance(row, Error):
            return row
        if row.state == "cancelled":
            return Ok(message=f"campaign {row.id} was already cancelled")
        await self.committer.run(self.journal.set_campaign_state, row.id, "cancelled")
        self.supervisor.halt_campaign(row.id, "cancelled")
        self._log_change(session, "campaign_cancelled", row.id)
        return await self._report(row.id)

    # ------------------------------------------------------------ reading

    async def report(self, request: Report) -> Reply:
        campaign = request.campaign
        if campaign is None:
            rows = await self.committer.run(self.journal.campaigns)
            if not rows:
                return Error(message="there are no campaigns yet")
            campaign = rows[-1].id
        row = await self._campaign(campaign)
        if isinstance(row, Error):
            return row
        if request.state is not None and request.state not in _REPORTABLE:
            return Error(message=f"unknown state {request.state!r}; use one of {', '.join(_REPORTABLE)}")
        return await self._report(
            campaign, request.state, request.limit, with_recipients=request.state is not None
        )

    async def list_campaigns(self) -> Reply:
        rows = await self.committer.run(self.journal.campaigns)
        return CampaignList(campaigns=[await self._report(row.id) for row in rows])

    async def status(self) -> Reply:
        rows = await self.committer.run(self.journal.campaigns, ("running", "paused"))
        return DaemonStatus(
            version=__version__, pid=os.getpid(), uptime=time.time() - self.started,
            state_dir=str(self.config.state_dir.resolve()),
            campaigns=[await self._report(row.id) for row in rows],
            servers=self.supervisor.server_info(),
        )

    async def set_pacing(self, session: ClientSession, request: SetPacing) -> Reply:
        if not request.settings:
            return Error(message="nothing to set: give KEY=VALUE pairs")
        try:
            server = await self.supervisor.set_pacing(
                request.server, dict(request.settings), f"uid={session.peer.uid} pid={session.peer.pid}")
        except ConfigError as exc:
            return Error(message=f"servers.{request.server}: {exc}")
        event("server_settings_changed", server=request.server, peer_uid=session.peer.uid,
              peer_pid=session.peer.pid)
        return Ok(message=f"servers.{server.name}: " + ", ".join(
            f"{k}={v}" for k, v in request.settings.items()))

    async def plan(self, request: Plan) -> Reply:
        row = await self._campaign(request.campaign)
        if isinstance(row, Error):
            return row
        counts = await self.committer.run(self.journal.counts, row.id)
        left = counts.queued + counts.sending + counts.deferred
        if row.state in ("cancelled",):
            left = 0
        seconds, servers = self.supervisor.plan(row.spec, left)
        finish = time.time() + seconds if seconds is not None else None
        return CampaignPlan(id=row.id, left=left, seconds=seconds, finish=finish, servers=servers)

    async def _report(self, campaign: int, state: str | None = None, limit: int | None = None,
                      with_recipients: bool = False) -> CampaignReport:
        report = await self.committer.run(
            self.journal.report, campaign, state, limit, with_recipients
        )
        assert report is not None
        report.rate = self.supervisor.rate(campaign)
        left = report.counts.queued + report.counts.sending + report.counts.deferred
        if report.state == "running" and report.rate > 0:
            report.eta = left / report.rate
        return report

    async def _campaign(self, campaign: int):
        row = await self.committer.run(self.journal.campaign, campaign)
        if row is None or row.state == "loading":
            return Error(message=f"no campaign with id {campaign}")
        return row

    def _log_change(self, session: ClientSession, what: str, campaign: int, **fields) -> None:
        event(what, logging.INFO, campaign=campaign, peer_uid=session.peer.uid,
              peer_pid=session.peer.pid, **fields)


_REPORTABLE = ("queued", "sending", "sent", "deferred", "failed", "uncertain", "invalid")


def _who(peer: Peer, request: Resume) -> str:
    return (f"uid={peer.uid} pid={peer.pid} include_uncertain={request.include_uncertain} "
            f"retry_failed={request.retry_failed}")

