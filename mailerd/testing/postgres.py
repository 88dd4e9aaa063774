"""A private PostgreSQL cluster for tests: Debian's postgresql packages, started on loopback.

Nothing of the host's PostgreSQL is used or touched: `initdb` makes a cluster in a
scratch directory under /tmp, and its server listens on its own port on 127.0.0.1 and
on a Unix socket in that directory. PostgreSQL refuses to run as root, so when the
tests run as root every server command runs as the `postgres` user (runuser), which
owns the scratch directory. Authentication is `trust`, reachable from loopback only.

`fsync` stays on by default: the journal's promise (`data-sent` is on disk before the
final ".") holds only with it, and the "PostgreSQL restarted mid-campaign" tests rely
on it. `PgCluster(fsync=False)` is for tests that measure nothing of durability.

`missing()` says why a cluster cannot run here, so tests skip with that reason.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import itertools
from pathlib import Path

from mailerd.testing.ports import free_port

SUPERUSER = "postgres"  # the cluster's superuser (a role name, not the OS user)
RUN_AS = "postgres"  # the OS user the server runs as when the tests run as root


def bin_dir() -> Path | None:
    """The newest installed /usr/lib/postgresql/N/bin that has initdb, or None."""
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    if not found:
        return None
    return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)


def missing() -> str | None:
    """Why a private PostgreSQL cannot run here, or None."""
    binaries = bin_dir()
    if binaries is None:
        return ("PostgreSQL's server binaries are not installed (/usr/lib/postgresql/*/bin/initdb; "
                "scripts/setup.sh installs the `postgresql` package)")
    for name in ("pg_ctl", "postgres", "psql"):
        if not os.access(binaries / name, os.X_OK):
            return f"{binaries / name} is missing"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(RUN_AS)
        except KeyError:
            return f"user {RUN_AS!r} is missing (created by Debian's postgresql-common)"
        if not shutil.which("runuser"):
            return "runuser is missing (util-linux): needed to run PostgreSQL as a non-root user"
    return None


class PgCluster:
    """One private cluster: `new_database()` gives a DSN of a fresh, empty database."""

    def __init__(self, fsync: bool = True) -> None:
        binaries = bin_dir()
        assert binaries is not None, missing()
        self.bin = binaries
        self.base = Path(tempfile.mkdtemp(prefix="mailerd-pg-"))
        self.data = self.base / "data"
        self.socket_dir = self.base / "run"
        self.log_file = self.base / "server.log"
        self.port = free_port()
        self.host = "127.0.0.1"
        self.fsync = fsync
        self.running = False
        self._names = itertools.count(1)
        self.socket_dir.mkdir()
        if os.geteuid() == 0:
            user = pwd.getpwnam(RUN_AS)
            for path in (self.base, self.socket_dir):
                os.chown(path, user.pw_uid, user.pw_gid)
        self.base.chmod(0o700)

    # ------------------------------------------------------------ server commands

    def _server_command(self, *args: str, timeout: float = 120) -> str:
        """Run a server binary (as RUN_AS when we are root); its output, or RuntimeError."""
        command = [str(self.bin / args[0]), *args[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", RUN_AS, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                env={**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"},
                                stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} exited {result.returncode}:\n"
                               f"{result.stdout}{result.stderr}\n{self.server_log()[-3000:]}")
        return result.stdout

    def server_log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def init(self) -> "PgCluster":
        self._server_command("initdb", "-D", str(self.data), "-U", SUPERUSER, "-A", "trust",
                             "-E", "UTF8", "--locale=C", "--no-sync")
        settings = {
            "listen_addresses": f"'{self.host}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "fsync": "on" if self.fsync else "off",
            "synchronous_commit": "on",
            "full_page_writes": "on" if self.fsync else "off",
            "max_connections": "100",
            "shared_buffers": "32MB",
            "logging_collector": "off",
            "log_min_messages": "warning",
        }
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write("\n# mailerd/testing/postgres.py\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        return self

    def start(self) -> None:
        self._server_command("pg_ctl", "-D", str(self.data), "-l", str(self.log_file),
                             "-w", "-t", "60", "start")
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: "fast" (sessions are ended cleanly), or "immediate" (like a crash:
        the next start replays the WAL)."""
        if self.running:
            self._server_command("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")
            self.running = False

    def restart(self, mode: str = "fast") -> None:
        """PostgreSQL restarted under the daemons' feet: every connection to it is lost."""
        self.stop(mode)
        self.start()

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    # ------------------------------------------------------------ databases

    def dsn(self, database: str = "postgres") -> str:
        return f"host={self.host} port={self.port} user={SUPERUSER} dbname={database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL with psql (as any user: the cluster trusts loopback); its unaligned output."""
        result = subprocess.run(
            [str(self.bin / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-d", self.dsn(database), "-c", sql],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise RuntimeError(f"psql {sql!r} exited {result.returncode}: {result.stderr}")
        return result.stdout

    def new_database(self, prefix: str = "t") -> str:
        """A fresh, empty database (from template0); its DSN."""
        name = f"{prefix}{next(self._names)}"
        self.psql(f"CREATE DATABASE {name} TEMPLATE template0")
        return self.dsn(name)


def start_cluster(fsync: bool = True) -> PgCluster:
    """A new private cluster, initialised and running; destroy() it afterwards."""
    cluster = PgCluster(fsync)
    try:
        cluster.init().start()
    except BaseException:
        cluster.destroy()
        raise
    return cluster
