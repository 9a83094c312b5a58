"""Sharded SKUs (DESIGN §12): orders routed to a home shard, units pulled in from
the other shards when it is short, a sold-out answer only when proven.

The engine calls in here around its own order path (``acquire``, ``transition``)
and for the stock levels of a sharded SKU. An order line of a sharded SKU is an
ordinary line of one shard's SKU name (``s#i``, ``keys.shard_sku``), so its
record, confirm, release, extend, cancel, expiry and tombstones are the ordinary
ones; ``present`` and ``unshard`` turn shard names back into the SKU in every
answer. Design: ``lua/README.md`` "Sharded SKUs".
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

from stock.core import keys, validate
from stock.core.errors import (
    InsufficientStock,
    InvalidRequest,
    NotFound,
    OrderConflict,
    ReservationExpired,
    StockError,
    Unavailable,
)
from stock.core.validate import Item
from stock.orders.core import OrderCore
from stock.orders.results import OrderResult
from stock.orders.shard_moves import ShardMeta, ShardMoves, ShardRegistry
from stock.redis.scripts import Counters, raise_for

REBALANCE_S = 1.0  # the rebalancer's period
DEADLINE_S = 5.0  # an order that could neither be served nor proven short: 503
Acquire = Callable[[str, str, list[Item], int, str], Awaitable[OrderResult]]
Transition = Callable[[str, str, int, str], Awaitable[OrderResult]]


def unshard(exc: StockError) -> StockError:
    """The error with every shard SKU name replaced by its SKU."""
    details = dict(exc.details)
    if "sku" in details:
        details["sku"] = keys.base_sku(str(details["sku"]))[0]
    if isinstance(details.get("items"), list):
        details["items"] = [
            {**i, "sku": keys.base_sku(str(i["sku"]))[0]}
            if isinstance(i, dict) and "sku" in i
            else i
            for i in details["items"]
        ]
    items = exc.details.get("items")
    names = [str(i["sku"]) for i in items or [] if isinstance(i, dict) and "sku" in i]
    names += [str(exc.details["sku"])] if "sku" in exc.details else []
    message = exc.message
    for name in sorted({n for n in names if keys.SHARD_SEP in n}, key=len, reverse=True):
        message = message.replace(name, keys.base_sku(name)[0])
    if details == exc.details and message == exc.message:
        return exc
    new = type(exc)(message, **details)
    new.__cause__ = exc.__cause__
    return new


def present(result: OrderResult) -> OrderResult:
    """The answer with each line's shard SKU name replaced by its SKU."""
    if not any(keys.SHARD_SEP in line.sku for line in result.lines):
        return result
    lines = [replace(ln, sku=keys.base_sku(ln.sku)[0]) for ln in result.lines]
    return replace(result, lines=lines)


def _same_items(a: Sequence[Item], b: Sequence[Item]) -> bool:
    return sorted((keys.base_sku(i.sku)[0], i.qty) for i in a) == sorted(
        (keys.base_sku(i.sku)[0], i.qty) for i in b
    )


class ShardedSkus:
    """One engine's sharded SKUs."""

    def __init__(self, core: OrderCore) -> None:
        self.core = core
        self.registry = ShardRegistry(core)
        self.moves = ShardMoves(core)
        # on a cluster: (registry load time, (sku, k) -> shard indexes per master)
        self._placed: tuple[float, dict[tuple[str, int], list[list[int]]]] = (0.0, {})

    def meta(self, sku: str) -> ShardMeta | None:
        return self.registry.meta.get(sku)

    async def known(self, sku: str, fresh: bool = False) -> ShardMeta | None:
        """The SKU's entry in the registry: as this process last read it (at most
        REFRESH_S old), or ``fresh``: read now (the admin's set and adjust)."""
        await self.registry.refresh(after=time.monotonic() if fresh else None)
        return self.meta(sku)

    # -- orders ------------------------------------------------------------------------

    def route(self, items: Sequence[Item], order_id: str, customer: str) -> list[Item]:
        out = []
        for item in items:
            meta = self.meta(item.sku)
            if meta is not None and meta.span > 1:
                home = self._home(item.sku, meta, order_id, customer)
                item = Item(keys.shard_sku(item.sku, home), item.qty)
            out.append(item)
        return out

    def _home(self, sku: str, meta: ShardMeta, order_id: str, customer: str) -> int:
        """``ShardMeta.home``; on a cluster an order without a limit picks a master
        first, then one of its shards, so that every master gets an equal part of
        the orders however the shards' slots fell (the topology is redis-py's, read
        again with the registry; a stale one only costs balance: any shard serves)."""
        if not self.core.cluster or (meta.limited and customer) or meta.shards == 1:
            return meta.home(order_id, customer)
        if self._placed[0] != self.registry.loaded_at:
            self._placed = (self.registry.loaded_at, {})
        groups = self._placed[1].get((sku, meta.shards))
        if groups is None:
            groups = self._placed[1][sku, meta.shards] = self._by_master(sku, meta.shards)
        h = zlib.crc32(order_id.encode())
        group = groups[h % len(groups)]
        return group[(h // len(groups)) % len(group)]

    def _by_master(self, sku: str, shards: int) -> list[list[int]]:
        by: dict[str, list[int]] = {}
        buckets = self.core.settings.buckets
        for i in range(shards):
            key = keys.sku_key(keys.shard_sku(sku, i), buckets)
            node = self.core.redis.get_node_from_key(key)
            by.setdefault(getattr(node, "name", ""), []).append(i)
        return [by[name] for name in sorted(by)]

    async def acquire(
        self, op: str, order_id: str, items: list[Item], ttl_ms: int, customer: str, run: Acquire
    ) -> OrderResult:
        """Reserve or deduct ``items``: an order without a sharded SKU is ``run`` as
        it is; one with is sent to its home shards, short shards are filled from
        the others and the order tried again, until it goes through or a double
        collect proves a SKU short."""
        started = time.monotonic()
        await self.registry.refresh()
        try:
            if not any(self.meta(i.sku) for i in items):
                try:
                    return await run(op, order_id, items, ttl_ms, customer)
                except InsufficientStock as short:  # sharded meanwhile? ask once more
                    await self.registry.refresh(after=started)
                    if not any(self.meta(s["sku"]) for s in short.details["items"]):
                        raise
            return await self._acquire_sharded(op, order_id, items, ttl_ms, customer, run, started)
        except StockError as exc:
            raise unshard(exc) from exc.__cause__

    async def _acquire_sharded(
        self,
        op: str,
        order_id: str,
        items: list[Item],
        ttl_ms: int,
        customer: str,
        run: Acquire,
        started: float,
    ) -> OrderResult:
        routed = self.route(items, order_id, customer)
        while time.monotonic() - started < DEADLINE_S:
            try:
                return present(await run(op, order_id, routed, ttl_ms, customer))
            except InsufficientStock as short:
                try:
                    await self._fill(routed, short, started)
                except InsufficientStock as proven:
                    # proven short; but a copy of this request may have made the
                    # order meanwhile (with the units the proof missed): ask once more
                    try:
                        return present(await run(op, order_id, routed, ttl_ms, customer))
                    except InsufficientStock:
                        raise proven from None
            except OrderConflict:  # the same order routed under another shard count?
                routed = await self._recorded(order_id, items, routed)
            except Unavailable as moved:
                if "home" not in moved.details:
                    raise
                await self.registry.refresh(after=started)
                routed = [self._rehome(i, moved.details) for i in routed]
        raise Unavailable(f"order {order_id!r}: a sharded SKU stayed busy; retry")

    def _rehome(self, item: Item, details: dict[str, Any]) -> Item:
        base, _ = keys.base_sku(item.sku)
        if keys.base_sku(str(details["sku"]))[0] != base:
            return item
        return Item(keys.shard_sku(base, int(details["home"])), item.qty)

    async def _recorded(self, order_id: str, items: list[Item], routed: list[Item]) -> list[Item]:
        """On a conflict: the order's recorded lines if they are these items in
        other shards (a retry after the shard count changed), else the conflict."""
        try:
            _, _, recorded = await self.core.record(order_id)
        except (NotFound, StockError):
            recorded = []
        if recorded and _same_items(recorded, items) and not _same_shards(recorded, routed):
            return recorded
        raise OrderConflict(f"order {order_id!r} already exists with other items")

    async def _fill(self, routed: list[Item], short: InsufficientStock, started: float) -> None:
        """Pull units into each short shard; raise InsufficientStock for the SKUs a
        double collect proves short (or an ordinary SKU short by its own script)."""
        qty = {i.sku: i.qty for i in routed}
        proven: list[dict[str, Any]] = []
        for entry in short.details["items"]:
            base, index = keys.base_sku(str(entry["sku"]))
            meta = self.meta(base)
            if meta is None:
                await self.registry.refresh(after=started)
                meta = self.meta(base)
            if meta is None or meta.span == 1:
                proven.append({"sku": base, "available": entry["available"]})
                continue
            left = await self.moves.pull(base, meta, index, qty[str(entry["sku"])])
            if left is not None:
                proven.append({"sku": base, "available": left})
        if proven:
            names = ", ".join(p["sku"] for p in proven)
            raise InsufficientStock(f"not enough stock for {names}", items=proven)

    async def transition(
        self, op: str, order_id: str, ttl_ms: int, reason: str, run: Transition
    ) -> OrderResult:
        """Confirm, release, extend, cancel: the ordinary ones on the shards' lines;
        a late confirm short in its shard pulls units in and tries again."""
        started = time.monotonic()
        try:
            while True:
                try:
                    return present(await run(op, order_id, ttl_ms, reason))
                except ReservationExpired as late:
                    if op != "confirm" or time.monotonic() - started > DEADLINE_S:
                        raise
                    await self._fill_late(order_id, late)
        except StockError as exc:
            raise unshard(exc) from exc.__cause__

    async def _fill_late(self, order_id: str, late: ReservationExpired) -> None:
        _, _, items = await self.core.record(order_id)
        await self.registry.refresh()
        qty = {i.sku: i.qty for i in items}
        for entry in late.details.get("items", []):
            base, index = keys.base_sku(str(entry["sku"]))
            meta = self.meta(base)
            if meta is None or meta.span == 1 or str(entry["sku"]) not in qty:
                raise late
            if await self.moves.pull(base, meta, index, qty[str(entry["sku"])]) is not None:
                raise late

    # -- stock levels --------------------------------------------------------------------

    async def set_shards(self, sku: str, shards: int) -> ShardMeta:
        """Change a SKU's shard count: every shard below the new span gets its
        metadata (counters created), the limit follows, then one rebalance pass."""
        e = self.core
        validate.int_in(shards, "shards", 1, e.settings.max_shards)
        (available,) = await e.hmget(keys.sku_key(sku, e.settings.buckets), "available")
        if available is None:
            raise NotFound(f"unknown SKU {sku!r}", sku=sku)
        await self.registry.refresh(after=time.monotonic())
        old = self.meta(sku) or ShardMeta(1, 1)
        if old.span == 1 and shards == 1:
            return old
        (raw,) = await e.hmget(keys.sku_key(sku, e.settings.buckets), "limit")
        limit = None if raw is None else int(raw)
        new = ShardMeta(
            shards,
            max(old.span, shards),
            old.lmod or (shards if shards > 1 else 0),
            limit is not None,
        )
        await asyncio.gather(*(self._meta_call(sku, i, new) for i in range(new.span)))
        if limit is not None:
            await self._limit_shards(sku, new, limit)
        await self.registry.store(sku, new)
        await self.moves.rebalance(sku, new)
        return new

    async def _meta_call(self, sku: str, index: int, meta: ShardMeta) -> None:
        _, skey, events = self.moves._shard_keys(sku, index)
        head = [meta.shards, meta.span] if index == 0 else ["", ""]
        await self.core.scripts("shard_move", [skey, events], ["meta", index, meta.lmod, *head])

    async def _limit_shards(self, sku: str, meta: ShardMeta, limit: int | None) -> None:
        calls = []
        for i in range(1, meta.span):
            name, skey, events = self.moves._shard_keys(sku, i)
            calls.append(
                self.core.scripts("limits", [skey, events], [name, "" if limit is None else limit])
            )
        await asyncio.gather(*calls)

    async def after_limit(self, sku: str, limit: int | None) -> None:
        """``set_limit`` of a SKU done on shard 0: the other shards and the registry
        (read afresh, so that a shard count changed just before is kept)."""
        await self.registry.refresh(after=time.monotonic())
        meta = self.meta(sku)
        if meta is None or meta.span == 1:
            return
        await self._limit_shards(sku, meta, limit)
        await self.registry.store(sku, replace(meta, limited=limit is not None))

    async def run(self, stop: asyncio.Event, period_s: float = REBALANCE_S) -> None:
        """The rebalancer (one per process that runs a reaper): every ``period_s``,
        finish the moves of dead movers and spread each sharded SKU's units over
        its shards in use (``ShardMoves.rebalance``)."""
        while not stop.is_set():
            await self.registry.refresh()
            for sku, meta in sorted(self.registry.meta.items()):
                if meta.span > 1 and not stop.is_set():
                    await self.moves.rebalance(sku, meta)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), period_s)

    async def restore(self, names: Sequence[str]) -> list[str]:
        """After ``stock resync`` rewrote SKUs from PostgreSQL (which keeps each
        shard as a SKU ``s#i``, not the shard metadata): every SKU with shards gets
        its metadata and registry entry back, its shard count = the shards found,
        and one rebalance pass. Returns the SKUs restored."""
        spans: dict[str, int] = {}
        for name in names:
            base, index = keys.base_sku(name)
            if index:
                spans[base] = max(spans.get(base, 1), index + 1)
        for base, span in sorted(spans.items()):
            await self.set_shards(base, min(span, self.core.settings.max_shards))
        return sorted(spans)

    async def counters(self, sku: str, span: int) -> Counters:
        """The SKU's totals over its ``span`` shards (in-flight units as available)."""
        return Counters(sku, *await self.moves.counters(sku, span))

    async def set_total(self, sku: str, meta: ShardMeta, available: int, reason: str) -> Counters:
        """``available`` spread over the shards in use, 0 in the others (exact at
        rest; units in flight land on top, as a release after a set does)."""
        k = meta.shards
        shares = [
            (available // k + (1 if i < available % k else 0)) if i < k else 0
            for i in range(meta.span)
        ]
        calls = []
        for i, share in enumerate(shares):
            name, skey, events = self.moves._shard_keys(sku, i)
            calls.append(self.core.scripts("set", [skey, events], [name, share, reason]))
        await asyncio.gather(*calls)
        return await self.counters(sku, meta.span)

    async def adjust(self, sku: str, meta: ShardMeta, delta: int, reason: str) -> Counters:
        """Add to shard 0, or take from it after pulling the units in; a take that
        the whole SKU cannot give is InsufficientStock."""
        name, skey, events = self.moves._shard_keys(sku, 0)
        started = time.monotonic()
        while time.monotonic() - started < DEADLINE_S:
            reply = await self.core.scripts(
                "adjust", [skey, events], [name, delta, "", reason], once=True
            )
            if reply[0] == "OK":
                return await self.counters(sku, meta.span)
            if reply[0] != "INSUFFICIENT":
                raise_for(reply, script="adjust")
            left = await self.moves.pull(sku, meta, 0, -delta)
            if left is not None:
                raise InsufficientStock(
                    f"not enough stock for {sku}", items=[{"sku": sku, "available": left}]
                )
        raise Unavailable(f"SKU {sku!r} stayed busy; retry", sku=sku)

    async def reject_expected(self, sku: str) -> None:
        raise InvalidRequest(
            f"SKU {sku!r} is sharded: expected_available is not supported",
            field="expected_available",
        )


def _same_shards(a: Sequence[Item], b: Sequence[Item]) -> bool:
    return sorted(a) == sorted(b)
