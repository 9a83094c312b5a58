"""The tests' one poll helper: wait for a condition without a fixed sleep."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def until(
    check: Callable[[], T | Awaitable[T]],
    within_s: float = 10.0,
    what: str = "the condition",
    every_s: float = 0.02,
) -> T:
    """Call ``check`` (plain or async) until it returns something true; return that.
    Fails (AssertionError naming ``what``) when ``within_s`` passes first."""
    deadline = time.monotonic() + within_s
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within_s} s: {what}")
        await asyncio.sleep(every_s)
