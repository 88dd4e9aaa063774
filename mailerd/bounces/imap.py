"""One IMAP connection to a bounce mailbox (imaplib; blocking, run in a thread).

Messages are fetched with BODY.PEEK[] (the \\Seen flag is left alone) and are moved
to `done_folder` (MOVE, else COPY + \\Deleted + UID EXPUNGE) or deleted only when
the caller says the journal has what they meant. Only UIDs this connection
handled are expunged where the server has UIDPLUS.
"""

from __future__ import annotations

import imaplib
import os
import re
import ssl
from pathlib import Path

from mailerd.schema.config import MailboxConfig

TIMEOUT = 30.0  # seconds for connect and every command
_FETCHED_UID = re.compile(rb"UID (\d+)")


class MailboxError(Exception):
    """The mailbox cannot be read; the message says why (never the password)."""


def read_password(config: MailboxConfig) -> str:
    path = Path(os.path.expandvars(config.password_file))
    try:
        return path.read_text(encoding="utf-8").strip("\r\n")
    except OSError as exc:
        raise MailboxError(f"cannot read password_file {path}: {exc.strerror or exc}") from None


def _quoted(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _tls_context(config: MailboxConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(
        cafile=os.path.expandvars(config.tls_ca_file) if config.tls_ca_file else None)
    if not config.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class ImapMailbox:
    def __init__(self, config: MailboxConfig) -> None:
        self.config = config
        self.imap: imaplib.IMAP4 | None = None
        self.uidvalidity = 0
        self._capabilities: set[str] = set()
        self._done_folder_ready = False

    def open(self) -> None:
        config = self.config
        password = read_password(config)
        try:
            if config.security == "tls":
                imap: imaplib.IMAP4 = imaplib.IMAP4_SSL(
                    config.host, config.port or 993, ssl_context=_tls_context(config), timeout=TIMEOUT)
            else:
                imap = imaplib.IMAP4(config.host, config.port or 143, timeout=TIMEOUT)
                if config.security == "starttls":
                    imap.starttls(_tls_context(config))
            self.imap = imap
            imap.login(config.username, password)
            self._capabilities = {c.upper() for c in imap.capabilities}
            self._ok(imap.select(_quoted(config.folder)), f"select {config.folder}")
            self.uidvalidity = int((imap.response("UIDVALIDITY")[1] or [b"0"])[0] or 0)
        except (OSError, imaplib.IMAP4.error, ssl.SSLError) as exc:
            self.abort()
            raise MailboxError(f"{config.host}:{config.port or ''}: {_why(exc)}") from None

    def uids(self) -> list[int]:
        data = self._ok(self._imap.uid("SEARCH", "UNDELETED"), "search")
        return sorted(int(u) for u in b" ".join(d for d in data if d).split())

    def fetch(self, uid: int) -> bytes | None:
        """The message's bytes; None if it is gone."""
        data = self._ok(self._imap.uid("FETCH", str(uid), "(BODY.PEEK[])"), f"fetch {uid}")
        for item in data:
            if isinstance(item, tuple) and _FETCHED_UID.search(item[0]):
                return bytes(item[1])
        return None

    def file_away(self, uid: int) -> None:
        """Move the message to done_folder, or delete it when there is none."""
        imap, folder = self._imap, self.config.done_folder
        if folder:
            self._ensure_done_folder()
            if "MOVE" in self._capabilities:
                self._ok(imap.uid("MOVE", str(uid), _quoted(folder)), f"move {uid}")
                return
            self._ok(imap.uid("COPY", str(uid), _quoted(folder)), f"copy {uid}")
        self._ok(imap.uid("STORE", str(uid), "+FLAGS.SILENT", r"(\Deleted)"), f"delete {uid}")
        if "UIDPLUS" in self._capabilities:
            self._ok(imap.uid("EXPUNGE", str(uid)), f"expunge {uid}")
        else:
            self._ok(imap.expunge(), "expunge")

    def close(self) -> None:
        if self.imap is None:
            return
        try:
            self.imap.logout()
        except (OSError, imaplib.IMAP4.error):
            pass
        self.imap = None

    def abort(self) -> None:
        """Close the socket under a command blocked in another thread (at shutdown)."""
        if self.imap is not None:
            try:
                self.imap.shutdown()
            except OSError:
                pass

    def _ensure_done_folder(self) -> None:
        if self._done_folder_ready:
            return
        assert self.config.done_folder
        status, _ = self._imap.create(_quoted(self.config.done_folder))  # NO: it exists already
        self._done_folder_ready = status in ("OK", "NO")

    @property
    def _imap(self) -> imaplib.IMAP4:
        if self.imap is None:
            raise MailboxError("not connected")
        return self.imap

    def _ok(self, answer: tuple[str, list], what: str) -> list:
        status, data = answer
        if status != "OK":
            text = b" ".join(d for d in data if isinstance(d, bytes)).decode("utf-8", "replace")
            raise MailboxError(f"{what}: the server answered {status} {text}".strip())
        return data


def _why(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.removeprefix("b'").removesuffix("'") if isinstance(exc, imaplib.IMAP4.error) else text
