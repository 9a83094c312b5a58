"""Sharded SKUs with PostgreSQL (DESIGN §12): a mover SIGKILLed while it moves
units between shards (the units come back, reconcile agrees), and Redis flushed
then ``stock resync`` (the shards and the totals come back)."""

from __future__ import annotations

import io
import re
import signal
import subprocess
import sys
import time
from typing import Any

import asyncpg
import pytest

from persist.reconcile import reconcile
from persist.resync import resync
from stock.app.embedded import stock_env
from stock.core import keys
from stock.core.config import Settings
from stock.orders.engine import StockEngine
from tests.conftest import flush
from tests.support.persistence import drain
from tests.test_sharded import shard_levels

SKU = "HOT"

# a mover that does nothing but reshard the SKU back and forth: every pass moves units
MOVER = """
import asyncio
from stock.core import keys
from stock.core.config import Settings
from stock.orders.engine import StockEngine
from stock.redis.client import connect

async def main():
    settings = Settings.from_env()
    engine = StockEngine(connect(settings), settings)
    print("moving", flush=True)
    while True:
        for k in (8, 1, 5, 2):
            await engine.set_shards("HOT", k)

asyncio.run(main())
"""


async def exact_total(engine: StockEngine) -> int:
    """available + reserved + sold over the shards, plus each move in flight not yet
    credited (its destination has no marker): a credited move still recorded in its
    source is in the destination's available already."""
    levels = await shard_levels(engine)
    buckets = engine.settings.buckets
    total = sum(a + r + s for a, r, s, _ in levels)
    for _src, dst, qty, move_id, _age in await engine.sharded.moves.in_flight(SKU, len(levels)):
        if not await engine.redis.exists(keys.move_marker_key(SKU, dst, buckets, move_id)):
            total += qty
    return total


def kill_mover_after(settings: Settings, seconds: float) -> None:
    """Start MOVER, SIGKILL it ``seconds`` after it began moving."""
    child = subprocess.Popen(
        [sys.executable, "-c", MOVER], env=stock_env(settings), stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "moving"
        time.sleep(seconds)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)


async def test_a_mover_killed_mid_move_loses_no_unit(
    redis: Any,
    engine: StockEngine,
    psettings: Settings,
    pg: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dsn = psettings.database_url
    await engine.set_stock(SKU, 1000)
    await engine.set_shards(SKU, 8)
    await engine.reserve("held", [{"sku": SKU, "qty": 7}])
    caught = 0  # kills that left a move in flight
    for _ in range(12):
        kill_mover_after(psettings, 0.3)
        levels = await shard_levels(engine)
        assert await exact_total(engine) == 1000, levels
        caught += sum(m for *_, m in levels) > 0
        if caught >= 2:
            break
    assert caught, "no kill landed in the middle of a move"
    if sum(m for *_, m in levels):  # the last kill left a move in flight: reconcile says so
        await drain(redis, psettings, dsn)
        monkeypatch.setattr("persist.reconcile.STALE_MS", 0)
        out = io.StringIO()
        assert await reconcile(redis, psettings, dsn, [SKU], out=out) == 1
        assert "moves in flight past 0 ms" in out.getvalue()
        monkeypatch.undo()
    await engine.sharded.moves.recover(SKU, len(levels), stale_ms=0)
    levels = await shard_levels(engine)
    assert sum(m for *_, m in levels) == 0
    assert sum(a + r + s for a, r, s, _ in levels) == 1000, levels
    stock = await engine.get_stock(SKU)
    assert (stock.available, stock.reserved, stock.sold) == (993, 7, 0)
    await drain(redis, psettings, dsn)
    out = io.StringIO()
    assert await reconcile(redis, psettings, dsn, [SKU], out=out) == 0, out.getvalue()
    assert re.search(
        r"shards HOT: \d in use of 8, totals 993/7/0, 0 moves in flight", out.getvalue()
    )


async def test_flushall_then_resync_gives_the_shards_back(
    redis: Any, engine: StockEngine, psettings: Settings, pg: asyncpg.Connection
) -> None:
    dsn = psettings.database_url
    await engine.set_stock(SKU, 80)
    await engine.set_shards(SKU, 8)
    for i in range(6):
        await engine.reserve(f"r{i}", [{"sku": SKU, "qty": 2}])
    await engine.confirm("r0")
    await engine.deduct("d1", [{"sku": SKU, "qty": 5}])
    before = await engine.get_stock(SKU)
    levels = await shard_levels(engine)
    await drain(redis, psettings, dsn)
    await flush(redis)

    out = io.StringIO()
    totals = await pg.fetchrow("SELECT * FROM stock_totals WHERE sku = $1", SKU)
    assert (totals["available"], totals["reserved"], totals["sold"], totals["shards"]) == (
        before.available,
        before.reserved,
        before.sold,
        8,
    )
    assert await pg.fetchval("SELECT count(DISTINCT shard_of(sku)) FROM stock_ledger") == 8
    assert await resync(redis, psettings, dsn, [SKU], out=out) == 0, out.getvalue()
    fresh = StockEngine(redis, psettings)  # a process that never saw the SKU sharded
    assert await fresh.shards_of(SKU) == 8
    assert await fresh.get_stock(SKU) == before
    assert sum(a for a, *_ in await shard_levels(fresh)) == sum(a for a, *_ in levels)
    assert (await fresh.confirm("r1")).lines[0].sku == SKU
    assert (await fresh.reserve("after", [{"sku": SKU, "qty": 60}])).lines[0].qty == 60
    await drain(redis, psettings, dsn)
    assert await reconcile(redis, psettings, dsn, None, out=io.StringIO()) == 0
