"""What a poller needs of a bounce mailbox, whatever its protocol (imap.py, pop3.py).

A poll opens the mailbox, lists its messages, fetches each, and files one away
(moves or deletes it) only once the journal has committed what it meant; `close`
ends the session (for POP3 that is what makes the deletions happen). `abort`
may be called from another thread and only shuts the socket down, so a thread
blocked in a read returns at once and nothing waits for it.
"""

from __future__ import annotations

import os
import socket
import ssl
from pathlib import Path
from typing import NamedTuple, Protocol

from mailerd.schema.config import MailboxConfig

TIMEOUT = 30.0  # seconds for connect and every command


class MailboxError(Exception):
    """The mailbox cannot be read; the message says why (never the password)."""


class MessageError(MailboxError):
    """One message cannot be fetched, and the session cannot go on after it."""


class Entry(NamedTuple):
    """One message of the mailbox, as listed at the start of a poll."""

    key: str | None  # the same message keeps it across sessions; None: the server has no ids
    label: str  # for the user: "uid 7", "pop3 uidl 00000007..."
    handle: int  # what fetch and file_away take in this session


class Mailbox(Protocol):
    def open(self) -> None: ...
    def entries(self) -> list[Entry]: ...
    def fetch(self, entry: Entry) -> bytes | None: ...
    def file_away(self, entry: Entry) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


def read_password(config: MailboxConfig) -> str:
    path = Path(os.path.expandvars(config.password_file))
    try:
        return path.read_text(encoding="utf-8").strip("\r\n")
    except OSError as exc:
        raise MailboxError(f"cannot read password_file {path}: {exc.strerror or exc}") from None


def tls_context(config: MailboxConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(
        cafile=os.path.expandvars(config.tls_ca_file) if config.tls_ca_file else None)
    if not config.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def where(config: MailboxConfig) -> str:
    return f"{config.host}:{config.port or config.default_port}"


def shut_down(sock: socket.socket | None) -> None:
    """End the connection under a read blocked in another thread (it returns EOF at once).
    Only the socket is shut down: closing the buffered file would wait for that read."""
    if sock is None:
        return
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


def files_problem(config: MailboxConfig) -> str | None:
    """Why the mailbox's password or CA file cannot be used, or None (for a reload)."""
    try:
        read_password(config)
        if config.tls_ca_file:
            tls_context(config)
    except MailboxError as exc:
        return str(exc)
    except (OSError, ssl.SSLError, ValueError) as exc:
        return f"tls_ca_file {config.tls_ca_file}: not a PEM bundle of CA certificates ({exc})"
    return None
