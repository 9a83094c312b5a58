"""What the stock operations mean (DESIGN §3): the only caller of the scripts.

Standalone Redis: every key lives on one server, so each operation is one
script call that also reads or writes the order record, and a multi-item
order is atomic as a whole.

Redis Cluster: an order is one script call per bucket group plus its
directory on the order's own node (``stock/orders/cluster.py``, design in
``lua/README.md``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from stock.core import formats, keys, validate
from stock.core.config import Settings
from stock.core.errors import NotFound, OrderClosed
from stock.core.formats import STATE_AFTER, items_spec
from stock.core.validate import Item
from stock.orders import sharded
from stock.orders.backend import Backend
from stock.orders.cluster import ClusterOrders
from stock.orders.core import OrderCore
from stock.orders.results import OrderResult
from stock.orders.sharded import ShardedSkus
from stock.orders.standalone import StandaloneOrders
from stock.redis.client import RetryOnce, retried_once, store_boundary, typed
from stock.redis.scripts import (
    Counters,
    LineResult,
    Scripts,
    parse_counters,
    parse_limit,
    parse_tomb,
)

log = logging.getLogger("stock.orders.engine")

TOMB_TRIES = 5  # a release/cancel's waits for the line of an order that is there
TOMBSTONES = {op: STATE_AFTER[op] for op in ("release", "cancel")}  # TCC: the state each leaves

__all__ = ["OrderResult", "StockEngine"]


class StockEngine:
    """Reserve, confirm, release, extend, deduct, cancel, set and adjust stock.

    The backend (standalone or cluster) is chosen once, here; both share one
    ``OrderCore``. A RedisError (or a failure inside redis-py) that escapes a public
    operation is raised as StoreUnavailable (``store_boundary``), the RedisError its
    ``__cause__``."""

    def __init__(self, client: Any, settings: Settings) -> None:
        self.core = core = OrderCore(client, settings)
        self.settings = settings
        self.cluster = settings.redis_cluster
        self.orders: Backend = ClusterOrders(core) if self.cluster else StandaloneOrders(core)
        self.sharded = ShardedSkus(core)  # DESIGN §12, stock/orders/sharded.py
        self.retry = RetryOnce()  # order operations are idempotent by order_id

    @property
    def redis(self) -> Any:
        return self.core.redis

    @property
    def scripts(self) -> Scripts:
        """The script runner every path calls through (a test may wrap it)."""
        return self.core.scripts

    @scripts.setter
    def scripts(self, runner: Scripts) -> None:
        self.core.scripts = runner

    async def ping(self) -> bool:
        """Whether Redis answers (readiness), over the connections already held."""
        return bool(await typed(self.redis.ping(), "readiness"))

    # -- stock levels -------------------------------------------------------

    @store_boundary
    async def set_stock(self, sku: str, available: int, reason: str = "") -> Counters:
        validate.sku(sku)
        validate.int_in(available, "available", 0, 10**12)
        if (meta := await self.sharded.known(sku, fresh=True)) is not None:  # DESIGN §12
            return await self.sharded.set_total(sku, meta, available, reason)
        bucket = keys.bucket_of(sku, self.settings.buckets)
        reply = await self.scripts(
            "set",
            [keys.sku_key(sku, self.settings.buckets), keys.events_key(bucket)],
            [sku, available, reason],
        )
        return parse_counters(reply, sku)

    @store_boundary
    async def adjust(
        self, sku: str, delta: int, expected_available: int | None = None, reason: str = ""
    ) -> Counters:
        validate.sku(sku)
        validate.int_in(delta, "delta", -(10**12), 10**12)
        if expected_available is not None:
            validate.int_in(expected_available, "expected_available", 0, 10**12)
        if (meta := await self.sharded.known(sku, fresh=True)) is not None:  # DESIGN §12
            if expected_available is not None:
                await self.sharded.reject_expected(sku)
            return await self.sharded.adjust(sku, meta, delta, reason)
        bucket = keys.bucket_of(sku, self.settings.buckets)
        expected = "" if expected_available is None else expected_available
        reply = await self.scripts(
            "adjust",
            [keys.sku_key(sku, self.settings.buckets), keys.events_key(bucket)],
            [sku, delta, expected, reason],
            once=True,  # a delta applied twice would be a unit made or lost
        )
        return parse_counters(reply, sku)

    @store_boundary
    async def get_stock(self, sku: str) -> Counters:
        return (await self.stock_view(sku))[0]

    @store_boundary
    async def stock_view(self, sku: str) -> tuple[Counters, int]:
        """The SKU's counters and shard count, read from shard 0 in one call; a
        sharded SKU (``span`` > 1) is the sum of its shards (DESIGN §12)."""
        validate.sku(sku)
        values = await self.core.hmget(
            keys.sku_key(sku, self.settings.buckets),
            "available",
            "reserved",
            "sold",
            "span",
            "shards",
        )
        if values[0] is None:
            raise NotFound(f"unknown SKU {sku!r}", sku=sku)
        available, reserved, sold, span, shards = (int(v or 0) for v in values)
        if span > 1:  # sharded: the shards' sum
            return await self.sharded.counters(sku, span), max(shards, 1)
        return Counters(sku, available, reserved, sold), max(shards, 1)

    # -- orders -------------------------------------------------------------

    @store_boundary
    async def reserve(
        self,
        order_id: str,
        items: Sequence[Any],
        ttl_s: int | None = None,
        customer_id: str | None = None,
    ) -> OrderResult:
        ttl = self.settings.reservation_ttl_s if ttl_s is None else validate.ttl_s(ttl_s)
        return await self._acquire("reserve", order_id, items, ttl * 1000, customer_id)

    @store_boundary
    async def deduct(
        self, order_id: str, items: Sequence[Any], customer_id: str | None = None
    ) -> OrderResult:
        return await self._acquire("deduct", order_id, items, 0, customer_id)

    @store_boundary
    async def set_limit(self, sku: str, per_customer: int | None) -> int | None:
        """A SKU's per-customer purchase limit; ``None`` removes it (DESIGN §9)."""
        validate.sku(sku)
        if per_customer is not None:
            validate.int_in(per_customer, "per_customer", 1, 1_000_000)
        bucket = keys.bucket_of(sku, self.settings.buckets)
        reply = await self.scripts(
            "limits",
            [keys.sku_key(sku, self.settings.buckets), keys.events_key(bucket)],
            [sku, "" if per_customer is None else per_customer],
        )
        limit = parse_limit(reply, sku)
        await self.sharded.after_limit(sku, limit)  # a sharded SKU's other shards
        return limit

    @store_boundary
    async def set_shards(self, sku: str, shards: int) -> int:
        """A SKU's shard count (DESIGN §12, ``stock/orders/sharded.py``)."""
        validate.sku(sku)
        return (await self.sharded.set_shards(sku, shards)).shards

    @store_boundary
    async def shard_names(self, sku: str) -> list[str]:
        """The SKU names its stock lives under: ``[sku]``, or a sharded SKU's shards
        (``sku``, ``sku#1``, ...; the ledger's rows name them)."""
        (span,) = await self.core.hmget(keys.sku_key(sku, self.settings.buckets), "span")
        return [keys.shard_sku(sku, i) for i in range(int(span or 1))]

    async def shards_of(self, sku: str) -> int:
        return (await self.stock_view(sku))[1]

    @store_boundary
    async def get_limit(self, sku: str) -> int | None:
        validate.sku(sku)
        (limit,) = await self.core.hmget(keys.sku_key(sku, self.settings.buckets), "limit")
        return None if limit is None else int(limit)

    @store_boundary
    async def confirm(self, order_id: str, reason: str = "") -> OrderResult:
        """``reason`` goes to the ledger (``payment-probe``, ``reconcile-payments``)."""
        return await self._transition("confirm", order_id, 0, reason)

    @store_boundary
    async def release(self, order_id: str, reason: str = "") -> OrderResult:
        return await self._transition("release", order_id, 0, reason)

    @store_boundary
    async def cancel(self, order_id: str, reason: str = "") -> OrderResult:
        return await self._transition("cancel", order_id, 0, reason)

    @store_boundary
    async def extend(self, order_id: str, ttl_s: int) -> OrderResult:
        return await self._transition("extend", order_id, validate.ttl_s(ttl_s) * 1000)

    @store_boundary
    async def known_order(self, order_id: str) -> bool:
        """Whether ``order_id`` has a record (an order, or a TCC tombstone): one GET.
        The sold-out fast path asks it before refusing a reserve or deduct from memory,
        so that a retry of an order that did sell gets its replay."""
        okey = keys.order_key(validate.order_id(order_id))
        if self.scripts.pipeline is not None:  # ride the (per-node) auto-pipeline
            return await self.scripts.pipeline.execute("GET", okey) is not None
        return await self.redis.get(okey) is not None

    @store_boundary
    async def get_order(self, order_id: str) -> dict[str, Any]:
        """The order's kind, phase and each line's state, qty and expiry; a TCC
        tombstone has phase ``released`` or ``cancelled`` and no lines."""
        try:
            kind, phase, items = await self.core.record(order_id)
        except OrderClosed as closed:
            return {
                "order_id": order_id,
                "kind": "reserve",
                "phase": closed.details["state"],
                "lines": [],
            }
        found = []
        for item in items:
            found.append(keys.line_keys(item.sku, order_id, self.settings.buckets).line)
            found.append(keys.alloc_key(item.sku, order_id, self.settings.buckets))  # locations
        values = await asyncio.gather(*(self.core.get(key) for key in found))
        lines = []
        for item, raw, placed in zip(items, values[::2], values[1::2], strict=True):
            line = formats.parse_line(raw) if raw else None
            state = formats.state_name(line.state) if line else formats.UNKNOWN
            allocations = placed.partition("|")[2] if placed else ""  # 'pin|location:qty,...'
            expires = line.expires_ms if line else 0
            lines.append(LineResult(item.sku, state, item.qty, expires, allocations))
        lines = sharded.present(OrderResult(order_id, phase, False, 0, lines)).lines
        return {"order_id": order_id, "kind": kind, "phase": phase, "lines": lines}

    # -- internals ----------------------------------------------------------

    @retried_once
    async def _acquire(
        self,
        op: str,
        order_id: str,
        raw_items: Sequence[Any],
        ttl_ms: int,
        customer_id: str | None = None,
    ) -> OrderResult:
        if self.core.inflight is None:
            return await self._acquire_now(op, order_id, raw_items, ttl_ms, customer_id)
        async with self.core.inflight:
            return await self._acquire_now(op, order_id, raw_items, ttl_ms, customer_id)

    async def _acquire_now(
        self,
        op: str,
        order_id: str,
        raw_items: Sequence[Any],
        ttl_ms: int,
        customer_id: str | None = None,
    ) -> OrderResult:
        validate.order_id(order_id)
        items = validate.items(raw_items)
        customer = "" if customer_id is None else validate.customer_id(customer_id)
        return await self.sharded.acquire(
            op, order_id, items, ttl_ms, customer, self._acquire_items
        )

    async def _acquire_items(
        self, op: str, order_id: str, items: list[Item], ttl_ms: int, customer: str
    ) -> OrderResult:
        """Reserve or deduct validated items (a sharded SKU's: its shards' names)."""
        spec = items_spec(items)
        return await self.orders.acquire(op, order_id, items, spec, ttl_ms, customer)

    @retried_once
    async def _transition(
        self, op: str, order_id: str, ttl_ms: int, reason: str = ""
    ) -> OrderResult:
        if self.core.inflight is None:
            return await self._transition_now(op, order_id, ttl_ms, reason)
        async with self.core.inflight:
            return await self._transition_now(op, order_id, ttl_ms, reason)

    async def _transition_now(
        self, op: str, order_id: str, ttl_ms: int, reason: str = ""
    ) -> OrderResult:
        validate.order_id(order_id)
        return await self.sharded.transition(op, order_id, ttl_ms, reason, self._transition_tcc)

    async def _transition_tcc(
        self, op: str, order_id: str, ttl_ms: int, reason: str = ""
    ) -> OrderResult:
        for attempt in range(TOMB_TRIES + 1):
            try:
                return await self._transition_known(op, order_id, ttl_ms, reason)
            except (NotFound, OrderClosed):
                if op not in TOMBSTONES or attempt == TOMB_TRIES:
                    raise  # (the last: a directory a crashed deduct left without its line)
            # TCC: a release or cancel of an order never reserved (the cancel overtook
            # its try) succeeds with no items and leaves a tombstone that refuses the try.
            reply = await self.scripts(
                "order",
                [keys.order_key(order_id)],
                ["tomb", TOMBSTONES[op], self.core.retention_ms],
            )
            tomb = parse_tomb(reply, order_id, TOMBSTONES[op])
            if not tomb.exists:
                if tomb.state != TOMBSTONES[op]:
                    raise OrderClosed(f"order {order_id!r} was {tomb.state}", state=tomb.state)
                return OrderResult(order_id, STATE_AFTER[op], not tomb.new, 0, [])
            # The try committed meanwhile (the normal way, again), or, on a cluster, a
            # single-group deduct's directory is there before its line (or its refused
            # script is about to drop it): a moment later it is one or the other.
            await self.core.pause(0.01 * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _transition_known(
        self, op: str, order_id: str, ttl_ms: int, reason: str
    ) -> OrderResult:
        return await self.orders.transition(op, order_id, ttl_ms, reason)
