"""A blocking client for the daemon's control socket."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from mailerd import wire
from mailerd.schema.control import AnyReply, Error, Reply, Request

DEFAULT_SOCKETS = ("/run/mailerd/control.sock", "state/control.sock")
_REPLIES = wire.Decoder(AnyReply)  # shared by every connection: a decoder keeps no state


class Unreachable(Exception):
    """The daemon's socket cannot be reached (exit code 3)."""


class Refused(Exception):
    """The daemon answered with an error (exit code 1)."""


def socket_path(explicit: str | None) -> str:
    if explicit:
        return explicit
    if os.environ.get("MAILERD_SOCKET"):
        return os.environ["MAILERD_SOCKET"]
    for candidate in DEFAULT_SOCKETS:
        if Path(candidate).exists():
            return candidate
    return DEFAULT_SOCKETS[0]


class Client:
    def __init__(self, path: str, timeout: float | None = 120.0) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as exc:
            self.sock.close()
            raise Unreachable(
                f"cannot connect to {path}: is mailerd running? ({exc.strerror or exc})"
            ) from None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def call(self, request: Request) -> Reply:
        """Send a request and return the reply; an Error reply raises Refused."""
        self.send(request)
        return self.receive()

    def send(self, request: Request) -> None:
        """Send a request without waiting for its reply (see receive)."""
        try:
            self.sock.sendall(wire.pack(request))
        except OSError as exc:
            raise self._lost(exc) from None

    def receive(self) -> Reply:
        """The next reply, in the order the requests were sent; an Error raises Refused."""
        try:
            reply = _REPLIES.decode(wire.recv_frame(self.sock))
        except (OSError, wire.ConnectionClosed, wire.FrameError) as exc:
            raise self._lost(exc) from None
        if isinstance(reply, Error):
            raise Refused(reply.message)
        return reply

    def _lost(self, exc: Exception) -> Unreachable:
        return Unreachable(f"lost the connection to {self.path}: {exc or 'closed'}")
