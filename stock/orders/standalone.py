"""Orders on one Redis server: every operation is one script call (DESIGN §4).

Every key lives on one server, so a script reads and writes the order record and
all of its lines at once, and a multi-item order is atomic as a whole.
"""

from __future__ import annotations

from stock.core.validate import Item
from stock.orders.core import OrderCore
from stock.orders.results import OrderResult, order_result
from stock.redis.scripts import FROM_RECORD, WITH_RECORD, line_call, parse_lines


class StandaloneOrders:
    """The ``Backend`` of a standalone Redis."""

    def __init__(self, core: OrderCore) -> None:
        self.core = core

    async def acquire(
        self, op: str, order_id: str, items: list[Item], spec: str, ttl_ms: int, customer: str
    ) -> OrderResult:
        c = self.core
        keys_, args = line_call(
            buckets=c.settings.buckets,
            retention_ms=c.retention_ms,
            mode=WITH_RECORD,
            order_id=order_id,
            items=items,
            spec=spec,
            ttl_ms=ttl_ms,
            may_create=True,
            order_kind=op,
            customer=customer,
        )
        reply = parse_lines(await c.scripts(op, keys_, args), order_id)
        return order_result(order_id, op, reply)

    async def transition(
        self, op: str, order_id: str, ttl_ms: int, reason: str = ""
    ) -> OrderResult:
        # One round trip: the script reads the order record and builds its lines'
        # keys itself (standalone only).
        c = self.core
        keys_, args = line_call(
            buckets=c.settings.buckets,
            retention_ms=c.retention_ms,
            mode=FROM_RECORD,
            order_id=order_id,
            ttl_ms=ttl_ms,
            reason=reason,
        )
        reply = await c.scripts(op, keys_, args)
        return order_result(order_id, op, parse_lines(reply, order_id))
