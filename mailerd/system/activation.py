"""Socket activation: the control socket handed over by systemd (mailerd.socket).

With packaging/mailerd.socket installed, systemd owns /run/mailerd/control.sock: it
exists from boot, survives daemon restarts (clients that connect while mailerd is
restarting wait in the backlog instead of failing) and starts the daemon on first
use. The daemon gets the listening socket as fd 3 ($LISTEN_FDS, $LISTEN_PID; see
sd_listen_fds(3)). Uses systemd.daemon when installed, else reads the variables.
"""

from __future__ import annotations

import os
import socket

SD_LISTEN_FDS_START = 3

try:
    from systemd import daemon as _sd_daemon
except ImportError:
    _sd_daemon = None


def listen_fds() -> list[int]:
    """The fds passed to this process, and unset the variables (children must not see them)."""
    if _sd_daemon is not None:
        return list(_sd_daemon.listen_fds(unset_environment=True))
    try:
        pid = int(os.environ.get("LISTEN_PID", ""))
        count = int(os.environ.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    finally:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
    if pid != os.getpid() or count < 1:
        return []
    return list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count))


def control_socket() -> socket.socket | None:
    """The inherited listening AF_UNIX stream socket, if systemd passed one."""
    for fd in listen_fds():
        sock = socket.socket(fileno=fd)
        if (sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM
                and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
            os.set_inheritable(fd, False)  # not into the worker processes
            return sock
        sock.detach()
    return None
