"""A mailerd daemon under benchmark (mailerd/testing/daemon.py): enqueue, wait, measure CPU
and memory."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from pathlib import Path

from mailerd.testing.daemon import DaemonProcess

from .tools import proc_cpu, thread_cpu, wait_for

JOURNAL_THREAD = "mailerd-journal"


class Mailerd(DaemonProcess):
    """The benchmarks' mailerd: one relay account `sink` on 127.0.0.1:`port`."""

    def __init__(self, workdir: Path, port: int, connections: int,
                 log_level: str = "info") -> None:
        super().__init__(workdir, {
            "daemon": {"log_level": log_level, "shutdown_timeout": "10s"},
            "servers.sink": {"host": "127.0.0.1", "port": port, "security": "none",
                             "connections": connections, "timeout": "30s",
                             "helo_name": "bench.example.org"},
        }, call_timeout=60)
        self.connections = connections

    # ------------------------------------------------------------ lifecycle

    def start(self, wait: bool = True, timeout: float = 30,
              wait_workers: bool = True) -> "Mailerd":
        super().start(wait, timeout)
        if wait_workers:
            wait_for(self._workers_up, 30, "mailerd's workers to start")
        return self

    def _workers_up(self) -> bool:
        workers = [w for s in self.status().servers for w in s.workers]
        return len(workers) == self.connections and all(
            w.pid and w.state in ("ready", "idle") for w in workers)

    def stop(self) -> None:
        try:
            self.terminate(30)
        except subprocess.TimeoutExpired:
            self.kill_group()

    def __enter__(self) -> "Mailerd":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.cleanup()

    # ------------------------------------------------------------ control

    def ctl(self, *args: str) -> tuple[str, float]:
        """Run mailerctl; return its stdout and wall seconds."""
        started = time.perf_counter()
        result = self.mailerctl(*args, timeout=600)
        wall = time.perf_counter() - started
        if result.returncode != 0:
            raise RuntimeError(f"mailerctl {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout, wall

    def enqueue(self, campaign: Path, recipients: Path) -> tuple[int, float]:
        """Enqueue with mailerctl; return the campaign id and wall seconds."""
        out, wall = self.ctl("enqueue", str(campaign), "--recipients", str(recipients), "--json")
        return json.loads(out)["id"], wall

    def wait_settled(self, campaign: int, timeout: float, interval: float = 1.0) -> None:
        """Until nothing of the campaign is queued, sending or deferred."""
        def settled() -> bool:
            return self.report(campaign).counts.left == 0
        wait_for(settled, timeout, f"campaign {campaign} to be sent", interval)

    # ------------------------------------------------------------ measurements

    def cpu(self, workers: list[int]) -> dict[str, float]:
        """CPU seconds so far: daemon (journal thread and the rest) and workers."""
        threads = thread_cpu(self.pid)
        journal = threads.pop(JOURNAL_THREAD, 0.0)
        return {
            "journal": journal,
            "daemon": journal + sum(threads.values()),
            "workers": sum(proc_cpu(pid) for pid in workers),
        }

    def journal_files_size(self) -> int:
        return sum(p.stat().st_size for p in self.state_dir.glob("journal.sqlite3*"))

    def journal_query(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Read the journal directly (read-only; WAL lets us beside the daemon)."""
        uri = f"file:{self.state_dir / 'journal.sqlite3'}?mode=ro"
        with sqlite3.connect(uri, uri=True, timeout=30) as db:
            return db.execute(sql, params).fetchall()

    def last_outcome_at(self, campaign: int) -> float:
        return self.journal_query(
            "SELECT max(updated) FROM recipients WHERE campaign=? AND state='sent'",
            (campaign,))[0][0]

    def first_sent_after(self, campaign: int, since: float) -> float | None:
        return self.journal_query(
            "SELECT min(updated) FROM recipients WHERE campaign=? AND state='sent' "
            "AND updated>?", (campaign, since))[0][0]

