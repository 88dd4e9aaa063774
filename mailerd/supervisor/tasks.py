"""The supervisor's background tasks: kept alive while they run, failures logged, cancelled at stop."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Coroutine

from mailerd.system.log import event


class Tasks:
    def __init__(self) -> None:
        self._running: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._running.add(task)
        task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            assert exc is not None
            event("supervisor_task_failed", logging.ERROR, error=repr(exc),
                  exc_info=(type(exc), exc, exc.__traceback__))

    def cancel_all(self) -> None:
        for task in list(self._running):
            task.cancel()
