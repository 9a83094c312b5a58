"""Reconcile (``stock reconcile``): compare Redis counters with PostgreSQL per SKU.

PostgreSQL's side is ``stock_levels`` plus the events still waiting in the
streams, so a writer that is behind is not drift. A SKU drifts when its Redis
counters differ from that, or exist on one side only. SKUs that look drifted
are read again once after a short pause, so that a change racing the read
(live traffic) is not reported.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from typing import Any, TextIO

import asyncpg

from persist.ops import record_reconcile
from persist.reconcile_locations import location_drifts
from persist.snapshot import (
    Levels,
    RedisSku,
    expected_levels,
    pg_levels,
    redis_levels,
    redis_skus,
    unflushed,
)
from stock.core import keys
from stock.core.config import Settings
from stock.orders.engine import StockEngine
from stock.orders.shard_moves import STALE_MS

RECHECK_PAUSE_S = 0.5


@dataclass(frozen=True, slots=True)
class Drift:
    sku: str
    redis: Levels | None
    postgres: Levels | None  # stock_levels with the unflushed events applied
    unflushed: int
    fenced: bool

    def text(self) -> str:
        redis = self.redis.text() if self.redis else "missing"
        pg = self.postgres.text() if self.postgres else "missing"
        extra = f" (+{self.unflushed} unflushed)" if self.unflushed else ""
        fence = " [fenced]" if self.fenced else ""
        return f"drift {self.sku}: redis {redis}, postgres {pg}{extra}{fence}"


async def find_drift(
    client: Any, conn: asyncpg.Connection, settings: Settings, skus: list[str] | None
) -> tuple[int, list[Drift]]:
    """(SKUs checked, the drifting ones). Without ``skus``: every SKU on either side."""
    if skus is None:
        names = sorted(set(await pg_levels(conn, None)) | await redis_skus(client))
    else:
        names = sorted(set(skus))
    drifts = await _compare(client, conn, settings, names)
    if drifts:
        await asyncio.sleep(RECHECK_PAUSE_S)
        drifts = await _compare(client, conn, settings, [d.sku for d in drifts])
    return len(names), drifts


async def _compare(
    client: Any, conn: asyncpg.Connection, settings: Settings, skus: list[str]
) -> list[Drift]:
    redis = await redis_levels(client, settings, skus)
    pg = await pg_levels(conn, skus)
    pending = await unflushed(client, conn, settings, skus)
    drifts = []
    for sku in skus:
        drift = _drift(sku, redis[sku], pg.get(sku), pending.get(sku, []))
        if drift is not None:
            drifts.append(drift)
    return drifts


def _drift(sku: str, redis: RedisSku, pg: Levels | None, events: list[Any]) -> Drift | None:
    seq = redis.levels.seq if redis.levels else None
    expected = expected_levels(pg, events, seq)
    if redis.levels is None and expected is None:
        return None
    if redis.levels and expected and redis.levels.counters() == expected.counters():
        return None
    return Drift(sku, redis.levels, expected, len(events), redis.fenced)


async def reconcile(
    client: Any, settings: Settings, dsn: str, skus: list[str] | None, out: TextIO = sys.stdout
) -> int:
    """Print the drift per SKU; returns the exit status (1 on any drift, else 0).
    The outcome is also left in Redis for the console and the drift alert."""
    conn = await asyncpg.connect(dsn)
    try:
        if skus is not None:  # a sharded SKU's shards come with it (DESIGN §12)
            skus = keys.with_shards(skus, list(await pg_levels(conn, None)))
        checked, drifts = await find_drift(client, conn, settings, skus)
        located = await location_drifts(client, conn, settings, skus)  # DESIGN §13
        if located:  # as for SKUs: read again once after a pause (live traffic)
            await asyncio.sleep(RECHECK_PAUSE_S)
            located = await location_drifts(client, conn, settings, skus)
    finally:
        await conn.close()
    texts = [d.text() for d in drifts] + located
    texts += await shard_report(StockEngine(client, settings), skus, out)
    await record_reconcile(client, checked, texts, whole=skus is None)
    for text in texts:
        print(text, file=out)
    print(f"reconcile: {checked} SKUs checked, {len(texts)} drifting", file=out)
    return 1 if texts else 0


async def shard_report(engine: StockEngine, skus: list[str] | None, out: TextIO) -> list[str]:
    """Each sharded SKU's totals and moves in flight (printed); a move in flight past
    ``STALE_MS`` (a mover died and nothing finished it yet) is drift."""
    await engine.sharded.registry.refresh(after=0.0)
    drifts = []
    for sku, meta in sorted(engine.sharded.registry.meta.items()):
        if skus is not None and sku not in skus:
            continue
        a, r, s = await engine.sharded.moves.counters(sku, meta.span)
        moves = await engine.sharded.moves.in_flight(sku, meta.span)
        units = sum(m[2] for m in moves)
        print(
            f"shards {sku}: {meta.shards} in use of {meta.span}, totals {a}/{r}/{s}, "
            f"{len(moves)} moves in flight ({units} units)",
            file=out,
        )
        stale = [m for m in moves if m[4] >= STALE_MS]
        if stale:
            drifts.append(f"drift {sku}: {len(stale)} moves in flight past {STALE_MS} ms")
    return drifts
