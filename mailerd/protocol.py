"""The control protocol spoken between mailerctl and the daemon.

Every request and reply is a tagged msgspec Struct sent as one frame (see wire.py).
A request carries the protocol version; the daemon refuses versions it does not know.
Enqueueing a list is a conversation on one connection: EnqueueBegin, any number of
EnqueueRows chunks (each acknowledged, which gives flow control and progress),
then EnqueueCommit. A connection that closes before the commit discards the campaign.
"""

from __future__ import annotations

from typing import Literal

import msgspec

PROTOCOL_VERSION = 1

RecipientState = Literal[
    "queued", "sending", "data-sent", "sent", "deferred", "failed", "uncertain", "invalid"
]
CampaignState = Literal["loading", "running", "paused", "done", "cancelled"]
COUNTED_STATES: tuple[str, ...] = (
    "queued", "sending", "sent", "deferred", "failed", "uncertain", "invalid",
)


class CampaignSpec(msgspec.Struct, kw_only=True):
    """What a campaign file says, with its body files read in by mailerctl."""

    name: str
    sender: str = msgspec.field(name="from")
    subject: str
    text: str | None = None
    html: str | None = None
    servers: list[str] | None = None
    columns: list[str] = []  # the CSV header, in file order


class Row(msgspec.Struct, array_like=True):
    line: int
    values: list[str]


# ---------------------------------------------------------------- requests


class Request(msgspec.Struct, tag_field="op", tag=True, kw_only=True):
    v: int = PROTOCOL_VERSION


class EnqueueBegin(Request):
    spec: CampaignSpec


class EnqueueRows(Request):
    campaign: int
    rows: list[Row]


class EnqueueCommit(Request):
    campaign: int


class Pause(Request):
    campaign: int


class Resume(Request):
    campaign: int
    include_uncertain: bool = False
    retry_failed: bool = False


class Cancel(Request):
    campaign: int


class Status(Request):
    pass


class Report(Request):
    campaign: int | None = None
    state: str | None = None
    limit: int | None = None


class ListCampaigns(Request):
    pass


class SetPacing(Request):
    server: str
    settings: dict[str, str]


class Plan(Request):
    campaign: int


class DebugFreeze(Request):
    """Debugging only ([daemon] debug_commands = true): block the event loop on purpose,
    so that the watchdog can be seen to restart a hung daemon."""

    seconds: float


AnyRequest = (
    EnqueueBegin | EnqueueRows | EnqueueCommit | Pause | Resume | Cancel | Status | Report
    | ListCampaigns | SetPacing | Plan | DebugFreeze
)

# ---------------------------------------------------------------- replies


class Reply(msgspec.Struct, tag_field="kind", tag=True, kw_only=True):
    pass


class Error(Reply):
    message: str


class Ok(Reply):
    message: str = ""


class Enqueued(Reply):
    campaign: int


class RowsAccepted(Reply):
    rows: int
    invalid: int


class Counts(msgspec.Struct, kw_only=True):
    queued: int = 0
    sending: int = 0
    sent: int = 0
    deferred: int = 0
    failed: int = 0
    uncertain: int = 0
    invalid: int = 0


class RecipientInfo(msgspec.Struct, kw_only=True):
    email: str
    line: int
    state: str
    attempts: int
    code: int | None
    reply: str | None
    updated: float
    server: str | None = None
    dot_at: float | None = None


class CampaignReport(Reply):
    id: int
    name: str
    state: str
    total: int
    counts: Counts
    created: float
    updated: float
    rate: float = 0.0  # messages sent per second over the last minute
    eta: float | None = None  # seconds left at that rate, while running
    recipients: list[RecipientInfo] | None = None


class ServerPlan(msgspec.Struct, kw_only=True):
    server: str
    rate: float  # messages per second expected
    state: str
    reason: str


class CampaignPlan(Reply):
    id: int
    left: int
    seconds: float | None  # None: cannot be estimated (nothing can send)
    finish: float | None
    servers: list[ServerPlan]


class CampaignList(Reply):
    campaigns: list[CampaignReport]


class WorkerInfo(msgspec.Struct, kw_only=True):
    server: str
    slot: int
    pid: int | None
    state: str
    detail: str
    sent: int
    restarts: int


class ServerInfo(msgspec.Struct, kw_only=True):
    name: str
    host: str
    port: int
    connections: int  # configured ceiling
    effective_connections: int
    state: str  # ok | slowed | paused | parked
    reason: str
    until: float | None
    windows: dict[str, int]  # messages sent in the last minute, hour, day
    learned: dict[str, float | int]
    settings: dict[str, str]  # changed at run time with `mailerctl set`
    messages_per_connection: int
    rate: float | None
    sessions_ended: int
    drops: int
    refused: int
    workers: list[WorkerInfo]


class DaemonStatus(Reply):
    version: str
    pid: int
    uptime: float
    state_dir: str
    campaigns: list[CampaignReport]
    servers: list[ServerInfo]


AnyReply = (
    Error | Ok | Enqueued | RowsAccepted | CampaignReport | CampaignList | DaemonStatus
    | CampaignPlan
)
