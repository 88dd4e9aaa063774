"""Starting worker processes: forked from one template that has imported them.

A fresh interpreter per worker would carry ~25 MB of its own. Instead the first
spawn starts multiprocessing's fork server, which imports the worker's modules
once (mailerd/worker/template.py, which also freezes them out of the garbage
collector so that forked copies keep sharing those pages); every worker is then
a fork of it. The worker gets its end of the supervisor's socketpair passed over
the fork server's socket.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import socket

# Imported at start, not at the first spawn: a spawn under descriptor exhaustion could
# not import it then. The fork server has it preloaded (worker/template.py); the daemon
# only names the target.
from mailerd.worker.session import run_in_process

_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload(["mailerd.worker.template"])


class WorkerProcess:
    """The few things the supervisor needs of a worker process, awaitable."""

    def __init__(self, process: multiprocessing.process.BaseProcess) -> None:
        self._process = process
        self._pid = process.pid
        self._code: int | None = None  # kept: a closed Process answers nothing
        self._ended: asyncio.Future[None] | None = None

    @property
    def pid(self) -> int:
        assert self._pid is not None
        return self._pid

    @property
    def returncode(self) -> int | None:
        """None while it runs (a non-blocking look until it has been reaped)."""
        if self._code is None:
            return self._process.exitcode
        return self._code

    def kill(self) -> None:
        if self.returncode is None:
            self._process.kill()

    async def wait(self) -> int:
        """Wait for the exit without blocking the loop; any number of callers may wait."""
        if self._code is None:
            if self._ended is None:
                loop = asyncio.get_running_loop()
                self._ended = loop.create_future()
                loop.add_reader(self._process.sentinel, self._reap, loop)
            await asyncio.shield(self._ended)
        assert self._code is not None
        return self._code

    def _reap(self, loop: asyncio.AbstractEventLoop) -> None:
        """The sentinel became readable: the process has exited."""
        loop.remove_reader(self._process.sentinel)
        self._process.join()
        self._code = self._process.exitcode
        self._process.close()
        assert self._ended is not None
        if not self._ended.done():
            self._ended.set_result(None)


def stop_template() -> None:
    """After the last worker: end the fork server and its resource tracker too, so a
    stopped daemon leaves no process behind (systemd would have to SIGKILL them).
    multiprocessing has no public call for this; these are the ones its tests use."""
    from multiprocessing import forkserver, resource_tracker

    forkserver._forkserver._stop()
    resource_tracker._resource_tracker._stop()


def spawn_worker(child: socket.socket) -> WorkerProcess:
    process = _context.Process(target=run_in_process, args=(child,), name="mailerd-worker")
    process.start()
    return WorkerProcess(process)
