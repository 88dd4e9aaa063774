"""Adding an address to the suppression list through the daemon's control socket.

The daemon commits the entry to its journal before it replies, so a SuppressResult
means the unsubscribe is durable. The request is idempotent: an address already
listed keeps its first entry and the reply says added=0. Anything short of that
reply is DaemonUnavailable, and the endpoint must not claim success.
"""

from __future__ import annotations

import asyncio

from mailerd import wire
from mailerd.schema.control import AnyReply, Error, SuppressAdd, SuppressResult

REASON = "unsubscribed"
_REPLIES = wire.Decoder(AnyReply)


class DaemonUnavailable(Exception):
    """The daemon could not be reached, did not answer in time, or refused the request."""


class Suppressor:
    """Suppression requests to the daemon at `socket_path`, at most `parallel` at a time
    (the daemon caps its control connections; a burst of clicks waits here instead)."""

    def __init__(self, socket_path: str, timeout: float = 10.0, parallel: int = 4) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._slots = asyncio.Semaphore(parallel)

    async def unsubscribe(self, address: str, detail: str) -> bool:
        """Put `address` on the suppression list (reason `unsubscribed`), durably.
        True if it is new there, False if it was listed already."""
        request = SuppressAdd(emails=[address], reason=REASON, detail=detail)
        async with self._slots:
            try:
                reply = await asyncio.wait_for(self._call(request), self.timeout)
            except TimeoutError:
                raise DaemonUnavailable(f"no reply from {self.socket_path} within "
                                        f"{self.timeout:g} s") from None
        if isinstance(reply, Error):
            raise DaemonUnavailable(f"the daemon refused: {reply.message}")
        if not isinstance(reply, SuppressResult) or reply.invalid:
            raise DaemonUnavailable(f"unexpected reply: {reply!r}")
        return reply.added > 0

    async def _call(self, request: SuppressAdd) -> object:
        try:
            reader, writer = await asyncio.open_unix_connection(self.socket_path)
        except OSError as exc:
            raise DaemonUnavailable(f"cannot connect to {self.socket_path}: "
                                    f"{exc.strerror or exc}") from None
        try:
            writer.write(wire.pack_within(request))
            await writer.drain()
            return _REPLIES.decode(await wire.read_frame(reader))
        except (OSError, wire.ConnectionClosed, wire.FrameError) as exc:
            raise DaemonUnavailable(f"lost the connection to {self.socket_path}: "
                                    f"{exc or 'closed'}") from None
        finally:
            writer.close()
