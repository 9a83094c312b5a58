"""What the stock operations mean (DESIGN §3): the only caller of the scripts.

Standalone Redis: every key lives on one server, so each operation is one
script call that also reads or writes the order record, and a multi-item
order is atomic as a whole.

Redis Cluster: an order is one script call per bucket group plus its
directory on the order's own node (``stock/cluster.py``, design in
``lua/README.md``).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from stock import formats, keys, validate
from stock.client import RetryOnce, retried_once, store_boundary
from stock.cluster import ClusterOrders
from stock.config import Settings
from stock.errors import NotFound, OrderClosed
from stock.formats import STATE_AFTER, items_spec
from stock.scripts import (
    FROM_RECORD,
    WITH_COPY,
    WITH_RECORD,
    Counters,
    LineResult,
    LinesReply,
    Mode,
    Scripts,
    line_call,
    parse_counters,
    parse_limit,
    parse_lines,
    parse_tomb,
)
from stock.validate import Item

log = logging.getLogger("stock.engine")
T = TypeVar("T")

TOMBSTONES = {op: STATE_AFTER[op] for op in ("release", "cancel")}  # TCC: the state each leaves


@dataclass(frozen=True, slots=True)
class OrderResult:
    """The answer to an order operation; ``replay`` when it changed nothing."""

    order_id: str
    status: str
    replay: bool
    expires_ms: int
    lines: list[LineResult] = field(default_factory=list)


class StockEngine:
    """Reserve, confirm, release, extend, deduct, cancel, set and adjust stock.

    A RedisError (or a failure inside redis-py) that escapes a public operation is
    raised as StoreUnavailable (``store_boundary``), the RedisError its ``__cause__``."""

    def __init__(self, client: Any, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self.cluster = settings.redis_cluster
        self.scripts = Scripts(client)
        self.retention_ms = settings.retention_s * 1000
        self.deduct_hold_ms = 10_000  # a cluster deduct's holds, until it is confirmed
        # redis-py's cluster pools fail instead of waiting when they run dry: bound
        # the operations in flight so a stampede queues here. (Standalone calls
        # share an auto-pipeline and a blocking pool, which queue by themselves.)
        self._inflight = asyncio.Semaphore(settings.redis_max_connections) if self.cluster else None
        self.orders = ClusterOrders(self)
        self.retry = RetryOnce()  # order operations are idempotent by order_id

    # -- stock levels -------------------------------------------------------

    @store_boundary
    async def set_stock(self, sku: str, available: int, reason: str = "") -> Counters:
        validate.sku(sku)
        validate.int_in(available, "available", 0, 10**12)
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
        validate.sku(sku)
        values = await self._hmget(
            keys.sku_key(sku, self.settings.buckets), "available", "reserved", "sold"
        )
        if values[0] is None:
            raise NotFound(f"unknown SKU {sku!r}", sku=sku)
        return Counters(sku, *(int(v or 0) for v in values))

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
        return parse_limit(reply, sku)

    @store_boundary
    async def get_limit(self, sku: str) -> int | None:
        validate.sku(sku)
        (limit,) = await self._hmget(keys.sku_key(sku, self.settings.buckets), "limit")
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
    async def get_order(self, order_id: str) -> dict[str, Any]:
        """The order's kind, phase and each line's state, qty and expiry; a TCC
        tombstone has phase ``released`` or ``cancelled`` and no lines."""
        try:
            kind, phase, items = await self._record(order_id)
        except OrderClosed as closed:
            return {
                "order_id": order_id,
                "kind": "reserve",
                "phase": closed.details["state"],
                "lines": [],
            }
        lines_ = [keys.line_keys(i.sku, order_id, self.settings.buckets).line for i in items]
        values = await asyncio.gather(*(self._get(line) for line in lines_))
        lines = []
        for item, raw in zip(items, values, strict=True):
            line = formats.parse_line(raw) if raw else None
            state = formats.state_name(line.state) if line else formats.UNKNOWN
            lines.append(LineResult(item.sku, state, item.qty, line.expires_ms if line else 0))
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
        if self._inflight is None:
            return await self._acquire_now(op, order_id, raw_items, ttl_ms, customer_id)
        async with self._inflight:
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
        spec = items_spec(items)
        if not self.cluster:
            keys_, args = line_call(
                buckets=self.settings.buckets,
                retention_ms=self.retention_ms,
                mode=WITH_RECORD,
                order_id=order_id,
                items=items,
                spec=spec,
                ttl_ms=ttl_ms,
                may_create=True,
                order_kind=op,
                customer=customer,
            )
            reply = parse_lines(await self.scripts(op, keys_, args), order_id)
            return _result(order_id, op, reply)
        return await self.orders.acquire(op, order_id, items, spec, ttl_ms, customer)

    @retried_once
    async def _transition(
        self, op: str, order_id: str, ttl_ms: int, reason: str = ""
    ) -> OrderResult:
        if self._inflight is None:
            return await self._transition_now(op, order_id, ttl_ms, reason)
        async with self._inflight:
            return await self._transition_now(op, order_id, ttl_ms, reason)

    async def _transition_now(
        self, op: str, order_id: str, ttl_ms: int, reason: str = ""
    ) -> OrderResult:
        validate.order_id(order_id)
        try:
            return await self._transition_known(op, order_id, ttl_ms, reason)
        except (NotFound, OrderClosed):
            if op not in TOMBSTONES:
                raise
        # TCC: a release or cancel of an order never reserved (the cancel overtook
        # its try) succeeds with no items and leaves a tombstone that refuses the try.
        reply = await self.scripts(
            "order", [keys.order_key(order_id)], ["tomb", TOMBSTONES[op], self.retention_ms]
        )
        tomb = parse_tomb(reply, order_id, TOMBSTONES[op])
        if tomb.exists:  # the try committed meanwhile: the normal way, once
            return await self._transition_known(op, order_id, ttl_ms, reason)
        if tomb.state != TOMBSTONES[op]:
            raise OrderClosed(f"order {order_id!r} was {tomb.state}", state=tomb.state)
        return OrderResult(order_id, STATE_AFTER[op], not tomb.new, 0, [])

    async def _transition_known(
        self, op: str, order_id: str, ttl_ms: int, reason: str
    ) -> OrderResult:
        if self.cluster:
            return await self.orders.transition(op, order_id, ttl_ms, reason)
        # One round trip (DESIGN §4): the script reads the order record and builds
        # its lines' keys itself (standalone only).
        keys_, args = line_call(
            buckets=self.settings.buckets,
            retention_ms=self.retention_ms,
            mode=FROM_RECORD,
            order_id=order_id,
            ttl_ms=ttl_ms,
            reason=reason,
        )
        reply = await self.scripts(op, keys_, args)
        return _result(order_id, op, parse_lines(reply, order_id))

    async def _outside(self, waiting: Awaitable[T]) -> T:
        """Await ``waiting`` without holding an in-flight slot (the caller holds one on
        a cluster): a wait must not keep other operations out."""
        if self._inflight is None:
            return await waiting
        self._inflight.release()
        try:
            return await waiting
        finally:
            await asyncio.shield(self._inflight.acquire())

    async def _pause(self, seconds: float) -> None:
        await self._outside(asyncio.sleep(seconds))

    async def _record(self, order_id: str, lifetime_ms: int = 0) -> tuple[str, str, list[Item]]:
        """The order's kind, phase and items. On a cluster with ``lifetime_ms`` (a
        transition) the directory's lifetime is extended to it in the same call."""
        validate.order_id(order_id)
        okey = keys.order_key(order_id)
        if self.cluster and lifetime_ms:
            found = await self.scripts("order", [okey], ["read", lifetime_ms])
            raw = found[0] if found else None
        elif self.scripts.pipeline is not None:  # ride the (per-node) auto-pipeline
            raw = await self.scripts.pipeline.execute("GET", okey)
        else:
            raw = await self.redis.get(okey)
        if raw is None:
            raise NotFound(f"unknown order {order_id!r}", order_id=order_id)
        record = formats.parse_record(raw)
        if record.phase in formats.TOMBSTONES:
            raise OrderClosed(f"order {order_id!r} was {record.phase}", state=record.phase)
        if record.phase != formats.DONE:  # a 'pending' record of an earlier version
            raise NotFound(f"unknown order {order_id!r}", order_id=order_id)
        return record.kind, record.phase, formats.parse_spec(record.spec)

    async def _get(self, key: str) -> str | None:
        """GET through the (per-node) auto-pipeline: on a cluster, an ASK is followed
        there on one connection (redis-py's own path can end in "TTL exhausted")."""
        pipe = self.scripts.pipeline
        raw = await (pipe.execute("GET", key) if pipe is not None else self.redis.get(key))
        return None if raw is None else str(raw)

    async def _hmget(self, key: str, *fields: str) -> list[str | None]:
        """HMGET, through the (per-node) auto-pipeline."""
        if self.scripts.pipeline is not None:
            return list(await self.scripts.pipeline.execute("HMGET", key, *fields))
        return list(await self.redis.hmget(key, *fields))

    async def _group_call(
        self,
        op: str,
        *,
        order_id: str,
        group: list[Item],
        spec: str,
        mode: Mode = WITH_COPY,
        ttl_ms: int = 0,
        may_create: bool = False,
        order_kind: str = "",
        hold_for: str = "",
        undo_holds: bool = False,
        tag: str = "",
        reason: str = "",
        customer: str = "",
    ) -> LinesReply:
        """Script ``op`` on one bucket group on a cluster (``line_call`` in
        ``stock/scripts.py`` names the arguments); by default the call carries the
        bucket's copy of the order."""
        keys_, args = line_call(
            buckets=self.settings.buckets,
            retention_ms=self.retention_ms,
            mode=mode,
            order_id=order_id,
            items=group,
            spec=spec,
            ttl_ms=ttl_ms,
            may_create=may_create,
            order_kind=order_kind,
            hold_for=hold_for,
            undo_holds=undo_holds,
            tag=tag,
            reason=reason,
            customer=customer,
        )
        return parse_lines(await self.scripts(op, keys_, args), order_id)

    def _groups(self, items: Sequence[Item]) -> list[list[Item]]:
        by_bucket: dict[int, list[Item]] = defaultdict(list)
        for item in items:
            by_bucket[keys.bucket_of(item.sku, self.settings.buckets)].append(item)
        return list(by_bucket.values())


def _result(order_id: str, op: str, reply: LinesReply) -> OrderResult:
    return OrderResult(order_id, STATE_AFTER[op], reply.replay, reply.expires_ms, reply.lines)
