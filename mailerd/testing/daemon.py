"""A real mailerd process for tests and benchmarks: start it, talk to it, stop or kill -9 it.

The daemon runs as `python -m mailerd --config FILE` in its own process group, so
that a kill of the group reaches every worker too, with its log in the work
directory. tests/conftest.py and bench/mailerd_proc.py add what only they need
(campaign helpers; CPU and journal readings) on top of DaemonProcess.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from mailerctl.client import Client, Unreachable
from mailerd.schema.control import CampaignReport, DaemonStatus, Report, Request, Status
from mailerd.testing.waiting import wait_until


class DaemonExited(RuntimeError):
    """The daemon ended while it was expected to start; the message holds its log's end."""


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def postgresql_journal(dsn: str, host_id: str, lease: str = "2s") -> dict[str, Any]:
    """The [journal] table of one host of several on the PostgreSQL database `dsn`."""
    return {"backend": "postgresql", "dsn": dsn, "host_id": host_id, "lease": lease}


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    """A TOML file of `{"section": {"key": value}}`."""
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


class DaemonProcess:
    """One mailerd process with its own state dir, socket, config and log in `workdir`.

    `sections` is the config as for write_config; the daemon's state_dir and socket
    are set to the work directory's. env: extra environment variables; stderr: where
    its stderr goes (default: the log file, with stdout); prefix: a command line that
    execs the daemon's ("$@"); pass_fds: file descriptors it inherits. journal: the
    [journal] table, e.g. `postgresql_journal(dsn, "host-a")` for one of several hosts
    on one PostgreSQL database (default: SQLite in the state directory).
    """

    def __init__(self, workdir: Path, sections: dict[str, dict[str, Any]], *,
                 env: dict[str, str] | None = None, stderr: Any = None,
                 prefix: list[str] | None = None, pass_fds: tuple[int, ...] = (),
                 call_timeout: float = 30, journal: dict[str, Any] | None = None) -> None:
        self.workdir = workdir
        self.state_dir = workdir / "state"
        self.socket = str(workdir / "control.sock")
        self.log_path = workdir / "mailerd.log"
        self.env = env or {}
        self.stderr = stderr
        self.prefix = prefix or []
        self.pass_fds = tuple(pass_fds)
        self.call_timeout = call_timeout
        daemon = {"state_dir": str(self.state_dir), "socket": self.socket,
                  **sections.get("daemon", {})}
        if journal is not None:
            sections = {**sections, "journal": journal}
        self.host_id: str | None = sections.get("journal", {}).get("host_id")
        self.config = write_config(workdir / "mailerd.toml", {**sections, "daemon": daemon})
        self.proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------ lifecycle

    def command(self) -> list[str]:
        return [*self.prefix, sys.executable, "-m", "mailerd", "--config", str(self.config)]

    def environment(self) -> dict[str, str] | None:
        return {**os.environ, **self.env} if self.env else None

    def start(self, wait: bool = True, timeout: float = 30) -> "DaemonProcess":
        """Start the daemon; with `wait`, return once it answers on its socket."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), cwd=self.workdir, stdout=log,
                stderr=log if self.stderr is None else self.stderr, start_new_session=True,
                env=self.environment(), pass_fds=self.pass_fds,
            )
        if wait:
            wait_until(self._answers, timeout, "mailerd to answer on its socket", error=TimeoutError)
        return self

    def start_expecting_failure(self) -> subprocess.CompletedProcess[str]:
        """Run mailerd in the foreground, for a start that must fail: its exit code and output."""
        return subprocess.run(self.command(), capture_output=True, text=True, timeout=30,
                              cwd=self.workdir, env=self.environment(), pass_fds=self.pass_fds)

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise DaemonExited(f"mailerd exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        try:
            self.call(Status())
            return True
        except Unreachable:
            return False

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM, and its exit code once it has stopped (0 if it was not running)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def signal_group(self, sig: signal.Signals) -> None:
        """A signal to the daemon and every worker (SIGSTOP/SIGCONT: freeze and thaw a host)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)

    def kill_group(self) -> None:
        """kill -9 of the daemon and every worker (its whole process group)."""
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        pgid = self.proc.pid
        wait_until(lambda: not group_alive(pgid), 10, "mailerd's processes to die",
                   error=TimeoutError)

    def cleanup(self) -> None:
        """Whatever state it is in: nothing of it left running."""
        if self.proc is not None and self.proc.poll() is None:
            self.kill_group()

    # ------------------------------------------------------------ control

    def call(self, request: Request) -> Any:
        with Client(self.socket, timeout=self.call_timeout) as client:
            return client.call(request)

    def status(self) -> DaemonStatus:
        return self.call(Status())

    def report(self, campaign: int, state: str | None = None) -> CampaignReport:
        return self.call(Report(campaign=campaign, state=state))

    def worker_pids(self) -> list[int]:
        return [w.pid for s in self.status().servers for w in s.workers if w.pid]

    def mailerctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run mailerctl against this daemon's socket; the caller checks the result."""
        return subprocess.run(
            [sys.executable, "-m", "mailerctl", "--socket", self.socket, *args],
            capture_output=True, text=True, timeout=timeout, cwd=self.workdir,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def group_alive(pgid: int) -> bool:
    """Any process of the group not yet dead? Zombies don't count: the workers a
    killed daemon leaves behind are reaped by init whenever it gets to them, but
    they hold nothing: no socket, no lock, no CPU."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False
