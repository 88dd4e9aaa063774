"""One IMAP connection to a bounce mailbox (imaplib; blocking, run in a thread).

Messages are fetched with BODY.PEEK[] (the \\Seen flag is left alone) and are moved
to `done_folder` (MOVE, else COPY + \\Deleted + UID EXPUNGE) or deleted only when
the caller says the journal has what they meant. Only UIDs this connection
handled are expunged where the server has UIDPLUS.

IdleWatch is a second connection that only waits in IDLE (RFC 2177) and tells the
poller when mail arrives. imaplib (before Python 3.14) has no IDLE: it is spoken with
imaplib's public send() and readline(), under a tag imaplib does not use.
"""

from __future__ import annotations

import imaplib
import re
import ssl
import time
from typing import Callable

from mailerd.bounces.mailbox import (TIMEOUT, Entry, MailboxError, read_password, shut_down,
                                     tls_context, where)
from mailerd.schema.config import MailboxConfig

_FETCHED_UID = re.compile(rb"UID (\d+)")
_EXISTS = re.compile(rb"^\* \d+ EXISTS\b", re.IGNORECASE)
IDLE_TAG = b"MDIDLE"


def _quoted(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


class ImapMailbox:
    def __init__(self, config: MailboxConfig) -> None:
        self.config = config
        self.imap: imaplib.IMAP4 | None = None
        self.uidvalidity = 0
        self.capabilities: set[str] = set()
        self._done_folder_ready = False

    def open(self) -> None:
        config = self.config
        password = read_password(config)
        port = config.port or config.default_port
        try:
            if config.security == "tls":
                imap: imaplib.IMAP4 = imaplib.IMAP4_SSL(
                    config.host, port, ssl_context=tls_context(config), timeout=TIMEOUT)
            else:
                imap = imaplib.IMAP4(config.host, port, timeout=TIMEOUT)
                self.imap = imap
                if config.security == "starttls":
                    imap.starttls(tls_context(config))
            self.imap = imap
            imap.login(config.username, password)
            self.capabilities = self._capabilities_after_login(imap)
            self._ok(imap.select(_quoted(config.folder)), f"select {config.folder}")
            self.uidvalidity = int((imap.response("UIDVALIDITY")[1] or [b"0"])[0] or 0)
        except (OSError, imaplib.IMAP4.error, ssl.SSLError) as exc:
            self.drop()
            raise MailboxError(f"{where(config)}: {_why(exc)}") from None

    def entries(self) -> list[Entry]:
        data = self._ok(self._imap.uid("SEARCH", "UNDELETED"), "search")
        uids = sorted(int(u) for u in b" ".join(d for d in data if d).split())
        return [Entry(f"{self.uidvalidity}:{uid}", f"uid {uid}", uid) for uid in uids]

    def fetch(self, entry: Entry) -> bytes | None:
        """The message's bytes; None if it is gone."""
        uid = entry.handle
        data = self._ok(self._imap.uid("FETCH", str(uid), "(BODY.PEEK[])"), f"fetch {uid}")
        for item in data:
            if isinstance(item, tuple) and _FETCHED_UID.search(item[0]):
                return bytes(item[1])
        return None

    def file_away(self, entry: Entry) -> None:
        """Move the message to done_folder, or delete it when there is none."""
        imap, folder, uid = self._imap, self.config.target_folder, str(entry.handle)
        if folder:
            self._ensure_done_folder()
            if "MOVE" in self.capabilities:
                self._ok(imap.uid("MOVE", uid, _quoted(folder)), f"move {uid}")
                return
            self._ok(imap.uid("COPY", uid, _quoted(folder)), f"copy {uid}")
        self._ok(imap.uid("STORE", uid, "+FLAGS.SILENT", r"(\Deleted)"), f"delete {uid}")
        if "UIDPLUS" in self.capabilities:
            self._ok(imap.uid("EXPUNGE", uid), f"expunge {uid}")
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
        """Shut the socket under a command blocked in another thread (shutdown, a reload)."""
        if self.imap is not None:
            shut_down(getattr(self.imap, "sock", None))

    def drop(self) -> None:
        """Close the connection without a word (in the thread that reads it)."""
        if self.imap is not None:
            self.abort()
            try:
                self.imap.shutdown()
            except OSError:
                pass
            self.imap = None

    @staticmethod
    def _capabilities_after_login(imap: imaplib.IMAP4) -> set[str]:
        """Asked again: before login a server lists fewer (Dovecot: no MOVE, no UIDPLUS)."""
        status, data = imap.capability()
        listed = data[-1] if status == "OK" and data and isinstance(data[-1], bytes) else b""
        return {c.upper() for c in listed.decode("ascii", "replace").split()} or {
            c.upper() for c in imap.capabilities}

    def _ensure_done_folder(self) -> None:
        if self._done_folder_ready:
            return
        folder = self.config.target_folder
        status, _ = self._imap.create(_quoted(folder))  # NO: it exists already
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


class IdleNotOffered(MailboxError):
    """The server does not offer IDLE (RFC 2177): the mailbox is polled."""


class IdleWatch:
    """A connection of its own that waits in IDLE and says when new mail arrives.

    `run` blocks (a thread of its own): log in, IDLE, call `on_ready` once the server
    confirmed it (the poller then reads what came before), `on_new_mail` at every
    `* N EXISTS`, and return after `config.idle_renew` so the caller re-issues it on a
    fresh connection, before the server's 30 minutes. The read blocks without a poll
    loop; `abort` (from another thread) ends it at once. Raises MailboxError when the
    connection fails or drops, IdleNotOffered when the server lacks IDLE.
    """

    def __init__(self, config: MailboxConfig, on_ready: Callable[[], None],
                 on_new_mail: Callable[[], None]) -> None:
        self.config = config
        self.on_ready = on_ready
        self.on_new_mail = on_new_mail
        self._mailbox = ImapMailbox(config)
        self._aborted = False

    def run(self) -> None:
        mailbox = self._mailbox
        mailbox.open()
        try:
            if self._aborted or mailbox.imap is None:
                return
            if "IDLE" not in mailbox.capabilities:
                raise IdleNotOffered(f"{where(self.config)}: the server does not offer IDLE")
            self._idle(mailbox.imap)
        except (OSError, imaplib.IMAP4.error, ssl.SSLError) as exc:
            if not self._aborted:
                raise MailboxError(f"{where(self.config)}: idle: {_why(exc)}") from None
        except MailboxError:
            if not self._aborted:
                raise
        finally:
            mailbox.drop()

    def _idle(self, imap: imaplib.IMAP4) -> None:
        deadline = time.monotonic() + self.config.idle_renew
        imap.send(IDLE_TAG + b" IDLE\r\n")
        while not (line := self._line(imap, TIMEOUT)).startswith(b"+"):
            if line.startswith(IDLE_TAG):
                raise MailboxError(f"IDLE refused: {line.decode('utf-8', 'replace').strip()}")
            self._untagged(line)
        self.on_ready()
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self._line(imap, remaining)
            except TimeoutError:
                return  # quiet until the renewal: a fresh connection re-issues it
            self._untagged(line)
        imap.send(b"DONE\r\n")
        while not self._line(imap, TIMEOUT).startswith(IDLE_TAG):
            pass
        imap.logout()

    def _line(self, imap: imaplib.IMAP4, timeout: float) -> bytes:
        imap.sock.settimeout(timeout)
        line = imap.readline()
        if not line:
            raise MailboxError("the server closed the connection" if not self._aborted else "")
        if line.upper().startswith(b"* BYE"):
            raise MailboxError(f"the server ended the session: {line.decode('utf-8', 'replace').strip()}")
        return line

    def _untagged(self, line: bytes) -> None:
        if _EXISTS.match(line):
            self.on_new_mail()

    def abort(self) -> None:
        self._aborted = True
        self._mailbox.abort()


def _why(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.removeprefix("b'").removesuffix("'") if isinstance(exc, imaplib.IMAP4.error) else text
