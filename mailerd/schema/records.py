"""Rows the journal hands out and takes in, and what pacing stores per server.

Pure data: journal/store.py reads and writes them, the supervisor and the control
commands pass them around. States are those of journal/store.py's state machine.
"""

from __future__ import annotations

from typing import NamedTuple

import msgspec

from mailerd.schema.control import CampaignSpec


class NewRecipient(NamedTuple):
    line: int
    email: str
    key: str | None
    fields: bytes | None
    state: str  # "queued" or "invalid"
    reply: str | None


class Claimed(NamedTuple):
    campaign: int
    line: int
    email: str
    fields: bytes
    attempts: int


class ClaimResult(NamedTuple):
    recipients: list[Claimed]
    cursor: int  # highest queued line looked at
    suppressed: list[tuple[int, int, str]]  # (campaign, line, reason): suppressed since enqueue


class Outcome(NamedTuple):
    campaign: int
    line: int
    state: str  # sent | deferred | failed | uncertain
    code: int | None
    reply: str
    next_at: float | None = None


class Recovery(NamedTuple):
    requeued: int
    uncertain: int
    discarded_campaigns: int


class LostRecipient(NamedTuple):
    """A recipient made `uncertain` because whoever held it is gone after its "." (a dead
    worker, a host taken over): the relay may have the message."""

    campaign: int
    line: int
    email: str
    reply: str  # why it is uncertain, as recorded


class TakeOver(NamedTuple):
    """What taking over one host whose lease expired did (journal/postgres.py)."""

    host: str
    requeued: int  # sending -> queued: the relay discarded the unfinished transaction
    uncertain: list[LostRecipient]  # data-sent -> uncertain


class CampaignRow(NamedTuple):
    id: int
    uid: str
    name: str
    state: str
    spec: CampaignSpec
    total: int
    created: float
    updated: float
    owner_uid: int | None = None  # who enqueued it (None: before journal version 3)


class Learned(msgspec.Struct, kw_only=True):
    """What the relay taught pacing about one account; stored in the journal."""

    connections: int | None = None
    messages_per_connection: int | None = None
    rate: float | None = None  # messages per second
    hourly_quota: int | None = None
    daily_quota: int | None = None
    parked_until: float | None = None
    park_reason: str | None = None
    cooloffs: int = 0  # consecutive quota parks without a known window


# ---------------------------------------------------------------- what comes back (bounces/)


class BounceTarget(NamedTuple):
    """One recipient a mailbox message is about, as bounces/classify.py read it.

    With an authentic VERP tag `confirm` is empty (the tag names the recipient);
    matched by Message-ID alone, the journal applies it only when the recipient's
    address is one of `confirm` (the addresses the report names), since a Message-ID
    is no secret to the recipient who got it."""

    campaign_uid: str
    line: int
    kind: str  # one of schema.control.BOUNCE_KINDS
    status: str | None  # "5.1.1"
    diagnostic: str
    confirm: tuple[str, ...] = ()


class BounceApplied(NamedTuple):
    """What the journal did with one mailbox message."""

    new: bool  # False: this very message was applied before (a re-read after a crash)
    matched: list[tuple[int, str, str]]  # (campaign, address, kind)
    suppressed: list[tuple[str, str]]  # (address, reason)
