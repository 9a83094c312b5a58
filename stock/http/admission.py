"""What the front decides per request without a timer of its own (DESIGN §10).

- ``Deadlines``: one deadline mechanism for every request in flight. Every request
  has the same timeout, so deadlines come in arrival order: one dict in that order
  and one sweep a tick (``loop.call_later``) cancel the requests past theirs, instead
  of ``asyncio.timeout``'s timer per request (a handle, a heap push and a cancel).
- ``QueueDelay``: is there a standing queue? As CoDel measures it: the least
  latency of the requests completed within an interval (100 ms) above the target.
  A queue that is only a burst drains within an interval; a standing one does not.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time

INTERVAL_S = 0.1  # CoDel's interval
QUEUE_MIN = 8  # fewer answers in an interval are no queue (one slow request is not)


class Deadlines:
    """Requests in flight by token, oldest first, each with its task."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout = timeout_s
        self.tick = min(0.1, timeout_s / 10)  # a deadline ends at most this late
        self.pending: dict[int, tuple[float, asyncio.Task[object]]] = {}
        self.expired: set[int] = set()
        self._tokens = itertools.count()
        self._sweeping: asyncio.TimerHandle | None = None

    def start(self, now: float) -> int:
        """Register the current task; ``end`` must follow, whatever happens."""
        token = next(self._tokens)
        self.pending[token] = (now + self.timeout, asyncio.current_task())  # type: ignore[assignment]
        if self._sweeping is None:
            self._sweeping = asyncio.get_running_loop().call_later(self.tick, self._sweep)
        return token

    def end(self, token: int) -> bool:
        """Forget the request; True if its deadline had passed (its task was cancelled)."""
        if self.pending.pop(token, None) is None and token in self.expired:
            self.expired.discard(token)
            return True
        return False

    def _sweep(self) -> None:
        self._sweeping = None
        now = time.monotonic()
        late = []
        for token, (deadline, _task) in self.pending.items():
            if deadline > now:
                break
            late.append(token)
        for token in late:
            _deadline, task = self.pending.pop(token)
            self.expired.add(token)
            task.cancel()
        if self.pending:
            self._sweeping = asyncio.get_running_loop().call_later(self.tick, self._sweep)


class QueueDelay:
    """CoDel's signal: ``standing`` while the least latency of an interval (of at least
    ``QUEUE_MIN`` answers) exceeds the target. An interval with no completion ends it."""

    def __init__(self, target_s: float, interval_s: float = INTERVAL_S) -> None:
        self.target = target_s if target_s > 0 else math.inf  # 0: off
        self.interval = interval_s
        self.standing = False
        self.least = math.inf
        self.count = 0
        self.until = 0.0

    def completed(self, seconds: float, now: float) -> None:
        self.count += 1
        if seconds < self.least:
            self.least = seconds
        if now >= self.until:
            self.roll(now)

    def roll(self, now: float) -> None:
        """Close the interval: standing if every request in it waited past the target."""
        self.standing = self.count >= QUEUE_MIN and self.least > self.target
        self.least = math.inf
        self.count = 0
        self.until = now + self.interval

    def shedding(self) -> bool:
        """True while new work should be shed; an interval with no completion ends it."""
        if not self.standing:
            return False
        now = time.monotonic()
        if now >= self.until:  # no completion closed the interval: nothing got through
            self.roll(now)
        return self.standing
