"""Template work off the event loop, with a time bound (security review M3).

Checking a campaign's templates (EnqueueBegin) and rendering a test message
(TestSend) run Jinja templates a member wrote: one may take minutes. On the event
loop that would stall every other client and the watchdog. So that work runs on a
small thread pool of its own (it cannot starve the default executor, which the
access check uses), and a line tracer in the working thread stops it at its
deadline, so the thread comes back and the client gets an Error.
"""

from __future__ import annotations

import asyncio
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from types import FrameType
from typing import Any, Callable, TypeVar

T = TypeVar("T")

TEMPLATE_TIME_LIMIT = 10.0  # seconds, from the request's arrival to its answer
TEMPLATE_THREADS = 2
TEMPLATE_CODE = "<template>"  # the file name of Jinja's compiled templates without a loader

_pool = ThreadPoolExecutor(max_workers=TEMPLATE_THREADS, thread_name_prefix="mailerd-templates")


class TemplateTimeout(BaseException):
    """Raised in the bounded work at its deadline. A BaseException, so that the
    `except Exception` around template rendering (render.py) lets it through."""


async def run_bounded(fn: Callable[..., T], *args: Any,
                      limit: float = TEMPLATE_TIME_LIMIT) -> T:
    """fn(*args) on the template pool; TemplateTimeout if it is not done `limit`
    seconds from now (time spent waiting for a free thread counts)."""
    deadline = time.monotonic() + limit
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_pool, _run_until, deadline, fn, args)


def _run_until(deadline: float, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
    if time.monotonic() >= deadline:
        raise TemplateTimeout
    # sys.settrace acts on this thread only. Every call is checked; the lines only of
    # compiled templates (a loop there may call nothing), which keeps the cost low.
    # An exception raised by the tracer surfaces in the traced frame.
    def stop_at_deadline(frame: FrameType, event: str, arg: object) -> Callable[..., Any] | None:
        if time.monotonic() >= deadline:
            raise TemplateTimeout
        return stop_at_deadline if frame.f_code.co_filename == TEMPLATE_CODE else None

    previous = sys.gettrace()
    sys.settrace(stop_at_deadline)
    try:
        return fn(*args)
    finally:
        sys.settrace(previous)
