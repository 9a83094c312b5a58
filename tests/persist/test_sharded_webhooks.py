"""A sharded SKU's webhooks and ledger (DESIGN §12): the deliveries name the SKU and
carry its totals, sold-out and back-in-stock follow the SKU as a whole, and the
ledger keeps the SKU as ``sku`` with the shard in ``shard``."""

from __future__ import annotations

from typing import Any

import asyncpg

from persist import webhooks
from stock.core.config import Settings
from stock.orders.engine import StockEngine
from tests.support.persistence import drain

SKU = "HOT"


async def outbox(pg: asyncpg.Connection, kind: str) -> list[tuple[str, str | None, int, int, int]]:
    rows = await pg.fetch(
        "SELECT sku, order_id, available, reserved, sold FROM webhook_deliveries"
        " WHERE type = $1 ORDER BY id",
        kind,
    )
    return [(r["sku"], r["order_id"], r["available"], r["reserved"], r["sold"]) for r in rows]


async def test_a_sharded_skus_webhooks_and_ledger_name_the_sku(
    redis: Any, engine: StockEngine, psettings: Settings, pg: asyncpg.Connection
) -> None:
    dsn = psettings.database_url
    await webhooks.subscribe(pg, "http://127.0.0.1:9/hook", list(webhooks.EVENT_TYPES), "s")
    await engine.set_stock(SKU, 8)
    await engine.set_shards(SKU, 4)
    await drain(redis, psettings, dsn)
    for i in range(8):  # one writer batch per order: the totals carry over batches
        await engine.reserve(f"o{i}", [{"sku": SKU, "qty": 1}])
        if i % 3 == 0:
            await drain(redis, psettings, dsn)
    await drain(redis, psettings, dsn)
    assert await outbox(pg, "stock.sold_out") == [(SKU, "o7", 0, 8, 0)]
    await engine.confirm("o0")
    await drain(redis, psettings, dsn)  # (two shards' events of one ms: in shard order)
    await engine.release("o1")
    await drain(redis, psettings, dsn)
    assert await outbox(pg, "order.confirmed") == [(SKU, "o0", 0, 7, 1)]
    assert await outbox(pg, "stock.back_in_stock") == [(SKU, None, 8, 0, 0), (SKU, "o1", 1, 6, 1)]
    changed = await outbox(pg, "stock.changed")
    assert changed == [(SKU, None, 1, 6, 1)]
    names = await pg.fetch("SELECT DISTINCT sku FROM webhook_deliveries")
    assert [r["sku"] for r in names] == [SKU]
    ledger = await pg.fetch("SELECT sku, count(DISTINCT shard) AS n FROM stock_ledger GROUP BY sku")
    assert [(r["sku"], r["n"]) for r in ledger] == [(SKU, 4)]


async def test_stock_levels_keeps_one_row_of_totals_per_sku(
    redis: Any, engine: StockEngine, psettings: Settings, pg: asyncpg.Connection
) -> None:
    """One row per SKU in stock_levels, the totals once the writer drained; the
    shards' own counters are in shard_levels (for resync and reconcile)."""
    dsn = psettings.database_url
    await engine.set_stock(SKU, 30)
    await engine.set_stock("PLAIN", 5)
    await drain(redis, psettings, dsn)  # the SKU's first rows, before it is sharded
    await engine.set_shards(SKU, 4)
    for i in range(5):
        await engine.reserve(f"o{i}", [{"sku": SKU, "qty": 2}])
    await engine.confirm("o0")
    await drain(redis, psettings, dsn)
    rows = await pg.fetch("SELECT sku, available, reserved, sold FROM stock_levels ORDER BY sku")
    stock = await engine.get_stock(SKU)
    assert [tuple(r) for r in rows] == [
        (SKU, stock.available, stock.reserved, stock.sold),
        ("PLAIN", 5, 0, 0),
    ]
    shards = await pg.fetch("SELECT sku, available FROM shard_levels ORDER BY sku")
    assert [r["sku"] for r in shards] == [SKU, f"{SKU}#1", f"{SKU}#2", f"{SKU}#3"]
    assert sum(r["available"] for r in shards) == stock.available == 20
