"""Structured event logging: every log record is an event name plus fields.

`event("sent", campaign=3, recipient="a@example.org", code=250)` becomes the line
`... info sent campaign=3 recipient=a@example.org code=250` on stderr, or, when
systemd connected stderr to the journal, one journald entry with structured fields
(see journald.py). Records go through a bounded queue to a listener thread, so a slow
log sink (journald can block its writers) never stalls the event loop; records that
do not fit are counted and reported as `log_records_dropped`. Fields named like
passwords, secrets, credentials or keys are never logged.

In the text line, fields that hold a moment (`until`, `deadline`, `since`, `*_at`) are
written as ISO 8601 UTC (`until=2026-12-01T12:00:00Z`); journald's structured fields keep
the epoch value. Control characters in values are escaped, so a relay's reply or a list's
value cannot drive the terminal of whoever reads the log.
"""

from __future__ import annotations

import functools
import logging
import logging.handlers
import math
import queue
import re
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Any, NamedTuple

from mailerd.system import journald
from mailerd.system.journald import is_secret

logger = logging.getLogger("mailerd")
_listener: _Listener | None = None
_queue_handler: _DroppingQueueHandler | None = None  # event()'s short way to the listener


def event(what: str, /, level: int = logging.INFO, exc_info: bool = False, **fields: Any) -> None:
    """One event. The record is made here rather than by `logger.log`, whose search of
    the stack for the caller cost a third of an event (and found this function): the
    caller is the frame above, so CODE_FILE/CODE_LINE/CODE_FUNC name the real one.
    With the listener in place (setup_logging) and nothing else on the logger, only the
    event's parts are queued: the listener thread makes the LogRecord, not the caller."""
    if not logger.isEnabledFor(level):
        return
    fields = {key: value for key, value in fields.items() if not is_secret(key)}
    caller = sys._getframe(1)
    code = caller.f_code
    queued = _queue_handler
    if queued is not None and not exc_info and logger.handlers == [queued] and not logger.filters:
        queued.enqueue(_Event(what, level, fields, code.co_filename, caller.f_lineno,
                              code.co_name, time.time()))
        return
    logger.handle(_record(_Event(what, level, fields, code.co_filename, caller.f_lineno,
                                 code.co_name, None), sys.exc_info() if exc_info else None))


class _Event(NamedTuple):
    """An event on its way to the listener, which makes its LogRecord."""

    what: str
    level: int
    fields: dict[str, Any]
    path: str
    line: int
    function: str
    created: float | None  # None: now


def _record(item: _Event, exc_info: Any = None) -> logging.LogRecord:
    record = logger.makeRecord(logger.name, item.level, item.path, item.line, item.what, (),
                               exc_info, item.function, {"fields": item.fields, "event": item.what})
    if item.created is not None:
        record.created = item.created
        record.msecs = (item.created - int(item.created)) * 1000
    return record


def readable(record: logging.LogRecord) -> str:
    """'what key=value ...' (then any traceback): the text of one event, unstamped."""
    fields: dict[str, Any] = getattr(record, "fields", {})
    head, sep, tail = record.getMessage().partition("\n")
    parts = [head] + [f"{key}={_quote(_readable_value(key, value))}"
                      for key, value in fields.items()
                      if value is not None and not is_secret(key)]
    return " ".join(parts) + sep + tail


_MOMENT_FIELD = re.compile(r"^(until|deadline|since|expires)$|_(at|until)$")
_PLAUSIBLE_EPOCH = 946684800  # 2000-01-01: smaller numbers are counts or "not set" (0)


@functools.lru_cache(maxsize=1024)
def _names_moment(key: str) -> bool:
    return bool(_MOMENT_FIELD.search(key))


def _readable_value(key: str, value: Any) -> Any:
    """An epoch time in a field that names a moment, as ISO 8601 UTC; anything else as is."""
    if (_names_moment(key) and isinstance(value, (int, float))
            and not isinstance(value, bool) and math.isfinite(value)
            and value >= _PLAUSIBLE_EPOCH):
        return iso8601(value)
    return value


def iso8601(ts: float) -> str:
    try:
        return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return str(ts)


_NEEDS_QUOTES = re.compile(r'[\s"=\\]|[^\x20-\x7e\xa0-\U0010ffff]')
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_CONTROL = re.compile("[\\\\\"\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape_control(match: re.Match[str]) -> str:
    char = match.group()
    return _ESCAPES.get(char) or f"\\x{ord(char):02x}"


def _quote(value: Any) -> str:
    """A value as one token of the line: quoted when needed, controls escaped (\\x1b)."""
    if type(value) is int:  # the common field (campaign, smtp_code): nothing to look at
        return str(value)
    text = str(value)
    if text == "" or _NEEDS_QUOTES.search(text):
        return '"' + _CONTROL.sub(_escape_control, text) + '"'
    return text


class KeyValueFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._stamp: tuple[int, str] = (-1, "")

    def format(self, record: logging.LogRecord) -> str:
        parts = [self._stamp_of(record.created), record.levelname.lower(), readable(record)]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line

    def _stamp_of(self, created: float) -> str:
        """The local time to the second, made once a second (astimezone is not cheap)."""
        second = int(created)
        if self._stamp[0] != second:
            stamp = datetime.fromtimestamp(second).astimezone().isoformat(timespec="seconds")
            self._stamp = (second, stamp)
        return self._stamp[1]


class _DroppingQueueHandler(logging.handlers.QueueHandler):
    """Never blocks: when the sink is so far behind that the queue holds `maxsize`, count.
    (A SimpleQueue: its put is a C call, where queue.Queue's takes a lock and a Condition.)"""

    def __init__(self, log_queue: queue.SimpleQueue[Any], maxsize: int) -> None:
        super().__init__(log_queue)  # type: ignore[arg-type]
        self.maxsize = maxsize
        self.dropped = 0

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        """As it is: the listener is a thread of this process, so nothing needs copying
        or formatting here, on the event loop's time. A traceback is still rendered now,
        while its frames are current."""
        return super().prepare(record) if record.exc_info else record

    def enqueue(self, record: logging.LogRecord | _Event) -> None:
        if self.queue.qsize() >= self.maxsize - (1 if self.dropped else 0):
            self.dropped += 1
            return
        if self.dropped:
            note = logging.LogRecord(logger.name, logging.WARNING, __file__, 0,
                                     "log_records_dropped", None, None)
            note.fields, note.event = {"count": self.dropped}, "log_records_dropped"
            self.queue.put_nowait(note)
            self.dropped = 0
        self.queue.put_nowait(record)


class _BatchingStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Text lines, written together: whatever the listener found queued goes out in one
    write at its flush, not one write (and flush) per line."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.pending: list[str] = []

    PENDING_MAX = 256  # lines held at most before a write, whoever flushes or not

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.pending.append(self.format(record) + self.terminator)
        except Exception:
            self.handleError(record)
        if len(self.pending) >= self.PENDING_MAX:
            self.flush()

    def flush(self) -> None:
        self.acquire()
        try:
            if self.pending:
                text, self.pending = "".join(self.pending), []
                self.stream.write(text)
            if self.stream and hasattr(self.stream, "flush"):
                self.stream.flush()
        except Exception:
            pass  # a closed or full stream: as StreamHandler, logging must not raise
        finally:
            self.release()


class _Listener:
    """The thread that hands queued records to the handler; it flushes the handler once
    the queue is empty, so lines logged together are written together. It takes each
    record as soon as it is queued, so an outcome's line is out about when its journal
    commit is: a 20 ms pause to gather lines lost the `sent` lines of recipients already
    committed as sent to a SIGKILL (tests/test_systemd.py)."""

    _STOP = None

    def __init__(self, log_queue: queue.SimpleQueue[Any], handler: logging.Handler) -> None:
        self.queue = log_queue
        self.handler = handler
        self.thread = threading.Thread(target=self._serve, name="mailerd-log", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.queue.put(self._STOP)  # blocking put: it must not be dropped
        self.thread.join()

    def _serve(self) -> None:
        while True:
            record = self.queue.get()
            while record is not self._STOP:
                self._handle(record)
                try:
                    record = self.queue.get_nowait()
                except queue.Empty:
                    break
            self.handler.flush()
            if record is self._STOP:
                return

    def _handle(self, record: logging.LogRecord | _Event) -> None:
        if isinstance(record, _Event):
            if record.level < self.handler.level:
                return
            record = _record(record)
        if record.levelno >= self.handler.level:
            self.handler.handle(record)


QUEUE_SIZE = 100_000


def log_handler(stream: Any = None) -> logging.Handler:
    """journald with structured fields when stderr is the journal, else text lines."""
    stream = sys.stderr if stream is None else stream
    if journald.stderr_is_journal(stream) and journald.available():
        return journald.JournaldHandler(message=readable)
    handler = _BatchingStreamHandler(stream)
    handler.setFormatter(KeyValueFormatter())
    return handler


def setup_logging(level: str = "info", handler: logging.Handler | None = None,
                  queue_size: int = QUEUE_SIZE) -> None:
    global _listener, _queue_handler
    handler = handler or log_handler()
    log_queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
    _queue_handler = _DroppingQueueHandler(log_queue, queue_size)
    logger.handlers[:] = [_queue_handler]
    logger.setLevel(level.upper())
    logger.propagate = False
    _listener = _Listener(log_queue, handler)  # type: ignore[arg-type]
    _listener.start()


def stop_logging() -> None:
    global _listener, _queue_handler
    _queue_handler = None
    if _listener is not None:
        _listener.stop()
        _listener = None
