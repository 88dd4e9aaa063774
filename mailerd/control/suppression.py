"""The global suppression list: `mailerctl suppress add|remove|list|import`.

Entries are keyed by addresses.suppression_key (the whole address casefolded);
the reason is `unsubscribed`, `bounced` or `manual`. Addresses on the list are
recorded as `suppressed` at enqueue (enqueue.py); a recipient still waiting when
its address is added is skipped when its turn comes (journal.claim), or at once
when it is already in the supervisor's dispatch buffer (Supervisor.drop_suppressed,
called from here). A permanent failure whose reply matches `[suppression]
bounce_patterns` adds the address with reason `bounced`, in the journal operation
that records the failure.
"""

from __future__ import annotations

from typing import Callable

from mailerd.journal.committer import Committer
from mailerd.journal.backend import JournalStore
from mailerd.message.addresses import check_address, suppression_key
from mailerd.schema.control import (
    SUPPRESSION_REASONS,
    Error,
    Reply,
    SuppressAdd,
    SuppressionEntry,
    SuppressionPage,
    SuppressList,
    SuppressRemove,
    SuppressResult,
)

MAX_PAGE = 10_000


class SuppressionList:
    """The suppression requests. The supervisor owns the dispatch buffers:
    `drop_suppressed(keys)` takes recipients with those suppression keys out of them
    and returns their (campaign, line)."""

    def __init__(self, journal: JournalStore, committer: Committer,
                 drop_suppressed: Callable[[set[str]], list[tuple[int, int]]]) -> None:
        self.journal = journal
        self.committer = committer
        self.drop_suppressed = drop_suppressed

    async def add(self, request: SuppressAdd) -> Reply:
        if request.reason not in SUPPRESSION_REASONS:
            return Error(message=f"reason {request.reason!r}: use one of {', '.join(SUPPRESSION_REASONS)}")
        entries: dict[str, tuple[str, str, str, str | None]] = {}
        invalid: list[str] = []
        for raw in request.emails:
            check = check_address(raw)
            if not check.ok:
                invalid.append(f"{raw.strip()!r}: {check.reason}")
                continue
            key = check.key.casefold()
            entries.setdefault(key, (key, check.address, request.reason, request.detail))
        added = await self.committer.run(self.journal.add_suppressions, list(entries.values()))
        if entries:
            await self.skip_buffered(set(entries), request.reason)
        return SuppressResult(added=added, invalid=len(invalid), examples=invalid[:5])

    async def skip_buffered(self, keys: set[str], reason: str) -> int:
        """Take newly suppressed recipients out of the dispatch buffers and record them.

        Runs after the suppression committed: every later claim leaves them out, and a
        claim that ran before it has put its rows in the buffer by now (its result was
        delivered first), so nothing suppressed can still be handed to a worker.
        """
        dropped = self.drop_suppressed(keys)
        if not dropped:
            return 0
        items = [(campaign, line, reason) for campaign, line in dropped]
        return await self.committer.run(self.journal.mark_suppressed, items)

    async def remove(self, request: SuppressRemove) -> Reply:
        keys = {suppression_key(raw) or raw.strip().casefold() for raw in request.emails}
        removed = await self.committer.run(self.journal.remove_suppressions, sorted(keys))
        return SuppressResult(removed=removed)

    async def listing(self, request: SuppressList) -> Reply:
        limit = max(1, min(request.limit, MAX_PAGE))
        rows, total = await self.committer.read(self.journal.list_suppressions,
                                                request.after, limit)
        return SuppressionPage(
            entries=[SuppressionEntry(email=r[0], key=r[1], reason=r[2], added=r[3], detail=r[4])
                     for r in rows],
            total=total,
        )
