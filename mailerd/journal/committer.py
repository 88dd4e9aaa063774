"""Group commit: one thread owns the journal and runs every operation on it.

The event loop never blocks on the journal. Callers `await committer.run(fn, *args)`;
the thread takes every operation that has queued up since its last commit, runs
them in one transaction (each inside its own savepoint, so one failing operation
does not undo the others) and resolves their futures only after COMMIT returned.
A caller that awaited `run` therefore knows its change is durable. No delay is
added to gather work: whatever arrives while a commit is in progress forms the
next batch, which is what makes batches grow with load. The operations of one
turn of the event loop reach the thread together, at the end of that turn: one
wake-up of the journal thread (and one GIL hand-over) a turn, not one an operation.

The committer knows no SQL: it drives the transaction through the store's methods
(begin, savepoint, release, rollback_to, commit, rollback) and every query and change
of data is a method of the store (backend.py's JournalStore: SQLite or PostgreSQL).
"""

from __future__ import annotations

import asyncio
import ctypes
import queue
import threading
from typing import Any, Callable, NamedTuple, TypeVar

# JournalWriteError is imported from here too (it lives in backend.py)
from mailerd.journal.backend import JournalStore, JournalWriteError

T = TypeVar("T")


class _Op(NamedTuple):
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    future: asyncio.Future[Any]
    read_only: bool = False


_STOP = object()


class Committer:
    def __init__(self, journal: JournalStore) -> None:
        self.journal = journal
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._turn: list[_Op] = []  # queued in this turn of the event loop, not yet handed over
        self.commits = 0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._serve, name="journal", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._hand_over()
        self._queue.put(_STOP)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    def run(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Queue fn(*args) for the journal thread; the future resolves after commit."""
        assert self._loop is not None, "committer not started"
        future: asyncio.Future[T] = self._loop.create_future()
        self._queue_op(_Op(fn, args, future))
        return future

    def read(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Queue a read: run outside any write transaction, so it works even while
        writes fail (a full disk must not stop `status` or `report`)."""
        assert self._loop is not None, "committer not started"
        future: asyncio.Future[T] = self._loop.create_future()
        self._queue_op(_Op(fn, args, future, read_only=True))
        return future

    def _queue_op(self, op: _Op) -> None:
        if not self._turn:
            assert self._loop is not None
            self._loop.call_soon(self._hand_over)
        self._turn.append(op)

    def _hand_over(self) -> None:
        """This turn's operations, in order, to the journal thread in one put."""
        if self._turn:
            ops, self._turn = self._turn, []
            self._queue.put(ops)

    # ---------------------------------------------------------- journal thread

    def _serve(self) -> None:
        _name_os_thread(b"mailerd-journal")
        while True:
            handed = [self._queue.get()]
            while True:
                try:
                    handed.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(ops is _STOP for ops in handed)
            self._run_in_order([op for ops in handed if ops is not _STOP for op in ops])
            if stop:
                return

    def _run_in_order(self, ops: list[_Op]) -> None:
        """Consecutive writes share one transaction; a read runs between them, in order."""
        writes: list[_Op] = []
        for op in ops:
            if not op.read_only:
                writes.append(op)
                continue
            if writes:
                self._commit_batch(writes)
                writes = []
            self._run_read(op)
        if writes:
            self._commit_batch(writes)

    def _run_read(self, op: _Op) -> None:
        try:
            result: tuple[_Op, bool, Any] = (op, True, op.fn(*op.args))
        except Exception as exc:
            result = (op, False, exc)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(_resolve, [result])

    def _commit_batch(self, ops: list[_Op]) -> None:
        store = self.journal
        results: list[tuple[_Op, bool, Any]] | None = []
        try:
            store.begin()
            results = self._run_plain(ops)
            if results is not None and not self._commit_plain():
                results = None
            if results is None:  # an op failed: again from the start, each in its savepoint
                store.rollback()
                store.begin()
                results = [self._run_in_savepoint(op) for op in ops]
                store.commit()
        except Exception as exc:  # a transaction statement failed, or storage did (below)
            self._rollback()
            error = exc if isinstance(exc, JournalWriteError) else \
                JournalWriteError(f"journal write failed: {exc}")
            results = [(op, False, error) for op in ops]
        self.commits += 1
        assert self._loop is not None
        self._loop.call_soon_threadsafe(_resolve, results)

    def _run_plain(self, ops: list[_Op]) -> list[tuple[_Op, bool, Any]] | None:
        """The usual case, where no op fails: no savepoints, which are half the
        statements of a typical op (bench/RESULTS.md). None when an op raised an
        error of its own; ops are pure journal work, so running the batch again
        after the rollback is safe. A storage error propagates as before."""
        results = []
        for op in ops:
            try:
                results.append((op, True, op.fn(*op.args)))
            except Exception as exc:
                if self.journal.is_storage_error(exc):
                    raise
                return None
        return results

    def _commit_plain(self) -> bool:
        """COMMIT after _run_plain; False when it failed with an op's own error, not the
        storage's: on PostgreSQL an op's write is not waited for (its pipeline), so its
        error comes with the COMMIT, and the transaction is rolled back."""
        try:
            self.journal.commit()
        except JournalWriteError:
            raise
        except Exception as exc:
            if self.journal.is_storage_error(exc):
                raise
            return False
        return True

    def _run_in_savepoint(self, op: _Op) -> tuple[_Op, bool, Any]:
        store = self.journal
        store.savepoint("op")
        try:
            value = op.fn(*op.args)
        except Exception as exc:  # the error belongs to the caller, not to the batch
            if store.is_storage_error(exc):
                raise
            store.rollback_to("op")
            store.release("op")
            return op, False, exc
        store.release("op")
        return op, True, value

    def _rollback(self) -> None:
        try:
            self.journal.rollback()
        except JournalWriteError:
            pass


def _name_os_thread(name: bytes) -> None:
    """Show the journal thread by name in `top -H` and /proc/PID/task/*/comm."""
    try:
        ctypes.CDLL(None).prctl(15, ctypes.c_char_p(name[:15]), 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def _resolve(results: list[tuple[_Op, bool, Any]]) -> None:
    for op, ok, value in results:
        if op.future.done():
            continue
        if ok:
            op.future.set_result(value)
        else:
            op.future.set_exception(value)
