"""A relay that misbehaves at the protocol level: huge or endless replies, silence.

aiosmtpd is too well-behaved for these, so this is a few lines of raw asyncio on
127.0.0.1. Every mode is bounded: an endless reply stops after `limit` bytes or
when the client goes away.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Literal

Mode = Literal["silent_greeting", "huge_reply", "endless_reply", "silent_after_dot"]


class HostileRelay:
    def __init__(self, mode: Mode, limit: int = 64 * 1024 * 1024) -> None:
        self.mode = mode
        self.limit = limit
        self.port = 0
        self.dots = 0  # messages whose final "." arrived
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def __enter__(self) -> "HostileRelay":
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        future.result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            await self._converse(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "silent_greeting":
            await reader.read()  # say nothing, ever; wait for the client to give up
            return
        writer.write(b"220 hostile.test ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"MAIL" and self.mode in ("huge_reply", "endless_reply"):
                await self._flood(writer)
                return
            if verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                await self._read_body(reader)
                self.dots += 1
                if self.mode == "silent_after_dot":
                    await reader.read()  # took the message, never answers
                    return
                writer.write(b"250 ok\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                return
            else:
                writer.write(b"250-hostile.test\r\n250 8BITMIME\r\n" if verb == b"EHLO"
                             else b"250 ok\r\n")
            await writer.drain()

    @staticmethod
    async def _read_body(reader: asyncio.StreamReader) -> None:
        while (await reader.readline()) not in (b".\r\n", b""):
            pass

    async def _flood(self, writer: asyncio.StreamWriter) -> None:
        if self.mode == "huge_reply":
            writer.write(b"250 " + b"x" * (8 * 1024 * 1024) + b"\r\n")
            await writer.drain()
            return
        sent = 0
        chunk = b"250-" + b"y" * 1000 + b"\r\n"
        while sent < self.limit:
            writer.write(chunk * 64)
            sent += len(chunk) * 64
            await writer.drain()
