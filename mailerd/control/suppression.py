"""The global suppression list: `mailerctl suppress add|remove|list|import`.

Entries are keyed by addresses.suppression_key (the whole address casefolded);
the reason is `unsubscribed`, `bounced` or `manual`. Addresses on the list are
recorded as `suppressed` at enqueue (enqueue.py); a recipient still waiting when
its address is added is skipped when its turn comes (journal.claim), or at once
when it is already in the supervisor's dispatch buffer (here). A permanent failure
whose reply matches `[suppression] bounce_patterns` adds the address with reason
`bounced`, in the journal operation that records the failure (journal/store.py
bounce_rule).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from mailerd.control.commands import Commands

MAX_PAGE = 10_000


async def add(commands: "Commands", request: SuppressAdd) -> Reply:
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
    added = await commands.committer.run(commands.journal.add_suppressions, list(entries.values()))
    if entries:
        await _skip_buffered(commands, set(entries), request.reason)
    return SuppressResult(added=added, invalid=len(invalid), examples=invalid[:5])


async def _skip_buffered(commands: "Commands", keys: set[str], reason: str) -> int:
    """Take newly suppressed recipients out of the dispatch buffers and record them.

    Runs after the suppression committed: every later claim leaves them out, and a
    claim that ran before it has put its rows in the buffer by now (its result was
    delivered first), so nothing suppressed can still be handed to a worker.
    """
    items: list[tuple[int, int, str]] = []
    for run in list(commands.supervisor.campaigns.values()):
        keep = []
        for claimed in run.buffer:
            if suppression_key(claimed.email) in keys:
                run.held.discard(claimed.line)
                items.append((claimed.campaign, claimed.line, reason))
            else:
                keep.append(claimed)
        if len(keep) != len(run.buffer):
            run.buffer.clear()
            run.buffer.extend(keep)
    if not items:
        return 0
    return await commands.committer.run(commands.journal.mark_suppressed, items)


async def remove(commands: "Commands", request: SuppressRemove) -> Reply:
    keys = {suppression_key(raw) or raw.strip().casefold() for raw in request.emails}
    removed = await commands.committer.run(commands.journal.remove_suppressions, sorted(keys))
    return SuppressResult(removed=removed)


async def listing(commands: "Commands", request: SuppressList) -> Reply:
    limit = max(1, min(request.limit, MAX_PAGE))
    rows, total = await commands.committer.read(commands.journal.list_suppressions,
                                                request.after, limit)
    return SuppressionPage(
        entries=[SuppressionEntry(email=r[0], key=r[1], reason=r[2], added=r[3], detail=r[4])
                 for r in rows],
        total=total,
    )
