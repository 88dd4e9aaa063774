"""Shared fixtures: a real mailerd process, real fake relays, real campaign files."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import msgspec
import pytest

from mailerd.testing import postgres
from mailerctl.client import Refused
from mailerd.journal.backend import JournalStore
from mailerd.journal.store import Journal
from mailerd.schema.control import CampaignReport
from mailerd.testing.daemon import DaemonProcess, postgresql_journal, toml_value, write_config
from mailerd.testing.relay import Faults, FakeRelay
from mailerd.testing.waiting import wait_until


class Daemon(DaemonProcess):
    """A test's mailerd: `servers` are the [servers.NAME] tables; short timeouts and
    retry delays unless `daemon` or `delivery` say otherwise (other keyword arguments
    as for DaemonProcess)."""

    def __init__(self, workdir: Path, servers: dict[str, dict[str, Any]],
                 daemon: dict[str, Any] | None = None,
                 delivery: dict[str, Any] | None = None, **kwargs: Any) -> None:
        sections: dict[str, dict[str, Any]] = {
            "daemon": {"log_level": "info", "shutdown_timeout": "10s", **(daemon or {})},
            "delivery": {"retry_initial": "1s", "retry_max": "2s", "reconnect_initial": "0.2s",
                         "reconnect_max": "2s", **(delivery or {})},
        }
        for name, values in servers.items():
            sections[f"servers.{name}"] = {"timeout": "5s", **values}
        super().__init__(workdir, sections, **kwargs)

    def start(self, wait: bool = True, timeout: float = 20) -> "Daemon":
        super().start(wait, timeout)
        return self

    def log_line(self, *needles: str, timeout: float = 10) -> str:
        """The first log line holding every needle; logging is asynchronous, so wait for it."""
        def find() -> str | None:
            return next((line for line in self.log().splitlines()
                         if all(n in line for n in needles)), None)
        return wait_until(find, timeout, f"a log line with {needles}")

    def emails(self, campaign: int, state: str) -> set[str]:
        """The addresses of the campaign's recipients in that state."""
        return {r.email for r in self.report(campaign, state).recipients}

    def ctl(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        result = self.mailerctl(*args, timeout=timeout)
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


JOURNAL_BACKENDS = ("sqlite", "postgresql")


def new_journal(backend: str, request: pytest.FixtureRequest, host_id: str = "host-a") -> JournalStore:
    """A journal, not yet opened: on a real SQLite file in the test's directory, or in a
    fresh database of the session's private PostgreSQL (mailerd/testing/postgres.py)."""
    if backend == "sqlite":
        return Journal(request.getfixturevalue("tmp_path") / "journal.sqlite3", host_id=host_id)
    from mailerd.journal.postgres import PgJournal

    return PgJournal(request.getfixturevalue("pg_dsn"), host_id)


def same_journal(journal: JournalStore, host_id: str | None = None) -> JournalStore:
    """Another, unopened instance of the same journal: the same daemon restarted, or (with
    another `host_id`) a second host on the same PostgreSQL database."""
    from mailerd.journal.postgres import PgJournal

    if isinstance(journal, PgJournal):
        return PgJournal(journal.dsn, host_id or journal.host_id, journal.lease)
    assert isinstance(journal, Journal)
    return Journal(journal.path, host_id=host_id or journal.host_id)


@pytest.fixture(params=JOURNAL_BACKENDS)
def journal(request: pytest.FixtureRequest) -> Iterator[JournalStore]:
    """An open journal, once on SQLite and once on PostgreSQL."""
    journal = new_journal(request.param, request)
    journal.open()
    yield journal
    journal.close()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[postgres.PgCluster]:
    """A private PostgreSQL (mailerd/testing/postgres.py) for the whole session, fsync on:
    `new_database()` gives a fresh database's DSN; restart()/stop()/start() for the tests
    of a PostgreSQL that goes away under the daemons. Skipped where it cannot run."""
    reason = postgres.missing()
    if reason:
        pytest.skip(reason)
    cluster = postgres.start_cluster(fsync=True)
    yield cluster
    cluster.destroy()


@pytest.fixture
def pg_dsn(pg_cluster: postgres.PgCluster) -> str:
    """The DSN of a fresh, empty database of the session's private PostgreSQL."""
    if not pg_cluster.running:  # a test that stopped it and failed before starting it again
        pg_cluster.start()
    return pg_cluster.new_database()


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
def journal_backend(request: pytest.FixtureRequest) -> str:
    """The journal of the daemons daemon_factory makes: "sqlite" unless the test module
    parametrises it (`pytest.mark.parametrize("journal_backend", JOURNAL_BACKENDS,
    indirect=True)`)."""
    return getattr(request, "param", "sqlite")


@pytest.fixture
def daemon_factory(tmp_path: Path, journal_backend: str,
                   request: pytest.FixtureRequest) -> Iterator[Callable[..., Daemon]]:
    """make(servers, **kwargs): a Daemon in its own work directory. On the "postgresql"
    backend each gets a fresh database of the session's private PostgreSQL (one host of
    its own); a `journal=` keyword says otherwise (tests/test_cluster.py: several hosts)."""
    daemons: list[Daemon] = []

    def make(servers: dict[str, dict[str, Any]], **kwargs: Any) -> Daemon:
        workdir = tmp_path / f"d{len(daemons)}"
        workdir.mkdir()
        if journal_backend == "postgresql" and "journal" not in kwargs:
            cluster = request.getfixturevalue("pg_cluster")
            if not cluster.running:  # a test that stopped it and failed before starting it
                cluster.start()
            kwargs["journal"] = postgresql_journal(cluster.new_database(), "host-0", "10s")
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


__all__ = ["Daemon", "JOURNAL_BACKENDS", "Refused", "assert_nobody_lost_or_sent_twice",
           "campaign_addresses", "make_campaign", "new_journal", "relay_server", "same_journal",
           "wait_until", "write_config"]
