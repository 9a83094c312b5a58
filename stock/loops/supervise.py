"""Background loops that cannot die: one pass loop and one supervisor for all of them.

The reaper (whose passes also run the payment probes) and the writer each run
``run_loop``: it calls the loop's pass again and again, and
every exception a pass raises (a RedisError, a closed connection, redis-py's
cluster client's AttributeError or RuntimeError during a failover, a bug) is
logged, counted, handed to the loop's ``recover`` and followed by a backoff,
never by the end of the loop. ``supervise`` runs the loop as a task and starts
it again, counted, if it ends anyway before it was told to stop. The webhook
dispatcher, whose wait also ends when a delivery slot frees, has its own loop
with the same ``Backoff``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
from collections.abc import Awaitable, Callable
from typing import Protocol

from redis.exceptions import RedisError

log = logging.getLogger("stock.loops.supervise")

BACKOFF_CAP_S = 5.0


class LoopCounters(Protocol):
    """Where a loop's errors and restarts are counted (``stock.http.metrics.Metrics``)."""

    def loop_error(self, loop: str) -> None: ...

    def loop_restart(self, loop: str) -> None: ...


class Backoff:
    """Exponential backoff with jitter: ``first_s``, doubling up to ``cap_s``, each
    delay scaled by a random factor in [0.5, 1.5] so that processes that failed
    together do not retry together."""

    def __init__(self, first_s: float, cap_s: float = BACKOFF_CAP_S) -> None:
        self.first_s = max(first_s, 0.05)
        self.cap_s = cap_s
        self._next = self.first_s

    def delay(self) -> float:
        """The delay before the next attempt after one more failure."""
        delay = self._next
        self._next = min(self._next * 2, self.cap_s)
        return min(delay * random.uniform(0.5, 1.5), self.cap_s)

    def reset(self) -> None:
        self._next = self.first_s


def dependency(exc: BaseException) -> str:
    """What an error says is down: ``Redis`` for the client's errors, else ``unexpected``."""
    return "Redis" if isinstance(exc, RedisError | OSError | TimeoutError) else "unexpected"


async def _nothing(exc: BaseException) -> str:
    return dependency(exc)


def stop_on_signals() -> asyncio.Event:
    """An event that SIGINT or SIGTERM sets: how a command's loop (``stock reaper``,
    ``stock writer``, ``stock webhooks``) learns to stop. Call it in the running loop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds``, or less if ``stop`` is set meanwhile."""
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        pass


async def run_loop(
    name: str,
    step: Callable[[], Awaitable[bool]],
    stop: asyncio.Event,
    *,
    idle_s: float,
    recover: Callable[[BaseException], Awaitable[str]] = _nothing,
    counters: LoopCounters | None = None,
) -> bool:
    """Call ``step`` until ``stop`` is set; returns whether the last pass succeeded.

    ``step`` returns True when more work is waiting (go again at once), else the
    loop waits ``idle_s``. After an exception ``recover(exc)`` drops whatever state
    the failed pass left and names what is down (``Redis``, ``PostgreSQL``, or
    ``unexpected`` for a bug, logged with its traceback); then the loop backs off.
    The first error of a failing spell is logged, and the recovery; all are counted.
    """
    backoff = Backoff(idle_s)
    failing: str | None = None
    errors = 0
    while not stop.is_set():
        try:
            more = await step()
        except Exception as exc:
            errors += 1
            if counters is not None:
                counters.loop_error(name)
            try:
                what = await recover(exc)
            except Exception:
                log.exception("%s: recovering from %r failed", name, exc)
                what = "unexpected"
            if what == "unexpected":
                log.error("%s: unexpected error, backing off", name, exc_info=exc)
            elif failing != what:
                log.warning("%s: %s error, backing off: %s", name, what, exc or repr(exc))
            failing = what
            await sleep_unless(stop, backoff.delay())
            continue
        if failing is not None:
            log.info("%s: %s is back after %d failed pass(es), resuming", name, failing, errors)
            failing, errors = None, 0
            backoff.reset()
        if not more:
            await sleep_unless(stop, idle_s)
    return failing is None


async def supervise(
    name: str,
    run: Callable[[], Awaitable[object]],
    stop: asyncio.Event,
    *,
    counters: LoopCounters | None = None,
    first_backoff_s: float = 0.5,
) -> None:
    """Run ``run()`` until ``stop`` is set; if it returns or raises before that, log
    it, count a restart and run it again after a backoff. Cancelling the supervisor
    cancels the loop."""
    backoff = Backoff(first_backoff_s)
    while True:
        try:
            await run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if stop.is_set():
                log.warning("%s: ended with an error while stopping: %r", name, exc)
                return
            log.error("%s: loop ended with an error; restarting", name, exc_info=exc)
        else:
            if stop.is_set():
                return
            log.error("%s: loop ended before it was stopped; restarting", name)
        if counters is not None:
            counters.loop_restart(name)
        await sleep_unless(stop, backoff.delay())
        if stop.is_set():
            return
