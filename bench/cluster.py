"""Scenario: several hosts on one PostgreSQL journal (issue 16), against one host on SQLite.

All on this one machine, so the figures are the cost per message of the shared journal,
not scaling: the hosts share the CPUs with each other and with PostgreSQL.

  sqlite     1 host, journal on SQLite (the default), C sessions
  pg_1..3    1, 2, 3 hosts on one private PostgreSQL (fsync on, synchronous_commit on),
             the relay account's C sessions shared by the cluster
  commit     journal CPU per message: the journal thread on SQLite; the journal threads
             of every host plus the PostgreSQL server's processes on PostgreSQL
  takeover   2 hosts, an account of ONE session: the host holding it is killed (kill -9);
             the time until the other host has sent again is the time from a host's
             death to its recipients moving again (lease + the takeover's look)
Targets: one host on PostgreSQL >= 0.6x the same host on SQLite; takeover <= lease + 2 s.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from mailerd.testing import postgres  # the private cluster the tests use too
from mailerd.testing.daemon import toml_value

from . import data
from .mailerd_proc import Mailerd
from .tools import Sink, interleaved, median_of, proc_cpu, process_tree, wait_for

RATIO_TARGET = 0.6
# How often the end of a run is looked for. The run's time ends at its last outcome in the
# journal (_last_outcome_at), not at the look that saw it, so looking seldom costs no
# precision; looking often would (a report counts the campaign's states: on PostgreSQL
# at 50 ms, about 0.1 ms of server time a message, and journal time on SQLite).
END_POLL = 0.5
TAKEOVER_MARGIN = 2.0


class Host(Mailerd):
    """A benchmark mailerd on a given [journal] (None: SQLite in its state directory)."""

    def __init__(self, workdir: Path, port: int, connections: int,
                 journal: dict[str, Any] | None) -> None:
        super().__init__(workdir, port, connections)
        if journal is not None:
            table = "\n".join(f"{key} = {toml_value(value)}" for key, value in journal.items())
            self.config.write_text(f"{self.config.read_text()}\n[journal]\n{table}\n")


def run(count: int, hosts: list[int], sessions: int, repeats: int, lease: float,
        workdir: Path) -> dict:
    reason = postgres.missing()
    if reason:
        return {"skipped": reason}
    campaign = data.write_campaign(workdir / "campaign")
    recipients = data.write_list(workdir / "list.csv", count)
    pg = postgres.start_cluster(fsync=True)
    try:
        with Sink() as sink:
            contenders = {"sqlite": lambda: run_hosts(sink, None, 1, sessions, campaign,
                                                       recipients, count, workdir)}
            for n in hosts:
                contenders[f"pg_{n}"] = (lambda n=n: run_hosts(sink, pg, n, sessions, campaign,
                                                              recipients, count, workdir))
            runs = interleaved(repeats, contenders)
            takeovers = [takeover(sink, pg, lease, campaign, recipients, workdir)
                         for _ in range(repeats)]
    finally:
        pg.destroy()
    result: dict[str, Any] = {"count": count, "sessions": sessions, "repeats": repeats,
                              "lease": lease, "hosts": hosts}
    result["by_setup"] = {name: {key: median_of(values, key) for key in values[0]}
                          for name, values in runs.items()}
    result["takeover_s"] = sorted(takeovers)[len(takeovers) // 2]
    result["takeover_runs"] = takeovers
    result["targets"] = _targets(result)
    return result


def run_hosts(sink: Sink, pg: postgres.PgCluster | None, n: int, sessions: int,
              campaign: Path, recipients: Path, count: int, workdir: Path) -> dict:
    dsn = pg.new_database("bench") if pg is not None else None
    daemons: list[Host] = []
    try:
        for i in range(n):
            journal = None if dsn is None else {"backend": "postgresql", "dsn": dsn,
                                                "host_id": f"bench-{i}", "lease": "5s"}
            daemons.append(Host(Path(tempfile.mkdtemp(prefix="host-", dir=workdir)), sink.port,
                                sessions, journal).start())
        workers = [d.worker_pids() for d in daemons]
        before = [d.cpu(w) for d, w in zip(daemons, workers)]
        server_before = _server_cpu(pg)
        started = time.time()
        campaign_id, _ = daemons[0].enqueue(campaign, recipients)
        wait_for(lambda: daemons[0].report(campaign_id).counts.left == 0,
                 max(120, count / 50), "the campaign to be sent", END_POLL)
        after = [d.cpu(w) for d, w in zip(daemons, workers)]
        server = _server_cpu(pg) - server_before
        wall = _last_outcome_at(daemons[0], dsn, campaign_id) - started
        sent = daemons[0].report(campaign_id).counts.sent
    finally:
        for daemon in daemons:
            daemon.stop()
            daemon.cleanup()
    cpu = {key: sum(a[key] - b[key] for a, b in zip(after, before)) for key in after[0]}
    return {
        "rate": sent / wall, "wall": wall, "sent": sent,
        "cpu_ms_per_msg": 1000 * (cpu["daemon"] + cpu["workers"] + server) / sent,
        "commit_ms_per_msg": 1000 * (cpu["journal"] + server) / sent,
        "journal_thread_ms_per_msg": 1000 * cpu["journal"] / sent,
        "postgresql_ms_per_msg": 1000 * server / sent,
    }


def _last_outcome_at(daemon: Host, dsn: str | None, campaign: int) -> float:
    """When the journal recorded the campaign's last outcome (the daemon's clock, as
    `started`), read from the journal itself, whichever the backend."""
    sql = "SELECT max(updated) FROM recipients WHERE campaign=%s" % int(campaign)
    if dsn is None:
        return float(daemon.journal_query(sql)[0][0])
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(sql).fetchone()
    assert row is not None
    return float(row[0])


def _server_cpu(pg: postgres.PgCluster | None) -> float:
    """CPU seconds of the PostgreSQL server's processes (postmaster and backends)."""
    if pg is None:
        return 0.0
    postmaster = int((pg.data / "postmaster.pid").read_text().split()[0])
    return sum(proc_cpu(pid) for pid in process_tree(postmaster))


def takeover(sink: Sink, pg: postgres.PgCluster, lease: float, campaign: Path,
             recipients: Path, workdir: Path) -> float:
    """Seconds from kill -9 of the host holding the account's one session to the other
    host's next message."""
    dsn = pg.new_database("takeover")
    daemons = [Host(Path(tempfile.mkdtemp(prefix="host-", dir=workdir)), sink.port, 1,
                    {"backend": "postgresql", "dsn": dsn, "host_id": f"t-{i}",
                     "lease": f"{lease:g}s"}).start() for i in range(2)]
    try:
        campaign_id, _ = daemons[0].enqueue(campaign, recipients)

        def holder() -> Host | None:
            busy = [d for d in daemons if any(w.state == "sending" or w.sent
                                              for s in d.status().servers for w in s.workers)]
            return busy[0] if len(busy) == 1 else None
        victim = wait_for(holder, 60, "one host to hold the session", 0.05)
        survivor = daemons[1 - daemons.index(victim)]
        victim.kill_group()
        killed = time.monotonic()
        sent_at_kill = survivor.report(campaign_id).counts.sent
        wait_for(lambda: survivor.report(campaign_id).counts.sent > sent_at_kill,
                 lease + 30, "the survivor to send again", 0.02)
        return time.monotonic() - killed
    finally:
        for daemon in daemons:
            daemon.stop()
            daemon.cleanup()


def _targets(result: dict) -> dict:
    setups = result["by_setup"]
    targets = {}
    if "pg_1" in setups:
        ratio = setups["pg_1"]["rate"] / setups["sqlite"]["rate"]
        targets["pg_vs_sqlite"] = {"target": RATIO_TARGET, "measured": ratio,
                                   "met": ratio >= RATIO_TARGET, "unit": "×"}
    limit = result["lease"] + TAKEOVER_MARGIN
    targets["takeover_s"] = {"target": limit, "measured": result["takeover_s"],
                             "met": result["takeover_s"] <= limit, "at_most": True, "unit": " s"}
    return targets


def markdown(result: dict) -> str:
    if "skipped" in result:
        return f"### Several hosts on PostgreSQL\n\nskipped: {result['skipped']}"
    out = [f"### Several hosts on PostgreSQL: N = {result['count']:,}, the account's "
           f"C = {result['sessions']} sessions shared by the hosts, against smtp-sink, one "
           f"machine (cost per message, not scaling); median of {result['repeats']}", "",
           "| setup | msg/s | CPU ms/msg (all) | commit ms/msg | of which PostgreSQL |",
           "|---|---:|---:|---:|---:|"]
    for name, m in result["by_setup"].items():
        hosts = name.removeprefix("pg_")
        label = ("1 host, SQLite" if name == "sqlite"
                 else f"{hosts} host{'s' if hosts != '1' else ''}, PostgreSQL")
        out.append(f"| {label} | {m['rate']:,.0f} | {m['cpu_ms_per_msg']:.3f} | "
                   f"{m['commit_ms_per_msg']:.3f} | {m['postgresql_ms_per_msg']:.3f} |")
    out += ["", f"Takeover (lease {result['lease']:g} s): kill -9 of the host holding the "
            f"account's one session to the other host's next message: "
            f"{result['takeover_s']:.2f} s (runs: "
            f"{', '.join(f'{t:.2f}' for t in result['takeover_runs'])})", ""]
    from .report import _targets as targets_table
    out.append(targets_table(result["targets"], "", at_least=True))
    return "\n".join(out)
