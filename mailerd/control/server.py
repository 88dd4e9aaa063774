"""The control socket: framing, peer credentials, limits (limits.py) and routing of
requests through one table of handlers, each called as (session, request) -> Reply.

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
import time
from pathlib import Path

from mailerd import wire
from mailerd.control.access import AccessPolicy, peer_credentials
from mailerd.control.commands import ClientSession, Commands, Handler
from mailerd.control.limits import AcceptErrorLog, BufferBudget, BufferFull, ConnectionLimits
from mailerd.schema.control import (
    PROTOCOL_VERSION,
    AnyRequest,
    DebugFreeze,
    Error,
    Ok,
    Reply,
    Request,
    SetPacing,
    SuppressRemove,
)
from mailerd.system.log import event

# Requests only admins may make (access.AccessPolicy), and how a refusal names them.
# Changing another member's campaign is checked in Commands, where the owner is known.
ADMIN_ONLY: dict[type[Request], str] = {
    SuppressRemove: "suppress remove",
    SetPacing: "set",
    DebugFreeze: "debug-freeze",
}

IDLE_TIMEOUT = 300.0  # a client that says nothing for this long is dropped
# Many clients may connect at once (watchers, scripts). asyncio also makes this many
# accept() calls per wake-up; when descriptors run out each one fails, which is cheap
# now that limits.AcceptErrorLog logs them once, not six lines each (review M4).
BACKLOG = 1024
REFUSED_FRAME_LIMIT = 64 * 1024  # what a refused peer may send before its answer


def _freeze(seconds: float) -> None:
    """DebugFreeze: the event loop hangs here (faulthandler's traceback names this)."""
    time.sleep(seconds)


class ControlServer:
    def __init__(self, commands: Commands, path: Path, mode: int, group: str | None = None,
                 debug_commands: bool = False, inherited: socket.socket | None = None,
                 admin_group: str | None = None) -> None:
        self.commands = commands
        self.path = path
        self.mode = mode
        self.inherited = inherited  # a listening socket from systemd (activation.py)
        self.access = AccessPolicy(group, admin_group)
        self.debug_commands = debug_commands
        self.server: asyncio.AbstractServer | None = None
        self.clients: set[asyncio.Task[None]] = set()
        self.limits = ConnectionLimits(trusted_uids={0, self.access.own_uid})
        self.budget = BufferBudget()
        self._accept_log: AcceptErrorLog | None = None
        self._decoder = wire.Decoder(AnyRequest)
        self._handlers: dict[type[Request], Handler] = {
            **commands.handlers(), DebugFreeze: self._debug_freeze}

    async def start(self) -> None:
        self._accept_log = AcceptErrorLog(asyncio.get_running_loop())
        self._accept_log.install()
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
        if self._accept_log is not None:
            self._accept_log.uninstall()
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
        session = ClientSession(peer_credentials(writer.get_extra_info("socket")))
        if self._accept_log is not None:
            self._accept_log.accepted()
        try:
            too_many = self.limits.admit(session.peer)
            if too_many is not None:  # answered fast: the point is to give the descriptor back
                await self._answer_first_request(reader, writer, Error(message=too_many), 1.0)
                return
            try:
                await self._serve_admitted(session, reader, writer)
            finally:
                self.limits.release(session.peer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.clients.discard(task)
            writer.close()

    async def _serve_admitted(self, session: ClientSession, reader: asyncio.StreamReader,
                              writer: asyncio.StreamWriter) -> None:
        try:
            refusal = await asyncio.to_thread(self.access.refusal, session.peer)  # NSS may block
            session.admin = await asyncio.to_thread(self.access.is_admin, session.peer)
            if refusal is not None:
                await self._refuse(session, refusal, reader, writer)
            else:
                await self._converse(session, reader, writer)
        finally:
            await self.commands.abandon(session)

    async def _refuse(self, session: ClientSession, refusal: str, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        """Answer the first request (whatever it is) with the refusal, then hang up."""
        event("control_refused", logging.WARNING, peer_uid=session.peer.uid,
              peer_gid=session.peer.gid, peer_pid=session.peer.pid)
        await self._answer_first_request(reader, writer, Error(message=refusal), 10.0)

    async def _answer_first_request(self, reader: asyncio.StreamReader,
                                    writer: asyncio.StreamWriter, reply: Reply,
                                    wait: float) -> None:
        """Read the first request, unseen (closing a socket with unread data would reset
        the connection before the client reads the reply), and answer it with `reply`."""
        try:
            await asyncio.wait_for(wire.read_frame(reader, REFUSED_FRAME_LIMIT), wait)
        except (wire.FrameError, wire.ConnectionClosed, asyncio.TimeoutError):
            pass
        await self._send(writer, reply)

    async def _converse(self, session: ClientSession, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                frame = await asyncio.wait_for(self._read_request(session, reader), IDLE_TIMEOUT)
                request = self._decoder.decode(frame)
            except wire.ConnectionClosed:
                return
            except BufferFull as exc:
                await self._send(writer, Error(message=str(exc)))
                return
            except (wire.FrameError, asyncio.TimeoutError) as exc:
                reason = str(exc) or "idle for too long"
                event("control_bad_frame", logging.WARNING, **session.peer.log_fields,
                      error=reason)
                await self._send(writer, Error(message=f"bad request: {reason}"))
                return
            reply = await self._answer(session, request)
            await self._send(writer, reply)

    async def _read_request(self, session: ClientSession, reader: asyncio.StreamReader) -> bytes:
        """One frame; a large one counts against the budget while its body arrives."""
        length = await wire.read_length(reader)
        self.budget.take(length, session.peer)
        try:
            return await wire.read_body(reader, length)
        finally:
            self.budget.give_back(length)

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
        handler = self._handlers.get(type(request))
        if handler is None:
            return Error(message=f"unsupported request {type(request).__name__}")
        if type(request) in ADMIN_ONLY and not session.admin:
            event("control_denied", logging.WARNING, request=type(request).__name__,
                  **session.peer.log_fields)
            return Error(message=f"permission denied: {ADMIN_ONLY[type(request)]} needs the admin "
                                 f"role ({self.access.admins()})")
        return await handler(session, request)

    async def _debug_freeze(self, session: ClientSession, request: DebugFreeze) -> Reply:
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
