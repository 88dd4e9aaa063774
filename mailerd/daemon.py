"""`mailerd --config FILE`: the daemon's entry point and its lifetime.

Start-up order matters: config is checked, the state directory locked, the
journal recovered, the control socket opened, and only then are workers started.
SIGTERM or SIGINT drains: no new transactions, in-flight ones finish, QUIT, exit 0.

Under systemd (Type=notify) READY=1 is sent only once all of that is done, STATUS=
carries a one-line summary, WATCHDOG=1 is sent from the event loop (notify.py), and
STOPPING=1 when a drain begins.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import faulthandler
import fcntl
import logging
import os
import signal
import stat
import sys
import time
from pathlib import Path

import msgspec

from mailerd import __version__
from mailerd.bounces.intake import mailbox_files_problems
from mailerd.system import activation
from mailerd.system import notify
from mailerd.control.commands import Commands
from mailerd.journal.committer import Committer
from mailerd.config import ConfigError, load_config, read_password
from mailerd.message.addresses import allow_special_use_domains
from mailerd.supervisor.identity import read_server_dkim
from mailerd.schema.config import Config, ReloadResult
from mailerd.control.server import ControlServer
from mailerd.journal.backend import HostIdInUse, JournalError, JournalStore
from mailerd.journal.factory import check_store, open_store
from mailerd.system.log import event, setup_logging, stop_logging
from mailerd.supervisor.supervisor import Supervisor
from mailerd.supervisor.results import log_uncertain
from mailerd.schema.records import LostRecipient

EXIT_CONFIG = 2
EXIT_STATE = 3
EXIT_LOCKED = 4
EXIT_FENCED = 5  # another host took this one's recipients over (issue 16): systemd restarts it

JOURNAL_FILE = "journal.sqlite3"
RELOAD_FILE = "reload.result"  # the last SIGHUP's verdict (ReloadResult as JSON)
RELOAD_WAIT = 60.0  # seconds `mailerd --reload` waits for the verdict
# what must stay the daemon's alone: the journal holds lists, merge values and campaign
# DKIM keys; its WAL and shared memory hold the same pages; the key files are keys
PRIVATE_FILES = (JOURNAL_FILE, f"{JOURNAL_FILE}-wal", f"{JOURNAL_FILE}-shm",
                 f"{JOURNAL_FILE}-journal", "mailerd.lock")
PRIVATE_SUFFIXES = (".key",)


class StartupError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def lock_state_dir(state_dir: Path) -> int:
    """Hold an exclusive lock for the daemon's lifetime; name the holder if taken."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(state_dir / "mailerd.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StartupError(f"cannot use state directory {state_dir}: {exc.strerror}",
                           EXIT_STATE) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StartupError(
            f"another mailerd (pid {holder}) is already using state directory {state_dir}",
            EXIT_LOCKED,
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def lock_journal(path: Path) -> int | None:
    """Lock the journal file itself (its inode), for the daemon's lifetime.

    The state-dir lock alone lets a second daemon whose state dir holds a link to a live
    daemon's journal serve it too. A symlink is refused; a hard link (or any other path to
    the same file) finds the inode locked. The descriptor is never closed: closing any
    descriptor of the file would drop SQLite's own (POSIX) locks on it. Something that is
    not a regular file is left to the journal's own checks.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise StartupError(f"cannot use journal {path}: {exc.strerror}", EXIT_STATE) from None
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise StartupError(f"journal {path} is a symbolic link; the journal must be a file of "
                           "the state directory itself", EXIT_STATE)
    if st is not None and not stat.S_ISREG(st.st_mode):
        return None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        reason = "a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
        raise StartupError(f"cannot use journal {path}: {reason}", EXIT_STATE) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StartupError(f"journal {path} is already in use by another mailerd (the same "
                           "file is reachable from another state directory)", EXIT_LOCKED) from None
    return fd


def secure_state_dir(state_dir: Path) -> None:
    """The state dir 0700 and the journal, WAL and key files 0600, whatever umask or
    earlier hand made them; each change is logged. Run before and after the journal opens."""
    try:
        st = os.stat(state_dir)
        if st.st_uid not in (os.geteuid(), 0):
            raise StartupError(f"state directory {state_dir} belongs to uid {st.st_uid}, not to "
                               f"the daemon's user (uid {os.geteuid()})", EXIT_STATE)
        tighten(state_dir, 0o700)
        for entry in state_dir.iterdir():
            if entry.name in PRIVATE_FILES or entry.name.endswith(PRIVATE_SUFFIXES):
                tighten(entry, 0o600)
    except OSError as exc:
        raise StartupError(f"cannot secure state directory {state_dir}: "
                           f"{exc.strerror or exc} ({exc.filename})", EXIT_STATE) from None


def tighten(path: Path, allowed: int) -> None:
    """Drop any permission bit outside `allowed` (symlinks are not followed)."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return
    mode = stat.S_IMODE(st.st_mode)
    if mode & ~allowed:
        os.chmod(path, mode & allowed)
        event("state_permissions_tightened", logging.WARNING, path=str(path),
              mode_was=f"{mode:04o}", mode=f"{mode & allowed:04o}")


def log_recovered_uncertain(journal: JournalStore, since: float) -> None:
    """One entry per recipient the recovery just made uncertain, like the entry of any
    other outcome, so that `journalctl MAILERD_CAMPAIGN=N` shows them too."""
    for campaign in journal.campaigns():
        for recipient in journal.recipients(campaign.id, "uncertain", None):
            if recipient.updated >= since:
                log_uncertain(LostRecipient(campaign.id, recipient.line, recipient.email,
                                            recipient.reply or "", recipient.server))


class Daemon:
    def __init__(self, config: Config, journal: JournalStore) -> None:
        self.config = config
        self.journal = journal
        self.committer = Committer(journal)
        self.fenced = False
        # STATUS= counts what the journal holds, not what this process sent: after a
        # restart it still matches `mailerctl report` (issue 15); read before the loop runs
        self.supervisor = Supervisor(config, journal, self.committer,
                                     sent_before=journal.sent_total(), on_fenced=self._fenced)
        self.commands = Commands(journal, self.committer, self.supervisor)
        self.control = ControlServer(
            self.commands, config.socket_path, config.socket_mode,
            group=config.daemon.socket_group, debug_commands=config.daemon.debug_commands,
            inherited=activation.control_socket(), admin_group=config.daemon.admin_group,
        )
        self.stop_requested = asyncio.Event()
        self.notifier: asyncio.Task[None] | None = None
        self.reloads = 0

    async def run(self) -> None:
        self.committer.start()
        try:
            await self.control.start()
        except OSError as exc:
            await self.committer.stop()
            raise StartupError(f"cannot set up the control socket {self.control.path}: "
                               f"{exc.strerror or exc}", EXIT_STATE) from None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._request_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self._request_reload)
        await self.supervisor.start()
        self.commands.bounces.start()
        event("daemon_ready", pid=os.getpid(), socket=str(self.control.path),
              socket_activated=self.control.inherited is not None,
              servers=",".join(self.config.servers), version=__version__)
        notify.ready(self.supervisor.status_line())
        self.notifier = asyncio.create_task(notify.keep_informed(self.supervisor.status_line,
                                                                  self.supervisor.status_changed))
        await self.stop_requested.wait()
        notify.stopping("draining: in-flight transactions finish, then exit")
        try:
            await self.shutdown()
        finally:
            self.notifier.cancel()

    def _request_reload(self) -> None:
        asyncio.get_running_loop().create_task(self.reload())

    async def reload(self) -> None:
        """SIGHUP: re-read the config file; a bad file changes nothing."""
        notify.reloading()
        self.reloads += 1
        error = ""
        try:
            config = load_config(self.config.path)
            check_files(config)  # every password and key file first: a bad one changes nothing
            await self.supervisor.reload(config)  # ConfigError before any change: a bad DKIM key
        except ConfigError as exc:
            error = str(exc)
            event("config_reload_failed", logging.ERROR, error=error)
        else:
            self.config = config
            allow_special_use_domains(config.delivery.allow_special_use_domains)
            await self.commands.bounces.reload(config.bounces)
        finally:
            write_reload_result(self.config.state_dir, ReloadResult(
                pid=os.getpid(), count=self.reloads, ok=not error, message=error))
            failed = f"config reload failed, the previous config stays: {error}; " if error else ""
            notify.ready(failed + self.supervisor.status_line())

    def _fenced(self) -> None:
        """Another host took this one over (cluster.py): stop, and exit EXIT_FENCED."""
        self.fenced = True
        if not self.stop_requested.is_set():
            event("daemon_stopping", reason="fenced", exit_status=EXIT_FENCED)
            self.stop_requested.set()

    def _request_stop(self, sig: signal.Signals) -> None:
        if not self.stop_requested.is_set():
            event("daemon_stopping", signal=sig.name)
            self.stop_requested.set()

    async def shutdown(self) -> None:
        try:
            await self.control.stop()
            await self.commands.bounces.stop()
            await self.supervisor.stop(self.config.daemon.shutdown_timeout)
        finally:  # the journal thread must end before the interpreter does, whatever happened
            await self.committer.stop()
        event("daemon_stopped", commits=self.committer.commits)


def write_reload_result(state_dir: Path, result: ReloadResult) -> None:
    path = state_dir / RELOAD_FILE
    try:
        temporary = path.with_suffix(".tmp")
        temporary.write_bytes(msgspec.json.encode(result))
        os.replace(temporary, path)
    except OSError as exc:
        event("reload_result_unwritable", logging.WARNING, path=str(path), error=exc.strerror)


def read_reload_result(state_dir: Path) -> ReloadResult | None:
    try:
        return msgspec.json.decode((state_dir / RELOAD_FILE).read_bytes(), type=ReloadResult)
    except (OSError, msgspec.DecodeError):
        return None


def request_reload(config: Config, pid: int) -> int:
    """`mailerd --reload PID` (ExecReload=): SIGHUP the daemon, wait for its verdict, and
    exit 2 with its message if it kept the old config, so that `systemctl reload` fails.
    Runs inside the unit, where systemd 252 does not give ExecReload= the credentials:
    the daemon itself reads them."""
    before = read_reload_result(config.state_dir)
    seen = before.count if before is not None and before.pid == pid else 0
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        raise StartupError(f"cannot signal mailerd (pid {pid}): {exc.strerror}", EXIT_STATE) from None
    deadline = time.monotonic() + RELOAD_WAIT
    while time.monotonic() < deadline:
        result = read_reload_result(config.state_dir)
        if result is not None and result.pid == pid and result.count > seen:
            if result.ok:
                print(f"mailerd (pid {pid}): config reloaded")
                return 0
            raise ConfigError(f"{result.message} (pid {pid} keeps the previous config)")
        time.sleep(0.05)
    raise StartupError(f"mailerd (pid {pid}) did not report on the reload within "
                       f"{RELOAD_WAIT:.0f} s", EXIT_STATE)


def build_parser() -> argparse.ArgumentParser:
    """The command line; also the source of mailerd(8) (packaging/gen-docs.py)."""
    parser = argparse.ArgumentParser(prog="mailerd", description="Bulk-mail sending daemon.")
    parser.add_argument("--config", "-c", metavar="FILE", help="TOML config file")
    parser.add_argument("--check-config", action="store_true",
                        help="check the config file and every file it names (relay passwords, "
                        "DKIM keys, CA bundles), connect to a PostgreSQL journal, then exit: "
                        "0 ok, 2 not")
    parser.add_argument("--reload", type=int, metavar="PID",
                        help="make the running daemon PID re-read its config (SIGHUP) and wait "
                             "for its verdict: 0 applied, 2 refused (the old config stays); "
                             "the unit's ExecReload=")
    parser.add_argument("--version", action="version", version=f"mailerd {__version__}")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def check_files(config: Config) -> list[str]:
    """Read every file the daemon will read at start (relay passwords, DKIM keys, [bounces]
    mailbox passwords and CA files; the relays' CA files were read by load_config):
    ConfigError for the first that cannot be used. The
    returned notes name what cannot be checked here: a file under $CREDENTIALS_DIRECTORY
    when that is unset (an admin shell; `systemctl reload mailerd` checks inside the unit)."""
    notes = []
    for name, server in config.servers.items():
        for key in ("password_file", "dkim_key_file"):
            path = getattr(server, key)
            if path and "CREDENTIALS_DIRECTORY" in path and not os.environ.get(
                    "CREDENTIALS_DIRECTORY"):
                notes.append(f"servers.{name}.{key}: not checked: $CREDENTIALS_DIRECTORY is set "
                             "only inside the service (`systemctl reload mailerd` checks it there)")
            elif key == "password_file":
                read_password(name, server)
            else:
                read_server_dkim(name, server)
    problems, mailbox_notes = mailbox_files_problems(config.bounces)
    if problems:
        raise ConfigError(problems[0])
    return notes + mailbox_notes


def start(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.check_config:
        notes = check_files(config)
        try:
            check_store(config.journal)  # PostgreSQL: connects, changes nothing
        except JournalError as exc:
            raise ConfigError(str(exc)) from None
        print("\n".join([*notes, f"{args.config or '<built-in defaults>'}: ok"]))
        return 0
    if args.reload is not None:
        return request_reload(config, args.reload)
    allow_special_use_domains(config.delivery.allow_special_use_domains)
    setup_logging(config.daemon.log_level)
    os.umask(0o077)  # whatever started us: new state files are the daemon's alone
    lock_state_dir(config.state_dir)
    secure_state_dir(config.state_dir)
    clustered = config.journal.backend == "postgresql"
    if not clustered:
        lock_journal(config.state_dir / JOURNAL_FILE)
    journal = open_store(config.journal, config.state_dir, config.daemon.journal_sync)
    opened_at = time.time()
    try:
        recovery = journal.open()
    except HostIdInUse as exc:  # the config's to fix: systemd must not restart it in a loop
        raise StartupError(str(exc), EXIT_CONFIG) from None
    except JournalError as exc:
        raise StartupError(str(exc), EXIT_STATE) from None
    secure_state_dir(config.state_dir)  # the WAL and shared-memory files are new now
    event("journal_recovered", journal=config.journal.backend,
          path=None if clustered else journal.location,
          host=journal.host_id if clustered else None, requeued=recovery.requeued,
          uncertain=recovery.uncertain, discarded_campaigns=recovery.discarded_campaigns)
    if recovery.uncertain:
        log_recovered_uncertain(journal, opened_at)
    try:
        daemon = Daemon(config, journal)
        asyncio.run(daemon.run())
    finally:
        journal.close()
    if daemon.fenced:
        event("daemon_fenced", logging.ERROR, host=journal.host_id, exit_status=EXIT_FENCED)
        return EXIT_FENCED
    return 0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    faulthandler.enable(all_threads=True)  # a watchdog SIGABRT shows where the loop hung
    try:
        code = start(args)
    except ConfigError as exc:
        print(f"mailerd: {exc}", file=sys.stderr)
        code = EXIT_CONFIG
    except StartupError as exc:
        event("startup_failed", logging.ERROR, error=str(exc))
        print(f"mailerd: {exc}", file=sys.stderr)
        code = exc.code
    finally:
        stop_logging()
    sys.exit(code)


if __name__ == "__main__":
    main()
