"""One POP3 session with a bounce mailbox (stdlib poplib; blocking, run in a thread).

POP3 has no folders: a message the journal has committed is marked with DELE, and
the server removes the marked ones when the session ends with QUIT (RFC 1939's
UPDATE state). A session that drops before QUIT removes nothing: the next poll
reads those messages again and the journal, which knows each one's SHA-256,
changes nothing twice. Messages are named across sessions by UIDL.
"""

from __future__ import annotations

import poplib
import ssl

from mailerd.bounces.mailbox import (TIMEOUT, Entry, MailboxError, MessageError, read_password,
                                     shut_down, tls_context, where)
from mailerd.schema.config import MailboxConfig

POP3_ERRORS = (OSError, poplib.error_proto, ssl.SSLError)


class Pop3Mailbox:
    def __init__(self, config: MailboxConfig) -> None:
        self.config = config
        self.pop: poplib.POP3 | None = None

    def open(self) -> None:
        config = self.config
        password = read_password(config)
        port = config.port or config.default_port
        try:
            if config.security == "tls":
                pop: poplib.POP3 = poplib.POP3_SSL(config.host, port, context=tls_context(config),
                                                   timeout=TIMEOUT)
            else:
                pop = poplib.POP3(config.host, port, timeout=TIMEOUT)
                self.pop = pop
                if config.security == "starttls":
                    pop.stls(tls_context(config))
            self.pop = pop
            pop.user(config.username)
            pop.pass_(password)
        except POP3_ERRORS as exc:
            if self.pop is not None:
                self.pop.close()
                self.pop = None
            raise MailboxError(f"{where(config)}: {_why(exc)}") from None

    def entries(self) -> list[Entry]:
        pop = self._pop
        try:
            _, listing, _ = pop.uidl()
        except poplib.error_proto:  # no UIDL: numbers only, valid for this session
            _, listing, _ = pop.list()
            return [Entry(None, f"message {number}", number)
                    for number in sorted(int(line.split()[0]) for line in listing)]
        entries = []
        for line in listing:
            number, _, uidl = line.decode("ascii", "replace").partition(" ")
            entries.append(Entry(f"uidl:{uidl}", f"uidl {uidl}", int(number)))
        return sorted(entries, key=lambda e: e.handle)

    def fetch(self, entry: Entry) -> bytes | None:
        """The message's bytes (CRLF line ends, dot-stuffing undone)."""
        try:
            _, lines, _ = self._pop.retr(entry.handle)
        except poplib.error_proto as exc:
            if _server_answer(exc):  # -ERR: the session goes on, this poll does not
                raise MailboxError(f"retr {entry.label}: {_why(exc)}") from None
            # e.g. a line over poplib's 2048 bytes: the rest of the message is unread
            raise MessageError(f"cannot read it over POP3 ({_why(exc)})") from None
        return b"\r\n".join(lines) + b"\r\n"

    def file_away(self, entry: Entry) -> None:
        """Mark it deleted; the server removes it at QUIT (close)."""
        self._pop.dele(entry.handle)

    def close(self) -> None:
        """QUIT: the server now removes the messages marked deleted."""
        if self.pop is None:
            return
        try:
            self.pop.quit()
        except POP3_ERRORS:
            self.pop.close()
        self.pop = None

    def abort(self) -> None:
        if self.pop is not None:
            shut_down(getattr(self.pop, "sock", None))

    @property
    def _pop(self) -> poplib.POP3:
        if self.pop is None:
            raise MailboxError("not connected")
        return self.pop


def _server_answer(exc: poplib.error_proto) -> bytes | None:
    """The server's -ERR line poplib raised with; None for poplib's own complaints."""
    return exc.args[0] if exc.args and isinstance(exc.args[0], bytes) else None


def _why(exc: BaseException) -> str:
    if isinstance(exc, poplib.error_proto) and (answer := _server_answer(exc)) is not None:
        return answer.decode("utf-8", "replace")
    return str(exc) or type(exc).__name__
