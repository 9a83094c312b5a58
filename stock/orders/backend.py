"""The one interface both order paths implement (standalone Redis, Redis Cluster).

The engine validates, bounds what is in flight and retries; a ``Backend`` decides
how an order's lines meet Redis. ``StockEngine`` picks one in its constructor.
"""

from __future__ import annotations

from typing import Protocol

from stock.core.validate import Item
from stock.orders.results import OrderResult


class Backend(Protocol):
    async def acquire(
        self, op: str, order_id: str, items: list[Item], spec: str, ttl_ms: int, customer: str
    ) -> OrderResult:
        """Reserve (``ttl_ms`` > 0) or deduct the validated ``items`` as one order."""
        ...

    async def transition(
        self, op: str, order_id: str, ttl_ms: int, reason: str = ""
    ) -> OrderResult:
        """Confirm, release, extend or cancel the order its record names."""
        ...
