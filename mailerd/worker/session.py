"""A worker process: one SMTP session, many messages.

Forked by the supervisor from the fork server (supervisor/spawner.py, which preloads
worker/template.py), with its end of a socketpair to the supervisor; started by hand,
it is `python -m mailerd.worker.session FD`. It renders each message itself and drives
the SMTP transaction stage by stage (MAIL, RCPT, DATA, body, then the final "."),
because only then does it know whether a broken connection happened before the "."
(the relay discarded the message: requeue) or after it (the relay may have it:
uncertain). The final "." is written only after the supervisor confirms the journal
holds `data-sent`.

The session is closed by us when it has carried `messages_per_connection`
messages (or the relay's LIMITS MAILMAX), when it has been idle for
`idle_timeout`, or when the supervisor says Hold; every end of a session is
reported so the supervisor can learn from the drops.

Signals and exits, the whole contract between a worker and its supervisor:

- The daemon dies: the kernel SIGKILLs the worker (PR_SET_PDEATHSIG, set first thing).
- The supervisor link reaches EOF or carries a frame that does not decode: exit 3 at
  once, whatever the worker was doing (a "." the journal cannot confirm is never sent).
- The first frame is not a Setup (or never comes): exit 3.
- SIGINT and SIGTERM are ignored: a Ctrl-C on the daemon's terminal or systemd's
  SIGTERM to the whole group must not cut a transaction; the supervisor decides.
- Stop: finish the transaction in flight, give the other jobs back (Released), QUIT,
  report the session's end, exit 0. The supervisor SIGKILLs a worker still running
  `shutdown_timeout` after the Stop; what it held is settled (data-sent -> uncertain).
- Exit 0 is a stop on purpose and is respawned at once; any other end is respawned
  with a growing delay. A worker that exits before it reports a connected session or
  a result counts toward the restart limit; one that holds a job and sends no frame
  for 9 x `timeout` + 10 s is SIGKILLed (the liveness rule). Both rules are written
  out in supervisor/processes.py.
"""
from __future__ import annotations

import asyncio
import collections
import ctypes
import os
import re
import signal
import socket
import sys
import time
from email.utils import parseaddr
from typing import Callable, NamedTuple, cast

import aiosmtplib
import msgspec

try:  # imported here, not after the fork, so the template's pages hold it (worker/template.py)
    import uvloop
except ImportError:
    uvloop = None  # type: ignore[assignment]

from mailerd import wire
from mailerd.message.render import Attachment, Renderer, RenderError, TemplateError, format_date, needs_smtputf8
from mailerd.message.signing import DkimKeyError, Signer, campaign_signer
from mailerd.schema.workers import (
    AnyToWorker,
    CampaignAttachment,
    CampaignTemplate,
    Done,
    DotAck,
    DotRequest,
    FromWorker,
    Hold,
    Job,
    Limits,
    Released,
    Result,
    Revoke,
    SessionEnded,
    SessionState,
    Setup,
    Stop,
)
from mailerd.worker.connect import greet, smtp_client
from mailerd.worker.pipeline import Command, Exchange, Pipeline, SessionBroken
from mailerd.worker.smtp import (
    code_of,
    describe,
    dot_stuff,
    relay_mailmax,
    relay_text,
    smtputf8_refusal,
)

_fields_decoder = msgspec.msgpack.Decoder(list[str])
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")  # never inside a command line
_DOT = Command("dot", b".\r\n")
_RSET = Command("rset", b"RSET\r\n", (250,))
_DATA = Command("data", b"DATA\r\n", (354,))


class SessionLost(Exception):
    """The SMTP session is unusable (`stage`: where; `code`: the relay's, if it said one)."""

    def __init__(self, reason: str, stage: str, code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.stage = stage
        self.code = code


class Prepared(NamedTuple):
    """A job whose message is made: what its transaction writes."""

    job: Job
    commands: tuple[Command, Command, Command]  # MAIL, RCPT, DATA
    body: bytes  # dot-stuffed, without the final "."


class Waiting(NamedTuple):
    """A message whose body is written; its "." waits for the journal's DotAck."""

    job: Job
    ack: asyncio.Future[bool]


class Campaign(NamedTuple):
    """What a worker keeps of a campaign, made once when its template arrives."""

    renderer: Renderer | None  # None: its messages cannot be made, for `problem`
    signer: Signer | None
    sender: str  # the envelope sender
    mail_from: bytes  # MAIL's argument for it, without SMTPUTF8
    sender_utf8: bool  # the sender's address alone needs SMTPUTF8
    problem: str  # "" unless renderer is None


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL us if the daemon dies (belt to the EOF braces)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


class Worker:
    def __init__(self, setup: Setup, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.setup = setup
        self.server = setup.server
        self.reader = reader
        self.writer = writer
        self.jobs: collections.deque[Job] = collections.deque()
        self.campaigns: dict[int, Campaign] = {}
        self.attachment_parts: dict[int, dict[int, list[bytes]]] = {}
        self.job_arrived = asyncio.Event()
        self.dot_acks: dict[tuple[int, int], asyncio.Future[bool]] = {}
        self.stopping = False
        self.holding = False
        self.limits = Limits(setup.server.messages_per_connection, setup.server.idle_timeout)
        self.session: Pipeline | None = None  # the SMTP session, once EHLO/AUTH are done
        self.smtputf8 = False  # the session's relay offers SMTPUTF8
        self.unsettled: dict[tuple[int, int], bool] = {}  # jobs in hand -> their "." may have gone
        self.needs_reset = False
        self.failures = 0  # consecutive sessions that failed to connect or answered nothing
        self.session_messages = 0  # accepted on the current session
        self.session_replies = 0
        self.session_cap = 0
        self.unproductive: str | None = None  # why the last session ended before any reply
        self._decoder = wire.Decoder(AnyToWorker)
        self._last_state: tuple[str, str, bool] = ("", "", False)
        self._outgoing: list[bytes] = []  # frames for the supervisor, until `flush`
        self._flush_soon = False

    # -------------------------------------------------------- supervisor link

    def send(self, message: FromWorker) -> None:
        """Frames made in one turn of the event loop leave in one write at its end (a
        message's Done and the next one's DotRequest, typically); `flush` sends at once."""
        self._outgoing.append(wire.pack(message))
        if not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._flush_soon = False
        if self._outgoing:
            frames, self._outgoing = b"".join(self._outgoing), []
            self.writer.write(frames)

    async def read_supervisor(self) -> None:
        """Dispatch supervisor messages; EOF means the daemon is gone: exit at once."""
        frames = wire.FrameReader(self.reader)
        try:
            while True:
                for body in await frames.read():
                    self.handle(self._decoder.decode(body))
        except (wire.ConnectionClosed, wire.FrameError, ConnectionError):
            os._exit(3)  # never write a "." the journal cannot confirm

    def handle(self, message: AnyToWorker) -> None:
        if isinstance(message, Job):
            self.holding = False
            self.jobs.append(message)
            self.job_arrived.set()
        elif isinstance(message, DotAck):
            future = self.dot_acks.pop((message.campaign, message.line), None)
            if future is not None and not future.done():
                future.set_result(message.ok)
        elif isinstance(message, CampaignAttachment):
            parts = self.attachment_parts.setdefault(message.campaign, {})
            parts.setdefault(message.index, []).append(message.chunk)
        elif isinstance(message, CampaignTemplate):
            self.add_campaign(message)
        elif isinstance(message, Revoke):
            self.release(lambda job: job.campaign == message.campaign)
        elif isinstance(message, Limits):
            self.limits = message
            self.job_arrived.set()  # re-evaluate the idle wait with the new timeout
        elif isinstance(message, Hold):
            self.holding = True
            self.release(lambda job: True)
            self.job_arrived.set()
        elif isinstance(message, Stop):
            self.stopping = True
            self.release(lambda job: True)
            self.job_arrived.set()

    def add_campaign(self, message: CampaignTemplate) -> None:
        spec = message.spec
        parts = self.attachment_parts.pop(message.campaign, {})
        attachments = [Attachment(info.name, info.content_type, b"".join(parts.get(i, [])))
                       for i, info in enumerate(spec.attachments)]
        sender = parseaddr(spec.sender)[1]
        renderer: Renderer | None
        signer: Signer | None
        try:
            renderer = Renderer.from_spec(spec, message.uid, attachments, self.setup.unsubscribe_key,
                                          self.server.return_path)
            signer = campaign_signer(spec, lambda: self.setup.dkim, self.server.dkim_domains)
            problem = ""
        except (TemplateError, RenderError, DkimKeyError) as exc:  # checked at enqueue: not expected
            renderer, signer, problem = None, None, str(exc)
        self.campaigns[message.campaign] = Campaign(
            renderer, signer, sender, b"FROM:<" + sender.encode() + b">",
            needs_smtputf8(sender), problem)

    def release(self, predicate: Callable[[Job], bool]) -> None:
        kept: collections.deque[Job] = collections.deque()
        given_back = []
        for job in self.jobs:
            (given_back if predicate(job) else kept).append(job)
        self.jobs = kept
        if given_back:
            self.send(Released([(job.campaign, job.line) for job in given_back]))

    def state(self, state: str, detail: str = "", until: float | None = None) -> None:
        connected = self.session is not None
        if (state, detail, connected) != self._last_state:
            self._last_state = (state, detail, connected)
            self.send(SessionState(state, detail, connected, until))

    # -------------------------------------------------------- main loop

    async def run(self) -> None:
        reader_task = asyncio.create_task(self.read_supervisor())
        self.state("ready", "no session yet")
        while not self.stopping:
            if not self.jobs:
                await self.wait_for_work()
                continue
            if self.session is None:
                if self.unproductive:
                    reason, self.unproductive = self.unproductive, None
                    await self.back_off(reason)
                else:
                    await self.open_session()
                continue  # the jobs may have been taken back meanwhile: look again
            await self.deliver(self.jobs.popleft())
            if self.session is not None and self.session_cap and self.session_messages >= self.session_cap:
                await self.close_session(f"rotated after {self.session_messages} messages")
        await self.close_session("stopping")
        self.state("closed", "stopped")
        self.flush()
        await self.writer.drain()
        reader_task.cancel()

    async def wait_for_work(self) -> None:
        """Idle: QUIT at once when held, or once idle for `idle_timeout`."""
        if self.session is not None and self.holding:
            await self.close_session("held by the supervisor")
        self.state("idle", "waiting for work")
        self.job_arrived.clear()
        timeout = self.limits.idle_timeout if self.session is not None else None
        try:
            await asyncio.wait_for(self.job_arrived.wait(), timeout)
        except asyncio.TimeoutError:
            await self.close_session(f"idle for {self.limits.idle_timeout:g}s")

    async def open_session(self) -> None:
        self.state("connecting", f"{self.server.host}:{self.server.port}")
        smtp = smtp_client(self.server, self.setup.password)
        try:
            await smtp.connect()
            await greet(smtp)
            transport = cast(asyncio.Transport, smtp.transport)  # uvloop's are not subclasses
            if transport is None or transport.is_closing():
                raise aiosmtplib.SMTPServerDisconnected("connection lost after EHLO")
        except (aiosmtplib.SMTPException, OSError) as exc:
            smtp.close()
            self.send(SessionEnded(0, True, "connect", code_of(exc), describe(exc)))
            await self.back_off(describe(exc))
            return
        self.session = Pipeline(transport, smtp.supports_extension("pipelining"), self.server.timeout)
        self.smtputf8 = smtp.supports_extension("smtputf8")
        self.needs_reset = False
        self.session_messages = self.session_replies = 0
        caps = [n for n in (self.limits.messages_per_connection, relay_mailmax(smtp)) if n]
        self.session_cap = min(caps) if caps else 0
        self.state("ready", f"connected to {self.server.host}:{self.server.port}")

    async def back_off(self, reason: str) -> None:
        """Connection-level failure: give the jobs back to others and wait, growing."""
        self.failures += 1
        delivery = self.setup.delivery
        delay = min(delivery.reconnect_initial * 2 ** (self.failures - 1), delivery.reconnect_max)
        self.release(lambda job: True)
        self.state("backoff", reason, time.time() + delay)
        await asyncio.sleep(delay)
        self.state("ready", f"retrying after: {reason}")

    async def close_session(self, why: str) -> None:
        """QUIT on our own initiative; not a drop."""
        session, self.session = self.session, None
        if session is None:
            return
        await session.quit()
        self.send(SessionEnded(self.session_messages, False, "idle", None, why))

    def lose_session(self, lost: SessionLost) -> None:
        """The session broke: reported after the Dones it explains."""
        if self.session is not None:
            self.session.abort()
        self.session = None
        if self.session_replies == 0:
            self.unproductive = lost.reason
        self.send(SessionEnded(self.session_messages, True, lost.stage, lost.code,
                               relay_text(lost.reason)))

    # -------------------------------------------------------- transactions

    def replied(self) -> None:
        self.session_replies += 1
        self.failures = 0

    def settle(self, key: tuple[int, int], result: Result, code: int | None, reply: str,
               stage: str = "") -> None:
        """The one Done of a job. Every reply passes relay_text, whatever made it: what
        the journal stores is valid UTF-8 and at most REPLY_MAX characters."""
        self.unsettled.pop(key, None)
        self.send(Done(key[0], key[1], result, code, relay_text(reply), stage))

    def settle_lost(self, lost: SessionLost) -> None:
        """Settle what is in hand by the usual rules (uncertain once its "." may have
        gone, else requeue), then report the lost session."""
        for key, after_dot in list(self.unsettled.items()):
            if after_dot:
                self.settle(key, "uncertain", lost.code,
                            f"no reply after the final '.': {lost.reason}", lost.stage)
            else:
                self.settle(key, "requeue", lost.code, lost.reason, lost.stage)
        self.lose_session(lost)

    async def deliver(self, job: Job) -> None:
        """Run transactions from `job` on. While jobs are at hand, each "." goes out in
        the same write as the next message's MAIL, RCPT and DATA (with PIPELINING), so a
        message costs one round trip. Every job taken here ends with exactly one Done."""
        try:
            prepared = self.prepare(job)
            waiting = await self.transaction(None, prepared) if prepared else None
            while waiting is not None:
                following = self.next_prepared()  # made while the journal commits
                if not await waiting.ack:
                    raise SessionLost("journal could not record the transaction", "dot")
                if following is None:  # the supervisor may have sent one meanwhile
                    following = self.next_prepared()
                waiting = await self.transaction(waiting, following)
        except SessionLost as lost:
            self.settle_lost(lost)
        except Exception as exc:  # a bug must cost the jobs in hand, never the worker
            self.settle_lost(SessionLost(f"worker error: {type(exc).__name__}: {exc}", "data"))

    def next_prepared(self) -> Prepared | None:
        """The next job to chain onto a pending ".", unless the session should end first."""
        while self.jobs and not (self.stopping or self.holding):
            if self.session_cap and self.session_messages + 1 >= self.session_cap:
                return None  # the pending message may be the session's last
            prepared = self.prepare(self.jobs.popleft())
            if prepared is not None:
                return prepared
        return None

    def prepare(self, job: Job) -> Prepared | None:
        """Make the job's message and commands, or settle it as failed."""
        key = (job.campaign, job.line)
        self.unsettled[key] = False
        campaign = self.campaigns[job.campaign]
        smtputf8 = campaign.sender_utf8 or needs_smtputf8(job.email)
        rcpt = b"TO:<" + job.email.encode() + b">"
        refusal = ""
        if smtputf8 and not self.smtputf8:
            refusal = smtputf8_refusal(campaign.sender, job.email)
        elif _CONTROL.search(rcpt):
            refusal = "the address holds a control character"
        else:
            try:
                message = self.render(job, campaign, smtputf8)
            except (RenderError, DkimKeyError) as exc:
                refusal = f"cannot render message: {exc}"
            except Exception as exc:  # any other failure to make one message is that message's
                refusal = f"cannot make message: {type(exc).__name__}: {exc}"
        if refusal:
            self.settle(key, "failed", None, refusal)
            return None
        mail_from = campaign.mail_from
        verp_sender = campaign.renderer.envelope_sender(job.line) if campaign.renderer else None
        if verp_sender is not None:
            mail_from = b"FROM:<" + verp_sender.encode() + b">"
        if smtputf8:
            mail_from += b" SMTPUTF8"
        commands = (Command("mail", b"MAIL " + mail_from + b"\r\n", (250,)),
                    Command("rcpt", b"RCPT " + rcpt + b"\r\n", (250, 251)), _DATA)
        return Prepared(job, commands, dot_stuff(message))

    def render(self, job: Job, campaign: Campaign, smtputf8: bool = False) -> bytes:
        if campaign.renderer is None:
            raise RenderError(campaign.problem)
        fields = _fields_decoder.decode(job.fields)
        message = campaign.renderer.render(
            line=job.line, email=job.email, fields=fields, date=format_date(time.time()),
            smtputf8=smtputf8,
        )
        return message if campaign.signer is None else campaign.signer.sign(message)

    async def transaction(self, waiting: Waiting | None, prepared: Prepared | None) -> Waiting | None:
        """Write the "." of `waiting` (the journal holds its `data-sent`) and the commands
        of `prepared`; settle what the replies decide; write `prepared`'s body.
        Return `prepared`, now waiting for its ".", or None. Raises SessionLost."""
        session = self.session
        assert session is not None
        self.state("sending")  # a frame only on the change: the supervisor knows the job
        commands: list[Command] = []
        if waiting is not None:
            if prepared is not None and (self.stopping or self.holding):
                self.release_prepared(prepared)
                prepared = None
            self.dot_goes_out(waiting.job)
            if session.pipelining:
                commands.append(_DOT)
            else:  # lock-step: the "." and its reply first
                self.settle_dot(waiting.job, await self.exchange([_DOT]))
        reset = self.needs_reset and prepared is not None
        if reset:
            commands.append(_RSET)
        if prepared is not None:
            commands += prepared.commands
        if not commands:
            return None
        exchange = await self.exchange(commands)
        if commands[0] is _DOT:
            assert waiting is not None
            exchange = self.settle_dot(waiting.job, exchange)
        if reset:
            exchange = self.after_reset(exchange)
        return await self.open_data(prepared, exchange) if prepared is not None else None

    def release_prepared(self, prepared: Prepared) -> None:
        """Stop or Hold came while it waited to be chained: it never started."""
        key = (prepared.job.campaign, prepared.job.line)
        self.unsettled.pop(key, None)
        self.send(Released([key]))

    async def exchange(self, commands: list[Command]) -> Exchange:
        session = self.session
        assert session is not None
        return await session.exchange(commands)

    def dot_goes_out(self, job: Job) -> None:
        """From here on a loss makes this job uncertain: the relay may have its message."""
        self.unsettled[(job.campaign, job.line)] = True

    def settle_dot(self, job: Job, exchange: Exchange) -> Exchange:
        """The reply to a message's "." (the first of `exchange`) decides it; the rest
        of the exchange is returned."""
        key = (job.campaign, job.line)
        if not exchange.replies:
            self.unsettled[key] = exchange.written > 0  # a "." that never left: discarded
            raise SessionLost(exchange.lost or "no reply", "dot")
        reply = exchange.replies[0]
        self.replied()
        if reply.code == 421:  # the relay gave up before taking the message
            raise SessionLost(f"421 {reply.text}", "dot", 421)
        if reply.code == 250:
            self.session_messages += 1
        else:
            self.needs_reset = True
        self.settle(key, result_of(reply.code), reply.code, reply.text, "dot")
        return exchange._replace(replies=exchange.replies[1:], written=exchange.written - 1)

    def after_reset(self, exchange: Exchange) -> Exchange:
        """Take the RSET's reply off the front; a relay that refuses RSET is unusable."""
        if not exchange.replies:
            raise SessionLost(exchange.lost or "no reply", "mail")
        reply = exchange.replies[0]
        if reply.code != 250:
            raise SessionLost(f"{reply.code} {reply.text}", "mail", reply.code)
        self.needs_reset = False
        return exchange._replace(replies=exchange.replies[1:], written=exchange.written - 1)

    async def open_data(self, prepared: Prepared, exchange: Exchange) -> Waiting | None:
        """MAIL, RCPT, DATA answered: settle a refusal, or write the body and ask for the "."."""
        key = (prepared.job.campaign, prepared.job.line)
        replies = exchange.replies
        for command, reply in zip(prepared.commands, replies):
            if reply.code == 421:
                raise SessionLost(f"421 {reply.text}", command.stage, 421)
            if reply.code not in command.ok:
                self.replied()
                self.needs_reset = True
                self.settle(key, result_of(reply.code), reply.code, reply.text, command.stage)
                if len(replies) == 3 and replies[2].code == 354:
                    await self.end_empty_data()  # RFC 2920 3.1: DATA taken after a refusal
                if exchange.lost:
                    raise SessionLost(exchange.lost, command.stage)
                return None
        if len(replies) < len(prepared.commands):
            raise SessionLost(exchange.lost or "no reply", prepared.commands[len(replies)].stage)
        self.replied()
        session = self.session
        assert session is not None
        try:
            session.write(prepared.body)
        except SessionBroken as exc:
            raise SessionLost(str(exc), "data") from None
        return Waiting(prepared.job, self.request_dot(prepared.job))

    async def end_empty_data(self) -> None:
        """A lone "." ends a DATA the relay took with no recipient; its reply is moot."""
        result = await self.exchange([Command("data", b".\r\n")])
        if result.lost:
            raise SessionLost(result.lost, "data")

    def request_dot(self, job: Job) -> asyncio.Future[bool]:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.dot_acks[(job.campaign, job.line)] = future
        self.send(DotRequest(job.campaign, job.line))
        self.flush()  # the journal's commit starts only when the supervisor has it
        return future


def result_of(code: int) -> Result:
    """What a relay's final reply to a transaction means for the recipient."""
    if code == 250:
        return "sent"
    if 400 <= code < 500:
        return "deferred"
    return "failed"


async def amain(sock: socket.socket) -> None:
    reader, writer = await asyncio.open_unix_connection(sock=sock, limit=wire.MAX_FRAME)
    decoder = wire.Decoder(Setup)
    try:
        setup = decoder.decode(await wire.read_frame(reader))
    except (wire.ConnectionClosed, wire.FrameError, ConnectionError):
        os._exit(3)  # the daemon went away before saying who we are
    await Worker(setup, reader, writer).run()


def run_in_process(sock: socket.socket) -> None:
    """A worker's life, given its end of the supervisor's socketpair (spawner.py)."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when we stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # uvloop halves a worker's CPU per message (bench/RESULTS.md); plain asyncio otherwise
    if uvloop is None:
        asyncio.run(amain(sock))
    else:
        uvloop.run(amain(sock))


def main() -> None:
    """`python -m mailerd.worker.session FD`: a worker started by hand on an inherited socket."""
    run_in_process(socket.socket(fileno=int(sys.argv[1])))


if __name__ == "__main__":
    main()
