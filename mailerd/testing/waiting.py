"""Waiting on a condition with a deadline: the one way tests and benchmarks synchronise."""

from __future__ import annotations

import time
from typing import Any, Callable


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition",
               interval: float = 0.05, error: type[Exception] = AssertionError) -> Any:
    """Poll `predicate` until it returns something truthy; raise `error` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise error(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)
