"""The one way tests wait for something another thread or process does."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T],
    timeout_s: float = 10.0,
    *,
    interval_s: float = 0.001,
    what: str = "the condition",
) -> T:
    """Call ``condition`` until it returns something truthy, and return that.

    Args:
        condition: polled with no arguments; it may also do the work that
            makes progress (step an engine, drain a queue).
        timeout_s: how long to keep trying; generous, since a loaded CI host
            is slow and a pass returns as soon as the condition holds.
        interval_s: pause between calls, so a poll does not starve the
            threads it waits for.
        what: named in the failure.

    Returns:
        The first truthy value ``condition`` returned.

    Raises:
        AssertionError: ``condition`` stayed falsy for ``timeout_s``; it is
            called one last time after the deadline, so a slow last step
            still counts.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)
