"""Sharded SKUs: the registry, reading the shards, moving units between them.

Design and crash cases: ``lua/README.md`` "Sharded SKUs". Shard 0 of SKU ``s``
is ``s`` itself, shard ``i > 0`` the SKU name ``s#i`` (``keys.shard_sku``), each
an ordinary SKU of its own bucket. A move of units from shard A to shard B is
three calls of ``lua/shard_move.lua``, each idempotent by the move id: ``out``
on A (available -> in flight, recorded in A's moves hash), ``in`` on B (credit,
marked done by a marker key), ``done`` on A (the record goes). A process that
dies between them leaves the move in flight in A; ``recover`` finishes it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import zlib
from dataclasses import dataclass
from typing import NamedTuple

from redis.exceptions import RedisError

from stock.core import keys
from stock.orders.core import OrderCore

log = logging.getLogger("stock.shards")

REFRESH_S = 1.0  # a process's view of the registry is at most this old for routing
RELOAD_RETRY_S = 0.5  # after a failed read of the registry, the next try
STALE_MS = 2_000  # a move in flight this long is taken for a dead mover's, and finished


@dataclass(frozen=True, slots=True)
class ShardMeta:
    """A sharded SKU: ``shards`` in use, ``span`` shards that may hold anything
    (never shrinks), ``lmod`` the customers' home modulus (fixed when first
    sharded), ``limited`` whether it has a per-customer limit."""

    shards: int
    span: int
    lmod: int = 0
    limited: bool = False

    @classmethod
    def parse(cls, raw: str) -> ShardMeta:
        k, span, lmod, limited = raw.split("|")
        return cls(int(k), int(span), int(lmod), limited == "1")

    def value(self) -> str:
        return f"{self.shards}|{self.span}|{self.lmod}|{int(self.limited)}"

    def home(self, order_id: str, customer: str) -> int:
        """The shard an order is served from first: by customer when a limit
        needs one place to count, else by order id."""
        if self.limited and customer and self.lmod:
            return zlib.crc32(customer.encode()) % self.lmod
        return zlib.crc32(order_id.encode()) % self.shards


class Shard(NamedTuple):
    """One shard as ``collect`` read it; ``version`` changes with any change of
    its available or in-flight units (seq on every event, moving on ``done``)."""

    available: int
    moving: int
    seq: int

    @property
    def version(self) -> tuple[int, int]:
        return (self.seq, self.moving)


class ShardRegistry:
    """The process's copy of ``stock:shards``, refreshed at most every REFRESH_S;
    concurrent refreshes share one read."""

    def __init__(self, core: OrderCore) -> None:
        self.core = core
        self.meta: dict[str, ShardMeta] = {}
        self.loaded_at = float("-inf")
        self._running: tuple[float, asyncio.Task[None]] | None = None

    async def refresh(self, after: float | None = None) -> None:
        """Reload unless loaded within REFRESH_S, or, with ``after`` (a monotonic
        time), unless a read that started after it has finished or is running."""
        if after is None:
            if time.monotonic() - self.loaded_at < REFRESH_S:
                return
            try:
                await self._reload(time.monotonic() - REFRESH_S)
            except (RedisError, OSError) as exc:
                if self.loaded_at == float("-inf"):
                    raise
                # The registry's node is lost (a failover): routing goes on with the
                # registry last read, which is what every SKU on a healthy node needs,
                # and asks again shortly instead of on every request.
                self.loaded_at = time.monotonic() - REFRESH_S + RELOAD_RETRY_S
                log.warning("shard registry not read, using the last one: %r", exc)
            return
        await self._reload(after)

    async def _reload(self, after: float) -> None:
        if self.loaded_at >= after:
            return
        if self._running is None or self._running[0] < after or self._running[1].done():
            started = time.monotonic()
            self._running = (started, asyncio.ensure_future(self._load(started)))
        await asyncio.shield(self._running[1])

    async def _load(self, started: float) -> None:
        raw = await self.core.hgetall(keys.shards_key())
        self.meta = {str(k): ShardMeta.parse(str(v)) for k, v in raw.items()}
        self.loaded_at = max(self.loaded_at, started)

    async def store(self, sku: str, meta: ShardMeta) -> None:
        await self.core.redis.hset(keys.shards_key(), sku, meta.value())
        self.meta[sku] = meta


class ShardMoves:
    """Reads of a sharded SKU's shards and the moves between them."""

    def __init__(self, core: OrderCore) -> None:
        self.core = core

    def _shard_keys(self, sku: str, index: int) -> tuple[str, str, str]:
        buckets = self.core.settings.buckets
        name = keys.shard_sku(sku, index)
        bucket = keys.bucket_of(name, buckets)
        return name, keys.sku_key_in(bucket, name), keys.events_key(bucket)

    async def collect(self, sku: str, span: int) -> list[Shard]:
        """Every shard's available, in-flight units and seq, read concurrently."""
        reads = [
            self.core.hmget(self._shard_keys(sku, i)[1], "available", "moving", "seq")
            for i in range(span)
        ]
        return [Shard(*(int(v or 0) for v in got)) for got in await asyncio.gather(*reads)]

    async def counters(self, sku: str, span: int) -> tuple[int, int, int]:
        """The SKU's totals: available (in-flight units counted), reserved, sold."""
        reads = [
            self.core.hmget(self._shard_keys(sku, i)[1], "available", "moving", "reserved", "sold")
            for i in range(span)
        ]
        rows = [[int(v or 0) for v in got] for got in await asyncio.gather(*reads)]
        return sum(r[0] + r[1] for r in rows), sum(r[2] for r in rows), sum(r[3] for r in rows)

    async def proven_short(self, sku: str, span: int, qty: int) -> int | None:
        """The SKU's available units if two collects in a row agree on every
        shard's version and hold fewer than ``qty`` (then the whole SKU held that
        few at the instant between them); ``None`` when that is not proven."""
        first = await self.collect(sku, span)
        if sum(s.available + s.moving for s in first) >= qty:
            return None
        second = await self.collect(sku, span)
        if [s.version for s in first] != [s.version for s in second]:
            return None
        total = sum(s.available + s.moving for s in second)
        return total if total < qty else None

    async def move(self, sku: str, src: int, dst: int, qty: int) -> int:
        """Move up to ``qty`` available units from shard ``src`` to ``dst``; the
        units moved (0: none there, or the debit's reply was lost: recovery then
        finishes it if it went through)."""
        name, skey, events = self._shard_keys(sku, src)
        buckets = self.core.settings.buckets
        move_id = secrets.token_hex(8)
        try:
            reply = await self.core.scripts(
                "shard_move",
                [skey, events, keys.moves_key(sku, src, buckets)],
                ["out", move_id, qty, dst, name],
                once=True,  # a debit sent twice after its done would be a unit lost
            )
        except Exception as exc:
            log.warning(
                "shard move %s of %r: debit unknown (%r), recovery finishes it", move_id, sku, exc
            )
            return 0
        if reply[0] != "OK":
            return 0
        moved = int(reply[1])
        await self.finish(sku, src, dst, move_id, moved)
        return moved

    async def finish(self, sku: str, src: int, dst: int, move_id: str, qty: int) -> None:
        """Credit ``dst`` (idempotent by the marker), then drop the in-flight record."""
        buckets, scripts = self.core.settings.buckets, self.core.scripts
        name, dkey, devents = self._shard_keys(sku, dst)
        marker = keys.move_marker_key(sku, dst, buckets, move_id)
        retention = self.core.retention_ms
        await scripts(
            "shard_move", [dkey, devents, marker], ["in", move_id, qty, src, name, retention]
        )
        _, skey, sevents = self._shard_keys(sku, src)
        await scripts(
            "shard_move", [skey, sevents, keys.moves_key(sku, src, buckets)], ["done", move_id]
        )

    async def in_flight(self, sku: str, span: int) -> list[tuple[int, int, int, str, int]]:
        """The moves in flight out of the SKU's shards: (source, destination, qty,
        move id, age in ms)."""
        buckets = self.core.settings.buckets
        seconds, micros = await self.core.redis.time()
        now = int(seconds) * 1000 + int(micros) // 1000
        tables = await asyncio.gather(
            *(self.core.hgetall(keys.moves_key(sku, i, buckets)) for i in range(span))
        )
        out = []
        for src, table in enumerate(tables):
            for move_id, entry in table.items():
                dst, qty, at = (int(v) for v in str(entry).split("|"))
                out.append((src, dst, qty, str(move_id), now - at))
        return out

    async def recover(self, sku: str, span: int, stale_ms: int | None = None) -> int:
        """Finish every move out of the SKU's shards in flight for ``stale_ms``
        (default STALE_MS) or longer (a mover that died); the number finished."""
        stale_ms = STALE_MS if stale_ms is None else stale_ms
        moves = await self.in_flight(sku, span)
        todo = [
            self.finish(sku, src, dst, mid, qty)
            for src, dst, qty, mid, age in moves
            if age >= stale_ms
        ]
        await asyncio.gather(*todo)
        return len(todo)

    async def pull(self, sku: str, meta: ShardMeta, index: int, qty: int) -> int | None:
        """Bring units into shard ``index`` so that it holds ``qty``: moves from the
        richest shards. ``None``: try the order again; a number: the SKU is proven
        to hold fewer than ``qty`` available (the number), a sold-out answer."""
        snap = await self.collect(sku, meta.span)
        need = qty - snap[index].available
        if need <= 0:
            return None
        if sum(s.available + s.moving for s in snap) < qty:
            return await self.proven_short(sku, meta.span, qty)
        donors = sorted(
            (i for i in range(meta.span) if i != index and snap[i].available > 0),
            key=lambda i: -snap[i].available,
        )
        plan: list[tuple[int, int]] = []
        for i in donors:
            if need <= 0:
                break
            plan.append((i, min(need, snap[i].available)))
            need -= plan[-1][1]
        if plan:
            await asyncio.gather(*(self.move(sku, i, index, x) for i, x in plan))
        else:  # the units are in flight: a live mover lands them, a dead one is finished
            await self.recover(sku, meta.span)
            await asyncio.sleep(0.005)
        return None

    async def rebalance(self, sku: str, meta: ShardMeta) -> int:
        """One pass: finish stale moves, empty shards at or past ``shards`` into the
        others, and fill a shard holding under half its share from those above
        theirs. Returns the units moved."""
        await self.recover(sku, meta.span)
        snap = await self.collect(sku, meta.span)
        total, k = sum(s.available for s in snap), meta.shards
        target = [
            (total // k + (1 if i < total % k else 0)) if i < k else 0 for i in range(meta.span)
        ]
        surplus = [
            [i, s.available - target[i]] for i, s in enumerate(snap) if s.available > target[i]
        ]
        deficit = [
            [i, target[i] - s.available]
            for i, s in enumerate(snap)
            if i < k and s.available < target[i]
        ]
        plan: list[tuple[int, int, int]] = []
        for d in deficit:
            for s in surplus:
                if d[1] <= 0:
                    break
                x = min(d[1], s[1])
                if x > 0:
                    plan.append((s[0], d[0], x))
                    s[1] -= x
                    d[1] -= x
        moved = await asyncio.gather(*(self.move(sku, a, b, x) for a, b, x in plan))
        return sum(moved)
