"""Per-caller rate limits (DESIGN §10): ``STOCK_RATE_LIMIT_PER_CUSTOMER`` and
``STOCK_RATE_LIMIT_PER_ADDRESS``, each ``N/second`` (minute, hour, day).

A fixed window per limit, counted in this process's memory: the algorithm of
alisaifee/limits' ``FixedWindowRateLimiter`` over its ``MemoryStorage``, written out
here because that library costs 6 to 12 µs a hit on the bench machine (key strings
built per call, a lock, an expiry thread), which is more than the whole request
layer's budget, while this costs well under a microsecond. What a caller sees: at
most N reserves and deducts per window per process, so with ``--workers W`` up to W
times N (the kernel spreads connections over the workers), and up to 2N across a
window's edge. A count shared by every process would cost a Redis call per request.
"""

from __future__ import annotations

import math
import time

from stock.core.errors import RateLimited

UNIT_S = {"second": 1, "minute": 60, "hour": 3600, "day": 86_400}


class Window:
    """At most ``count`` hits per key in each window of ``seconds``."""

    def __init__(self, spec: str) -> None:
        count, _, unit = spec.partition("/")
        self.spec = spec
        self.count = int(count)
        self.seconds = UNIT_S[unit]
        self.window = -1
        self.hits: dict[str, int] = {}

    def hit(self, key: str, now: float) -> float:
        """Count one hit of ``key``; 0 if it is within the limit, else the seconds until
        the window ends. A new window drops the last one's counts (memory: the callers
        of one window)."""
        window = int(now // self.seconds)
        if window != self.window:
            self.window, self.hits = window, {}
        hits = self.hits.get(key, 0) + 1
        self.hits[key] = hits
        if hits <= self.count:
            return 0.0
        return (window + 1) * self.seconds - now


class RateLimits:
    """The process's per-customer and per-address windows (either may be off)."""

    def __init__(self, per_customer: str, per_address: str) -> None:
        self.customer = Window(per_customer) if per_customer else None
        self.address = Window(per_address) if per_address else None

    def check_address(self, address: str | None) -> None:
        if self.address is not None:
            self._check(self.address, address or "", "client address")

    def check_customer(self, customer: str | None) -> None:
        if self.customer is not None and customer is not None:
            self._check(self.customer, customer, "customer_id")

    @staticmethod
    def _check(window: Window, key: str, who: str) -> None:
        wait = window.hit(key, time.monotonic())
        if wait:
            retry = max(1, math.ceil(wait))
            raise RateLimited(
                f"this {who} is past its limit of {window.spec}; retry after {retry} s",
                retry_after_s=retry,
            )
