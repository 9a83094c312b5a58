"""The reaper: racing reapers expire each line once; stock comes back after expiry."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from persist.events import named
from stock.app.wiring import create_app
from stock.core import keys
from stock.core.config import Settings
from stock.http.api import BACKGROUND, ENGINE
from stock.loops.reaper import Reaper
from stock.orders.engine import StockEngine
from stock.redis.client import connect
from tests.conftest import BUCKETS


async def events_of(client: Any, op: str) -> list[dict[str, str]]:
    found = []
    for key in keys.all_events_keys(BUCKETS):
        events = [named(fields) for _id, fields in await client.xrange(key)]
        found += [e for e in events if e["op"] == op]
    return found


async def test_racing_reapers_expire_each_line_once(
    engine: StockEngine, settings: Settings
) -> None:
    skus = [f"R{i}" for i in range(8)]
    for sku in skus:
        await engine.set_stock(sku, 100)
    orders = 240
    await asyncio.gather(
        *(engine.reserve(f"o{i}", [{"sku": skus[i % 8], "qty": 1}], ttl_s=1) for i in range(orders))
    )
    await asyncio.sleep(1.05)
    clients = [connect(settings) for _ in range(4)]
    reapers = [Reaper(c, settings) for c in clients for _ in range(2)]  # 8 reapers, 4 connections
    try:
        totals = 0
        for _ in range(50):
            totals += sum(await asyncio.gather(*(r.reap_once() for r in reapers)))
            if totals >= orders:
                break
            await asyncio.sleep(0.02)
    finally:
        for client in clients:
            await client.aclose()
    expired = await events_of(engine.redis, "expire")
    assert totals == orders
    assert len(expired) == orders
    assert len({(e["sku"], e["order"]) for e in expired}) == orders
    for sku in skus:
        stock = await engine.get_stock(sku)
        assert (stock.available, stock.reserved, stock.sold) == (100, 0, 0)


async def test_running_reaper_returns_stock_after_expiry(
    engine: StockEngine, settings: Settings
) -> None:
    """DESIGN §3: the stock of an expired reservation is back within 1 s of its
    (server-time) expiry."""
    await engine.set_stock("A", 1)
    reaper = Reaper(engine.redis, settings)
    stop = asyncio.Event()
    loop_task = asyncio.create_task(reaper.run(stop))
    try:
        held = await engine.reserve("o1", [{"sku": "A", "qty": 1}], ttl_s=1)
        for _ in range(200):
            if (await engine.get_stock("A")).available == 1:
                break
            await asyncio.sleep(0.02)
        back_ms = await reaper.server_ms()
    finally:
        stop.set()
        await loop_task
    assert (await engine.get_stock("A")).available == 1
    assert (await engine.get_order("o1"))["lines"][0].state == "expired"
    assert back_ms - held.expires_ms <= 1000, f"back {back_ms - held.expires_ms} ms after expiry"


async def test_extended_line_is_not_expired(engine: StockEngine, settings: Settings) -> None:
    await engine.set_stock("A", 5)
    await engine.reserve("o1", [{"sku": "A", "qty": 2}], ttl_s=1)
    await engine.extend("o1", 600)
    await asyncio.sleep(1.05)
    assert await Reaper(engine.redis, settings).reap_once() == 0
    assert (await engine.get_stock("A")).reserved == 2


async def test_expiry_lag_reports_overdue_lines(engine: StockEngine, settings: Settings) -> None:
    """A fenced SKU's due line waits for the resync; the lag shows it."""
    fence = "test@99999999999999"  # a resync's fence: token@until_ms
    await engine.set_stock("A", 5)
    await engine.reserve("o1", [{"sku": "A", "qty": 2}], ttl_s=1)
    await engine.redis.hset(keys.sku_key("A", BUCKETS), "fenced", fence)
    reaper = Reaper(engine.redis, settings)
    await asyncio.sleep(1.3)
    assert await reaper.reap_once() == 0
    assert reaper.stats.expiry_lag_s >= 0.2
    await engine.redis.hdel(keys.sku_key("A", BUCKETS), "fenced")
    expired = 0  # passed by while fenced (moved at most 1 s ahead in the index)
    for _ in range(40):
        expired += await reaper.reap_once()
        if expired:
            break
        await asyncio.sleep(0.05)
    assert expired == 1
    await reaper.reap_once()
    assert reaper.stats.expiry_lag_s == 0.0


async def test_stale_index_members_are_dropped(engine: StockEngine, settings: Settings) -> None:
    await engine.set_stock("A", 5)
    await engine.reserve("o1", [{"sku": "A", "qty": 2}], ttl_s=1)
    await engine.confirm("o1")
    due = keys.due_key(keys.bucket_of("A", BUCKETS))
    await engine.redis.zadd(due, {keys.line_member("A", "o1"): 1})  # a leftover member
    assert await Reaper(engine.redis, settings).reap_once() == 0
    assert await engine.redis.zcard(due) == 0
    assert (await engine.get_stock("A")).sold == 2


async def test_reaper_survives_a_non_redis_exception(
    engine: StockEngine, settings: Settings, monkeypatch: Any
) -> None:
    """redis-py's cluster client raises AttributeError/RuntimeError during a failover:
    the reaper logs it, backs off and goes on; a line due after it still expires
    within 1 s of its (server-time) expiry."""
    await engine.set_stock("A", 1)
    reaper = Reaper(engine.redis, replace(settings, reaper_period_s=0.05))
    failed = asyncio.Event()
    real = reaper.server_ms

    async def broken_once() -> int:
        if not failed.is_set():
            failed.set()
            raise AttributeError("'NoneType' object has no attribute 'write'")
        return await real()

    monkeypatch.setattr(reaper, "server_ms", broken_once)
    stop = asyncio.Event()
    loop_task = asyncio.create_task(reaper.run(stop))
    try:
        await asyncio.wait_for(failed.wait(), 5)
        held = await engine.reserve("o1", [{"sku": "A", "qty": 1}], ttl_s=1)
        for _ in range(150):
            if (await engine.get_stock("A")).available == 1 or loop_task.done():
                break
            await asyncio.sleep(0.02)
        back_ms = await real()
        assert not loop_task.done(), f"the reaper ended: {loop_task}"
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(loop_task, return_exceptions=True), 5)
    assert (await engine.get_stock("A")).available == 1
    assert back_ms - held.expires_ms < 1000, back_ms - held.expires_ms


async def test_expiry_lag_metric_comes_from_redis_when_the_reaper_is_stuck(
    settings: Settings, redis: Any
) -> None:
    """A reaper stuck in a pass (a blackholed call, a bug) expires nothing: the lag
    on /metrics keeps growing, read from Redis, instead of freezing at the reaper's
    last figure."""
    app = create_app(replace(settings, reaper_period_s=0.05), run_writer=False)
    async with TestClient(TestServer(app)) as client:
        engine, reaper = app[ENGINE], app[BACKGROUND]["reaper"]

        unstuck = asyncio.Event()

        async def stuck() -> int:
            await unstuck.wait()
            return 0

        reaper.reap_once = stuck  # from its next pass on
        await asyncio.sleep(0.2)
        await engine.set_stock("A", 1)
        await engine.reserve("o1", [{"sku": "A", "qty": 1}], ttl_s=1)
        await asyncio.sleep(1.3)
        first = _gauge(await (await client.get("/metrics")).text(), "stock_expiry_lag_seconds")
        await asyncio.sleep(0.6)
        second = _gauge(await (await client.get("/metrics")).text(), "stock_expiry_lag_seconds")
        unstuck.set()
    assert first >= 0.2, first
    assert second - first >= 0.5, (first, second)


def _gauge(text: str, name: str) -> float:
    line = next(x for x in text.splitlines() if x.startswith(name + " "))
    return float(line.split()[1])
