"""Multi-item orders across buckets: all or nothing, crash between groups, retry."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import RedisCluster

from stock.core import keys
from stock.core.errors import InsufficientStock, NotFound
from stock.core.formats import RESERVED, items_spec, parse_line
from stock.core.validate import Item
from stock.loops.reaper import Reaper
from stock.orders.cluster import ClusterOrders
from stock.orders.engine import StockEngine
from tests.conftest import BUCKETS


def skus_on_distinct_nodes(client: Any, count: int = 3) -> list[str]:
    """SKUs whose buckets live on different cluster nodes (distinct buckets on standalone)."""
    chosen: list[str] = []
    seen: set[Any] = set()
    for i in range(10_000):
        sku = f"SKU-{i}"
        key = keys.sku_key(sku, BUCKETS)
        where: Any = keys.bucket_of(sku, BUCKETS)
        if isinstance(client, RedisCluster):
            where = client.get_node_from_key(key).name
        if where not in seen:
            seen.add(where)
            chosen.append(sku)
            if len(chosen) == count:
                return chosen
    raise AssertionError("could not spread SKUs over nodes")


async def snapshot(engine: StockEngine, skus: list[str]) -> list[tuple[int, int, int]]:
    out = []
    for sku in skus:
        c = await engine.get_stock(sku)
        out.append((c.available, c.reserved, c.sold))
    return out


@pytest.fixture
async def spread(engine: StockEngine) -> list[str]:
    skus = skus_on_distinct_nodes(engine.redis)
    for sku in skus:
        await engine.set_stock(sku, 5)
    return skus


async def test_multi_item_order_spans_nodes(engine: StockEngine, spread: list[str]) -> None:
    items = [{"sku": s, "qty": 2} for s in spread]
    result = await engine.reserve("multi", items, ttl_s=60)
    assert sorted(line.sku for line in result.lines) == sorted(spread)
    assert await snapshot(engine, spread) == [(3, 2, 0)] * 3
    await engine.confirm("multi")
    assert await snapshot(engine, spread) == [(3, 0, 2)] * 3
    await engine.cancel("multi")
    assert await snapshot(engine, spread) == [(5, 0, 0)] * 3


@pytest.mark.parametrize("short", [0, 1, 2])
@pytest.mark.parametrize("op", ["reserve", "deduct"])
async def test_failure_in_any_group_changes_nothing(
    engine: StockEngine, spread: list[str], short: int, op: str
) -> None:
    items = [{"sku": s, "qty": 6 if i == short else 2} for i, s in enumerate(spread)]
    before = await snapshot(engine, spread)
    with pytest.raises(InsufficientStock) as refused:
        await getattr(engine, op)("multi", items)
    assert refused.value.details["items"] == [{"sku": spread[short], "available": 5}]
    assert await snapshot(engine, spread) == before
    with pytest.raises(NotFound):
        await engine.get_order("multi")
    for sku in spread:  # no line left behind, nothing due
        line = keys.line_keys(sku, "multi", BUCKETS)
        assert await engine.redis.exists(line.line) == 0
        assert await engine.redis.zcard(line.due) == 0
    # the same order id can try again once stock is there
    await engine.adjust(spread[short], 1)
    assert len((await getattr(engine, op)("multi", items)).lines) == 3


async def crash_after_first_group(engine: StockEngine, order_id: str, items: list[Item]) -> None:
    """What a reserve leaves when its process dies after the first bucket group: that
    group's lines (RESERVED, beside the bucket's copy of the order) and no directory."""
    spec = items_spec(items)
    await engine.core.group_call(
        "reserve",
        order_id=order_id,
        group=[items[0]],
        spec=spec,
        ttl_ms=1000,
        may_create=True,
        order_kind="reserve",
        tag="crashed",
    )


async def test_crash_between_groups_then_retry_completes(
    engine: StockEngine, spread: list[str]
) -> None:
    engine.orders = ClusterOrders(engine.core)  # the group-by-group path on standalone too
    items = [Item(s, 2) for s in spread]
    await crash_after_first_group(engine, "half", items)
    # only lines with an expiry are left: each held line is in its bucket's due index
    held = keys.line_keys(spread[0], "half", BUCKETS)
    assert parse_line(await engine.redis.get(held.line))[:2] == (RESERVED, 2)
    assert await engine.redis.zscore(held.due, keys.line_member(spread[0], "half")) is not None
    assert await snapshot(engine, spread) == [(3, 2, 0), (5, 0, 0), (5, 0, 0)]
    retried = await engine.reserve("half", [i._asdict() for i in items], ttl_s=60)
    assert not retried.replay
    assert await snapshot(engine, spread) == [(3, 2, 0)] * 3
    assert (await engine.get_order("half"))["phase"] == "done"
    again = await engine.reserve("half", [i._asdict() for i in items], ttl_s=60)
    assert again.replay


async def test_crash_between_groups_reaper_returns_stock(
    engine: StockEngine, spread: list[str]
) -> None:
    engine.orders = ClusterOrders(engine.core)
    items = [Item(s, 2) for s in spread]
    await crash_after_first_group(engine, "half", items)
    await asyncio.sleep(1.05)
    reaper = Reaper(engine.redis, engine.settings, engine.scripts)
    expired = 0
    for _ in range(20):
        expired += await reaper.reap_once()
        if expired:
            break
        await asyncio.sleep(0.05)
    assert expired == 1
    assert await snapshot(engine, spread) == [(5, 0, 0)] * 3
