"""The command exchange of a worker's SMTP session, pipelined when the relay allows it.

aiosmtplib connects, starts TLS, says EHLO and authenticates; then `Pipeline.take_over`
moves the connection's transport to a small protocol of our own, because aiosmtplib's
(5.x) keeps one reply at a time and drops bytes that arrive while no command waits for
them: it cannot read the several replies of a pipelined group (RFC 2920).

`Pipeline.exchange` writes a group of commands and reads their replies in order. With
PIPELINING the whole group goes out in one write and all replies are read together;
without it each command waits for its reply and a refusal ends the group, as a plain
SMTP client does. What the replies mean is the worker's business (session.py).
"""

from __future__ import annotations

import asyncio
import collections
from typing import NamedTuple, Sequence

from mailerd.worker.smtp import relay_text

MAX_REPLY_BYTES = 32 * 1024  # as aiosmtplib: bounds a reply that never ends


class Reply(NamedTuple):
    code: int
    text: str  # safe relay text (smtp.relay_text)


class Command(NamedTuple):
    stage: str  # dot | rset | mail | rcpt | data
    line: bytes  # with its CRLF
    ok: tuple[int, ...] = ()  # replies that let a lock-step group go on; () = any


class Exchange(NamedTuple):
    replies: list[Reply]  # for the first len(replies) commands, in order
    written: int  # commands that went out (a lock-step group stops at a refusal)
    lost: str | None  # why the session broke before every written command had its reply


class SessionBroken(Exception):
    """No more replies will come on this connection."""


class ReplyReader(asyncio.Protocol):
    """Collects every byte the relay sends and splits it into replies, as many as come."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._lines: list[bytes] = []  # lines of the multi-line reply being read
        self._size = 0  # bytes of the reply being read
        self._replies: collections.deque[Reply] = collections.deque()
        self._broken: str | None = None
        self._wakeup: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None

    def data_received(self, data: bytes) -> None:
        if self._broken is not None:
            return
        self._buffer += data
        try:
            self._split_replies()
        except SessionBroken as exc:
            self._break(str(exc))
            if self.transport is not None:
                self.transport.abort()
        self._wake()

    def _split_replies(self) -> None:
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[:end + 1])
            del self._buffer[:end + 1]
            self._take_line(line)
        if self._size + len(self._buffer) > MAX_REPLY_BYTES:
            raise SessionBroken(f"reply longer than {MAX_REPLY_BYTES} bytes")

    def _take_line(self, line: bytes) -> None:
        self._size += len(line)
        if self._size > MAX_REPLY_BYTES:
            raise SessionBroken(f"reply longer than {MAX_REPLY_BYTES} bytes")
        code, separator = line[:3], line[3:4]
        if not (code.isdigit() and separator in (b" ", b"-", b"\r", b"\n")):
            raise SessionBroken(f"malformed reply line: {relay_text(line[:80]).strip()!r}")
        self._lines.append(line[4:].strip(b" \t\r\n"))
        if separator != b"-":
            self._replies.append(Reply(int(code), relay_text(b"\n".join(self._lines))))
            self._lines, self._size = [], 0

    def eof_received(self) -> bool:
        self._break("the relay closed the connection")
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._break(f"connection lost: {exc}" if exc else "connection lost")
        self.transport = None

    def _break(self, reason: str) -> None:
        if self._broken is None:
            self._broken = reason
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def next_reply(self) -> Reply:
        """The next reply, in order; SessionBroken once none is left and none can come."""
        while not self._replies:
            if self._broken is not None:
                raise SessionBroken(self._broken)
            self._wakeup = asyncio.get_running_loop().create_future()
            await self._wakeup
        return self._replies.popleft()

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing() or self._broken is not None:
            raise SessionBroken(self._broken or "connection lost")
        transport.write(data)


class Pipeline:
    """One connection's command exchange after EHLO/AUTH, replies read by ReplyReader."""

    def __init__(self, transport: asyncio.Transport, pipelining: bool, timeout: float) -> None:
        self.pipelining = pipelining
        self.timeout = timeout
        self._reader = ReplyReader()
        self._reader.transport = transport
        transport.set_protocol(self._reader)  # aiosmtplib's protocol hears no more of it

    async def exchange(self, commands: Sequence[Command]) -> Exchange:
        replies: list[Reply] = []
        written = 0
        try:
            if self.pipelining:
                self._reader.write(b"".join(command.line for command in commands))
                written = len(commands)
                for _ in commands:
                    replies.append(await self._reply())
                    if replies[-1].code == 421:
                        break  # the relay is closing: no more replies will come
            else:
                for command in commands:
                    self._reader.write(command.line)
                    written += 1
                    replies.append(reply := await self._reply())
                    if reply.code == 421 or (command.ok and reply.code not in command.ok):
                        break
        except SessionBroken as exc:
            self.abort()
            return Exchange(replies, written, str(exc))
        return Exchange(replies, written, None)

    async def _reply(self) -> Reply:
        try:
            return await asyncio.wait_for(self._reader.next_reply(), self.timeout)
        except asyncio.TimeoutError:
            raise SessionBroken(f"no reply within {self.timeout:g}s") from None

    def write(self, data: bytes) -> None:
        """Write without waiting for a reply (a message's body); SessionBroken if gone."""
        self._reader.write(data)

    async def quit(self, timeout: float = 5) -> None:
        try:
            self._reader.write(b"QUIT\r\n")
            await asyncio.wait_for(self._reader.next_reply(), timeout)
        except (SessionBroken, asyncio.TimeoutError):
            pass
        self.close()

    def close(self) -> None:
        if self._reader.transport is not None:
            self._reader.transport.close()

    def abort(self) -> None:
        if self._reader.transport is not None:
            self._reader.transport.abort()
