"""TCC semantics (DESIGN §3): empty rollback, hanging try refused, expired lines closed
by a release; standalone and cluster, and a race of try and cancel."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from stock.core.config import Settings
from stock.core.errors import InvalidTransition, OrderClosed, StockError
from stock.loops.reaper import Reaper
from stock.orders.engine import StockEngine


def one(sku: str, qty: int = 1) -> list[dict[str, Any]]:
    return [{"sku": sku, "qty": qty}]


async def test_release_before_reserve_leaves_a_tombstone(engine: StockEngine) -> None:
    await engine.set_stock("A", 5)
    released = await engine.release("o1")
    assert (released.status, released.lines, released.replay) == ("released", [], False)
    assert (await engine.release("o1")).replay  # a retried cancel replays
    for late_try in (
        engine.reserve("o1", one("A")),
        engine.deduct("o1", one("A")),
        engine.confirm("o1"),
        engine.extend("o1", 60),
    ):
        with pytest.raises(OrderClosed) as refused:
            await late_try
        assert refused.value.code == "invalid_transition"
        assert refused.value.details["state"] == "released"
    with pytest.raises(OrderClosed):
        await engine.cancel("o1")  # released, not cancelled
    order = await engine.get_order("o1")
    assert (order["phase"], order["lines"]) == ("released", [])
    stock = await engine.get_stock("A")
    assert (stock.available, stock.reserved, stock.sold) == (5, 0, 0)


async def test_cancel_before_deduct_leaves_a_tombstone(engine: StockEngine) -> None:
    await engine.set_stock("A", 5)
    await engine.set_stock("B", 5)  # (a cluster checks stock before the tombstone)
    assert (await engine.cancel("d1")).status == "cancelled"
    with pytest.raises(OrderClosed) as refused:
        await engine.deduct("d1", one("A") + one("B"))
    assert refused.value.details["state"] == "cancelled"
    assert (await engine.get_stock("A")).available == 5


async def test_release_of_an_expired_line_closes_it(
    engine: StockEngine, settings: Settings
) -> None:
    await engine.set_stock("A", 5)
    await engine.set_stock("B", 5)
    await engine.reserve("o1", one("A", 2) + one("B", 1), ttl_s=1)
    await asyncio.sleep(1.1)
    assert await Reaper(engine.redis, settings).reap_once() == 2
    released = await engine.release("o1")  # refunded: the order is closed
    assert released.status == "released"
    assert {line.state for line in released.lines} == {"released"}
    with pytest.raises(InvalidTransition) as refused:  # a callback redelivered days later
        await engine.confirm("o1")
    assert refused.value.details["state"] == "released"
    for sku in ("A", "B"):
        stock = await engine.get_stock(sku)
        assert (stock.available, stock.reserved, stock.sold) == (5, 0, 0)


async def test_try_and_cancel_race_leaves_no_hold_behind_a_cancel(
    engine: StockEngine,
) -> None:
    skus = ["A", "B", "C"]
    for sku in skus:
        await engine.set_stock(sku, 1000)
    rng = random.Random(7)
    orders = [f"o-{i}" for i in range(150)]
    items = {
        o: one(skus[i % 3]) + (one(skus[(i + 1) % 3]) if i % 4 == 0 else [])
        for i, o in enumerate(orders)
    }

    async def attempt(call: Any) -> str:
        try:
            return str((await call).status)
        except StockError as exc:
            return exc.code

    calls = []
    for o in orders:
        pair = [("reserve", engine.reserve(o, items[o])), ("release", engine.release(o))]
        rng.shuffle(pair)
        calls += pair
    answers = await asyncio.gather(*(attempt(call) for _, call in calls))
    by_order: dict[str, dict[str, str]] = {}
    for (op, _), answer, order_id in zip(
        calls, answers, [o for o in orders for _ in (0, 1)], strict=True
    ):
        by_order.setdefault(order_id, {})[op] = answer
    held = 0
    for order_id, ops in by_order.items():
        order = await engine.get_order(order_id)
        states = {line.state for line in order["lines"]}
        if ops["release"] == "released":  # a successful cancel: no hold survives it
            assert "reserved" not in states, (order_id, ops, order)
        else:  # the cancel lost: only to a try still in flight, and it is retried later
            assert ops["release"] in ("not_found", "unavailable"), (order_id, ops)
        if ops["reserve"] == "reserved":
            held += "reserved" in states
        else:
            assert ops["reserve"] == "invalid_transition", (order_id, ops)
            assert "reserved" not in states
    total_reserved = sum([(await engine.get_stock(s)).reserved for s in skus])
    for sku in skus:
        stock = await engine.get_stock(sku)
        assert stock.available + stock.reserved + stock.sold == 1000
    reserved_lines = 0
    for o in orders:
        lines = (await engine.get_order(o))["lines"]
        reserved_lines += sum(line.qty for line in lines if line.state == "reserved")
    assert total_reserved == reserved_lines
    assert held == sum(1 for o in by_order.values() if o["release"] != "released")
