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
from typing import Callable, NamedTuple

import aiosmtplib
import msgspec

try:  # imported here, not after the fork, so the template's pages hold it (worker_template.py)
    import uvloop
except ImportError:
    uvloop = None  # type: ignore[assignment]

from mailerd import wire
from mailerd.schema.config import ServerConfig
from mailerd.worker.connect import greet, smtp_client
from mailerd.message.render import Attachment, Renderer, RenderError, TemplateError, format_date, needs_smtputf8
from mailerd.message.signing import KeyError_, Signer, campaign_signer
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

_PERIOD_AT_LINE_START = re.compile(rb"(?m)^\.")
_MAILMAX = re.compile(r"\bMAILMAX=(\d+)", re.IGNORECASE)
_fields_decoder = msgspec.msgpack.Decoder(list[str])


class SessionLost(Exception):
    """The SMTP session is unusable; `after_dot` says whether the "." went out."""

    def __init__(self, reason: str, after_dot: bool, stage: str, code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.after_dot = after_dot
        self.stage = stage
        self.code = code


def dot_stuff(message: bytes) -> bytes:
    """Transparency (RFC 5321 4.5.2); the message already has CRLF line ends."""
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    return _PERIOD_AT_LINE_START.sub(b"..", message)


def relay_mailmax(smtp: aiosmtplib.SMTP) -> int:
    """RFC 9422 `LIMITS MAILMAX=n` from the EHLO reply, or 0."""
    match = _MAILMAX.search(smtp.esmtp_extensions.get("limits", ""))
    return int(match[1]) if match else 0


def smtputf8_refusal(sender: str, recipient: str) -> str:
    """Why a message that needs SMTPUTF8 cannot go through a relay that lacks it."""
    address = recipient if not recipient.isascii() else sender
    return f"relay does not offer SMTPUTF8, required for <{address}>"


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
        self.smtp: aiosmtplib.SMTP | None = None
        self.needs_reset = False
        self.failures = 0  # consecutive sessions that failed to connect or answered nothing
        self.session_messages = 0  # accepted on the current session
        self.session_replies = 0
        self.session_cap = 0
        self.unproductive: str | None = None  # why the last session ended before any reply
        self._decoder = wire.Decoder(AnyToWorker)
        self._last_state: tuple[str, str, bool] = ("", "", False)

    # -------------------------------------------------------- supervisor link

    def send(self, message: FromWorker) -> None:
        self.writer.write(wire.pack(message))

    async def read_supervisor(self) -> None:
        """Dispatch supervisor messages; EOF means the daemon is gone: exit at once."""
        try:
            while True:
                self.handle(self._decoder.decode(await wire.read_frame(self.reader)))
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
            renderer = Renderer.from_spec(spec, message.uid, attachments, self.setup.unsubscribe_key)
            signer = campaign_signer(spec, lambda: self.setup.dkim, self.server.dkim_domains)
            problem = ""
        except (TemplateError, RenderError, KeyError_) as exc:  # checked at enqueue: not expected
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
        connected = self.smtp is not None
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
            if self.smtp is None:
                if self.unproductive:
                    reason, self.unproductive = self.unproductive, None
                    await self.back_off(reason)
                else:
                    await self.open_session()
                continue  # the jobs may have been taken back meanwhile: look again
            await self.deliver(self.jobs.popleft())
            if self.smtp is not None and self.session_cap and self.session_messages >= self.session_cap:
                await self.close_session(f"rotated after {self.session_messages} messages")
        await self.close_session("stopping")
        self.state("closed", "stopped")
        await self.writer.drain()
        reader_task.cancel()

    async def wait_for_work(self) -> None:
        """Idle: QUIT at once when held, or once idle for `idle_timeout`."""
        if self.smtp is not None and self.holding:
            await self.close_session("held by the supervisor")
        self.state("idle", "waiting for work")
        self.job_arrived.clear()
        timeout = self.limits.idle_timeout if self.smtp is not None else None
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
        except (aiosmtplib.SMTPException, OSError) as exc:
            smtp.close()
            self.send(SessionEnded(0, True, "connect", code_of(exc), describe(exc)))
            await self.back_off(describe(exc))
            return
        self.smtp = smtp
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
        smtp, self.smtp = self.smtp, None
        if smtp is None:
            return
        try:
            if smtp.is_connected:
                await smtp.quit(timeout=5)
        except (aiosmtplib.SMTPException, OSError):
            pass
        smtp.close()
        self.send(SessionEnded(self.session_messages, False, "idle", None, why))

    def lose_session(self, lost: SessionLost) -> None:
        if self.smtp is not None:
            self.smtp.close()
        self.smtp = None
        self.send(SessionEnded(self.session_messages, True, lost.stage, lost.code, lost.reason))

    # -------------------------------------------------------- one transaction

    async def deliver(self, job: Job) -> None:
        """One recipient: render, run the transaction, report exactly one Done."""
        campaign = self.campaigns[job.campaign]
        smtputf8 = campaign.sender_utf8 or needs_smtputf8(job.email)
        if smtputf8 and self.smtp is not None and not self.smtp.supports_extension("smtputf8"):
            self.send(Done(job.campaign, job.line, "failed", None,
                           smtputf8_refusal(campaign.sender, job.email)))
            return
        try:
            message = self.render(job, campaign, smtputf8)
        except (RenderError, KeyError_) as exc:
            self.send(Done(job.campaign, job.line, "failed", None, f"cannot render message: {exc}"))
            return
        try:
            mail_from = (campaign.mail_from + b" SMTPUTF8") if smtputf8 else campaign.mail_from
            stage, code, reply = await self.transaction(job, message, mail_from)
        except SessionLost as lost:
            if self.session_replies == 0:
                self.unproductive = lost.reason
            result: Result = "uncertain" if lost.after_dot else "requeue"
            self.send(Done(job.campaign, job.line, result, lost.code, lost.reason, lost.stage))
            self.lose_session(lost)  # reported after the Done it explains
            return
        self.session_replies += 1
        self.failures = 0
        if code == 250:
            self.session_messages += 1
        self.send(Done(job.campaign, job.line, classify(code), code, reply, stage))

    def render(self, job: Job, campaign: Campaign, smtputf8: bool = False) -> bytes:
        if campaign.renderer is None:
            raise RenderError(campaign.problem)
        fields = _fields_decoder.decode(job.fields)
        message = campaign.renderer.render(
            line=job.line, email=job.email, fields=fields, date=format_date(time.time()),
            smtputf8=smtputf8,
        )
        return message if campaign.signer is None else campaign.signer.sign(message)

    async def transaction(self, job: Job, message: bytes, mail_from: bytes) -> tuple[str, int, str]:
        """Run MAIL..DATA..'.' (`mail_from`: MAIL's argument); return the deciding
        reply with the stage it answered, or raise SessionLost."""
        smtp = self.smtp
        assert smtp is not None
        self.state("sending")  # a frame only on the change: the supervisor knows the job
        stage = "mail"
        try:
            if self.needs_reset:
                await smtp.rset()
                self.needs_reset = False
            for stage, command in (
                ("mail", (b"MAIL", mail_from)),
                ("rcpt", (b"RCPT", b"TO:<" + job.email.encode() + b">")),
            ):
                reply = await smtp.execute_command(*command)
                if reply.code not in (250, 251):
                    return self.refused(stage, reply.code, reply.message)
            stage = "data"
            reply = await smtp.execute_command(b"DATA")
            if reply.code != 354:
                return self.refused(stage, reply.code, reply.message)
            ack = self.request_dot(job)
            # hold on to the protocol: aiosmtplib drops smtp.protocol when the
            # connection is lost, which may happen while we wait for the journal
            protocol = smtp.protocol
            assert protocol is not None
            protocol.write(dot_stuff(message))
            if not await ack:
                raise SessionLost("journal could not record the transaction", False, stage)
            protocol.write(b".\r\n")  # raises if the connection is already gone: no '.' sent
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise SessionLost(describe(exc), False, stage, code_of(exc)) from None
        try:
            reply = await protocol.read_response(timeout=self.server.timeout)
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise SessionLost(f"no reply after the final '.': {describe(exc)}", True, "dot") from None
        if reply.code == 421:
            raise SessionLost(f"{reply.code} {reply.message}", False, "dot", 421)
        if reply.code != 250:
            self.needs_reset = True
        return "dot", reply.code, reply.message

    def refused(self, stage: str, code: int, text: str) -> tuple[str, int, str]:
        """A refusal before the '.': 421 ends the session, anything else needs RSET."""
        if code == 421:
            raise SessionLost(f"{code} {text}", False, stage, code)
        self.needs_reset = True
        return stage, code, text

    def request_dot(self, job: Job) -> asyncio.Future[bool]:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.dot_acks[(job.campaign, job.line)] = future
        self.send(DotRequest(job.campaign, job.line))
        return future


def classify(code: int) -> Result:
    if code == 250:
        return "sent"
    if 400 <= code < 500:
        return "deferred"
    return "failed"


def code_of(exc: BaseException) -> int | None:
    return exc.code if isinstance(exc, aiosmtplib.SMTPResponseException) else None


def describe(exc: BaseException) -> str:
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return f"{exc.code} {exc.message}"
    return str(exc) or type(exc).__name__


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
