"""Shared fixtures: a real mailerd process, real fake relays, real campaign files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import msgspec
import pytest

from mailerctl.client import Client, Refused, Unreachable
from mailerd.schema.control import CampaignReport, DaemonStatus, Report, Request, Status
from mailerd.testing.relay import Faults, FakeRelay
from mailerd.testing.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


class Daemon:
    """A mailerd process in its own process group, with its own state dir.

    env: extra environment variables; stderr: where its stderr goes (default: the log
    file, with stdout); prefix: a command line that execs the daemon's ("$@");
    pass_fds: file descriptors it inherits.
    """

    def __init__(self, workdir: Path, servers: dict[str, dict[str, Any]],
                 daemon: dict[str, Any] | None = None,
                 delivery: dict[str, Any] | None = None, *,
                 env: dict[str, str] | None = None, stderr: Any = None,
                 prefix: list[str] | None = None, pass_fds: tuple[int, ...] = ()) -> None:
        self.workdir = workdir
        self.env = env or {}
        self.stderr = stderr
        self.prefix = prefix or []
        self.pass_fds = tuple(pass_fds)
        self.state_dir = workdir / "state"
        self.socket = str(workdir / "control.sock")
        sections: dict[str, dict[str, Any]] = {
            "daemon": {"state_dir": str(self.state_dir), "socket": self.socket,
                       "log_level": "info", "shutdown_timeout": "10s", **(daemon or {})},
            "delivery": {"retry_initial": "1s", "retry_max": "2s", "reconnect_initial": "0.2s",
                         "reconnect_max": "2s", **(delivery or {})},
        }
        for name, values in servers.items():
            sections[f"servers.{name}"] = {"timeout": "5s", **values}
        self.config = write_config(workdir / "mailerd.toml", sections)
        self.log_path = workdir / "mailerd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        return [*self.prefix, sys.executable, "-m", "mailerd", "--config", str(self.config)]

    def environment(self) -> dict[str, str] | None:
        return {**os.environ, **self.env} if self.env else None

    def start(self, wait: bool = True) -> "Daemon":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.command(), cwd=self.workdir, stdout=log,
            stderr=log if self.stderr is None else self.stderr, start_new_session=True,
            env=self.environment(), pass_fds=self.pass_fds,
        )
        log.close()
        if wait:
            wait_until(self._answers, 20, "the daemon to answer on its socket")
        return self

    def start_expecting_failure(self) -> subprocess.CompletedProcess[str]:
        """Run mailerd in the foreground, for a start that must fail: its exit code and output."""
        return subprocess.run(self.command(), capture_output=True, text=True, timeout=30,
                              cwd=self.workdir, env=self.environment(), pass_fds=self.pass_fds)

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"mailerd exited with {self.proc.returncode}:\n{self.log()}")
        try:
            self.call(Status())
            return True
        except Unreachable:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_line(self, *needles: str, timeout: float = 10) -> str:
        """The first log line holding every needle; logging is asynchronous, so wait for it."""
        def find() -> str | None:
            return next((line for line in self.log().splitlines()
                         if all(n in line for n in needles)), None)
        return wait_until(find, timeout, f"a log line with {needles}")

    def call(self, request: Request) -> Any:
        with Client(self.socket, timeout=30) as client:
            return client.call(request)

    def status(self) -> DaemonStatus:
        return self.call(Status())

    def report(self, campaign: int, state: str | None = None) -> CampaignReport:
        return self.call(Report(campaign=campaign, state=state))

    def emails(self, campaign: int, state: str) -> set[str]:
        """The addresses of the campaign's recipients in that state."""
        return {r.email for r in self.report(campaign, state).recipients}

    def ctl(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "mailerctl", "--socket", self.socket, *args],
            capture_output=True, text=True, timeout=timeout, cwd=self.workdir,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"mailerctl {' '.join(args)} exited {result.returncode}:\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def enqueue(self, campaign_file: Path, recipients: Path) -> int:
        out = self.ctl("enqueue", str(campaign_file), "--recipients", str(recipients), "--json")
        return msgspec.json.decode(out.stdout)["id"]

    def send_campaign(self, directory: Path, count: int, **kwargs: Any) -> int:
        """make_campaign's files, enqueued with mailerctl: the campaign's id."""
        return self.enqueue(*make_campaign(directory, count, **kwargs))

    def wait_done(self, campaign: int, timeout: float = 60) -> CampaignReport:
        return wait_until(
            lambda: (r := self.report(campaign)).state == "done" and r,
            timeout, f"campaign {campaign} to be done",
        )

    def quiesce(self, campaign: int, timeout: float = 30) -> None:
        """Pause and wait until nothing is in flight, so journal and relay can be compared."""
        if self.report(campaign).state == "running":
            paused = self.ctl("pause", str(campaign), check=False)
            # it may have finished between the report and the pause: then there is nothing to pause
            assert paused.returncode == 0 or self.report(campaign).state == "done", paused.stderr
        wait_until(lambda: self.report(campaign).counts.sending == 0, timeout, "in-flight work to end")

    def worker_pids(self) -> list[int]:
        return [w.pid for s in self.status().servers for w in s.workers if w.pid]

    def kill_group(self) -> None:
        """kill -9 of the daemon and every worker (its whole process group)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        wait_until(lambda: not _group_alive(self.proc.pid), 10, "the process group to die")

    def terminate(self, timeout: float = 30) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        return code

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def make_campaign(directory: Path, count: int, *, domain: str = "example.com",
                  subject: str = "Hello {{ first_name }}",
                  text: str = "Dear {{ first_name }},\nyour code is {{ code }}.\n",
                  html: str | None = None, extra_rows: list[str] | None = None,
                  servers: list[str] | None = None, name: str = "Test letter") -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "body.txt").write_text(text)
    lines = [f'name = "{name}"', 'from = "News <news@example.org>"', f'subject = "{subject}"',
             'text = "body.txt"']
    if html is not None:
        (directory / "body.html").write_text(html)
        lines.append('html = "body.html"')
    if servers is not None:
        lines.append(f"servers = {toml_value(servers)}")
    campaign = directory / "campaign.toml"
    campaign.write_text("\n".join(lines) + "\n")
    rows = ["email,first_name,code"]
    rows += [f"user{i}@{domain},Name{i},C{i:06d}" for i in range(count)]
    rows += extra_rows or []
    recipients = directory / "list.csv"
    recipients.write_text("\n".join(rows) + "\n")
    return campaign, recipients


def campaign_addresses(count: int, domain: str = "example.com") -> set[str]:
    """The addresses make_campaign(directory, count, domain=domain) writes."""
    return {f"user{i}@{domain}" for i in range(count)}


def assert_nobody_lost_or_sent_twice(received: Mapping[str, int], uncertain: set[str],
                                     expected: set[str], sent: int, uncertain_count: int) -> None:
    """After crashes and a resume: `received` (address -> copies at the relay) has nobody twice,
    and every expected address is at the relay or uncertain; `sent` and `uncertain_count` are
    the report's counts."""
    twice = sorted(a for a, n in received.items() if n > 1)
    assert not twice, f"nobody is sent twice: {twice[:10]}"
    lost = sorted(expected - set(received) - uncertain)
    assert set(received) | uncertain == expected, f"nobody is lost: {lost[:10]}"
    assert sent + uncertain_count == len(expected)
    assert sent == len(set(received) - uncertain)


@pytest.fixture
def relay_factory() -> Iterator[Callable[..., FakeRelay]]:
    relays: list[FakeRelay] = []

    def make(faults: Faults | None = None, **options: Any) -> FakeRelay:
        relay = FakeRelay(faults or Faults(), **options)
        relay.start()
        relays.append(relay)
        return relay

    yield make
    for relay in relays:
        relay.stop()


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    daemons: list[Daemon] = []

    def make(servers: dict[str, dict[str, Any]], **kwargs: Any) -> Daemon:
        workdir = tmp_path / f"d{len(daemons)}"
        workdir.mkdir()
        daemon = Daemon(workdir, servers, **kwargs)
        daemons.append(daemon)
        return daemon

    yield make
    for daemon in daemons:
        daemon.cleanup()
    for daemon in daemons:  # a crash in the daemon or a worker is a bug, even if retried
        assert "Traceback" not in daemon.log(), daemon.log()[-3000:]


def relay_server(relay: FakeRelay, connections: int = 2, **extra: Any) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": relay.port, "security": "none",
            "connections": connections, **extra}


__all__ = ["Daemon", "Refused", "assert_nobody_lost_or_sent_twice", "campaign_addresses",
           "make_campaign", "relay_server", "wait_until", "write_config"]
