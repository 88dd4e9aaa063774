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
from pathlib import Path

from mailerd import __version__
from mailerd.system import activation
from mailerd.system import notify
from mailerd.control.commands import Commands
from mailerd.journal.committer import Committer
from mailerd.config import ConfigError, load_config
from mailerd.schema.config import Config
from mailerd.control.server import ControlServer
from mailerd.journal.store import Journal, JournalError
from mailerd.system.log import event, setup_logging, stop_logging
from mailerd.supervisor.supervisor import Supervisor

EXIT_CONFIG = 2
EXIT_STATE = 3
EXIT_LOCKED = 4

JOURNAL_FILE = "journal.sqlite3"
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


class Daemon:
    def __init__(self, config: Config, journal: Journal) -> None:
        self.config = config
        self.journal = journal
        self.committer = Committer(journal)
        self.supervisor = Supervisor(config, journal, self.committer)
        self.commands = Commands(journal, self.committer, self.supervisor)
        self.control = ControlServer(
            self.commands, config.socket_path, config.socket_mode,
            group=config.daemon.socket_group, debug_commands=config.daemon.debug_commands,
            inherited=activation.control_socket(), admin_group=config.daemon.admin_group,
        )
        self.stop_requested = asyncio.Event()
        self.notifier: asyncio.Task[None] | None = None

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
        try:
            config = load_config(self.config.path)
            await self.supervisor.reload(config)  # ConfigError before any change: a bad DKIM key
        except ConfigError as exc:
            event("config_reload_failed", logging.ERROR, error=str(exc))
        else:
            self.config = config
        finally:
            notify.ready(self.supervisor.status_line())

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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mailerd", description="Bulk-mail sending daemon.")
    parser.add_argument("--config", "-c", metavar="FILE", help="TOML config file")
    parser.add_argument("--check-config", action="store_true",
                        help="check the config file and exit")
    parser.add_argument("--version", action="version", version=f"mailerd {__version__}")
    return parser.parse_args(argv)


def start(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.check_config:
        print(f"{args.config or '<built-in defaults>'}: ok")
        return 0
    setup_logging(config.daemon.log_level)
    os.umask(0o077)  # whatever started us: new state files are the daemon's alone
    lock_state_dir(config.state_dir)
    journal_path = config.state_dir / JOURNAL_FILE
    secure_state_dir(config.state_dir)
    lock_journal(journal_path)
    journal = Journal(journal_path, config.daemon.journal_sync)
    try:
        recovery = journal.open()
    except JournalError as exc:
        raise StartupError(str(exc), EXIT_STATE) from None
    secure_state_dir(config.state_dir)  # the WAL and shared-memory files are new now
    event("journal_recovered", path=str(journal.path), requeued=recovery.requeued,
          uncertain=recovery.uncertain, discarded_campaigns=recovery.discarded_campaigns)
    try:
        asyncio.run(Daemon(config, journal).run())
    finally:
        journal.close()
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
