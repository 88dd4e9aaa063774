"""The control socket: framing, peer credentials and routing of requests.

A bad frame (garbage, truncated, oversize, unknown request, wrong version) gets an
Error reply where one can still be sent, and that connection is closed; every
other client is served as before. A peer that access.py does not let in gets one
Error reply saying so, whatever it asked.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import time
from pathlib import Path

from mailerd import wire
from mailerd.control.access import AccessPolicy
from mailerd.control.commands import ClientSession, Commands, Peer
from mailerd.system.log import event
from mailerd.schema.control import (
    EnqueueAttachment,
    ExportRecipients,
    SuppressAdd,
    SuppressList,
    SuppressRemove,
    TestSend,
)
from mailerd.schema.control import (
    PROTOCOL_VERSION,
    AnyRequest,
    Cancel,
    DebugFreeze,
    EnqueueBegin,
    EnqueueCommit,
    EnqueueRows,
    Error,
    ListCampaigns,
    Ok,
    Pause,
    Reply,
    Report,
    Request,
    Plan,
    Explain,
    Resume,
    SetPacing,
    Settle,
    Status,
)

IDLE_TIMEOUT = 300.0  # a client that says nothing for this long is dropped
BACKLOG = 1024  # many clients may connect at once (watchers, scripts)
REFUSED_FRAME_LIMIT = 64 * 1024  # what a refused peer may send before its answer


def _freeze(seconds: float) -> None:
    """DebugFreeze: the event loop hangs here (faulthandler's traceback names this)."""
    time.sleep(seconds)


def peer_credentials(sock: socket.socket) -> Peer:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return Peer(*struct.unpack("3i", creds))


class ControlServer:
    def __init__(self, commands: Commands, path: Path, mode: int, group: str | None = None,
                 debug_commands: bool = False, inherited: socket.socket | None = None) -> None:
        self.commands = commands
        self.path = path
        self.mode = mode
        self.inherited = inherited  # a listening socket from systemd (activation.py)
        self.access = AccessPolicy(group)
        self.debug_commands = debug_commands
        self.server: asyncio.AbstractServer | None = None
        self.clients: set[asyncio.Task[None]] = set()
        self._decoder = wire.Decoder(AnyRequest)

    async def start(self) -> None:
        if self.inherited is not None:  # systemd owns the file, its mode and group
            self.path = Path(self.inherited.getsockname() or self.path)
            self.server = await asyncio.start_unix_server(
                self._serve, sock=self.inherited, limit=wire.MAX_FRAME)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_socket():
            self.path.unlink()  # we hold the state lock, so no live daemon owns it
        old_umask = os.umask(0o177)
        try:
            self.server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=wire.MAX_FRAME, backlog=BACKLOG
            )
        finally:
            os.umask(old_umask)
        if self.access.gid is not None and os.stat(self.path).st_gid != self.access.gid:
            # not needed when the group is the daemon's own (Group= in the unit), which
            # matters there: the unit's SystemCallFilter=~@privileged forbids chown
            os.chown(self.path, -1, self.access.gid)
        os.chmod(self.path, self.mode)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.clients):
            task.cancel()
        if self.inherited is not None:
            return  # the socket unit keeps it, and queues clients until we are back
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.clients.add(task)
        sock = writer.get_extra_info("socket")
        session = ClientSession(peer_credentials(sock))
        try:
            refusal = await asyncio.to_thread(self.access.refusal, session.peer)  # NSS may block
            if refusal is not None:
                await self._refuse(session, refusal, reader, writer)
            else:
                await self._converse(session, reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.clients.discard(task)
            await self.commands.abandon(session)
            writer.close()

    async def _refuse(self, session: ClientSession, refusal: str, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        """Answer the first request (whatever it is) with the refusal, then hang up."""
        event("control_refused", logging.WARNING, peer_uid=session.peer.uid,
              peer_gid=session.peer.gid, peer_pid=session.peer.pid)
        try:
            await asyncio.wait_for(wire.read_frame(reader, REFUSED_FRAME_LIMIT), 10)
        except (wire.FrameError, wire.ConnectionClosed, asyncio.TimeoutError):
            pass
        await self._send(writer, Error(message=refusal))

    async def _converse(self, session: ClientSession, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                frame = await asyncio.wait_for(wire.read_frame(reader), IDLE_TIMEOUT)
                request = self._decoder.decode(frame)
            except wire.ConnectionClosed:
                return
            except (wire.FrameError, asyncio.TimeoutError) as exc:
                reason = str(exc) or "idle for too long"
                event("control_bad_frame", logging.WARNING, **session.peer.log_fields,
                      error=reason)
                await self._send(writer, Error(message=f"bad request: {reason}"))
                return
            reply = await self._answer(session, request)
            await self._send(writer, reply)

    async def _answer(self, session: ClientSession, request: Request) -> Reply:
        if request.v != PROTOCOL_VERSION:
            return Error(message=f"protocol version {request.v} is not supported "
                                 f"(this daemon speaks {PROTOCOL_VERSION})")
        try:
            return await self._route(session, request)
        except Exception as exc:  # a bug or journal trouble must not take the daemon down
            event("control_error", logging.ERROR, request=type(request).__name__,
                  error=repr(exc), exc_info=True)
            return Error(message=f"internal error while handling {type(request).__name__}: {exc}")

    async def _route(self, session: ClientSession, request: Request) -> Reply:
        commands = self.commands
        match request:
            case EnqueueBegin():
                return await commands.enqueue_begin(session, request)
            case EnqueueRows():
                return await commands.enqueue_rows(session, request)
            case EnqueueCommit():
                return await commands.enqueue_commit(session, request)
            case Pause():
                return await commands.pause(session, request)
            case Resume():
                return await commands.resume(session, request)
            case Cancel():
                return await commands.cancel(session, request)
            case Report():
                return await commands.report(request)
            case ListCampaigns():
                return await commands.list_campaigns()
            case Status():
                return await commands.status()
            case SetPacing():
                return await commands.set_pacing(session, request)
            case Plan():
                return await commands.plan(request)
            case Settle():
                return await commands.settle(session, request)
            case EnqueueAttachment():
                return await commands.enqueue_attachment(session, request)
            case SuppressAdd():
                return await commands.suppress_add(session, request)
            case SuppressRemove():
                return await commands.suppress_remove(session, request)
            case SuppressList():
                return await commands.suppress_list(request)
            case TestSend():
                return await commands.test_send(session, request)
            case ExportRecipients():
                return await commands.export_recipients(request)
            case DebugFreeze():
                return self._debug_freeze(session, request)
            case Explain():
                return await commands.explain(request)
        return Error(message=f"unsupported request {type(request).__name__}")

    def _debug_freeze(self, session: ClientSession, request: DebugFreeze) -> Reply:
        if not self.debug_commands:
            return Error(message="debug commands are disabled "
                                 "(set [daemon] debug_commands = true to allow them)")
        seconds = max(0.0, min(request.seconds, 3600.0))
        event("debug_freeze", logging.WARNING, seconds=seconds, **session.peer.log_fields)
        # after this reply is written: block the whole event loop, as a hang would
        asyncio.get_running_loop().call_soon(_freeze, seconds)
        return Ok(message=f"freezing the event loop for {seconds:g} s")

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, reply: Reply) -> None:
        writer.write(wire.pack(reply))
        await writer.drain()
