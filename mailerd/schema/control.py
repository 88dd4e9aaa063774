"""The control protocol spoken between mailerctl and the daemon.

Every request and reply is a tagged msgspec Struct sent as one frame (see wire.py).
A request carries the protocol version; the daemon refuses versions it does not know.
Enqueueing a list is a conversation on one connection: EnqueueBegin, any number of
EnqueueRows chunks (each acknowledged, which gives flow control and progress),
then EnqueueCommit. A connection that closes before the commit discards the campaign.
"""

from __future__ import annotations


import msgspec

PROTOCOL_VERSION = 1

COUNTED_STATES: tuple[str, ...] = (
    "queued", "sending", "sent", "deferred", "failed", "uncertain", "invalid", "suppressed",
)
SUPPRESSION_REASONS: tuple[str, ...] = ("unsubscribed", "bounced", "complained", "manual")
# What came back for a sent recipient (bounces/classify.py); `report --state` takes the first two
BOUNCE_STATES: tuple[str, ...] = ("bounced", "complained")
BOUNCE_KINDS: tuple[str, ...] = ("hard", "soft", "complaint", "auto-reply", "unknown")


def email_column_index(columns: list[str]) -> int | None:
    """Where a list's `email` column is (the first, case-insensitive), or None."""
    lowered = [c.strip().lower() for c in columns]
    return lowered.index("email") if "email" in lowered else None


def merge_field_names(columns: list[str]) -> list[str]:
    """Every column but the email column: the merge fields, in the order rows store them."""
    index = email_column_index(columns)
    return [c for i, c in enumerate(columns) if i != index]


class ListUnsubscribe(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """List-Unsubscribe targets (templates: `{{ token }}`, `{{ email }}`, columns)."""

    mailto: str | None = None
    url: str | None = None  # https://...; also gives List-Unsubscribe-Post (RFC 8058)


class DkimBase(msgspec.Struct, kw_only=True):
    """A campaign's DKIM signing identity, as its file and the wire both give it."""

    domain: str
    selector: str


class DkimKey(DkimBase):
    """A campaign's DKIM signing key, read from its key_file by mailerctl."""

    key: str  # PEM (RSA or Ed25519) or a base64 Ed25519 seed; never logged

    def __repr__(self) -> str:
        return f"DkimKey(domain={self.domain!r}, selector={self.selector!r}, key=<hidden>)"


class AttachmentInfo(msgspec.Struct, kw_only=True):
    """An attachment's description; its bytes follow as EnqueueAttachment chunks."""

    name: str
    content_type: str
    size: int


class CampaignBase(msgspec.Struct, kw_only=True):
    """The fields a campaign file and a CampaignSpec share, under the same names.

    `text` and `html` are the bodies' file paths in a campaign file (mailerctl's
    CampaignFile) and the bodies themselves in a CampaignSpec."""

    name: str
    sender: str = msgspec.field(name="from")
    subject: str
    text: str | None = None
    html: str | None = None
    servers: list[str] | None = None
    reply_to: str | None = None
    headers: dict[str, str] = {}  # extra headers; values are templates
    list_unsubscribe: ListUnsubscribe | None = None
    # VERP envelope sender, e.g. "bounces+{{ tag }}@example.org" (message/verp.py);
    # None: the server's return_path, else the From address
    return_path: str | None = None


class CampaignSpec(CampaignBase):
    """What a campaign file says, with its body, key and attachment files read in by
    mailerctl (the daemon never opens a path a client names)."""

    columns: list[str] = []  # the CSV header, in file order
    dkim: DkimKey | None = None
    attachments: list[AttachmentInfo] = []  # their bytes follow as EnqueueAttachment chunks


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
    # rows whose merge values would make an unsafe message (a header they would
    # break, a control character) are kept as invalid instead of refusing the campaign
    skip_unsafe: bool = False


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
    """`mailerctl set`: KEY=VALUE settings; or, with `reset`, drop run-time settings (the
    named `keys`, or all when none is named) back to the config file's values."""

    server: str
    settings: dict[str, str]
    reset: bool = False
    keys: list[str] = []


class Plan(Request):
    campaign: int


class Settle(Request):
    """Uncertain recipients, after checking the relay's log: mark sent, or send again."""

    campaign: int
    as_sent: bool
    emails: list[str] = []


class DebugFreeze(Request):
    """Debugging only ([daemon] debug_commands = true): block the event loop on purpose,
    so that the watchdog can be seen to restart a hung daemon."""

    seconds: float


class EnqueueAttachment(Request):
    """Bytes of spec.attachments[index], in order, between EnqueueBegin and EnqueueCommit
    (chunks keep frames under wire.MAX_FRAME). Stored once per campaign."""

    campaign: int
    index: int
    chunk: bytes
    last: bool = False


class SuppressAdd(Request):
    emails: list[str]
    reason: str = "manual"  # one of SUPPRESSION_REASONS
    detail: str | None = None


class SuppressRemove(Request):
    emails: list[str]


class SuppressList(Request):
    after: str = ""  # paging: entries whose key sorts after this
    limit: int = 1000


class TestSend(Request):
    """Render one message from `spec` for `to` and send it through the first server,
    outside any campaign (nothing is journaled)."""

    spec: CampaignSpec
    to: str
    fields: dict[str, str] = {}
    attachments: list[bytes] = []  # the bytes of spec.attachments, in order


class ExportRecipients(Request):
    """One page of a campaign's recipients, in line order (for `report --csv`)."""

    campaign: int | None = None
    state: str | None = None
    after_line: int = 0
    limit: int = 5000


class Explain(Request):
    """How mailerd would read a relay's reply (`mailerctl explain`)."""

    reply: str  # with its code: "450 4.7.1 Error: too much mail from 192.0.2.1"
    stage: str | None = None  # connect | mail | rcpt | data | dot; None: every stage


class Bounces(Request):
    """What came back (`mailerctl bounces [ID]`): every campaign's, or one's."""

    campaign: int | None = None
    limit: int = 10_000


AnyRequest = (
    EnqueueBegin | EnqueueRows | EnqueueCommit | Pause | Resume | Cancel | Status | Report
    | ListCampaigns | SetPacing | Plan | Settle | DebugFreeze
    | EnqueueAttachment | SuppressAdd | SuppressRemove | SuppressList | TestSend | ExportRecipients
    | Explain | Bounces
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
    unsafe: int = 0  # of the invalid: rows with unsafe merge values (EnqueueRows.skip_unsafe)


class Counts(msgspec.Struct, kw_only=True):
    queued: int = 0
    sending: int = 0
    sent: int = 0
    deferred: int = 0
    failed: int = 0
    uncertain: int = 0
    invalid: int = 0
    suppressed: int = 0
    # of those `sent`: a bounce or a complaint came back later (bounces/; they stay `sent`)
    bounced: int = 0
    complained: int = 0

    @property
    def left(self) -> int:
        """Recipients still to send: queued, sending or deferred."""
        return self.queued + self.sending + self.deferred


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
    message_id: str | None = None


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
    state: str  # ok | slowed | paused | parked | broken
    reason: str
    until: float | None
    windows: dict[str, int]  # 250s after the "." in the last minute, hour, day (since the daemon started)
    learned: dict[str, float | int]
    settings: dict[str, str]  # changed at run time with `mailerctl set`
    messages_per_connection: int
    rate: float | None  # this host's part of the account's rate
    sessions_ended: int
    drops: int
    refused: int
    workers: list[WorkerInfo]
    broken: str | None = None  # why its workers are no longer respawned (until set or reload)
    account_rate: float | None = None  # the account's, shared by the hosts sending through it
    hosts: int = 1  # the hosts whose parts `rate` is one of (several hosts on PostgreSQL)


class HostInfo(msgspec.Struct, kw_only=True):
    """One daemon sharing the journal (one on SQLite; every host on PostgreSQL)."""

    host: str
    generation: int  # bumped at each start and at each takeover (which fences the old one)
    renewed_at: float  # when it last renewed its lease (the database's clock)
    sessions: int  # relay session slots it holds
    alive: bool  # renewed within the lease, and not taken over


class MailboxInfo(msgspec.Struct, kw_only=True):
    """One bounce mailbox, as its poller last saw it (bounces/intake.py)."""

    name: str
    last_poll: float | None  # when a poll last finished
    last_error: str | None  # why the last poll failed; None: it worked
    read: int  # messages applied since the daemon started
    left: list[str]  # messages left in the mailbox: they could not be read (why, which)
    protocol: str = "imap"  # "imap" | "pop3"
    # its IDLE connection: "off" (POP3, or idle = false: polled), "connecting", "on" (new
    # mail is read at once), "not offered" (polled), "failing" (reconnecting; polled meanwhile)
    idle: str = "off"
    idle_since: float | None = None  # when it entered that state
    idle_error: str | None = None  # why not "on"


class DaemonStatus(Reply):
    version: str
    pid: int
    uptime: float
    state_dir: str
    campaigns: list[CampaignReport]
    servers: list[ServerInfo]
    journal_error: str | None = None  # set while the journal cannot be written: nothing is sent
    mailboxes: list[MailboxInfo] = []  # [bounces] mailboxes
    hosts: list[HostInfo] = []  # the hosts sharing a PostgreSQL journal (none on SQLite)


class SuppressResult(Reply):
    added: int = 0  # new entries (an address already listed keeps its first reason)
    removed: int = 0
    invalid: int = 0  # not addresses; nothing was recorded for them
    examples: list[str] = []  # a few of the invalid ones, with the reason


class SuppressionEntry(msgspec.Struct, kw_only=True):
    email: str
    key: str
    reason: str
    added: float
    detail: str | None = None


class SuppressionPage(Reply):
    entries: list[SuppressionEntry]
    total: int


class TestSent(Reply):
    code: int | None
    reply: str
    message_id: str
    server: str


class RecipientPage(Reply):
    campaign: int
    recipients: list[RecipientInfo]
    next_line: int | None  # pass as after_line for the next page; None: that was all


class StageReading(msgspec.Struct, kw_only=True):
    """A reply read as the answer to one stage, and what mailerd would do about it."""

    stage: str
    scope: str  # account | recipient | none
    cause: str | None  # the relay limit it names: too many sessions, rate, quota, session length
    reason: str
    pattern: str | None  # the wording that matched, and where it comes from
    source: str | None
    action: str


class Explained(Reply):
    code: int
    text: str
    enhanced: str | None  # RFC 3463 code found in the text
    readings: list[StageReading]


class BounceInfo(msgspec.Struct, kw_only=True):
    campaign: int
    line: int
    email: str
    kind: str  # one of BOUNCE_KINDS
    status: str | None
    diagnostic: str
    t: float


class UnmatchedInfo(msgspec.Struct, kw_only=True):
    """A mailbox message that named no recipient of ours (a forged tag, a foreign bounce)."""

    t: float
    mailbox: str
    format: str
    summary: str


class BounceList(Reply):
    bounces: list[BounceInfo]
    unmatched: list[UnmatchedInfo]


AnyReply = (
    Error | Ok | Enqueued | RowsAccepted | CampaignReport | CampaignList | DaemonStatus
    | CampaignPlan | SuppressResult | SuppressionPage | TestSent | RecipientPage | Explained
    | BounceList
)
