"""A blocking client for the daemon's control socket.

Which socket: `--socket`, else $MAILERD_SOCKET, else the system path; never a path
relative to the current directory chosen behind the user's back. Whose socket: the
campaign (with its DKIM key) and the whole list go to whoever listens there, so the
socket file and the process listening on it (SO_PEERCRED) must belong to root, to the
caller, or to the daemon's account (`mailerd`, or $MAILERD_USER); anything else is an
impostor and gets nothing.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import socket
import stat
import struct

from mailerd import wire
from mailerd.schema.control import AnyReply, Error, Reply, Request

SYSTEM_SOCKET = "/run/mailerd/control.sock"
DAEMON_USER = "mailerd"  # the account packaging/mailerd.sysusers.conf creates
_REPLIES = wire.Decoder(AnyReply)  # shared by every connection: a decoder keeps no state
_UCRED = struct.Struct("3i")  # pid, uid, gid


class Unreachable(Exception):
    """The daemon's socket cannot be reached (exit code 3)."""


class Untrusted(Unreachable):
    """The socket, or the process behind it, belongs to someone who is not the daemon."""


class PermissionDenied(Unreachable):
    """The caller may not open the socket: waiting will not help."""


class Refused(Exception):
    """The daemon answered with an error (exit code 1)."""


def socket_path(explicit: str | None) -> str:
    return explicit or os.environ.get("MAILERD_SOCKET") or SYSTEM_SOCKET


def daemon_user() -> str:
    return os.environ.get("MAILERD_USER") or DAEMON_USER


def trusted_uids() -> set[int]:
    """root, the caller, and the daemon's account if it exists on this machine."""
    uids = {0, os.geteuid()}
    try:
        uids.add(pwd.getpwnam(daemon_user()).pw_uid)
    except KeyError:
        pass
    return uids


def user_name(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def untrusted(path: str, what: str, uid: int) -> Untrusted:
    return Untrusted(
        f"refusing {path}: {what} {user_name(uid)}, not root, you, or the daemon's user "
        f"({daemon_user()}); it may be an impostor. Use the daemon's socket (--socket or "
        f"MAILERD_SOCKET), or set MAILERD_USER if mailerd runs under another account")


def permission_denied(path: str) -> PermissionDenied:
    """EACCES on the socket or its directory: the caller is not in the socket's group."""
    group = None
    for candidate in (path, os.path.dirname(os.path.abspath(path))):
        try:
            group = group_name(os.stat(candidate).st_gid)
            break
        except OSError:
            continue
    group = group or "of the daemon's socket"
    return PermissionDenied(
        f"permission denied: cannot open {path}: only root, the daemon's user and members of "
        f"group {group} may (after `usermod -aG {group} USER`, log in again)")


def check_socket_file(path: str) -> None:
    """Before connecting: the path must be a socket owned by a trusted account."""
    try:
        st = os.stat(path)
    except PermissionError:
        raise permission_denied(path) from None
    except OSError as exc:
        raise Unreachable(
            f"cannot connect to {path}: is mailerd running? ({exc.strerror or exc})") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise Unreachable(f"cannot connect to {path}: not a socket")
    if st.st_uid not in trusted_uids():
        raise untrusted(path, "the socket belongs to", st.st_uid)


def check_peer(sock: socket.socket, path: str) -> None:
    """After connecting, before sending: the listening process must be trusted too
    (this also closes the gap between the file check and connect)."""
    _pid, uid, _gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    if uid not in trusted_uids():
        raise untrusted(path, "the socket is served by", uid)


class Client:
    def __init__(self, path: str, timeout: float | None = 120.0) -> None:
        self.path = path
        check_socket_file(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
            check_peer(self.sock, path)
        except OSError as exc:
            self.sock.close()
            if exc.errno == errno.EACCES:
                raise permission_denied(path) from None
            raise Unreachable(
                f"cannot connect to {path}: is mailerd running? ({exc.strerror or exc})"
            ) from None
        except Untrusted:
            self.sock.close()
            raise

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
        """Send a request without waiting for its reply (see receive). A request the
        daemon would refuse as too large raises wire.FrameTooLarge; nothing is sent."""
        frame = wire.pack_within(request)
        try:
            self.sock.sendall(frame)
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
