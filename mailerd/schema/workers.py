"""Messages between the supervisor and its worker processes (framed as in wire.py).

The supervisor hands out Jobs; a worker renders and sends each over its one SMTP
session. Before writing the final "." it sends DotRequest and waits for DotAck,
which the supervisor sends only once the journal has durably recorded the
recipient as `data-sent`. Every Job ends with exactly one Done, or comes back in
Released when the worker gives it up unstarted.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from mailerd.schema.config import DeliveryConfig, ServerConfig
from mailerd.schema.control import CampaignSpec, DkimKey

Result = Literal["sent", "deferred", "failed", "uncertain", "requeue"]

REPLY_MAX = 1000
"""Characters of a relay's reply a worker passes on (Done, SessionEnded): what the journal
keeps of it. Replies may be 32 KiB; the first thousand characters say all that matters."""


class ToWorker(msgspec.Struct, tag_field="t", tag=True, array_like=True):
    pass


class Setup(ToWorker):
    server: ServerConfig
    delivery: DeliveryConfig
    password: str | None
    unsubscribe_key: bytes = b""  # state dir's unsubscribe.key: {{ token }} (tokens.py)
    dkim: DkimKey | None = None  # this server's DKIM key, if it has one


class CampaignAttachment(ToWorker):
    """Bytes of spec.attachments[index], in chunks, sent before its CampaignTemplate
    (none for an empty attachment)."""

    campaign: int
    index: int
    chunk: bytes


class CampaignTemplate(ToWorker):
    campaign: int
    uid: str
    spec: CampaignSpec


class Job(ToWorker):
    campaign: int
    line: int
    email: str
    fields: msgspec.Raw


class DotAck(ToWorker):
    campaign: int
    line: int
    ok: bool


class Revoke(ToWorker):
    """Give back every job of this campaign that has not started."""

    campaign: int


class Limits(ToWorker):
    """Session limits in force for this server (set, learned, or changed live)."""

    messages_per_connection: int
    idle_timeout: float


class Hold(ToWorker):
    """Give back every unstarted job and close the session once idle (parked or surplus)."""


class Stop(ToWorker):
    """Finish the transaction in progress, give back the rest, QUIT and exit."""


class FromWorker(msgspec.Struct, tag_field="t", tag=True, array_like=True):
    pass


class SessionState(FromWorker):
    state: str  # connecting | ready | idle | sending | backoff | closed
    detail: str
    connected: bool
    until: float | None = None


class SessionEnded(FromWorker):
    """A session is over: closed by us (rotation, idle, hold) or lost (`dropped`)."""

    messages: int  # messages the relay accepted on it
    dropped: bool
    stage: str  # connect | mail | rcpt | data | dot | idle
    code: int | None
    reply: str


class DotRequest(FromWorker):
    campaign: int
    line: int


class Done(FromWorker):
    campaign: int
    line: int
    result: Result
    code: int | None
    reply: str
    stage: str = ""  # the command the reply answered: connect | mail | rcpt | data | dot ("": none)


class Released(FromWorker):
    jobs: list[tuple[int, int]]


AnyToWorker = Setup | CampaignAttachment | CampaignTemplate | Job | DotAck | Revoke | Limits | Hold | Stop
AnyFromWorker = SessionState | SessionEnded | DotRequest | Done | Released
