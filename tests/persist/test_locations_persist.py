"""Locations downstream (DESIGN §13): the writer's per-location counters, the ledger's
location, line allocations, and `stock resync` after a Redis loss, on both backends."""

from __future__ import annotations

import io
from typing import Any

import asyncpg

from persist import webhooks
from persist.reconcile import reconcile
from persist.resync import resync
from stock.core import keys
from stock.core.config import Settings
from stock.core.validate import Item
from stock.orders.engine import StockEngine
from stock.orders.locations import Locations
from tests.conftest import flush
from tests.support.persistence import drain


async def _shop(engine: StockEngine) -> Locations:
    locs = Locations(engine)
    await locs.set("W", "berlin", 3)
    await locs.set("W", "paris", 4)
    await locs.set_allocation("W", "priority", ["berlin", "paris"], True)
    await engine.reserve("held", [Item("W", 4)], 600)  # berlin 3 + paris 1
    await engine.reserve("paid", [Item("W", 1, "paris")], 600)
    await engine.confirm("paid")
    await locs.send("W", "t1", "paris", "rome", 1, "to the new store")
    return locs


async def test_writer_keeps_counters_per_location(
    redis: Any, engine: StockEngine, psettings: Settings, pg: asyncpg.Connection
) -> None:
    locs = await _shop(engine)
    await drain(redis, psettings, psettings.database_url)
    rows = await pg.fetch(
        "SELECT location, available, reserved, sold, in_transit FROM stock_location_levels"
        " WHERE sku = 'W' ORDER BY location"
    )
    view = await locs.read("W")
    assert view is not None
    assert {r["location"]: tuple(r)[1:] for r in rows} == {
        name: (c["available"], c["reserved"], c["sold"], c["in_transit"])
        for name, c in view["locations"].items()
    }
    assert {r["location"]: tuple(r)[1:] for r in rows} == {
        "berlin": (0, 3, 0, 0),
        "paris": (1, 1, 1, 1),
    }
    held = await pg.fetchval(
        "SELECT allocations FROM reservation_lines WHERE order_id = 'held' AND sku = 'W'"
    )
    assert held == "berlin:3,paris:1"
    ledger = await pg.fetch("SELECT op, location FROM stock_ledger WHERE sku = 'W' ORDER BY seq")
    assert [(r["op"], r["location"]) for r in ledger][-3:] == [
        ("reserve", "paris"),
        ("confirm", "paris"),
        ("transfer", "paris,rome"),
    ]


async def test_resync_after_redis_loss_gives_back_locations_and_transfers(
    redis: Any, engine: StockEngine, psettings: Settings, pg: asyncpg.Connection
) -> None:
    dsn = psettings.database_url
    locs = await _shop(engine)
    await drain(redis, psettings, dsn)
    before = await locs.read("W")
    await flush(redis)
    assert await resync(redis, psettings, dsn, None, out=io.StringIO()) == 0
    assert await locs.read("W") == before
    assert [t["state"] for t in await locs.transfers("W")] == ["in_transit"]
    released = await engine.release("held")  # the units go back where they came from
    assert released.lines[0].allocations == "berlin:3,paris:1"
    await locs.receive("W", "t1")
    view = await locs.read("W")
    assert view is not None and view["in_transit"] == 0
    assert {n: c["available"] for n, c in view["locations"].items()} == {
        "berlin": 3,
        "paris": 2,
        "rome": 1,
    }
    await drain(redis, psettings, dsn)
    assert await reconcile(redis, psettings, dsn, None, out=io.StringIO()) == 0


async def test_reconcile_per_location(
    redis: Any, engine: StockEngine, psettings: Settings, pg: asyncpg.Connection
) -> None:
    dsn = psettings.database_url
    await _shop(engine)
    await drain(redis, psettings, dsn)
    assert await reconcile(redis, psettings, dsn, None, out=io.StringIO()) == 0
    await redis.hset(keys.locations_key("W", psettings.buckets), "@berlin", "1,2,0,0")
    out = io.StringIO()
    assert await reconcile(redis, psettings, dsn, ["W"], out=out) == 1
    assert "drift W@berlin: redis 1/2/0/0, postgres 0/3/0/0" in out.getvalue()
    assert "drift W: its locations sum to (2, 3, 1), its totals are (1, 4, 1)" in out.getvalue()


async def test_webhook_data_names_the_location(
    redis: Any, engine: StockEngine, psettings: Settings, pg: asyncpg.Connection
) -> None:
    await webhooks.subscribe(pg, "http://127.0.0.1:9/hook", ["order.confirmed"], "s3cret")
    await _shop(engine)
    await engine.confirm("held")
    await drain(redis, psettings, psettings.database_url)
    rows = await pg.fetch(
        "SELECT * FROM webhook_deliveries WHERE type = 'order.confirmed' ORDER BY seq"
    )
    assert [webhooks.data(r).get("location") for r in rows] == ["paris", "berlin,paris"]


async def test_resync_keeps_a_pinned_lines_pin(
    redis: Any, engine: StockEngine, psettings: Settings, pg: asyncpg.Connection
) -> None:
    """A replay of a pinned reserve after a Redis loss and resync is a replay."""
    dsn = psettings.database_url
    await _shop(engine)
    await engine.reserve("pinned", [Item("W", 1, "paris")], 600)
    await drain(redis, psettings, dsn)
    await flush(redis)
    assert await resync(redis, psettings, dsn, None, out=io.StringIO()) == 0
    again = await engine.reserve("pinned", [Item("W", 1, "paris")], 600)
    assert again.replay and again.lines[0].allocations == "paris:1"


async def test_resync_dry_run_prints_location_differences(
    redis: Any, engine: StockEngine, psettings: Settings, pg: asyncpg.Connection
) -> None:
    dsn = psettings.database_url
    await _shop(engine)
    await drain(redis, psettings, dsn)
    await redis.hset(keys.locations_key("W", psettings.buckets), "@berlin", "1,2,0,0")
    out = io.StringIO()
    assert await resync(redis, psettings, dsn, ["W"], dry_run=True, out=out) == 0
    assert "W@berlin: redis 1/2/0/0 -> postgres 0/3/0/0" in out.getvalue()
