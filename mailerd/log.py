"""Structured event logging: every log record is an event name plus fields.

`event("sent", campaign=3, recipient="a@example.org", code=250)` becomes the line
`... info sent campaign=3 recipient=a@example.org code=250` on stderr. Records go
through a queue to a listener thread, so a slow log sink never stalls the event loop.
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
import sys
import time
from typing import Any

logger = logging.getLogger("mailerd")
_listener: logging.handlers.QueueListener | None = None


def event(what: str, /, level: int = logging.INFO, exc_info: bool = False, **fields: Any) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, what, exc_info=exc_info, extra={"fields": fields})


def _quote(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        parts = [stamp, record.levelname.lower(), record.getMessage()]
        parts += [f"{key}={_quote(value)}" for key, value in fields.items() if value is not None]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(level: str = "info") -> None:
    global _listener
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    log_queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    logger.handlers[:] = [logging.handlers.QueueHandler(log_queue)]
    logger.setLevel(level.upper())
    logger.propagate = False
    _listener = logging.handlers.QueueListener(log_queue, handler)
    _listener.start()


def stop_logging() -> None:
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None
