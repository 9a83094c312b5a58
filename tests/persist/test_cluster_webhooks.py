"""Webhooks of a cluster's multi-node transitions (issue 20 item 7): the undo of a refused
late-confirm hold must not report an expiry twice."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from persist import webhooks
from stock.core.config import Settings
from stock.core.errors import ReservationExpired
from stock.loops.reaper import Reaper
from stock.orders.engine import StockEngine
from tests.persist.helpers import drain
from tests.test_multibucket import skus_on_distinct_nodes


@pytest.mark.parametrize("settings", ["cluster"], indirect=True)
async def test_a_refused_late_confirm_reports_each_expiry_once(
    redis: Any, engine: StockEngine, psettings: Settings, pg: asyncpg.Connection
) -> None:
    """Both lines expire (two ``reservation.expired``); a late confirm re-acquires A's line
    in its hold, B is short, the hold is undone: still two, one per line."""
    await webhooks.subscribe(pg, "http://127.0.0.1:9/hook", ["reservation.expired"], "s")
    a, b = skus_on_distinct_nodes(redis, 2)
    for sku in (a, b):
        await engine.set_stock(sku, 5)
    await engine.reserve("late", [{"sku": a, "qty": 1}, {"sku": b, "qty": 1}], ttl_s=1)
    reaper = Reaper(redis, psettings)
    while (await engine.get_stock(a)).reserved or (await engine.get_stock(b)).reserved:
        await reaper.reap_once()
    await engine.set_stock(b, 0)
    with pytest.raises(ReservationExpired):
        await engine.confirm("late")
    await drain(redis, psettings, psettings.database_url)
    rows = await pg.fetch(
        "SELECT sku FROM webhook_deliveries WHERE type = 'reservation.expired'"
        " AND order_id = 'late' ORDER BY sku"
    )
    assert sorted(r["sku"] for r in rows) == sorted([a, b])
