"""Per-customer purchase limits (DESIGN §9), on standalone and on the cluster."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from stock.core import keys
from stock.core.config import Settings
from stock.core.errors import InvalidRequest, LimitExceeded, NotFound
from stock.loops.reaper import Reaper
from stock.orders.engine import StockEngine


def one(sku: str, qty: int = 1) -> list[dict[str, Any]]:
    return [{"sku": sku, "qty": qty}]


async def held(engine: StockEngine, settings: Settings, sku: str, customer: str) -> int:
    value = await engine.redis.hget(keys.sku_key(sku, settings.buckets), f"c:{customer}")
    return int(value or 0)


async def test_limit_refuses_past_it_and_names_the_sku(engine: StockEngine) -> None:
    await engine.set_stock("A", 10)
    assert await engine.get_limit("A") is None
    assert await engine.set_limit("A", 2) == 2
    assert await engine.get_limit("A") == 2
    await engine.reserve("o1", one("A"), customer_id="c1")
    with pytest.raises(LimitExceeded) as refused:
        await engine.reserve("o2", one("A", 2), customer_id="c1")
    assert refused.value.details["items"] == [{"sku": "A", "limit": 2, "held": 1}]
    with pytest.raises(InvalidRequest) as missing:
        await engine.reserve("o3", one("A"))
    assert missing.value.details["field"] == "customer_id"
    await engine.reserve("o4", one("A", 2), customer_id="c2")  # another customer
    await engine.deduct("o5", one("A"), customer_id="c1")  # bought counts as held
    with pytest.raises(LimitExceeded):
        await engine.deduct("o6", one("A"), customer_id="c1")
    stock = await engine.get_stock("A")
    assert (stock.available, stock.reserved, stock.sold) == (6, 3, 1)
    assert await engine.set_limit("A", None) is None
    await engine.reserve("o7", one("A", 3))  # no limit: no customer needed


async def test_multi_item_order_all_or_nothing_with_limits(
    engine: StockEngine, settings: Settings
) -> None:
    for sku in ("A", "B"):
        await engine.set_stock(sku, 10)
    await engine.set_limit("B", 1)
    with pytest.raises(LimitExceeded):
        await engine.reserve("o1", one("A", 3) + one("B", 2), customer_id="c1")
    for sku in ("A", "B"):
        assert (await engine.get_stock(sku)).available == 10
    assert await held(engine, settings, "B", "c1") == 0
    await engine.reserve("o2", one("A", 3) + one("B", 1), customer_id="c1")
    assert await held(engine, settings, "B", "c1") == 1


async def test_released_expired_cancelled_units_return_to_the_allowance(
    engine: StockEngine, settings: Settings
) -> None:
    await engine.set_stock("A", 10)
    await engine.set_limit("A", 2)
    await engine.reserve("r1", one("A", 2), customer_id="c1")
    await engine.release("r1")
    assert await held(engine, settings, "A", "c1") == 0
    await engine.reserve("r2", one("A", 2), ttl_s=1, customer_id="c1")
    await asyncio.sleep(1.1)
    assert await Reaper(engine.redis, settings).reap_once() == 1
    assert await held(engine, settings, "A", "c1") == 0
    await engine.deduct("d1", one("A", 2), customer_id="c1")
    with pytest.raises(LimitExceeded):
        await engine.reserve("r3", one("A"), customer_id="c1")
    await engine.cancel("d1")
    assert await held(engine, settings, "A", "c1") == 0
    await engine.reserve("r4", one("A", 1), customer_id="c1")
    # a late confirm of the expired r2 re-acquires its units: they count again
    await engine.confirm("r2")
    assert await held(engine, settings, "A", "c1") == 3
    await engine.cancel("r2")
    assert await held(engine, settings, "A", "c1") == 1


async def test_200_concurrent_orders_of_one_customer_hold_exactly_the_limit(
    engine: StockEngine, settings: Settings
) -> None:
    await engine.set_stock("A", 1000)
    await engine.set_limit("A", 2)

    async def buy(i: int) -> bool:
        try:
            await engine.reserve(f"o-{i}", one("A"), customer_id="scalper")
            return True
        except LimitExceeded:
            return False

    results = await asyncio.gather(*(buy(i) for i in range(200)))
    assert sum(results) == 2
    stock = await engine.get_stock("A")
    assert (stock.available, stock.reserved, stock.sold) == (998, 2, 0)
    assert await held(engine, settings, "A", "scalper") == 2


async def test_limit_of_an_unknown_sku_is_not_found_and_sets_nothing(
    engine: StockEngine, settings: Settings
) -> None:
    with pytest.raises(NotFound):
        await engine.set_limit("NOPE", 2)
    assert await engine.redis.exists(keys.sku_key("NOPE", settings.buckets)) == 0
    with pytest.raises(NotFound):
        await engine.get_stock("NOPE")
