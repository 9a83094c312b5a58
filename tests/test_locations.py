"""Locations (DESIGN §13) on a real server, standalone and the 3-master cluster:
allocation decided in the reservation's script, per-location counters through
every transition, expiry and transfers."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from stock.core import keys
from stock.core.errors import InsufficientStock, InvalidRequest, LimitExceeded, OrderConflict
from stock.core.validate import Item
from stock.orders.engine import StockEngine
from stock.orders.locations import Locations
from tests.test_engine import expire_now


def places(view: dict[str, Any] | None) -> dict[str, tuple[int, int, int, int]]:
    assert view is not None
    return {
        name: (c["available"], c["reserved"], c["sold"], c["in_transit"])
        for name, c in view["locations"].items()
    }


async def located(engine: StockEngine, sku: str, **stock: int) -> Locations:
    locs = Locations(engine)
    for name, units in stock.items():
        await locs.set(sku, name, units)
    return locs


def allocations(text: str) -> dict[str, int]:
    return {n: int(q) for n, _, q in (p.rpartition(":") for p in text.split(",") if p)}


async def test_hundred_buyers_split_off_take_exactly_what_each_location_had(
    engine: StockEngine,
) -> None:
    locs = await located(engine, "L1", berlin=3, paris=4, rome=5)
    await locs.set_allocation("L1", "priority", ["rome", "paris", "berlin"], False)

    async def buy(i: int) -> dict[str, int] | None:
        try:
            result = await engine.reserve(f"o{i}", [Item("L1", 1)], 60)
        except InsufficientStock:
            return None
        return allocations(result.lines[0].allocations)

    outcomes = await asyncio.gather(*(buy(i) for i in range(100)))
    served = [o for o in outcomes if o is not None]
    assert len(served) == 12
    given: dict[str, int] = {}
    for alloc in served:
        assert sum(alloc.values()) == 1
        for name, qty in alloc.items():
            given[name] = given.get(name, 0) + qty
    assert given == {"berlin": 3, "paris": 4, "rome": 5}
    view = await locs.read("L1")
    assert places(view) == {"berlin": (0, 3, 0, 0), "paris": (0, 4, 0, 0), "rome": (0, 5, 0, 0)}
    counters = await engine.get_stock("L1")
    assert (counters.available, counters.reserved, counters.sold) == (0, 12, 0)


async def test_split_lines_confirmed_and_released_keep_each_location_exact(
    engine: StockEngine,
) -> None:
    locs = await located(engine, "L2", berlin=3, paris=4)
    await locs.set_allocation("L2", "priority", ["berlin", "paris"], True)
    first = await engine.reserve("a", [Item("L2", 5)], 60)
    assert allocations(first.lines[0].allocations) == {"berlin": 3, "paris": 2}
    second = await engine.reserve("b", [Item("L2", 2)], 60)
    assert allocations(second.lines[0].allocations) == {"paris": 2}
    assert places(await locs.read("L2")) == {"berlin": (0, 3, 0, 0), "paris": (0, 4, 0, 0)}
    confirmed = await engine.confirm("a")
    assert allocations(confirmed.lines[0].allocations) == {"berlin": 3, "paris": 2}
    released = await engine.release("b")
    assert allocations(released.lines[0].allocations) == {"paris": 2}
    assert places(await locs.read("L2")) == {"berlin": (0, 0, 3, 0), "paris": (2, 0, 2, 0)}
    again = await engine.confirm("a")  # a replay answers the same allocations
    assert again.replay and allocations(again.lines[0].allocations) == {"berlin": 3, "paris": 2}
    cancelled = await engine.cancel("a")
    assert allocations(cancelled.lines[0].allocations) == {"berlin": 3, "paris": 2}
    assert places(await locs.read("L2")) == {"berlin": (3, 0, 0, 0), "paris": (4, 0, 0, 0)}
    counters = await engine.get_stock("L2")
    assert (counters.available, counters.reserved, counters.sold) == (7, 0, 0)


async def test_expiry_returns_units_where_they_came_from(engine: StockEngine) -> None:
    locs = await located(engine, "L3", berlin=2, paris=2)
    await locs.set_allocation("L3", "most_available", [], True)
    await engine.reserve("x", [Item("L3", 3)], 1)
    assert places(await locs.read("L3")) == {"berlin": (0, 2, 0, 0), "paris": (1, 1, 0, 0)}
    await expire_now(engine, "x")
    assert places(await locs.read("L3")) == {"berlin": (2, 0, 0, 0), "paris": (2, 0, 0, 0)}
    late = await engine.confirm("x")  # a late confirm re-takes where the strategy finds units
    assert sum(allocations(late.lines[0].allocations).values()) == 3
    view = places(await locs.read("L3"))
    assert sum(v[2] for v in view.values()) == 3 and sum(v[0] for v in view.values()) == 1


async def test_pinned_item_is_served_there_or_refused(engine: StockEngine) -> None:
    await located(engine, "L4", berlin=1, paris=5)
    with pytest.raises(InsufficientStock) as short:
        await engine.reserve("p1", [{"sku": "L4", "qty": 2, "location": "berlin"}], 60)
    assert short.value.details["items"] == [{"sku": "L4", "available": 1, "location": "berlin"}]
    done = await engine.reserve("p2", [{"sku": "L4", "qty": 2, "location": "paris"}], 60)
    assert allocations(done.lines[0].allocations) == {"paris": 2}
    with pytest.raises(OrderConflict):
        await engine.reserve("p2", [{"sku": "L4", "qty": 2, "location": "berlin"}], 60)
    replay = await engine.reserve("p2", [{"sku": "L4", "qty": 2, "location": "paris"}], 60)
    assert replay.replay and allocations(replay.lines[0].allocations) == {"paris": 2}


async def test_plain_sku_refuses_a_location_and_located_sku_refuses_plain_set(
    engine: StockEngine,
) -> None:
    await engine.set_stock("P", 5)
    with pytest.raises(InvalidRequest) as pinned:
        await engine.reserve("q1", [{"sku": "P", "qty": 1, "location": "berlin"}], 60)
    assert pinned.value.details["field"] == "location"
    plain = await engine.reserve("q2", [Item("P", 1)], 60)
    assert plain.lines[0].allocations == ""
    await located(engine, "L5", berlin=1)
    for refused in (engine.set_stock("L5", 3), engine.adjust("L5", 1)):
        with pytest.raises(InvalidRequest) as whole:
            await refused
        assert whole.value.details["field"] == "location"


async def test_transfer_retried_and_received_twice_moves_units_once(engine: StockEngine) -> None:
    locs = await located(engine, "L6", berlin=5, paris=1)
    sent = await locs.send("L6", "t1", "berlin", "paris", 3, "rebalance")
    again = await locs.send("L6", "t1", "berlin", "paris", 3, "rebalance")
    assert sent["state"] == again["state"] == "in_transit" and again["replay"]
    view = await locs.read("L6")
    assert view is not None and view["in_transit"] == 3
    assert places(view) == {"berlin": (2, 0, 0, 3), "paris": (1, 0, 0, 0)}
    assert (await engine.get_stock("L6")).available == 3
    with pytest.raises(OrderConflict):
        await locs.send("L6", "t1", "berlin", "paris", 2)
    with pytest.raises(InsufficientStock) as short:
        await locs.send("L6", "t2", "berlin", "paris", 9)
    assert short.value.details["items"] == [{"sku": "L6", "available": 2, "location": "berlin"}]
    first, second = await asyncio.gather(locs.receive("L6", "t1"), locs.receive("L6", "t1"))
    assert {first["replay"], second["replay"]} == {True, False}
    view = await locs.read("L6")
    assert view is not None and view["in_transit"] == 0
    assert places(view) == {"berlin": (2, 0, 0, 0), "paris": (4, 0, 0, 0)}
    assert (await engine.get_stock("L6")).available == 6


def other_bucket_sku(engine: StockEngine, sku: str) -> str:
    """A SKU in another bucket than ``sku`` (another cluster node's group, mostly)."""
    buckets = engine.settings.buckets
    return next(
        name
        for name in (f"P{i}" for i in range(100))
        if keys.bucket_of(name, buckets) != keys.bucket_of(sku, buckets)
    )


async def test_multi_group_order_late_confirm_retakes_where_the_strategy_finds(
    engine: StockEngine,
) -> None:
    locs = await located(engine, "L7", berlin=2, paris=2)
    await locs.set_allocation("L7", "priority", ["berlin", "paris"], False)
    plain = other_bucket_sku(engine, "L7")
    await engine.set_stock(plain, 5)
    first = await engine.reserve("m1", [Item("L7", 2), Item(plain, 1)], 1)
    placed = {line.sku: line.allocations for line in first.lines}
    assert placed == {"L7": "berlin:2", plain: ""}
    await expire_now(engine, "m1")
    await locs.adjust("L7", "berlin", -2)  # berlin is empty now: the strategy finds paris
    late = await engine.confirm("m1")
    assert {line.sku: line.allocations for line in late.lines} == {"L7": "paris:2", plain: ""}
    assert places(await locs.read("L7")) == {"berlin": (0, 0, 0, 0), "paris": (0, 0, 2, 0)}
    cancelled = await engine.cancel("m1")
    assert {line.sku: line.allocations for line in cancelled.lines}["L7"] == "paris:2"
    assert places(await locs.read("L7")) == {"berlin": (0, 0, 0, 0), "paris": (2, 0, 0, 0)}


async def test_first_location_adopts_the_skus_open_lines(engine: StockEngine) -> None:
    await engine.set_stock("L8", 5)
    await engine.reserve("before", [Item("L8", 2)], 60)
    locs = await located(engine, "L8", berlin=3)
    assert places(await locs.read("L8")) == {"berlin": (3, 2, 0, 0)}
    fresh = await engine.reserve("after", [Item("L8", 1)], 60)  # one location, no strategy
    assert fresh.lines[0].allocations == "berlin:1"
    await engine.release("after")
    released = await engine.release("before")
    assert released.lines[0].allocations == "berlin:2"
    assert places(await locs.read("L8")) == {"berlin": (5, 0, 0, 0)}
    counters = await engine.get_stock("L8")
    assert (counters.available, counters.reserved, counters.sold) == (5, 0, 0)


async def test_per_customer_limit_counts_across_locations(engine: StockEngine) -> None:
    await located(engine, "L9", berlin=5, paris=5)
    await engine.set_limit("L9", 2)
    await engine.reserve("c1", [{"sku": "L9", "qty": 1, "location": "berlin"}], 60, "cust")
    await engine.reserve("c2", [{"sku": "L9", "qty": 1, "location": "paris"}], 60, "cust")
    with pytest.raises(LimitExceeded) as refused:
        await engine.reserve("c3", [{"sku": "L9", "qty": 1, "location": "paris"}], 60, "cust")
    assert refused.value.details["items"] == [{"sku": "L9", "limit": 2, "held": 2}]
    await engine.release("c1")  # a unit back at berlin, and back in the allowance
    done = await engine.reserve("c3", [{"sku": "L9", "qty": 1}], 60, "cust")
    assert done.lines[0].allocations == "berlin:1"


async def test_strategy_rides_in_the_sku_hash_and_an_old_flag_still_works(
    engine: StockEngine,
) -> None:
    """The line scripts read the strategy from the SKU hash's 'locs' (no HMGET of the
    locations hash); a SKU whose 'locs' is the older '1' reads the locations hash."""
    locs = await located(engine, "M", berlin=2, paris=5)
    await locs.set_allocation("M", "priority", ["paris", "berlin"], False)
    sku_key = keys.sku_key("M", engine.settings.buckets)
    assert await engine.redis.hget(sku_key, "locs") == "priority;0;berlin;paris,berlin"
    first = await engine.reserve("m1", [Item("M", 1)])
    assert first.lines[0].allocations == "paris:1"
    await engine.redis.hset(sku_key, "locs", "1")
    await locs.set("M", "paris", 0)  # no new location: 'locs' stays '1'
    second = await engine.reserve("m2", [Item("M", 2)])
    assert second.lines[0].allocations == "berlin:2"
