"""The journal writes nobody waits for, and their replay after a storage failure.

The supervisor records hand-outs, outcomes and requeues without awaiting them.
When such a write fails because the journal cannot be written (a full disk, a
lost mount), the write is kept here, in order, and `error` says why; while it is
set nothing new may be sent (the dispatch looks at it). `retry` replays the
kept writes once storage takes writes again, then calls `on_writable` so that
sending resumes.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any, Callable

from mailerd.journal.committer import Committer, JournalWriteError
from mailerd.system.log import event

Write = tuple[Callable[..., Any], tuple[Any, ...]]


class Outbox:
    def __init__(self, committer: Committer, probe: Callable[[], None],
                 on_writable: Callable[[], None]) -> None:
        self.committer = committer
        self.probe = probe  # a write that changes nothing (Journal.probe_write)
        self.on_writable = on_writable
        self.error: str | None = None  # set while the journal cannot be written
        self.pending: collections.deque[Write] = collections.deque()

    def write(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """A journal write nobody waits for; kept for replay if storage fails."""
        future = self.committer.run(fn, *args)

        def check(done: asyncio.Future[Any]) -> None:
            error = None if done.cancelled() else done.exception()
            if isinstance(error, JournalWriteError):
                self._failed(str(error))
                self.pending.append((fn, args))
            elif error is not None:
                event("journal_error", logging.ERROR, error=str(error))
        future.add_done_callback(check)
        return future

    def _failed(self, error: str) -> None:
        if self.error is None:
            event("journal_unwritable", logging.ERROR, error=error,
                  action="sending stopped until the journal can be written again")
        self.error = error

    async def retry(self) -> None:
        """Once a second while storage is failing: replay the writes that failed, in order."""
        try:
            await self.committer.run(self.probe)
            while self.pending:
                fn, args = self.pending[0]
                await self.committer.run(fn, *args)
                self.pending.popleft()
        except JournalWriteError as exc:
            self.error = str(exc)
            return
        event("journal_writable", pending_replayed=True)
        self.error = None
        self.on_writable()
