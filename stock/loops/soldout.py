"""The sold-out fast path (DESIGN §10; opt-in with ``STOCK_SOLDOUT_CACHE_MS``).

Once this process sees a SKU's ``available`` at 0 (a refusal whose short item
has 0 available, or counters read or set to 0), a reserve or deduct of that SKU
is answered 409 ``insufficient_stock`` from memory until a deadline: the time
the call that saw the 0 was *sent*, plus the setting. Redis saw the 0 after
that moment, so an answer from memory is never more than the setting older
than what Redis said: once stock comes back, no process answers sold-out for
longer than the setting. This process's own release, cancel, expiry (its
reaper), set and adjust end it at once.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from stock.core import keys
from stock.core.validate import Item

MAX_SKUS = 100_000  # sold-out SKUs remembered; past it the expired ones are dropped


class SoldOut:
    """SKUs this process saw at 0 available, each with the monotonic time it ends."""

    def __init__(self, window_ms: int) -> None:
        self.window = window_ms / 1000
        self.until: dict[str, float] = {}
        self.hits = 0  # requests answered from memory

    def short(self, items: Sequence[Item]) -> list[str]:
        """The SKUs among ``items`` that are sold out as far as this process knows."""
        until = self.until
        if not until:
            return []
        now = time.monotonic()
        out = []
        for item in items:
            ends = until.get(item.sku)
            if ends is not None:
                if ends > now:
                    out.append(item.sku)
                else:
                    del until[item.sku]
        if out:
            self.hits += 1
        return out

    def seen(self, sku: str, available: int, sent: float) -> None:
        """Counters of ``sku`` from a call sent at monotonic time ``sent``."""
        if available > 0:
            self.until.pop(sku, None)
            return
        if len(self.until) >= MAX_SKUS:
            now = time.monotonic()
            self.until = {k: v for k, v in self.until.items() if v > now}
            if len(self.until) >= MAX_SKUS:
                self.until.clear()  # forgetting only costs the fast path
        self.until[sku] = sent + self.window

    def refused(self, short_items: Iterable[Mapping[str, Any]], sent: float) -> None:
        """An ``insufficient_stock`` refusal: its items carry each short SKU's available."""
        for item in short_items:
            if "location" in item:  # one location's refusal (a pin): the SKU may have more
                continue
            self.seen(item["sku"], int(item["available"]), sent)

    def back(self, skus: Iterable[str]) -> None:
        """Stock of ``skus`` came back through this process (release, cancel, expiry);
        a sharded SKU's shard (``s#i``, the reaper's name for it) counts as its SKU."""
        for sku in skus:
            self.until.pop(keys.base_sku(sku)[0], None)
