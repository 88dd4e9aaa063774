"""What each control request does: one handler per request type, each called as
(session, request) -> Reply. The socket handling lives in server.py."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from typing import Any, Awaitable, Callable, TypeVar

from mailerd import __version__, wire
from mailerd.bounces.intake import BounceIntake
from mailerd.config import ConfigError
from mailerd.control import testsend
from mailerd.control.access import Peer
from mailerd.control.bounded import TEMPLATE_TIME_LIMIT, TemplateTimeout, run_bounded
from mailerd.control.enqueue import check_spec, store_chunk
from mailerd.control.suppression import SuppressionList
from mailerd.journal.committer import Committer
from mailerd.journal.backend import JournalStore
from mailerd.message.check import SpecError
from mailerd.message.rowcheck import unsafe_rows
from mailerd.message.render import message_id_for
from mailerd.schema.config import Config
from mailerd.schema.records import CampaignRow
from mailerd.schema.control import (
    BOUNCE_STATES,
    COUNTED_STATES,
    BounceList,
    Bounces,
    CampaignList,
    CampaignPlan,
    CampaignReport,
    CampaignSpec,
    Cancel,
    DaemonStatus,
    EnqueueAttachment,
    Enqueued,
    EnqueueBegin,
    EnqueueCommit,
    EnqueueRows,
    Error,
    Explain,
    ExportRecipients,
    ListCampaigns,
    Ok,
    Pause,
    Plan,
    RecipientInfo,
    RecipientPage,
    Reply,
    Report,
    Request,
    Resume,
    SetPacing,
    Settle,
    Status,
    SuppressAdd,
    SuppressList,
    SuppressRemove,
    TestSend,
)
from mailerd.pacing.explain import explain_reply
from mailerd.supervisor.supervisor import Supervisor
from mailerd.system.log import event

T = TypeVar("T")

MAX_PAGE = 20_000  # recipients in one Report or ExportRecipients reply, at most
PAGE_BYTES = wire.MAX_FRAME // 2  # and about this many bytes of them
ROW_OVERHEAD = 256  # a RecipientInfo's bytes besides its email and reply (keys, Message-ID...)

# Every request is answered by one of these: (the connection's session, the request).
Handler = Callable[["ClientSession", Any], Awaitable[Reply]]


class ClientSession:
    """Per-connection state: the campaign being loaded, if any."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.admin = False  # the connection's role (access.AccessPolicy), set once it is served
        self.loading: int | None = None
        self.spec: CampaignSpec | None = None  # of the campaign being loaded (set with loading)
        self.attachment_chunks: dict[int, tuple[int, int, bool]] = {}  # index -> (chunks, bytes, last)


class Commands:
    def __init__(self, journal: JournalStore, committer: Committer, supervisor: Supervisor) -> None:
        self.journal = journal
        self.committer = committer
        self.supervisor = supervisor
        self.suppressions = SuppressionList(journal, committer, supervisor.drop_suppressed)
        self.started = time.time()
        # [bounces]: the mailbox pollers; their messages suppress through skip_suppressed
        self.bounces = BounceIntake(journal, committer, supervisor.identity.unsubscribe_key,
                                    supervisor.config.bounces, self.skip_suppressed)

    async def skip_suppressed(self, keys: set[str], reason: str) -> int:
        """Newly suppressed addresses (a bounce, a complaint) leave the dispatch buffers."""
        return await self.suppressions.skip_buffered(keys, reason)

    def handlers(self) -> dict[type[Request], Handler]:
        """The handler of each request type (the socket adds its own, DebugFreeze)."""
        return {
            EnqueueBegin: self.enqueue_begin,
            EnqueueRows: self.enqueue_rows,
            EnqueueAttachment: self.enqueue_attachment,
            EnqueueCommit: self.enqueue_commit,
            Pause: self.pause,
            Resume: self.resume,
            Cancel: self.cancel,
            Settle: self.settle,
            Report: self.report,
            ExportRecipients: self.export_recipients,
            ListCampaigns: self.list_campaigns,
            Status: self.status,
            Plan: self.plan,
            SetPacing: self.set_pacing,
            SuppressAdd: self.suppress_add,
            SuppressRemove: self.suppress_remove,
            SuppressList: self.suppress_list,
            TestSend: self.test_send,
            Explain: self.explain,
            Bounces: self.bounce_list,
        }

    @property
    def config(self) -> Config:
        """The supervisor's: the file's, as last (re)loaded."""
        return self.supervisor.config

    # ------------------------------------------------------------ enqueue

    async def enqueue_begin(self, session: ClientSession, request: EnqueueBegin) -> Reply:
        if session.loading is not None:
            return Error(message="this connection is already loading a campaign")
        try:
            await run_bounded(check_spec, request.spec, self.config)
        except SpecError as exc:
            return Error(message=f"campaign refused: {exc}")
        except TemplateTimeout:
            return Error(message=f"campaign refused: checking its templates took more than "
                                 f"{TEMPLATE_TIME_LIMIT:g} s")
        uid = secrets.token_hex(8)
        campaign = await self.committer.run(self.journal.begin_campaign, uid, request.spec,
                                            session.peer.uid)
        session.loading, session.spec, session.attachment_chunks = campaign, request.spec, {}
        self._log_change(session, "enqueue_started", campaign, name=request.spec.name)
        return Enqueued(campaign=campaign)

    async def enqueue_rows(self, session: ClientSession, request: EnqueueRows) -> Reply:
        if session.loading != request.campaign:
            return Error(message=f"campaign {request.campaign} is not being loaded on this connection")
        # rendering each row's headers is CPU work: neither on the loop nor the journal thread
        unsafe = await asyncio.to_thread(unsafe_rows, session.spec, request.rows)
        reply = await self.committer.run(
            store_chunk, self.journal, request.campaign, session.spec.columns, request.rows,
            unsafe, request.skip_unsafe)
        if isinstance(reply, Error):  # refused: the campaign is not kept
            await self.abandon(session)
        return reply

    async def enqueue_commit(self, session: ClientSession, request: EnqueueCommit) -> Reply:
        if session.loading != request.campaign:
            return Error(message=f"campaign {request.campaign} is not being loaded on this connection")
        for index, info in enumerate(session.spec.attachments):
            _, size, last = session.attachment_chunks.get(index, (0, 0, False))
            if not last or size != info.size:
                return Error(message=f"attachments[{index}] ({info.name!r}): {size} of "
                                     f"{info.size} bytes arrived; the campaign was not committed")
        total = await self.committer.run(self.journal.commit_campaign, request.campaign)
        session.loading = None
        row = await self.committer.read(self.journal.campaign, request.campaign)
        assert row is not None
        self.supervisor.add_campaign(row.id, row.uid, row.spec)
        self._log_change(session, "campaign_enqueued", row.id, name=row.name, total=total)
        return await self._report(row.id)

    async def enqueue_attachment(self, session: ClientSession, request: EnqueueAttachment) -> Reply:
        """Attachment bytes, in order, stored once per campaign (journal table attachments)."""
        if session.loading != request.campaign:
            return Error(message=f"campaign {request.campaign} is not being loaded on this connection")
        infos = session.spec.attachments
        if not 0 <= request.index < len(infos):
            return Error(message=f"attachments[{request.index}]: the campaign has {len(infos)}")
        chunks, size, last = session.attachment_chunks.get(request.index, (0, 0, False))
        size += len(request.chunk)
        if last or size > infos[request.index].size:
            return Error(message=f"attachments[{request.index}]: more bytes than announced")
        await self.committer.run(self.journal.add_attachment_chunk, request.campaign,
                                 request.index, chunks, request.chunk)
        session.attachment_chunks[request.index] = (chunks + 1, size, request.last)
        return Ok()

    async def suppress_add(self, session: ClientSession, request: SuppressAdd) -> Reply:
        reply = await self.suppressions.add(request)
        event("suppression_added", **session.peer.log_fields, reason=request.reason,
              addresses=len(request.emails), added=getattr(reply, "added", None))
        return reply

    async def suppress_remove(self, session: ClientSession, request: SuppressRemove) -> Reply:
        reply = await self.suppressions.remove(request)
        event("suppression_removed", **session.peer.log_fields,
              addresses=len(request.emails), removed=getattr(reply, "removed", None))
        return reply

    async def suppress_list(self, session: ClientSession, request: SuppressList) -> Reply:
        return await self.suppressions.listing(request)

    async def test_send(self, session: ClientSession, request: TestSend) -> Reply:
        reply = await testsend.test_send(request, self.config, self.supervisor.identity,
                                         self.supervisor.passwords.get)
        event("test_send", **session.peer.log_fields,
              smtp_code=getattr(reply, "code", None), error=getattr(reply, "message", None))
        return reply

    async def explain(self, session: ClientSession, request: Explain) -> Reply:
        """How the configured patterns read a relay's reply (nothing changes)."""
        return explain_reply(request, self.config.patterns)

    async def export_recipients(self, session: ClientSession, request: ExportRecipients) -> Reply:
        limit = _page_limit(request.limit)
        found = await self._read_about(request.campaign, request.state, lambda row: (
            self.journal.recipients(row.id, request.state, limit, request.after_line)))
        if isinstance(found, Error):
            return found
        row, recipients = found
        page = _within_frame(recipients)
        _set_message_ids(row, page)
        next_line = page[-1].line if len(page) < len(recipients) or len(page) == limit else None
        return RecipientPage(campaign=row.id, recipients=page, next_line=next_line)

    async def abandon(self, session: ClientSession) -> None:
        """The client went away mid-enqueue: nothing of that campaign is kept."""
        if session.loading is not None:
            campaign, session.loading = session.loading, None
            await self.committer.run(self.journal.discard_campaign, campaign)
            self._log_change(session, "enqueue_abandoned", campaign)

    # ------------------------------------------------------------ control

    async def pause(self, session: ClientSession, request: Pause) -> Reply:
        return await self._halt(session, request.campaign, _pausable, "paused", "campaign_paused")

    async def cancel(self, session: ClientSession, request: Cancel) -> Reply:
        return await self._halt(session, request.campaign, _cancellable, "cancelled",
                                "campaign_cancelled")

    async def resume(self, session: ClientSession, request: Resume) -> Reply:
        row = await self._changeable(session, request.campaign, _resumable)
        if not isinstance(row, CampaignRow):
            return row

        def resume_in_journal() -> int:
            changed = self.journal.resume(row.id, request.include_uncertain, request.retry_failed)
            self.journal.set_campaign_state(row.id, "running")
            self.journal.audit(row.id, "resume", (
                f"{session.peer.who} include_uncertain={request.include_uncertain} "
                f"retry_failed={request.retry_failed}"))
            return changed

        changed = await self.committer.run(resume_in_journal)
        self.supervisor.resume_campaign(row.id, row.uid, row.spec)
        self._log_change(session, "campaign_resumed", row.id, made_eligible=changed,
                         include_uncertain=request.include_uncertain,
                         retry_failed=request.retry_failed)
        return await self._report(row.id)

    async def _halt(self, session: ClientSession, campaign: int,
                    refusal: Callable[[CampaignRow], Reply | None], state: str, what: str) -> Reply:
        """Pause or cancel: the campaign stops being dispatched and is left in `state`."""
        row = await self._changeable(session, campaign, refusal)
        if not isinstance(row, CampaignRow):
            return row
        await self.committer.run(self.journal.set_campaign_state, row.id, state)
        self.supervisor.halt_campaign(row.id, state)
        self._log_change(session, what, row.id)
        return await self._report(row.id)

    async def _changeable(self, session: ClientSession, campaign: int,
                          refusal: Callable[[CampaignRow], Reply | None]) -> CampaignRow | Reply:
        """The campaign's row if it exists, the peer may change it and its state allows the
        change (`refusal` finds nothing to say), else the reply to send instead."""
        row = await self._campaign(campaign)
        if isinstance(row, Error):
            return row
        return _not_owner(session, row) or refusal(row) or row

    # ------------------------------------------------------------ reading

    async def report(self, session: ClientSession, request: Report) -> Reply:
        """Counts, and with a state the first recipients in it: at most a page that fits
        a frame (mailerctl pages the rest with ExportRecipients)."""
        limit = _page_limit(request.limit)
        found = await self._read_about(request.campaign, request.state, lambda row: (
            self.journal.report(row, request.state, limit,
                                with_recipients=request.state is not None)))
        if isinstance(found, Error):
            return found
        row, report = found
        if report.recipients:
            report.recipients = _within_frame(report.recipients)
            _set_message_ids(row, report.recipients)
        return self._with_rate(report)

    async def _read_about(self, campaign: int | None, state: str | None,
                          read: Callable[[CampaignRow], T]) -> tuple[CampaignRow, T] | Error:
        """In one journal read: the campaign a report is about, and read(its row)."""
        def in_journal() -> tuple[CampaignRow, T] | Error:
            row = self._reportable(campaign, state)
            return row if isinstance(row, Error) else (row, read(row))

        return await self.committer.read(in_journal)

    def _reportable(self, campaign: int | None, state: str | None) -> CampaignRow | Error:
        """On the journal thread: the campaign a report is about (when none is named, the
        latest one not being loaded), or an Error."""
        latest = None
        if campaign is None:
            rows = [row for row in self.journal.campaigns() if row.state != "loading"]
            if not rows:
                return Error(message="there are no campaigns yet")
            latest = rows[-1]
        if state is not None and state not in COUNTED_STATES + BOUNCE_STATES:
            return Error(message=f"unknown state {state!r}; use one of "
                                 f"{', '.join(COUNTED_STATES + BOUNCE_STATES)}")
        return latest if latest is not None else self._existing(campaign)

    async def list_campaigns(self, session: ClientSession, request: ListCampaigns) -> Reply:
        return CampaignList(campaigns=await self._reports())

    async def status(self, session: ClientSession, request: Status) -> Reply:
        return DaemonStatus(
            version=__version__, pid=os.getpid(), uptime=time.time() - self.started,
            state_dir=str(self.config.state_dir.resolve()),
            campaigns=await self._reports(("running", "paused")),
            servers=self.supervisor.server_info(),
            journal_error=self.supervisor.storage_error,
            mailboxes=self.bounces.info(),
            hosts=await self.supervisor.hosts(),
        )

    async def bounce_list(self, session: ClientSession, request: Bounces) -> Reply:
        limit = max(1, min(request.limit, MAX_PAGE))
        if request.campaign is not None:
            row = await self.committer.read(self.journal.campaign, request.campaign)
            if row is None:
                return Error(message=f"no campaign {request.campaign}")

        def in_journal() -> BounceList:
            return BounceList(bounces=self.journal.bounce_list(request.campaign, limit),
                              unmatched=self.journal.unmatched_bounces(limit)
                              if request.campaign is None else [])

        return await self.committer.read(in_journal)

    async def settle(self, session: ClientSession, request: Settle) -> Reply:
        row = await self._changeable(session, request.campaign, lambda row: None)
        if not isinstance(row, CampaignRow):
            return row
        who = session.peer.who

        def settle_in_journal() -> int:
            changed = self.journal.settle(row.id, request.as_sent, request.emails or None, who)
            if changed and not request.as_sent and row.state == "done":
                self.journal.set_campaign_state(row.id, "running")
            return changed

        changed = await self.committer.run(settle_in_journal)
        if changed and not request.as_sent and row.state in ("done", "running"):
            self.supervisor.resume_campaign(row.id, row.uid, row.spec)
        self._log_change(session, "uncertain_settled", row.id, settled=changed,
                         settled_as="sent" if request.as_sent else "resend")
        if request.emails and changed < len(request.emails):
            return Error(message=f"settled {changed} of {len(request.emails)}: the others are "
                                 "not uncertain in this campaign")
        return await self._report(row.id)

    async def set_pacing(self, session: ClientSession, request: SetPacing) -> Reply:
        if request.reset:
            return await self.reset_pacing(session, request)
        if not request.settings:
            return Error(message="nothing to set: give KEY=VALUE pairs")
        try:
            server = await self.supervisor.set_pacing(
                request.server, dict(request.settings), session.peer.who)
        except ConfigError as exc:
            return Error(message=f"servers.{request.server}: {exc}")
        event("server_settings_changed", server=request.server, **session.peer.log_fields)
        return Ok(message=f"servers.{server.name}: " + ", ".join(
            f"{k}={v}" for k, v in request.settings.items()))

    async def reset_pacing(self, session: ClientSession, request: SetPacing) -> Reply:
        """`mailerctl set SERVER --reset [KEY ...]`: back to the config file's values."""
        if request.settings:
            return Error(message="--reset takes setting names, not KEY=VALUE pairs")
        try:
            dropped = await self.supervisor.reset_pacing(request.server, list(request.keys),
                                                         session.peer.who)
        except ConfigError as exc:
            return Error(message=f"servers.{request.server}: {exc}")
        event("server_settings_reset", server=request.server, settings=" ".join(dropped) or None,
              **session.peer.log_fields)
        if not dropped:
            return Ok(message=f"servers.{request.server}: nothing was set at run time")
        return Ok(message=f"servers.{request.server}: {', '.join(dropped)} back to the "
                          f"config file's values")

    async def plan(self, session: ClientSession, request: Plan) -> Reply:
        row = await self._campaign(request.campaign)
        if isinstance(row, Error):
            return row
        counts = await self.committer.read(self.journal.counts, row.id)
        left = counts.left
        if row.state in ("cancelled",):
            left = 0
        seconds, servers = self.supervisor.plan(row.spec, left)
        finish = time.time() + seconds if seconds is not None else None
        return CampaignPlan(id=row.id, left=left, seconds=seconds, finish=finish, servers=servers)

    def _with_rate(self, report: CampaignReport) -> CampaignReport:
        report.rate = self.supervisor.rate(report.id)
        if report.state == "running" and report.rate > 0:
            report.eta = report.counts.left / report.rate
        return report

    async def _report(self, campaign: int) -> CampaignReport:
        """The report (no recipients) of a campaign that exists, as it is now."""
        def read() -> CampaignReport:
            row = self.journal.campaign(campaign)
            assert row is not None
            return self.journal.report(row)

        return self._with_rate(await self.committer.read(read))

    async def _reports(self, states: tuple[str, ...] | None = None) -> list[CampaignReport]:
        """The counts of every campaign (in one of `states`), in one journal read."""
        reports = await self.committer.read(
            lambda: [self.journal.report(row) for row in self.journal.campaigns(states)])
        return [self._with_rate(report) for report in reports]

    async def _campaign(self, campaign: int) -> CampaignRow | Error:
        return await self.committer.read(self._existing, campaign)

    def _existing(self, campaign: int) -> CampaignRow | Error:
        """On the journal thread: the campaign's row, or an Error if there is none."""
        row = self.journal.campaign(campaign)
        if row is None or row.state == "loading":
            return Error(message=f"no campaign with id {campaign}")
        return row

    def _log_change(self, session: ClientSession, what: str, campaign: int, **fields) -> None:
        event(what, logging.INFO, campaign=campaign, **session.peer.log_fields, **fields)


def _page_limit(asked: int | None) -> int:
    """How many recipients one reply may list: what was asked, within 1..MAX_PAGE."""
    return MAX_PAGE if asked is None else max(1, min(asked, MAX_PAGE))


def _within_frame(recipients: list[RecipientInfo]) -> list[RecipientInfo]:
    """The first of `recipients` whose reply fits well inside one frame (review L6): a
    relay's reply may be long, so rows are counted by their size, not only by number."""
    size = 0
    for count, recipient in enumerate(recipients):
        size += ROW_OVERHEAD + len(recipient.email.encode()) + len((recipient.reply or "").encode())
        if size > PAGE_BYTES and count:
            return recipients[:count]
    return recipients


def _not_owner(session: ClientSession, row: CampaignRow) -> Reply | None:
    """A member changes only the campaigns it enqueued; admins change any."""
    if session.admin or row.owner_uid == session.peer.uid:
        return None
    owner = "nobody recorded" if row.owner_uid is None else f"uid {row.owner_uid}"
    return Error(message=f"permission denied: campaign {row.id} belongs to {owner}; "
                         f"changing it needs the admin role")


def _pausable(row: CampaignRow) -> Reply | None:
    return None if row.state == "running" else Error(
        message=f"campaign {row.id} is {row.state}, not running")


def _resumable(row: CampaignRow) -> Reply | None:
    return None if row.state != "cancelled" else Error(
        message=f"campaign {row.id} was cancelled; it cannot be resumed")


def _cancellable(row: CampaignRow) -> Reply | None:
    return None if row.state != "cancelled" else Ok(
        message=f"campaign {row.id} was already cancelled")


def _set_message_ids(row: CampaignRow, recipients: list[RecipientInfo]) -> None:
    """Each recipient's Message-ID, as its messages carry it (render.message_id_for)."""
    for recipient in recipients:
        recipient.message_id = message_id_for(row.uid, recipient.line, row.spec.sender)
