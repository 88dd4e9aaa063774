"""A mailerd daemon under test: start, enqueue, wait, measure CPU and memory, stop."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from mailerctl.client import Client, Unreachable
from mailerd.schema.control import CampaignReport, DaemonStatus, Report, Request, Status

from .tools import proc_cpu, thread_cpu, wait_for

JOURNAL_THREAD = "mailerd-journal"


class Mailerd:
    def __init__(self, workdir: Path, port: int, connections: int,
                 log_level: str = "info") -> None:
        self.workdir = workdir
        self.state_dir = workdir / "state"
        self.socket = str(workdir / "control.sock")
        self.config = workdir / "mailerd.toml"
        self.log_path = workdir / "mailerd.log"
        self.connections = connections
        self.config.parent.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            f'[daemon]\nstate_dir = "{self.state_dir}"\nsocket = "{self.socket}"\n'
            f'log_level = "{log_level}"\nshutdown_timeout = "10s"\n\n'
            f'[servers.sink]\nhost = "127.0.0.1"\nport = {port}\nsecurity = "none"\n'
            f'connections = {connections}\ntimeout = "30s"\nhelo_name = "bench.example.org"\n'
        )
        self.proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self, wait_workers: bool = True) -> "Mailerd":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mailerd", "--config", str(self.config)],
                cwd=self.workdir, stdout=log, stderr=log, start_new_session=True,
            )
        wait_for(self._answers, 30, "mailerd to answer on its socket")
        if wait_workers:
            wait_for(self._workers_up, 30, "mailerd's workers to start")
        return self

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"mailerd exited with {self.proc.returncode}: "
                               f"{self.log_path.read_text()[-2000:]}")
        try:
            self.call(Status())
            return True
        except Unreachable:
            return False

    def _workers_up(self) -> bool:
        workers = [w for s in self.status().servers for w in s.workers]
        return len(workers) == self.connections and all(
            w.pid and w.state in ("ready", "idle") for w in workers)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill9()

    def kill9(self) -> None:
        """kill -9 of the daemon and all its workers (its process group)."""
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        wait_for(lambda: not _group_alive(self.proc.pid), 10, "mailerd's processes to die")

    def __enter__(self) -> "Mailerd":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self.proc is not None and self.proc.poll() is None:
            self.kill9()

    # ------------------------------------------------------------ control

    def call(self, request: Request):
        with Client(self.socket, timeout=60) as client:
            return client.call(request)

    def status(self) -> DaemonStatus:
        return self.call(Status())

    def report(self, campaign: int) -> CampaignReport:
        return self.call(Report(campaign=campaign))

    def ctl(self, *args: str) -> tuple[str, float]:
        """Run mailerctl; return its stdout and wall seconds."""
        started = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "mailerctl", "--socket", self.socket, *args],
            capture_output=True, text=True, timeout=600, cwd=self.workdir,
        )
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

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def worker_pids(self) -> list[int]:
        return [w.pid for s in self.status().servers for w in s.workers if w.pid]

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


def _group_alive(pgid: int) -> bool:
    """Any process of the group not yet dead? Zombies don't count: the workers the
    killed daemon leaves behind are reaped by init whenever it gets to them (often
    a second later), but they hold nothing: no socket, no lock, no CPU."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False
