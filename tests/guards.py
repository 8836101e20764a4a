"""A guard against hangs: a call that never returns fails its test instead of blocking the run.

Never a timing assertion: the limits are generous, and only a call that is stuck reaches them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def bounded(call: Callable[[], T], within_s: float, what: str | None = None) -> T:
    """``call()``'s result (or its exception), run on a daemon thread; an assertion error when it
    has not returned within ``within_s`` seconds (the stuck thread is left behind)."""
    outcome: list[tuple[bool, object]] = []

    def target() -> None:
        try:
            outcome.append((True, call()))
        except BaseException as exc:  # handed to the test's thread
            outcome.append((False, exc))

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(within_s)
    assert outcome, f"{what or getattr(call, '__name__', 'the call')} did not return within {within_s:.0f} s"
    ok, value = outcome[0]
    if not ok:
        raise value  # type: ignore[misc]
    return value  # type: ignore[return-value]
