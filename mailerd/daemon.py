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
import faulthandler
import fcntl
import logging
import os
import signal
import sys
from pathlib import Path

from mailerd import __version__
from mailerd.system import activation
from mailerd.system import notify
from mailerd.control.commands import Commands
from mailerd.journal.committer import Committer
from mailerd.config import Config, ConfigError, load_config
from mailerd.control.server import ControlServer
from mailerd.journal.store import Journal, JournalError
from mailerd.system.log import event, setup_logging, stop_logging
from mailerd.supervisor.supervisor import Supervisor

EXIT_CONFIG = 2
EXIT_STATE = 3
EXIT_LOCKED = 4


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
            inherited=activation.control_socket(),
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
    lock_state_dir(config.state_dir)
    journal = Journal(config.state_dir / "journal.sqlite3", config.daemon.journal_sync)
    try:
        recovery = journal.open()
    except JournalError as exc:
        raise StartupError(str(exc), EXIT_STATE) from None
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
