"""Several hosts on one PostgreSQL journal (journal/postgres.py), on a real private cluster.

What matters to a user: two daemons never hand out the same recipient; a host that was
taken over (it stopped renewing its lease: crashed, frozen, cut off) can never write a
"." for what it held, and its answers change nothing any more; the relay's session
limit holds across hosts; a restarted host recovers only what it held itself; a
PostgreSQL restart makes writes fail for a moment (the outbox retries) and the journal
goes on with a new connection, nothing lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import AsyncIterator

import pytest

from conftest import same_journal
from mailerd.config import ConfigError, load_config
from mailerd.journal.backend import FencedError, JournalError, JournalWriteError
from mailerd.journal.committer import Committer
from mailerd.journal.factory import open_store
from mailerd.journal.postgres import SCHEMA_VERSION, PgJournal
from mailerd.journal.store import Journal
from mailerd.schema.config import JournalConfig
from mailerd.schema.control import CampaignSpec
from mailerd.schema.records import NewRecipient, Outcome

SPEC = CampaignSpec(name="t", sender="news@example.org", subject="s", text="t", columns=["email"])


@pytest.fixture
def two_hosts(pg_dsn: str):
    """Hosts a and b, open on one fresh database."""
    a, b = PgJournal(pg_dsn, "host-a"), PgJournal(pg_dsn, "host-b")
    a.open()
    b.open()
    yield a, b
    a.close()
    b.close()


def add_campaign(journal: PgJournal, count: int) -> int:
    campaign = journal.begin_campaign("uid-pg", SPEC)
    journal.add_recipients(campaign, [
        NewRecipient(line, f"user{line}@example.com", f"user{line}@example.com", b"\x90",
                     "queued", None) for line in range(1, count + 1)])
    journal.commit_campaign(campaign)
    return campaign


def states(journal: PgJournal, campaign: int) -> dict[int, str]:
    return {r.line: r.state for r in journal.recipients(campaign, None, None)}


def claimed_lines(journal: PgJournal, campaign: int, after: int = 0, limit: int = 10) -> list[int]:
    return [c.line for c in journal.claim(campaign, after, limit, time.time(), set()).recipients]


# ---------------------------------------------------------------- claiming


def test_two_hosts_never_claim_the_same_recipient(two_hosts):
    a, b = two_hosts
    campaign = add_campaign(a, 30)
    a.add_recipients(campaign, [NewRecipient(31, "bad", None, None, "invalid", "no @")])
    assert [(r.state, r.reply) for r in a.recipients(campaign, "invalid", None)] == [("invalid", "no @")]
    assert claimed_lines(a, campaign) == list(range(1, 11))
    assert {c.fields for c in a.claim(campaign, 0, 10, time.time(), set()).recipients} == {b"\x90"}
    assert claimed_lines(b, campaign) == list(range(11, 21))  # a's are held, not only locked
    assert claimed_lines(a, campaign) == list(range(1, 11))  # its own, again (they are in memory)
    assert claimed_lines(a, campaign, after=10) == list(range(21, 31))
    assert claimed_lines(b, campaign, after=20) == []
    b.mark_sending([(campaign, line, "isp") for line in (1, 2)])  # a's: b cannot take them
    assert (states(a, campaign)[1], states(a, campaign)[2]) == ("queued", "queued")


def test_concurrent_hosts_send_everyone_exactly_once(pg_dsn: str):
    """Three hosts in three threads claim, send and record one campaign at the same time."""
    hosts = [PgJournal(pg_dsn, f"host-{n}") for n in range(3)]
    for host in hosts:
        host.open()
    campaign = add_campaign(hosts[0], 600)
    taken: dict[str, list[int]] = {host.host_id: [] for host in hosts}
    errors: list[BaseException] = []

    def work(host: PgJournal) -> None:
        try:
            cursor = 0
            for _ in range(400):  # bounded: 600 recipients in batches of 7
                result = host.claim(campaign, cursor, 7, time.time(), set())
                lines = [c.line for c in result.recipients]
                if not lines:
                    if not host.has_pending(campaign):
                        return
                    cursor = 0
                    continue
                cursor = result.cursor
                host.mark_sending([(campaign, line, "isp") for line in lines])
                host.mark_data_sent([(campaign, line, "isp") for line in lines])
                host.record_outcomes([Outcome(campaign, line, "sent", 250, "ok") for line in lines])
                taken[host.host_id] += lines
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(host,)) for host in hosts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    try:
        assert not errors, errors
        every = sorted(line for lines in taken.values() for line in lines)
        assert every == list(range(1, 601)), "everyone exactly once"
        assert all(taken.values()), f"the load is shared: {[len(t) for t in taken.values()]}"
        report = hosts[0].recipients(campaign, None, None)
        assert {(r.state, r.attempts) for r in report} == {("sent", 1)}
        assert len(hosts[0].sends_since("isp", 0)) == 600  # the send history is shared
    finally:
        for host in hosts:
            host.close()


# ---------------------------------------------------------------- takeover and fencing


def test_a_taken_over_host_can_neither_send_nor_record(two_hosts):
    a, b = two_hosts
    campaign = add_campaign(a, 4)
    assert claimed_lines(a, campaign) == [1, 2, 3, 4]
    a.mark_sending([(campaign, line, "isp") for line in (1, 2, 3)])
    a.mark_data_sent([(campaign, 2, "isp")])
    assert b.take_over_expired(10.0) == []  # a renewed just now

    [taken] = b.take_over_expired(0.0)  # a lease of 0 s: a's is over

    assert (taken.host, taken.requeued) == ("host-a", 2)
    assert [(r.line, r.email) for r in taken.uncertain] == [(2, "user2@example.com")]
    assert "host-a stopped renewing its lease" in taken.uncertain[0].reply
    with pytest.raises(FencedError, match="taken over"):
        a.mark_data_sent([(campaign, 1, "isp")])
    before = a.recipients(campaign, None, None)
    a.record_outcomes([Outcome(campaign, line, "sent", 250, "late") for line in (1, 2, 3)])
    a.requeue([(campaign, 3)], "late")
    a.mark_sending([(campaign, 4, "isp")])
    assert a.settle_lost_worker([(campaign, 2)]) == ([], 0)
    assert a.recipients(campaign, None, None) == before
    assert states(a, campaign) == {1: "queued", 2: "uncertain", 3: "queued", 4: "queued"}
    assert not a.renew_lease()  # the daemon stops: systemd starts a new life
    assert claimed_lines(a, campaign) == []
    assert claimed_lines(b, campaign) == [1, 3, 4]  # a's claims are free again
    assert b.take_over_expired(0.0) == []  # once
    assert [(h.host, h.alive) for h in b.hosts()] == [("host-a", False), ("host-b", True)]


def test_a_taken_over_host_changes_nothing_in_a_committer_batch(two_hosts):
    """The same fencing inside one batch, where the writes nobody reads are pipelined and
    not waited for: each checks the generation itself, so a late answer, requeue or
    hand-out of a taken-over host changes nothing, and its data-sent is refused."""
    a, b = two_hosts
    campaign = add_campaign(a, 4)
    assert claimed_lines(a, campaign) == [1, 2, 3, 4]
    a.mark_sending([(campaign, line, "isp") for line in (1, 2, 3)])
    [taken] = b.take_over_expired(0.0)
    assert taken.requeued == 3
    before = a.recipients(campaign, None, None)

    async def one_batch() -> list[object]:
        committer = Committer(a)
        committer.start()
        try:  # queued in one turn of the event loop: one batch
            return await asyncio.gather(
                committer.run(a.mark_sending, [(campaign, 4, "isp")]),  # released: unheld, queued
                committer.run(a.record_outcomes,
                              [Outcome(campaign, line, "sent", 250, "late") for line in (1, 2)]),
                committer.run(a.requeue, [(campaign, 3)], "late"),
                committer.run(a.mark_data_sent, [(campaign, 1, "isp")]),
                return_exceptions=True)
        finally:
            await committer.stop()

    *writes, data_sent = asyncio.run(one_batch())
    assert writes == [None, None, None]
    assert isinstance(data_sent, FencedError) and "taken over" in str(data_sent)
    assert a.recipients(campaign, None, None) == before
    assert states(a, campaign) == {1: "queued", 2: "queued", 3: "queued", 4: "queued"}
    assert a.sends_since("isp", 0.0) == []  # nothing counted against the relay's limits
    assert claimed_lines(b, campaign) == [1, 2, 3, 4]


def test_a_batch_of_a_live_host_writes_every_op(two_hosts):
    """The pipelined writes of one batch all land, in order, and a read in the middle sees
    those before it."""
    a, _ = two_hosts
    campaign = add_campaign(a, 3)
    assert claimed_lines(a, campaign) == [1, 2, 3]
    a.begin()
    a.mark_sending([(campaign, line, "isp") for line in (1, 2, 3)])
    a.mark_data_sent([(campaign, 1, "isp"), (campaign, 2, "isp")])
    a.record_outcomes([Outcome(campaign, 1, "sent", 250, "ok")])
    assert states(a, campaign) == {1: "sent", 2: "data-sent", 3: "sending"}
    a.requeue([(campaign, 3)], "dropped")
    a.commit()
    assert states(a, campaign) == {1: "sent", 2: "data-sent", 3: "queued"}
    assert [r.reply for r in a.recipients(campaign, "queued", None)] == ["dropped"]


def test_the_statements_of_a_delivery_are_planned_once(two_hosts):
    """The hand-out, data-sent and answers of every batch run with their generic plans:
    with the default, PostgreSQL planned them again at each batch (custom plans), which
    cost more server time than running them. Every other statement keeps the default."""
    a, _ = two_hosts
    campaign = add_campaign(a, 40)
    assert claimed_lines(a, campaign, limit=40) == list(range(1, 41))
    for line in range(1, 41, 2):  # 20 batches of two recipients
        pair = [(campaign, line, "isp"), (campaign, line + 1, "isp")]
        a.begin()
        a.mark_sending(pair)
        a.mark_data_sent(pair)
        a.record_outcomes([Outcome(campaign, number, "sent", 250, "ok")
                           for _, number, _ in pair])
        a.commit()
    assert set(states(a, campaign).values()) == {"sent"}
    plans = a.connection().execute(
        "SELECT generic_plans, custom_plans FROM pg_prepared_statements "
        "WHERE statement LIKE '%unnest%'").fetchall()
    assert len(plans) == 3  # prepared: sending, data-sent, outcomes
    assert all(generic >= 15 and custom == 0 for generic, custom in plans), plans
    assert a.connection().execute("SHOW plan_cache_mode").fetchone() == ("auto",)


def test_a_takeover_waits_for_the_hosts_transaction_in_progress(two_hosts):
    """The "." rule across hosts: a's data-sent either commits before the takeover (and
    becomes uncertain) or is refused; never both sent by a and requeued by b."""
    a, b = two_hosts
    campaign = add_campaign(a, 2)
    a.mark_sending([(campaign, 1, "isp"), (campaign, 2, "isp")])
    a.begin()
    a.mark_data_sent([(campaign, 1, "isp")])
    assert b.take_over_expired(0.0) == []  # a is inside a transaction: next round
    a.commit()
    [taken] = b.take_over_expired(0.0)
    assert [r.line for r in taken.uncertain] == [1] and taken.requeued == 1
    with pytest.raises(FencedError):
        a.mark_data_sent([(campaign, 2, "isp")])


def test_a_host_restarted_after_a_crash_recovers_only_its_own_rows(two_hosts):
    a, b = two_hosts
    campaign = add_campaign(a, 6)
    a.mark_sending([(campaign, line, "isp") for line in (1, 2)])
    a.mark_data_sent([(campaign, 2, "isp")])
    b.mark_sending([(campaign, line, "isp") for line in (3, 4)])
    b.mark_data_sent([(campaign, 4, "isp")])
    assert claimed_lines(a, campaign) == [5, 6]

    again = same_journal(a)  # a's daemon killed and started again: a new life
    recovery = again.open()
    try:
        assert (recovery.requeued, recovery.uncertain) == (1, 1)
        assert states(b, campaign) == {1: "queued", 2: "uncertain", 3: "sending",
                                       4: "data-sent", 5: "queued", 6: "queued"}
        b.mark_data_sent([(campaign, 3, "isp")])  # b goes on undisturbed
        b.record_outcomes([Outcome(campaign, 4, "sent", 250, "ok")])
        assert states(b, campaign)[4] == "sent"
        with pytest.raises(FencedError):  # the old life is fenced by the new one
            a.mark_data_sent([(campaign, 1, "isp")])
        assert claimed_lines(again, campaign) == [1, 5, 6]
    finally:
        again.close()


def test_a_loading_campaign_is_discarded_only_by_its_own_host(two_hosts):
    a, b = two_hosts
    loading = a.begin_campaign("uid-loading", SPEC)
    again = same_journal(b)
    try:
        assert again.open().discarded_campaigns == 0  # b restarting leaves a's enqueue alone
        assert again.campaign(loading) is not None
        assert b.take_over_expired(0.0) == []  # the old b is fenced by its new life
        again.take_over_expired(0.0)
        assert again.campaign(loading) is None
    finally:
        again.close()


# ---------------------------------------------------------------- session slots


def test_session_slots_never_exceed_the_limit_across_hosts(two_hosts):
    a, b = two_hosts
    assert [a.acquire_session_slot("isp", 3), b.acquire_session_slot("isp", 3),
            a.acquire_session_slot("isp", 3)] == [0, 1, 2]
    assert b.acquire_session_slot("isp", 3) is None
    assert b.acquire_session_slot("other", 1) == 0  # per server
    b.release_session_slot("isp", 1)
    assert a.acquire_session_slot("isp", 3) == 1
    assert a.acquire_session_slot("isp", 2) is None  # a lowered limit: none until below it
    assert {(h.host, h.sessions) for h in a.hosts()} == {("host-a", 3), ("host-b", 1)}
    b.take_over_expired(0.0)  # a's sessions are gone with it
    assert [b.acquire_session_slot("isp", 3) for _ in range(4)] == [0, 1, 2, None]


def test_session_slots_under_concurrent_hosts(pg_dsn: str):
    hosts = [PgJournal(pg_dsn, f"host-{n}") for n in range(3)]
    for host in hosts:
        host.open()
    held: set[int] = set()
    peak = [0]
    lock = threading.Lock()
    problems: list[str] = []

    def work(host: PgJournal) -> None:
        for _ in range(60):
            slot = host.acquire_session_slot("isp", 2)
            if slot is None:
                continue
            with lock:
                if slot in held:
                    problems.append(f"slot {slot} held twice")
                held.add(slot)
                peak[0] = max(peak[0], len(held))
            with lock:
                held.discard(slot)
            host.release_session_slot("isp", slot)

    threads = [threading.Thread(target=work, args=(host,)) for host in hosts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for host in hosts:
        host.close()
    assert not problems and 1 <= peak[0] <= 2


# ---------------------------------------------------------------- PostgreSQL goes away


@contextlib.asynccontextmanager
async def running_committer(dsn: str) -> AsyncIterator[tuple[PgJournal, Committer]]:
    """Host "host-a" on `dsn`, opened, with its committer thread running; both stopped after."""
    journal = PgJournal(dsn, "host-a")
    journal.open()
    committer = Committer(journal)
    committer.start()
    try:
        yield journal, committer
    finally:
        await committer.stop()
        journal.close()


def test_a_postgresql_restart_fails_one_batch_and_the_next_reconnects(pg_cluster, pg_dsn):
    async def scenario() -> None:
        async with running_committer(pg_dsn) as (journal, committer):
            campaign = await committer.run(add_campaign, journal, 3)
            await committer.run(journal.mark_sending, [(campaign, 1, "isp")])
            pg_cluster.restart("immediate")  # like a crash of the server: WAL replayed
            with pytest.raises(JournalWriteError, match="journal write failed"):
                await committer.run(journal.mark_data_sent, [(campaign, 1, "isp")])
            await committer.run(journal.mark_data_sent, [(campaign, 1, "isp")])  # reconnected
            await committer.run(journal.record_outcomes, [Outcome(campaign, 1, "sent", 250, "ok")])
            assert await committer.run(journal.renew_lease)
            assert (await committer.read(journal.counts, campaign)).sent == 1

    asyncio.run(scenario())


# ---------------------------------------------------------------- opening, configuration


def test_a_foreign_or_newer_database_is_refused(pg_cluster, pg_dsn):
    newer = PgJournal(pg_dsn, "host-a")
    newer.open()
    newer.close()
    database = pg_dsn.rsplit("dbname=", 1)[1]
    pg_cluster.psql("INSERT INTO schema_version VALUES (99, 0)", database)
    with pytest.raises(JournalError,
                       match=f"schema version 99; this mailerd knows version {SCHEMA_VERSION}"):
        PgJournal(pg_dsn, "host-a").open()
    foreign = pg_cluster.new_database()
    pg_cluster.psql("CREATE TABLE orders (id integer)", foreign.rsplit("dbname=", 1)[1])
    with pytest.raises(JournalError, match="holds tables but is not a mailerd journal"):
        PgJournal(foreign, "host-a").open()
    with pytest.raises(JournalError, match="cannot open journal"):
        PgJournal(f"host=127.0.0.1 port={pg_cluster.port} user=nobody dbname=x", "h").open()


def write_config(tmp_path: Path, journal: str) -> Path:
    path = tmp_path / "mailerd.toml"
    path.write_text(f"[journal]\n{journal}\n")
    return path


@pytest.mark.parametrize(("journal", "message"), [
    ('backend = "postgresql"', "key journal.dsn: is required"),
    ('dsn = "host=db"', 'key journal.dsn: is used only with backend = "postgresql"'),
    ('backend = "mysql"', "key journal.backend"),
    ('backend = "postgresql"\ndsn = "host=db"\nlease = "0.5s"', "key journal.lease: must be at least"),
    ('host_id = " a "', "key journal.host_id"),
    ('hosts = 2', "unknown key journal.hosts"),
])
def test_journal_config_errors_name_the_key(tmp_path, journal, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path, journal))


def test_open_store_builds_the_configured_backend(tmp_path, pg_dsn):
    password = tmp_path / "pg.pass"
    password.write_text("secret\n")
    config = load_config(write_config(
        tmp_path, f'backend = "postgresql"\ndsn = "{pg_dsn}"\nhost_id = "mx1"\nlease = "4s"\n'
                  f'password_file = "{password}"')).journal
    store = open_store(config, tmp_path)
    assert isinstance(store, PgJournal) and (store.host_id, store.lease) == ("mx1", 4.0)
    assert "secret" not in store.location
    store.open()
    try:
        assert [h.host for h in store.hosts()] == ["mx1"]
    finally:
        store.close()
    sqlite = open_store(JournalConfig(host_id="mx2"), tmp_path)
    assert isinstance(sqlite, Journal) and sqlite.path == tmp_path / "journal.sqlite3"
    assert sqlite.host_id == "mx2"


def test_a_fenced_host_claims_nothing_and_gets_no_session(two_hosts):
    a, b = two_hosts
    campaign = add_campaign(a, 2)
    b.take_over_expired(0.0)
    assert claimed_lines(a, campaign) == [] and a.acquire_session_slot("isp", 5) is None
    assert claimed_lines(b, campaign) == [1, 2]


def test_one_failing_op_of_a_batch_fails_alone_on_postgresql(pg_dsn):
    """The committer's group commit on PostgreSQL: one transaction for the ops queued
    together; the op that fails is undone alone (its savepoint), the others commit."""
    async def scenario() -> None:
        async with running_committer(pg_dsn) as (journal, committer):
            campaign = await committer.run(add_campaign, journal, 4)
            await committer.run(journal.mark_sending, [(campaign, line, "isp") for line in (1, 2, 3)])
            await committer.run(journal.record_outcomes, [Outcome(campaign, 2, "sent", 250, "ok")])
            batch = [committer.run(journal.mark_suppressed, [(campaign, 4, "manual")]),
                     committer.run(journal.mark_data_sent, [(campaign, 1, "isp")]),
                     committer.run(journal.mark_data_sent, [(campaign, 2, "isp")]),
                     committer.run(journal.mark_data_sent, [(campaign, 3, "isp")])]
            results = await asyncio.gather(*batch, return_exceptions=True)
            assert results[0] == 1 and results[1] is None and results[3] is None
            assert isinstance(results[2], JournalError) and "not in a sendable state" in str(results[2])
            assert states(journal, campaign) == {1: "data-sent", 2: "sent", 3: "data-sent",
                                                 4: "suppressed"}
            assert len(journal.sends_since("isp", 0)) == 2  # the failed op's send is undone too

    asyncio.run(scenario())


def test_an_op_whose_error_comes_with_the_commit_fails_alone(pg_dsn):
    """A batch's writes are not waited for on PostgreSQL, so an op's own error comes with
    the COMMIT: that op still fails alone with it, the others commit, and nothing is
    taken for a storage failure (which the outbox would replay forever)."""
    async def scenario() -> None:
        async with running_committer(pg_dsn) as (journal, committer):
            campaign = await committer.run(add_campaign, journal, 3)
            await committer.run(journal.mark_sending, [(campaign, line, "isp") for line in (1, 2, 3)])
            batch = [committer.run(journal.mark_data_sent, [(campaign, 1, "isp")]),
                     committer.run(journal.mark_data_sent, [(campaign, 3, "isp")]),
                     committer.run(journal.record_outcomes,  # the batch's last statement
                                   [Outcome(campaign, 2, "failed", 2 ** 40, "no such code")])]
            results = await asyncio.gather(*batch, return_exceptions=True)
            assert results[0] is None and results[1] is None
            assert not isinstance(results[2], JournalWriteError)
            assert "out of range" in str(results[2])
            assert states(journal, campaign) == {1: "data-sent", 2: "sending", 3: "data-sent"}

    asyncio.run(scenario())


def test_a_daemon_on_sqlite_never_loads_psycopg(tmp_path):
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from mailerd.journal.factory import open_store\n"
        "from mailerd.journal.committer import Committer\n"
        "from mailerd.schema.config import JournalConfig\n"
        f"store = open_store(JournalConfig(), Path({str(tmp_path)!r}))\n"
        "store.open(); store.close()\n"
        "print(sorted(m for m in sys.modules if m.startswith('psycopg')))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def statements_sent(journal: PgJournal, tmp_path: Path, batch) -> int:
    """How many statements `batch()` (a committer batch, begin to commit) sent to
    PostgreSQL: the Bind messages of libpq's protocol trace."""
    trace = tmp_path / f"trace-{time.monotonic_ns()}"
    with trace.open("w") as out:
        pgconn = journal.connection().pgconn
        pgconn.trace(out.fileno())
        try:
            journal.begin()
            batch()
            journal.commit()
        finally:
            pgconn.untrace()
    return sum(1 for line in trace.read_text().splitlines() if "\tF\t" in line and "\tBind\t" in line)


def test_the_ops_of_a_batch_go_as_one_statement_of_each_kind(two_hosts, tmp_path):
    """psycopg and PostgreSQL cost about as much per statement as per row: the hand-outs,
    data-sent and answers of a batch's messages each go as one statement, however many
    messages; two writes to one recipient still apply in the order of their ops."""
    a, _ = two_hosts
    campaign = add_campaign(a, 12)
    assert claimed_lines(a, campaign, limit=12) == list(range(1, 13))

    def handout(lines: range) -> None:
        for line in lines:
            a.mark_sending([(campaign, line, "isp")])
        for line in lines:
            a.mark_data_sent([(campaign, line, "isp")])
        for line in lines:
            a.record_outcomes([Outcome(campaign, line, "sent", 250, "ok")])

    one = statements_sent(a, tmp_path, lambda: handout(range(1, 2)))
    six = statements_sent(a, tmp_path, lambda: handout(range(2, 8)))
    assert one > 3 and six == one
    assert states(a, campaign) == {**{line: "sent" for line in range(1, 8)},
                                   **{line: "queued" for line in range(8, 13)}}
    assert len(a.sends_since("isp", 0.0)) == 7

    def one_recipient_twice() -> None:  # each op sees the one before it
        a.mark_sending([(campaign, 8, "isp")])
        a.mark_sending([(campaign, 9, "isp")])
        a.mark_data_sent([(campaign, 8, "isp")])
        a.record_outcomes([Outcome(campaign, 8, "deferred", 451, "later", time.time() + 60)])
        a.mark_sending([(campaign, 8, "isp")])  # deferred and still held: sending again
        a.requeue([(campaign, 9)], "dropped")
        a.mark_sending([(campaign, 9, "isp")])

    statements_sent(a, tmp_path, one_recipient_twice)
    assert {line: state for line, state in states(a, campaign).items() if line in (8, 9)} == {
        8: "sending", 9: "sending"}
    assert len(a.sends_since("isp", 0.0)) == 8
