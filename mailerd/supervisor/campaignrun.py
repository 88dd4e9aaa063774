"""A running campaign's place in the dispatch: its buffer and its read cursor."""

from __future__ import annotations

import collections

from mailerd.schema.records import Claimed
from mailerd.pacing.pacer import forget_before, window_rate
from mailerd.schema.control import CampaignSpec

RATE_WINDOW = 60.0


class CampaignRun:
    def __init__(self, campaign: int, uid: str, spec: CampaignSpec, state: str) -> None:
        self.id = campaign
        self.uid = uid
        self.spec = spec
        self.state = state
        self.servers = set(spec.servers) if spec.servers else None
        self.buffer: collections.deque[Claimed] = collections.deque()
        self.held: set[int] = set()  # lines buffered here or held by a worker
        self.cursor = 0  # queued lines up to here have been claimed
        self.exhausted = False  # the last claim found nothing more
        self.refilling = False
        self.sent_times: collections.deque[float] = collections.deque()
        self.attachments: list[bytes] | None = None  # loaded before the first claim

    def uses(self, server: str) -> bool:
        return self.servers is None or server in self.servers

    def rescan(self) -> None:
        """Something went back to `queued` behind the cursor: read from the start."""
        self.cursor = 0
        self.exhausted = False

    def put_back(self, claimed: Claimed) -> None:
        """A recipient a worker gave back: first in line again while running."""
        if self.state == "running":
            self.buffer.appendleft(claimed)
        else:
            self.held.discard(claimed.line)

    def drop_buffer(self) -> None:
        for claimed in self.buffer:
            self.held.discard(claimed.line)
        self.buffer.clear()

    def note_sent(self, now: float) -> None:
        self.sent_times.append(now)
        forget_before(self.sent_times, now - RATE_WINDOW)

    def rate(self, now: float) -> float:
        """Messages per second over the last minute (0 until there are two)."""
        forget_before(self.sent_times, now - RATE_WINDOW)
        return window_rate(self.sent_times, now, RATE_WINDOW)
