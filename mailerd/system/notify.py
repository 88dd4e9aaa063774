"""sd_notify: tell the service manager READY, STATUS, WATCHDOG and STOPPING.

Uses `systemd.daemon.notify` (libsystemd's sd_notify) when systemd-python is
installed; otherwise sends the same datagram to $NOTIFY_SOCKET itself (a path,
or an abstract socket written with a leading "@"). Without $NOTIFY_SOCKET every
call is a no-op, so the daemon runs the same outside systemd.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Callable

try:
    from systemd import daemon as _sd_daemon
except ImportError:  # the library is optional at run time: it is only a datagram
    _sd_daemon = None


def enabled() -> bool:
    return bool(os.environ.get("NOTIFY_SOCKET"))


def notify(*assignments: str) -> bool:
    """Send "READY=1", "STATUS=...", ... as one message; True if it was sent."""
    if not enabled() or not assignments:
        return False
    message = "\n".join(assignments)
    if _sd_daemon is not None:
        try:
            return bool(_sd_daemon.notify(message))
        except OSError:
            return False
    return _send_datagram(message)


def _send_datagram(message: str) -> bool:
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        return False  # vsock and other transports: leave them to libsystemd
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode("utf-8", "replace"), address)
        return True
    except OSError:
        return False


def ready(status: str | None = None) -> bool:
    return notify("READY=1", *( [f"STATUS={_one_line(status)}"] if status else []))


def status(text: str) -> bool:
    return notify(f"STATUS={_one_line(text)}")


def stopping(status: str | None = None) -> bool:
    return notify("STOPPING=1", *( [f"STATUS={_one_line(status)}"] if status else []))


def reloading() -> bool:
    return notify("RELOADING=1")


def watchdog() -> bool:
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Half of $WATCHDOG_USEC in seconds when the watchdog is meant for us, else None."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec or not enabled():
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    try:
        seconds = int(usec) / 1_000_000
    except ValueError:
        return None
    return seconds / 2 if seconds > 0 else None


def _one_line(text: str) -> str:
    return " ".join(text.split())


STATUS_EVERY = 2.0  # seconds between checks of the STATUS= line (sent when it changed)


async def keep_informed(status_line: Callable[[], str], changed: asyncio.Event | None = None) -> None:
    """Until cancelled: WATCHDOG=1 at half of $WATCHDOG_USEC, STATUS= when it changes.

    The line is checked every STATUS_EVERY seconds and at once when `changed`
    is set (a campaign started, paused or ended), so a short campaign still shows.
    Runs on the event loop on purpose: a loop that hangs stops the pings, and the
    service manager then kills and restarts the daemon (WatchdogSec=, Restart=).
    """
    if not enabled():
        return
    changed = changed or asyncio.Event()
    interval = watchdog_interval()
    loop = asyncio.get_running_loop()
    next_ping = next_status = loop.time()
    last = None
    while True:
        now = loop.time()
        if interval is not None and now >= next_ping:
            watchdog()
            next_ping = now + interval
        if now >= next_status or changed.is_set():
            changed.clear()
            line = _status_or_error(status_line)
            if line != last:
                status(line)
                last = line
            next_status = now + STATUS_EVERY
        wake = min(next_status, next_ping if interval is not None else next_status)
        try:
            await asyncio.wait_for(changed.wait(), max(0.0, wake - loop.time()))
        except TimeoutError:
            pass


def _status_or_error(status_line: Callable[[], str]) -> str:
    try:
        return status_line()
    except Exception as exc:  # a status bug must not stop the watchdog pings
        return f"status unavailable: {exc!r}"
