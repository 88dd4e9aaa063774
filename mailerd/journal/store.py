"""The journal: every campaign and every recipient's delivery state, in SQLite.

Every query and every change of data is here. committer.py adds only the
transaction statements around them (BEGIN, SAVEPOINT, RELEASE, COMMIT, ROLLBACK).
The methods are synchronous and are run by exactly one thread, the committer's, so
they need no locking of their own. The rows they take and give are in
schema/records.py.

Recipient states and who moves them:
  queued     -> sending    the supervisor hands the recipient to a worker
  sending    -> data-sent  committed before the worker may write the final "."
  data-sent  -> sent | deferred | failed | uncertain   the relay's answer, or none
  sending    -> queued     the session broke before the final "." (no attempt counted)
  deferred   -> sending    when its retry time comes (or at resume)
  invalid    never sent: bad address, empty, duplicate, malformed row
  suppressed never sent: the address is on the suppression list (at enqueue, or
             when a queued/deferred recipient's turn comes after it was listed)
On start, `sending` goes back to `queued` (the relay discarded the unfinished
transaction) and `data-sent` becomes `uncertain` (the relay may have the message).
"""

from __future__ import annotations

import re
import os
import socket
import sqlite3
import time
from pathlib import Path
from typing import Iterable

import msgspec

# JournalError and FencedError are imported from here too (they live in backend.py)
from mailerd.journal.backend import FencedError, JournalError, JournalWriteError  # noqa: F401
from mailerd.message.addresses import suppression_key
from mailerd.schema.control import (
    BOUNCE_STATES,
    COUNTED_STATES,
    BounceInfo,
    UnmatchedInfo,
    CampaignReport,
    CampaignSpec,
    Counts,
    HostInfo,
    RecipientInfo,
)
from mailerd.schema.config import SuppressionConfig
from mailerd.schema.records import (
    CampaignRow,
    Claimed,
    ClaimResult,
    LostRecipient,
    NewRecipient,
    BounceApplied,
    BounceTarget,
    Outcome,
    Recovery,
    TakeOver,
)

SCHEMA_VERSION = 4

# Version 2 (issue 6): attachments stored once per campaign, the global suppression list.
_SCHEMA_V2 = """
CREATE TABLE attachments (
    campaign INTEGER NOT NULL,
    idx      INTEGER NOT NULL,
    seq      INTEGER NOT NULL,
    data     BLOB NOT NULL,
    PRIMARY KEY (campaign, idx, seq)
);
CREATE TABLE suppressions (
    key    TEXT PRIMARY KEY,
    email  TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT,
    added  REAL NOT NULL
) WITHOUT ROWID;
"""

# Version 3 (issue 11): who enqueued each campaign (SO_PEERCRED uid), for the roles on the
# control socket; campaigns from before it have none and only admins may change them.
_SCHEMA_V3 = """
ALTER TABLE campaigns ADD COLUMN owner_uid INTEGER;
"""

# Version 4 (issue 14): what came back. Every mailbox message read once (its sha256 is
# `source`, so a re-read after a crash changes nothing twice), and per recipient what it said.
_SCHEMA_V4 = """
CREATE TABLE bounce_messages (
    source  TEXT PRIMARY KEY,
    mailbox TEXT NOT NULL,
    t       REAL NOT NULL,
    format  TEXT NOT NULL,
    matched INTEGER NOT NULL,
    summary TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE bounces (
    campaign   INTEGER NOT NULL,
    line       INTEGER NOT NULL,
    source     TEXT NOT NULL,
    kind       TEXT NOT NULL,
    status     TEXT,
    diagnostic TEXT NOT NULL,
    t          REAL NOT NULL,
    PRIMARY KEY (campaign, line, source)
) WITHOUT ROWID;
"""

_SCHEMA = """
CREATE TABLE campaigns (
    id      INTEGER PRIMARY KEY,
    uid     TEXT NOT NULL,
    name    TEXT NOT NULL,
    state   TEXT NOT NULL,
    spec    BLOB NOT NULL,
    total   INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE recipients (
    campaign  INTEGER NOT NULL,
    line      INTEGER NOT NULL,
    email     TEXT NOT NULL,
    email_key TEXT,
    fields    BLOB,
    state     TEXT NOT NULL,
    attempts  INTEGER NOT NULL DEFAULT 0,
    code      INTEGER,
    reply     TEXT,
    next_at   REAL,
    server    TEXT,
    dot_at    REAL,
    updated   REAL NOT NULL,
    PRIMARY KEY (campaign, line)
) WITHOUT ROWID;
CREATE INDEX recipients_by_state ON recipients (campaign, state, line);
CREATE INDEX recipients_by_key ON recipients (campaign, email_key) WHERE email_key IS NOT NULL;
CREATE TABLE sends (
    server TEXT NOT NULL,
    t      REAL NOT NULL
);
CREATE INDEX sends_by_server ON sends (server, t);
CREATE TABLE servers (
    name      TEXT PRIMARY KEY,
    learned   BLOB,
    overrides BLOB
);
CREATE TABLE audit (
    id       INTEGER PRIMARY KEY,
    t        REAL NOT NULL,
    campaign INTEGER,
    action   TEXT NOT NULL,
    detail   TEXT NOT NULL
);
"""

# (version, what takes a journal from the one before to it); a new journal runs them all
_MIGRATIONS = ((1, _SCHEMA), (2, _SCHEMA_V2), (3, _SCHEMA_V3), (4, _SCHEMA_V4))

UNCERTAIN_AFTER_RESTART = (
    "no reply recorded: the daemon stopped after the final '.' was sent, "
    "the relay may have delivered the message"
)
UNCERTAIN_WORKER_DIED = "no reply: the worker process died after the final '.' was sent"

# States a campaign still has work in (it is not `done` while any remain).
PENDING_STATES = ("queued", "sending", "data-sent", "deferred")


def suppressed_reply(reason: str) -> str:
    return f"not sent: the address is on the suppression list ({reason})"


# Lets a state-only search use recipients_by_state (campaign, state, line) per campaign
# instead of scanning every recipient: recovery after kill -9 stays instant at 1M rows.
_CAMPAIGN_COLUMNS = "id, uid, name, state, spec, total, created, updated, owner_uid"
_EVERY_CAMPAIGN = "campaign IN (SELECT id FROM campaigns)"


def bounce_rule(config: SuppressionConfig) -> re.Pattern[str] | None:
    """One regular expression of all `[suppression] bounce_patterns`; None with auto_bounce off."""
    if not config.auto_bounce or not config.bounce_patterns:
        return None
    return re.compile("|".join(f"(?:{p})" for p in config.bounce_patterns), re.IGNORECASE)


_spec_decoder = msgspec.msgpack.Decoder(CampaignSpec)


class Journal:
    def __init__(self, path: Path, synchronous: str = "normal", host_id: str | None = None) -> None:
        self.path = path
        self.location = str(path)
        self.host_id = host_id or socket.gethostname()
        self._synchronous = synchronous.upper()
        self.db: sqlite3.Connection | None = None
        self._session_slots: dict[str, set[int]] = {}  # server -> slot numbers held
        # [suppression]: a permanent failure whose reply matches this suppresses the
        # address (reason "bounced"); None: auto_bounce is off. The supervisor sets it
        # from bounce_rule(config.suppression) at start and on every reload.
        self.bounce_rule: re.Pattern[str] | None = None

    # ------------------------------------------------------------ lifecycle

    def open(self) -> Recovery:
        self.db = self._connect()
        self._prepare_schema()
        return self.recover()

    def _preflight(self) -> None:
        """Read-only checks of an existing journal, so a bad one is left exactly as it was."""
        if not self.path.exists():
            return
        if not self.path.is_file():
            raise JournalError(f"{self.path} is not a file")
        if not os.access(self.path, os.R_OK | os.W_OK):
            raise JournalError(f"cannot open journal {self.path}: permission denied "
                               f"(the daemon's user must be able to read and write it)")
        try:
            db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=0)
            try:
                version = db.execute("PRAGMA user_version").fetchone()[0]
                tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
                if version == 0 and tables:
                    raise JournalError(f"{self.path} is an SQLite file but not a mailerd journal")
                if version > SCHEMA_VERSION:
                    raise JournalError(
                        f"{self.path} has journal schema version {version}; this mailerd knows "
                        f"version {SCHEMA_VERSION} (newer journals cannot be opened by older releases)")
                if version:
                    result = db.execute("PRAGMA quick_check(1)").fetchone()[0]
                    if result != "ok":
                        raise JournalError(f"journal {self.path} is corrupt: {result}")
            finally:
                db.close()
        except sqlite3.DatabaseError as exc:
            raise JournalError(f"cannot open journal {self.path}: {exc}") from None

    def _connect(self) -> sqlite3.Connection:
        self._preflight()
        try:
            db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=0
            )
            db.execute("PRAGMA journal_mode=WAL").fetchone()
            db.execute(f"PRAGMA synchronous={self._synchronous}")
            db.execute("PRAGMA foreign_keys=OFF")
            # 8 MB: part of the daemon's memory for good once a big list has been loaded;
            # 16 MB made neither a 1M enqueue nor a 1M report faster (bench/RESULTS.md)
            db.execute("PRAGMA cache_size=-8000")
            db.execute("PRAGMA wal_autocheckpoint=4000")
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.DatabaseError as exc:
            raise JournalError(f"cannot open journal {self.path}: {exc}") from None
        return db

    def _prepare_schema(self) -> None:
        """Create or migrate; _preflight has refused foreign, newer and corrupt files and has
        run quick_check on an existing journal (it reads the whole file: ~0.2 s per 1M recipients)."""
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        steps = "".join(sql for step, sql in _MIGRATIONS if step > version)
        self._db.executescript(f"BEGIN;{steps}PRAGMA user_version={SCHEMA_VERSION};COMMIT;")

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None

    @property
    def _db(self) -> sqlite3.Connection:
        if self.db is None:
            raise JournalError("journal is not open")
        return self.db

    # ------------------------------------------------------------ transactions (committer.py)

    def begin(self) -> None:
        self._transaction_statement("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self._transaction_statement("COMMIT")

    def rollback(self) -> None:
        self._transaction_statement("ROLLBACK")

    def savepoint(self, name: str) -> None:
        self._transaction_statement(f"SAVEPOINT {name}")

    def release(self, name: str) -> None:
        self._transaction_statement(f"RELEASE {name}")

    def rollback_to(self, name: str) -> None:
        self._transaction_statement(f"ROLLBACK TO {name}")

    def _transaction_statement(self, sql: str) -> None:
        try:
            self._db.execute(sql)
        except sqlite3.Error as exc:
            raise JournalWriteError(f"journal write failed: {exc}") from None

    def is_storage_error(self, exc: BaseException) -> bool:
        if not isinstance(exc, sqlite3.OperationalError):
            return False
        text = str(exc).lower()
        return "disk" in text or "full" in text or "i/o" in text or "readonly" in text

    # ------------------------------------------------------------ cluster (one host: trivial)

    def renew_lease(self) -> bool:
        return True

    def take_over_expired(self, lease_seconds: float) -> list[TakeOver]:
        return []

    def hosts(self) -> list[HostInfo]:
        sessions = sum(len(slots) for slots in self._session_slots.values())
        return [HostInfo(host=self.host_id, generation=1, renewed_at=time.time(),
                         sessions=sessions, alive=True)]

    def acquire_session_slot(self, server: str, limit: int) -> int | None:
        """The lowest free slot below `limit` (the supervisor's own connection limit is the
        guard here: one daemon per journal)."""
        held = self._session_slots.setdefault(server, set())
        slot = next((n for n in range(limit) if n not in held), None)
        if slot is not None:
            held.add(slot)
        return slot

    def release_session_slot(self, server: str, slot: int) -> None:
        self._session_slots.get(server, set()).discard(slot)

    def take_group_turns(self, server: str, want: int, size: int, pause: float
                         ) -> tuple[int, float]:
        """One host: its pacer counts the groups itself (never asked on SQLite)."""
        return want, 0.0

    def share_servers(self, servers: list[str]) -> dict[str, int]:
        return {server: 1 for server in servers}  # one daemon per journal

    def recover(self) -> Recovery:
        """Classify what a crash left behind (rule 3 of the write discipline)."""
        now = time.time()
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            requeued = db.execute(
                f"UPDATE recipients SET state='queued', updated=? WHERE {_EVERY_CAMPAIGN} "
                "AND state='sending'", (now,)
            ).rowcount
            uncertain = db.execute(
                "UPDATE recipients SET state='uncertain', code=NULL, reply=?, updated=? "
                f"WHERE {_EVERY_CAMPAIGN} AND state='data-sent'",
                (UNCERTAIN_AFTER_RESTART, now),
            ).rowcount
            loading = [r[0] for r in db.execute("SELECT id FROM campaigns WHERE state='loading'")]
            for campaign in loading:
                self._delete_campaign(campaign)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return Recovery(requeued, uncertain, len(loading))

    # ------------------------------------------------------------ enqueue

    def begin_campaign(self, uid: str, spec: CampaignSpec, owner_uid: int | None = None) -> int:
        now = time.time()
        cursor = self._db.execute(
            "INSERT INTO campaigns (uid, name, state, spec, created, updated, owner_uid) "
            "VALUES (?, ?, 'loading', ?, ?, ?, ?)",
            (uid, spec.name, msgspec.msgpack.encode(spec), now, now, owner_uid),
        )
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def first_lines(self, campaign: int, keys: Iterable[str]) -> dict[str, int]:
        """key -> line, for those of `keys` already stored for this campaign."""
        keys = list(keys)
        found: dict[str, int] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            found.update(self._db.execute(
                f"SELECT email_key, line FROM recipients WHERE campaign=? AND email_key IN ({marks})",
                (campaign, *chunk),
            ).fetchall())
        return found

    def add_recipients(self, campaign: int, rows: list[NewRecipient]) -> None:
        now = time.time()
        self._db.executemany(
            "INSERT INTO recipients (campaign, line, email, email_key, fields, state, reply, updated) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(campaign, *row, now) for row in rows],
        )

    def commit_campaign(self, campaign: int) -> int:
        total = self._db.execute(
            "SELECT count(*) FROM recipients WHERE campaign=?", (campaign,)
        ).fetchone()[0]
        self._db.execute(
            "UPDATE campaigns SET state='running', total=?, updated=? WHERE id=?",
            (total, time.time(), campaign),
        )
        return total

    def discard_campaign(self, campaign: int) -> None:
        self._delete_campaign(campaign)

    def _delete_campaign(self, campaign: int) -> None:
        self._db.execute("DELETE FROM recipients WHERE campaign=?", (campaign,))
        self._db.execute("DELETE FROM campaigns WHERE id=?", (campaign,))
        self._db.execute("DELETE FROM attachments WHERE campaign=?", (campaign,))

    # ------------------------------------------------------------ campaigns

    def campaign(self, campaign: int) -> CampaignRow | None:
        row = self._db.execute(
            f"SELECT {_CAMPAIGN_COLUMNS} FROM campaigns WHERE id=?",
            (campaign,),
        ).fetchone()
        return self._campaign_row(row) if row else None

    def campaigns(self, states: tuple[str, ...] | None = None) -> list[CampaignRow]:
        sql = f"SELECT {_CAMPAIGN_COLUMNS} FROM campaigns"
        params: tuple[str, ...] = ()
        if states:
            sql += f" WHERE state IN ({','.join('?' * len(states))})"
            params = states
        return [self._campaign_row(row) for row in self._db.execute(sql + " ORDER BY id", params)]

    @staticmethod
    def _campaign_row(row: tuple) -> CampaignRow:
        return CampaignRow(row[0], row[1], row[2], row[3], _spec_decoder.decode(row[4]), *row[5:])

    def set_campaign_state(self, campaign: int, state: str) -> None:
        self._db.execute(
            "UPDATE campaigns SET state=?, updated=? WHERE id=?", (state, time.time(), campaign)
        )

    def audit(self, campaign: int | None, action: str, detail: str) -> None:
        self._db.execute(
            "INSERT INTO audit (t, campaign, action, detail) VALUES (?, ?, ?, ?)",
            (time.time(), campaign, action, detail),
        )

    def resume(self, campaign: int, include_uncertain: bool, retry_failed: bool) -> int:
        """Make every not-yet-sent recipient eligible now; return how many changed."""
        states = ["deferred"]
        if include_uncertain:
            states.append("uncertain")
        if retry_failed:
            states.append("failed")
        marks = ",".join("?" * len(states))
        changed = self._db.execute(
            f"UPDATE recipients SET state='queued', next_at=NULL, updated=? "
            f"WHERE campaign=? AND state IN ({marks})",
            (time.time(), campaign, *states),
        ).rowcount
        return changed

    def has_pending(self, campaign: int) -> bool:
        marks = ",".join("?" * len(PENDING_STATES))
        return (
            self._db.execute(
                f"SELECT 1 FROM recipients WHERE campaign=? AND state IN ({marks}) LIMIT 1",
                (campaign, *PENDING_STATES),
            ).fetchone()
            is not None
        )

    # ------------------------------------------------------------ delivery

    def claim(
        self, campaign: int, after_line: int, limit: int, now: float, skip: set[int]
    ) -> ClaimResult:
        """Queued recipients past `after_line`, then deferred ones whose time has come.

        Nothing is written (on PostgreSQL they become held by this host, postgres.py):
        a claimed recipient becomes `sending` only when it is
        handed to a worker (mark_sending), and one whose address was suppressed since
        enqueue is left out and returned for mark_suppressed. `skip` holds lines already
        in memory.
        """
        queued, deferred = self._claimable(campaign, after_line, limit + len(skip), now)
        cursor = queued[-1][0] if queued else after_line
        claimed = [Claimed(campaign, *row) for row in queued + deferred if row[0] not in skip]
        claimed, suppressed = self._split_suppressed(campaign, claimed)
        if len(claimed) > limit:
            claimed = claimed[:limit]
            cursor = min(cursor, claimed[-1].line)
        return ClaimResult(claimed, cursor, suppressed)

    def _claimable(self, campaign: int, after_line: int, count: int, now: float
                   ) -> tuple[list[tuple], list[tuple]]:
        """(line, email, fields, attempts) of up to `count` queued recipients past
        `after_line` in line order, and of up to `count` deferred ones due at `now`."""
        queued = self._db.execute(
            "SELECT line, email, fields, attempts FROM recipients "
            "WHERE campaign=? AND state='queued' AND line>? ORDER BY line LIMIT ?",
            (campaign, after_line, count),
        ).fetchall()
        deferred = self._db.execute(
            "SELECT line, email, fields, attempts FROM recipients "
            "WHERE campaign=? AND state='deferred' AND next_at<=? ORDER BY next_at LIMIT ?",
            (campaign, now, count),
        ).fetchall()
        return queued, deferred

    def mark_sending(self, items: list[tuple[int, int, str]]) -> None:
        """(campaign, line, server): handed to a worker of that server."""
        now = time.time()
        self._db.executemany(
            "UPDATE recipients SET state='sending', server=?, updated=? "
            "WHERE campaign=? AND line=? AND state IN ('queued', 'deferred')",
            [(server, now, campaign, line) for campaign, line, server in items],
        )

    def mark_data_sent(self, items: list[tuple[int, int, str]]) -> None:
        """(campaign, line, server): the final '.' may go out now; counts as a send.

        `queued` is accepted too: the hand-out's `sending` write may still be
        waiting for a retry. Any other state means the recipient must not be sent,
        and the error makes the worker abandon the transaction before its '.'.
        """
        now = time.time()
        changed = self._db.executemany(
            "UPDATE recipients SET state='data-sent', dot_at=?, updated=? "
            "WHERE campaign=? AND line=? AND state IN ('sending', 'queued')",
            [(now, now, campaign, line) for campaign, line, _ in items],
        ).rowcount  # summed over the rows; the caller's savepoint undoes them on a mismatch
        if changed != len(items):
            if len(items) == 1:
                raise JournalError(f"campaign {items[0][0]} line {items[0][1]} "
                                   "is not in a sendable state")
            raise JournalError(f"{len(items) - changed} of {len(items)} recipients are not "
                               "in a sendable state")  # the caller asks again one by one
        self._db.executemany("INSERT INTO sends (server, t) VALUES (?, ?)",
                             [(server, now) for _, _, server in items])

    def probe_write(self) -> None:
        """A write that changes nothing, to learn whether the journal takes writes again."""
        self._db.execute("INSERT INTO audit (t, action, detail) VALUES (?, 'probe', '')",
                         (time.time(),))
        self._db.execute("DELETE FROM audit WHERE action='probe'")

    def settle(self, campaign: int, as_sent: bool, emails: list[str] | None, who: str) -> int:
        """The user checked the relay's log: uncertain recipients become sent, or go out again."""
        now = time.time()
        note = f"settled as {'sent' if as_sent else 'resend'} by {who}"
        selection = "campaign=? AND state='uncertain'"
        params: list[object] = [campaign]
        if emails:
            selection += f" AND lower(email) IN ({','.join('?' * len(emails))})"
            params += [e.strip().lower() for e in emails]
        if as_sent:
            sql = f"UPDATE recipients SET state='sent', reply=?, updated=? WHERE {selection}"
        else:
            sql = (f"UPDATE recipients SET state='queued', reply=?, next_at=NULL, updated=? "
                   f"WHERE {selection}")
        changed = self._db.execute(sql, (note, now, *params)).rowcount
        self.audit(campaign, "settle", f"{note}: {changed} recipients "
                   f"({', '.join(emails) if emails else 'all uncertain'})")
        return changed

    def sends_since(self, server: str, since: float) -> list[float]:
        return [row[0] for row in self._db.execute(
            "SELECT t FROM sends WHERE server=? AND t>=? ORDER BY t", (server, since))]

    def prune_sends(self, server: str, before: float) -> None:
        """Send times older than every quota window are of no use any more."""
        self._db.execute("DELETE FROM sends WHERE server=? AND t<?", (server, before))

    def server_state(self, name: str) -> tuple[bytes | None, bytes | None]:
        row = self._db.execute(
            "SELECT learned, overrides FROM servers WHERE name=?", (name,)).fetchone()
        return (row[0], row[1]) if row else (None, None)

    def save_learned(self, name: str, learned: bytes | None) -> None:
        self._db.execute(
            "INSERT INTO servers (name, learned) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET learned=excluded.learned", (name, learned))

    def save_overrides(self, name: str, overrides: bytes | None) -> None:
        self._db.execute(
            "INSERT INTO servers (name, overrides) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET overrides=excluded.overrides", (name, overrides))

    def record_outcomes(self, outcomes: list[Outcome]) -> None:
        """The relay's answers. Only a recipient in flight can take one: a write replayed
        late (after a full disk) never overwrites a final state."""
        now = time.time()
        self._db.executemany(
            "UPDATE recipients SET state=?, code=?, reply=?, next_at=?, attempts=attempts+1, "
            "updated=? WHERE campaign=? AND line=? AND state IN ('queued', 'sending', 'data-sent')",
            [
                (o.state, o.code, o.reply, o.next_at, now, o.campaign, o.line)
                for o in outcomes
            ],
        )
        if self.bounce_rule is not None:
            self._suppress_bounces(outcomes)

    def requeue(self, items: list[tuple[int, int]], reply: str | None = None) -> None:
        """Back to the queue without counting an attempt: the relay does not have the message.

        Only the worker's own account of the session says so, which is why `data-sent`
        may move here too: the session broke before the '.' was written, or the relay
        answered after it with a refusal that was not the recipient's fault.
        """
        now = time.time()
        self._db.executemany(
            "UPDATE recipients SET state='queued', reply=coalesce(?, reply), updated=? "
            "WHERE campaign=? AND line=? AND state IN ('sending', 'data-sent')",
            [(reply, now, campaign, line) for campaign, line in items],
        )

    def settle_lost_worker(self, items: list[tuple[int, int]]
                           ) -> tuple[list[LostRecipient], int]:
        """A worker died holding these: data-sent -> uncertain, sending -> queued.
        (the recipients made uncertain, how many went back to the queue)"""
        now = time.time()
        uncertain: list[LostRecipient] = []
        requeued = 0
        for campaign, line in items:
            uncertain += [LostRecipient(*row) for row in self._db.execute(
                "UPDATE recipients SET state='uncertain', code=NULL, reply=?, attempts=attempts+1, "
                "updated=? WHERE campaign=? AND line=? AND state='data-sent' "
                "RETURNING campaign, line, email, reply, server",
                (UNCERTAIN_WORKER_DIED, now, campaign, line),
            ).fetchall()]
            requeued += self._db.execute(
                "UPDATE recipients SET state='queued', updated=? "
                "WHERE campaign=? AND line=? AND state='sending'",
                (now, campaign, line),
            ).rowcount
        return uncertain, requeued

    # ------------------------------------------------------------ attachments, suppression

    def add_attachment_chunk(self, campaign: int, index: int, seq: int, chunk: bytes) -> None:
        self._db.execute("INSERT INTO attachments (campaign, idx, seq, data) VALUES (?, ?, ?, ?)",
                         (campaign, index, seq, chunk))

    def attachments(self, campaign: int) -> list[bytes]:
        """The campaign's attachments' bytes, in spec order."""
        parts: dict[int, list[bytes]] = {}
        for idx, data in self._db.execute(
                "SELECT idx, data FROM attachments WHERE campaign=? ORDER BY idx, seq", (campaign,)):
            parts.setdefault(idx, []).append(data)
        return [b"".join(parts[i]) for i in sorted(parts)]

    def has_suppressions(self) -> bool:
        return self._db.execute("SELECT EXISTS (SELECT 1 FROM suppressions)").fetchone()[0] == 1

    def suppressed(self, keys: Iterable[str]) -> dict[str, str]:
        """key -> reason, for those of `keys` on the suppression list."""
        keys = list(keys)
        found: dict[str, str] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            found.update(self._db.execute(
                f"SELECT key, reason FROM suppressions WHERE key IN ({','.join('?' * len(chunk))})",
                chunk))
        return found

    def add_suppressions(self, entries: list[tuple[str, str, str, str | None]]) -> int:
        """(key, email, reason, detail); an address already listed keeps its entry."""
        now = time.time()
        before = self._db.total_changes
        self._db.executemany(
            "INSERT OR IGNORE INTO suppressions (key, email, reason, detail, added) "
            "VALUES (?, ?, ?, ?, ?)", [(*entry, now) for entry in entries])
        return self._db.total_changes - before

    def remove_suppressions(self, keys: list[str]) -> int:
        before = self._db.total_changes
        self._db.executemany("DELETE FROM suppressions WHERE key=?", [(k,) for k in keys])
        return self._db.total_changes - before

    def list_suppressions(self, after: str, limit: int) -> tuple[list[tuple], int]:
        rows = self._db.execute(
            "SELECT email, key, reason, added, detail FROM suppressions WHERE key>? "
            "ORDER BY key LIMIT ?", (after, limit)).fetchall()
        total = self._db.execute("SELECT count(*) FROM suppressions").fetchone()[0]
        return rows, total

    def mark_suppressed(self, items: list[tuple[int, int, str]]) -> int:
        """(campaign, line, reason): not sent, because the address is suppressed. Only
        recipients still waiting (queued, deferred) change."""
        now = time.time()
        before = self._db.total_changes
        self._db.executemany(
            "UPDATE recipients SET state='suppressed', reply=?, next_at=NULL, updated=? "
            "WHERE campaign=? AND line=? AND state IN ('queued', 'deferred')",
            [(suppressed_reply(reason), now, campaign, line) for campaign, line, reason in items])
        return self._db.total_changes - before

    def _split_suppressed(self, campaign: int, claimed: list[Claimed]
                          ) -> tuple[list[Claimed], list[tuple[int, int, str]]]:
        """(those to hand out, (campaign, line, reason) of those suppressed after enqueue)."""
        if not claimed or not self.has_suppressions():
            return claimed, []
        keys = {c.line: suppression_key(c.email) for c in claimed}
        found = self.suppressed(k for k in keys.values() if k)
        if not found:
            return claimed, []
        return ([c for c in claimed if keys[c.line] not in found],
                [(campaign, line, found[k]) for line, k in keys.items() if k in found])

    def _suppress_bounces(self, outcomes: list[Outcome]) -> None:
        rule = self.bounce_rule
        assert rule is not None
        for o in outcomes:
            if o.state != "failed" or o.code is None or not 500 <= o.code < 600:
                continue
            if not rule.search(o.reply or ""):
                continue
            row = self._db.execute("SELECT email FROM recipients WHERE campaign=? AND line=?",
                                   (o.campaign, o.line)).fetchone()
            key = suppression_key(row[0]) if row else None
            if key:
                self.add_suppressions([(key, row[0], "bounced", f"{o.code} {o.reply}"[:500])])

    # ------------------------------------------------------------ what comes back

    def bounce_seen(self, source: str) -> bool:
        return self._db.execute("SELECT 1 FROM bounce_messages WHERE source=?",
                                (source,)).fetchone() is not None

    def apply_bounce(self, source: str, mailbox: str, format: str, summary: str,
                     targets: list[BounceTarget], soft_bounce_limit: int) -> BounceApplied:
        """Record what one mailbox message said, once: the same `source` again changes nothing.

        Hard bounces and complaints put the address on the suppression list (reasons
        `bounced`, `complained`); a soft bounce does when the address soft-bounced in
        each of the last `soft_bounce_limit` campaigns it was sent in. The recipient
        stays `sent`: the relay did take the message."""
        if self.bounce_seen(source):
            return BounceApplied(False, [], [])
        now = time.time()
        matched: list[tuple[int, str, str]] = []
        suppressed: list[tuple[str, str]] = []
        for target in targets:
            row = self._db.execute(
                "SELECT r.campaign, r.line, r.email, r.email_key FROM campaigns c JOIN recipients r "
                "ON r.campaign=c.id AND r.line=? WHERE c.uid=?",
                (target.line, target.campaign_uid)).fetchone()
            if row is None or (target.confirm and row[2].casefold() not in target.confirm):
                continue  # not ours, or a Message-ID without the address it was sent to
            campaign, line, address, email_key = row
            self._db.execute(
                "INSERT OR IGNORE INTO bounces (campaign, line, source, kind, status, diagnostic, t) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (campaign, line, source, target.kind, target.status, target.diagnostic, now))
            matched.append((campaign, address, target.kind))
            reason = self._bounce_reason(email_key, target, soft_bounce_limit)
            key = suppression_key(address)
            if reason and key and self.add_suppressions([(key, address, reason[0], reason[1])]):
                suppressed.append((address, reason[0]))
        self._db.execute(
            "INSERT INTO bounce_messages (source, mailbox, t, format, matched, summary) "
            "VALUES (?, ?, ?, ?, ?, ?)", (source, mailbox, now, format, len(matched), summary))
        return BounceApplied(True, matched, suppressed)

    def _bounce_reason(self, email_key: str | None, target: BounceTarget,
                       soft_bounce_limit: int) -> tuple[str, str] | None:
        """(suppression reason, detail), or None when the address stays."""
        detail = " ".join(p for p in (target.status, target.diagnostic) if p)[:500]
        if target.kind == "hard":
            return "bounced", detail
        if target.kind == "complaint":
            return "complained", detail
        if target.kind == "soft" and email_key is not None:
            streak = self._soft_bounce_streak(email_key, soft_bounce_limit)
            if streak >= soft_bounce_limit:
                return "bounced", f"{streak} soft bounces in a row, the last: {detail}"[:500]
        return None

    def _soft_bounce_streak(self, email_key: str, limit: int) -> int:
        """In how many of the latest campaigns that sent to the address, newest first and
        without a gap, it soft-bounced (counted up to `limit`). A newer campaign whose
        bounce has not come (yet) ends the row: suppressing waits for it."""
        streak = 0
        for (cid,) in self._db.execute("SELECT id FROM campaigns ORDER BY id DESC").fetchall():
            sent = self._db.execute(
                "SELECT line FROM recipients WHERE campaign=? AND email_key=? "
                "AND state IN ('sent', 'uncertain') LIMIT 1", (cid, email_key)).fetchone()
            if sent is None:
                continue  # not sent to in that campaign: no link in the chain either way
            soft = self._db.execute(
                "SELECT 1 FROM bounces WHERE campaign=? AND line=? AND kind='soft' LIMIT 1",
                (cid, sent[0])).fetchone()
            if soft is None:
                break
            streak += 1
            if streak >= limit:
                break
        return streak

    def bounce_list(self, campaign: int | None, limit: int) -> list[BounceInfo]:
        sql = ("SELECT b.campaign, b.line, r.email, b.kind, b.status, b.diagnostic, b.t "
               "FROM bounces b JOIN recipients r ON r.campaign=b.campaign AND r.line=b.line")
        params: list[object] = []
        if campaign is not None:
            sql += " WHERE b.campaign=?"
            params.append(campaign)
        sql += " ORDER BY b.t, b.campaign, b.line LIMIT ?"
        return [BounceInfo(campaign=r[0], line=r[1], email=r[2], kind=r[3], status=r[4],
                           diagnostic=r[5], t=r[6])
                for r in self._db.execute(sql, (*params, limit))]

    def unmatched_bounces(self, limit: int) -> list[UnmatchedInfo]:
        """Mailbox messages that named no recipient of ours (forged, foreign, too old)."""
        return [UnmatchedInfo(t=r[0], mailbox=r[1], format=r[2], summary=r[3])
                for r in self._db.execute(
                    "SELECT t, mailbox, format, summary FROM bounce_messages WHERE matched=0 "
                    "ORDER BY t DESC LIMIT ?", (limit,))]

    # ------------------------------------------------------------ reports

    def sent_total(self) -> int:
        """Recipients recorded sent, over every campaign."""
        return self._db.execute("SELECT count(*) FROM recipients WHERE state='sent'").fetchone()[0]

    def counts(self, campaign: int) -> Counts:
        counts = dict.fromkeys(COUNTED_STATES, 0)
        for state, n in self._db.execute(
            "SELECT state, count(*) FROM recipients WHERE campaign=? GROUP BY state", (campaign,)
        ):
            key = "sending" if state == "data-sent" else state
            counts[key] = counts.get(key, 0) + n
        for kind, n in self._db.execute(
            "SELECT kind, count(DISTINCT line) FROM bounces WHERE campaign=? "
            "AND kind IN ('hard', 'complaint') GROUP BY kind", (campaign,)
        ):
            counts["bounced" if kind == "hard" else "complained"] = n
        return Counts(**counts)

    def recipients(
        self, campaign: int, state: str | None, limit: int | None, after_line: int = 0
    ) -> list[RecipientInfo]:
        sql = (
            "SELECT email, line, state, attempts, code, reply, updated, server, dot_at "
            "FROM recipients WHERE campaign=?"
        )
        params: list[object] = [campaign]
        if state in BOUNCE_STATES:  # of those sent, whom a bounce or complaint came back for
            sql = sql.replace("reply,", "(SELECT trim(coalesce(status, '') || ' ' || diagnostic) "
                              "FROM bounces b WHERE b.campaign=recipients.campaign AND "
                              "b.line=recipients.line AND b.kind=? ORDER BY t DESC LIMIT 1),")
            sql += (" AND line IN (SELECT line FROM bounces WHERE campaign=? AND kind=?)")
            kind = "hard" if state == "bounced" else "complaint"
            params = [kind, campaign, campaign, kind]
        elif state == "sending":
            sql += " AND state IN ('sending', 'data-sent')"
        elif state:
            sql += " AND state=?"
            params.append(state)
        if after_line:
            sql += " AND line>?"
            params.append(after_line)
        sql += " ORDER BY line"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [
            RecipientInfo(
                email=r[0], line=r[1], state=r[2], attempts=r[3], code=r[4], reply=r[5],
                updated=r[6], server=r[7], dot_at=r[8],
            )
            for r in self._db.execute(sql, params)
        ]

    def report(self, row: CampaignRow, state: str | None = None, limit: int | None = None,
               with_recipients: bool = False) -> CampaignReport:
        """The report of the campaign in `row` (rate and ETA are the supervisor's)."""
        return CampaignReport(
            id=row.id, name=row.name, state=row.state, total=row.total,
            counts=self.counts(row.id), created=row.created, updated=row.updated,
            recipients=self.recipients(row.id, state, limit) if with_recipients else None,
        )

    # ------------------------------------------------------------ unsubscribe mails (bounces/, issue 14)

    def recipient_at(self, campaign_uid: str, line: int) -> tuple[int, str] | None:
        """(campaign id, address) of recipient `line` of the campaign with that uid."""
        row = self._db.execute(
            "SELECT r.campaign, r.email FROM campaigns c JOIN recipients r "
            "ON r.campaign=c.id AND r.line=? WHERE c.uid=?", (line, campaign_uid)).fetchone()
        return None if row is None else (row[0], row[1])

    def apply_unsubscribe(self, source: str, mailbox: str, summary: str,
                          recipients: list[tuple[int, str, str]]) -> BounceApplied:
        """Record one mailbox message that asked to unsubscribe (a mail to a List-Unsubscribe
        mailto address), once, like apply_bounce: each (campaign, address, detail) the
        caller verified goes on the suppression list with reason `unsubscribed`; with none
        the message is kept as unmatched."""
        if self.bounce_seen(source):
            return BounceApplied(False, [], [])
        suppressed = []
        for _, address, detail in recipients:
            key = suppression_key(address)
            if key and self.add_suppressions([(key, address, "unsubscribed", detail)]):
                suppressed.append((address, "unsubscribed"))
        self._db.execute(
            "INSERT INTO bounce_messages (source, mailbox, t, format, matched, summary) "
            "VALUES (?, ?, ?, 'unsubscribe', ?, ?)",
            (source, mailbox, time.time(), len(recipients), summary))
        return BounceApplied(True, [(c, a, "unsubscribe") for c, a, _ in recipients], suppressed)

    def server_states(self) -> dict[str, tuple[bytes | None, bytes | None]]:
        """Every server's (learned, overrides), as server_state gives one: several hosts on
        one journal follow each other's `mailerctl set` and learned limits with it."""
        rows = self._db.execute("SELECT name, learned, overrides FROM servers").fetchall()
        return {row[0]: (row[1], row[2]) for row in rows}
