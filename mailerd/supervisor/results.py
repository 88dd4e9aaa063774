"""What workers report, and what the journal and the pacers make of it (like qmgr's feedback).

Each frame from a worker lands in `handle`: a DotRequest is answered only once
`data-sent` is durable; a Done becomes an outcome (sent, deferred, failed), or a
requeue when the relay refused for its own limit; session states and ends feed the
server's pacer, whose decisions go back to the workers as Limits and Hold. A dead
worker's jobs are settled here too: data-sent -> uncertain, the rest -> queued.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

import msgspec

from mailerd.schema.config import Config
from mailerd.journal.committer import Committer, JournalWriteError
from mailerd.journal.outbox import Outbox
from mailerd.journal.backend import JournalStore
from mailerd.schema.records import Claimed, LostRecipient, Outcome
from mailerd.pacing.classify import Cause, Verdict
from mailerd.pacing.pacer import Decision
from mailerd.schema.workers import (
    AnyFromWorker,
    Done,
    DotAck,
    DotRequest,
    Hold,
    Limits,
    Released,
    SessionEnded,
    SessionState,
)
from mailerd.supervisor.campaignrun import CampaignRun
from mailerd.supervisor.dispatch import Dispatch, log_decision
from mailerd.supervisor.servers import ServerRun, WorkerSlot
from mailerd.supervisor.tasks import Tasks
from mailerd.system.log import event


def log_uncertain(recipient: LostRecipient, **fields: object) -> None:
    """The entry of one recipient whose delivery is uncertain, like that of any other
    outcome, so that `journalctl MAILERD_CAMPAIGN=N` shows it too: written when a worker
    dies after its final "." (settle_slot) and when a restart finds one (daemon.py)."""
    event("uncertain", logging.WARNING, campaign=recipient.campaign,
          recipient=recipient.email, server=recipient.server, reason=recipient.reply, **fields)


def limits(server: ServerRun) -> Limits:
    return Limits(server.pacer.messages_per_connection(), server.config.idle_timeout)


class Results:
    def __init__(self, servers: dict[str, ServerRun], dispatch: Dispatch, journal: JournalStore,
                 committer: Committer, outbox: Outbox, tasks: Tasks,
                 config: Callable[[], Config], sent_before: int = 0) -> None:
        self.servers = servers
        self.dispatch = dispatch
        self.campaigns = dispatch.campaigns
        self.journal = journal
        self.committer = committer
        self.outbox = outbox
        self.tasks = tasks
        self.config = config  # the current one: replaced by a reload
        self.sent_total = sent_before  # recipients recorded sent, journal's count at start
        # what one turn of the event loop asked of the journal, written as one op each
        self._dot_requests: list[tuple[WorkerSlot, DotRequest]] = []
        self._outcomes: list[Outcome] = []
        self._after_outcomes: list[Callable[[], None]] = []
        self._flush_soon = False

    def handle(self, slot: WorkerSlot, message: AnyFromWorker) -> None:
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

    # ------------------------------------------------------------ the final "."

    def _confirm_data_sent(self, slot: WorkerSlot, message: DotRequest) -> None:
        slot.acks_owed.add((message.campaign, message.line))  # the worker waits: its liveness clock stops
        self._dot_requests.append((slot, message))
        self._flush_at_end_of_turn()

    def _flush_at_end_of_turn(self) -> None:
        if not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """The DotRequests and outcomes of this turn, each kind as one journal op."""
        self._flush_soon = False
        requests, self._dot_requests = self._dot_requests, []
        if requests:
            self._mark_data_sent(requests, retry_singly=len(requests) > 1)
        outcomes, self._outcomes = self._outcomes, []
        after, self._after_outcomes = self._after_outcomes, []
        if outcomes:
            written = self.outbox.write(self.journal.record_outcomes, outcomes)
            for callback in after:
                written.add_done_callback(lambda _, callback=callback: callback())

    def _mark_data_sent(self, requests: list[tuple[WorkerSlot, DotRequest]],
                        retry_singly: bool) -> None:
        """Each DotAck goes out once `data-sent` is durable. A recipient that may not be
        sent fails the whole op: then each is tried again alone, so only it is refused."""
        items = [(m.campaign, m.line, slot.server_name) for slot, m in requests]
        future = self.committer.run(self.journal.mark_data_sent, items)

        def acknowledge(done: asyncio.Future[None]) -> None:
            error = done.exception() if not done.cancelled() else asyncio.CancelledError()
            if error is not None and retry_singly and not isinstance(error, JournalWriteError):
                for request in requests:
                    self._mark_data_sent([request], retry_singly=False)
                return
            if error is not None:
                for _, message in requests:
                    event("journal_error", logging.ERROR, campaign=message.campaign,
                          error=str(error))
            now = time.monotonic()
            for slot, message in requests:
                slot.acks_owed.discard((message.campaign, message.line))
                slot.silent_since = now
                slot.send(DotAck(message.campaign, message.line, error is None))

        future.add_done_callback(acknowledge)

    # ------------------------------------------------------------ outcomes

    def _finish(self, slot: WorkerSlot, done: Done) -> None:
        server = self.servers[slot.server_name]
        claimed = slot.jobs.pop((done.campaign, done.line), None)
        run = self.campaigns.get(done.campaign)
        verdict = None
        if done.result != "sent" and done.code is not None:
            verdict = self._reply_to_pacer(server, done.stage, done.code, done.reply)
        slot.refusal = verdict.cause if verdict else None
        if done.result == "requeue" or (verdict is not None and done.result != "uncertain"
                                        and verdict.spares_recipient):
            # the relay's limit or the session's trouble, not the recipient's fault: no attempt
            self._requeue(run, claimed, done)
        else:
            self._record(slot, run, claimed, done)
        self.dispatch.kick()

    def _record(self, slot: WorkerSlot, run: CampaignRun | None, claimed: Claimed | None,
                done: Done) -> None:
        outcome = self._outcome(claimed, done)
        self._outcomes.append(outcome)  # written with the others of this turn
        self._flush_at_end_of_turn()
        now = time.time()
        if run is not None:
            run.held.discard(done.line)
            if outcome.state == "sent":
                run.note_sent(now)
            if run.exhausted and not run.buffer and not run.held:
                # perhaps the last one: check once it is on disk, not at the next tick
                self._after_outcomes.append(
                    lambda: self.tasks.spawn(self.dispatch.finish_if_done(run)))
        if outcome.state == "sent":
            slot.sent += 1
            self.servers[slot.server_name].note_delivered(now)
            self.sent_total += 1
        event(outcome.state, campaign=done.campaign,
              recipient=claimed.email if claimed else None, server=slot.server_name,
              smtp_code=done.code, smtp_reply=done.reply)

    def _outcome(self, claimed: Claimed | None, done: Done) -> Outcome:
        attempts = (claimed.attempts if claimed else 0) + 1
        delivery = self.config().delivery
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
        self.outbox.write(self.journal.requeue, [(done.campaign, done.line)], reply)
        if run is not None and claimed is not None:
            run.put_back(claimed)

    def _released(self, slot: WorkerSlot, jobs: list[tuple[int, int]]) -> None:
        for campaign, line in jobs:
            claimed = slot.jobs.pop((campaign, line), None)
            run = self.campaigns.get(campaign)
            if run is not None and claimed is not None:
                run.put_back(claimed)
        self.outbox.write(self.journal.requeue, list(jobs))
        self.dispatch.kick()

    async def settle_slot(self, slot: WorkerSlot) -> None:
        """What a dead worker held: data-sent -> uncertain, the rest back to the queue."""
        self._flush()  # its last DotRequest, if any, reaches the journal first, as it came
        held, slot.jobs = slot.jobs, {}
        slot.lost()
        if not held:
            return
        try:
            lost, requeued = await self.outbox.write(self.journal.settle_lost_worker, list(held))
        except JournalWriteError:
            lost, requeued = [], 0  # kept by the outbox and replayed before anything is sent again
        for campaign, line in held:
            run = self.campaigns.get(campaign)
            if run is not None:
                run.held.discard(line)
                run.rescan()
        for recipient in lost:
            log_uncertain(recipient)
        if lost or requeued:
            event("worker_jobs_settled", server=slot.server_name, slot=slot.slot,
                  uncertain=len(lost), requeued=requeued)
        self.dispatch.kick()

    # ------------------------------------------------------------ sessions and pacing

    def _session_state(self, slot: WorkerSlot, message: SessionState) -> None:
        was_accepting = slot.accepting
        slot.state, slot.detail = message.state, message.detail
        slot.connected = message.connected
        if message.state == "backoff":
            event("session_backoff", logging.WARNING, server=slot.server_name, slot=slot.slot,
                  reason=message.detail, until=round(message.until or 0, 1))
        if slot.accepting and not was_accepting:
            self.dispatch.kick()

    def _session_ended(self, slot: WorkerSlot, ended: SessionEnded) -> None:
        server = self.servers[slot.server_name]
        server.sessions_ended += 1
        refusal, slot.refusal = slot.refusal, None
        slot.connected = False
        if ended.stage == "connect":
            server.refused += 1
            slot.state = "refused"  # until the worker reports its back-off: not chosen as active
            if ended.code:
                self._reply_to_pacer(server, "connect", ended.code, ended.reply)
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
        decision = server.pacer.on_session_end(ended.messages, ended.dropped, ended.reply,
                                               time.time(), others)
        if decision is not None:
            self._decided(server, decision)

    def _reply_to_pacer(self, server: ServerRun, stage: str, code: int, reply: str) -> Verdict:
        """A relay's refusal goes to the pacer once, with its stage; the pacer's reading of
        it comes back (and any change of pace is applied). The one place a reply meets it."""
        reaction = server.pacer.on_reply(stage, code, reply, time.time())
        if reaction.decision is not None:
            self._decided(server, reaction.decision)
        return reaction.verdict

    def _decided(self, server: ServerRun, decision: Decision) -> None:
        log_decision(server, decision)
        self.apply_pacing(server)

    def apply_pacing(self, server: ServerRun) -> None:
        """Tell the workers what the pacer now says; save what it learned."""
        before = server.active
        after = server.choose_active()
        now = time.time()
        parked = server.pacer.next_start(now) - now > server.config.idle_timeout
        new_limits = limits(server)
        for slot in server.slots:
            slot.send(new_limits)
            if slot.slot in before - after or (parked and slot.jobs):
                slot.send(Hold())
        if server.pacer.changed:
            server.pacer.changed = False
            learned = msgspec.msgpack.encode(server.pacer.learned)
            self.outbox.write(self.journal.save_learned, server.name, learned)
        self.dispatch.kick()
