"""``stock reconcile-payments``: each outcome, the repairs and their ledger reason, a
second run that changes nothing, bad files, and a 100 000-row export."""

from __future__ import annotations

import asyncio
import io
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from persist.payments import REASON, reconcile_payments
from stock.core.config import Settings
from stock.core.errors import InvalidRequest
from stock.loops.reaper import Reaper
from stock.orders.engine import StockEngine
from tests.persist.helpers import drain


def export(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text(
        "channel_ref,order_id,amount,status\n"
        + "".join(f"ch-{i},{order_id},9.99,{status}\n" for i, (order_id, status) in enumerate(rows))
    )
    return path


async def _shop(engine: StockEngine, settings: Settings) -> None:
    await engine.set_stock("A", 10)
    await engine.set_stock("B", 10)
    await engine.reserve("paid-sold", [{"sku": "A", "qty": 1}])
    await engine.confirm("paid-sold")
    await engine.reserve("paid-held", [{"sku": "A", "qty": 1}, {"sku": "B", "qty": 1}])
    await engine.reserve("paid-expired", [{"sku": "B", "qty": 2}], ttl_s=1)
    await engine.reserve("paid-released", [{"sku": "A", "qty": 1}])
    await engine.release("paid-released")
    await engine.deduct("refunded-sold", [{"sku": "B", "qty": 1}])
    await engine.deduct("failed-sold", [{"sku": "A", "qty": 1}])
    await engine.deduct("not-in-file", [{"sku": "A", "qty": 1}])
    await engine.reserve("refunded-held", [{"sku": "B", "qty": 1}])
    await asyncio.sleep(1.1)
    assert await Reaper(engine.redis, settings).reap_once() == 1  # paid-expired


FILE_ROWS = [
    ("paid-sold", "paid"),
    ("paid-held", "paid"),
    ("paid-expired", "paid"),
    ("paid-released", "paid"),
    ("paid-unknown", "paid"),
    ("refunded-sold", "refunded"),
    ("failed-sold", "failed"),
    ("refunded-held", "refunded"),
]


async def _run(engine: StockEngine, dsn: str, path: Path, **options: Any) -> tuple[int, list[Any]]:
    out = io.StringIO()
    since = datetime.now(UTC) - timedelta(hours=1)
    status = await reconcile_payments(
        engine, dsn, path, since=since, as_json=True, out=out, progress=io.StringIO(), **options
    )
    return status, [orjson.loads(line) for line in out.getvalue().splitlines()]


async def _levels(engine: StockEngine) -> list[Any]:
    return [await engine.get_stock(sku) for sku in ("A", "B")]


async def test_each_outcome_repaired_once(
    redis: Any, engine: StockEngine, psettings: Settings, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    dsn = psettings.database_url
    await _shop(engine, psettings)
    await drain(redis, psettings, dsn)
    path = export(tmp_path / "export.csv", FILE_ROWS)

    status, report = await _run(engine, dsn, path)  # a dry run first: changes nothing
    before = await _levels(engine)
    assert status == 1
    assert {r["order_id"]: (r["outcome"], r["action"]) for r in report} == {
        "paid-sold": ("ok", "none"),
        "paid-held": ("paid_still_reserved", "would_confirm"),
        "paid-expired": ("paid_not_sold", "would_confirm"),
        "paid-released": ("paid_not_sold", "refund_needed"),
        "paid-unknown": ("paid_not_sold", "refund_needed"),
        "refunded-sold": ("refunded_still_sold", "would_cancel"),
        "failed-sold": ("sold_not_paid", "none"),
        "refunded-held": ("ok", "none"),
        "not-in-file": ("sold_not_paid", "none"),
    }
    assert [r["order_id"] for r in report][: len(FILE_ROWS)] == [o for o, _ in FILE_ROWS]

    status, report = await _run(engine, dsn, path, repair=True)
    assert status == 1  # refunds and unpaid sales are left to a person
    actions = {r["order_id"]: r["action"] for r in report}
    assert actions["paid-held"] == "confirmed"
    assert actions["paid-expired"] == "confirmed"  # re-acquired: B had the units
    assert actions["refunded-sold"] == "cancelled"
    a, b = await _levels(engine)
    assert (a.available, a.reserved, a.sold) == (before[0].available, 0, before[0].sold + 1)
    assert b.sold == before[1].sold + 1 + 2 - 1  # paid-held, paid-expired in; refunded out
    assert (await engine.get_order("refunded-sold"))["lines"][0].state == "cancelled"

    repaired = await _levels(engine)
    status, report = await _run(engine, dsn, path, repair=True)  # the same file again
    assert await _levels(engine) == repaired
    assert {r["order_id"]: r["outcome"] for r in report if r["outcome"] != "ok"} == {
        "paid-released": "paid_not_sold",
        "paid-unknown": "paid_not_sold",
        "failed-sold": "sold_not_paid",
        "not-in-file": "sold_not_paid",
    }

    await drain(redis, psettings, dsn)
    rows = await pg.fetch(
        "SELECT order_id, op FROM stock_ledger WHERE reason = $1 ORDER BY order_id, op", REASON
    )
    assert sorted((r["order_id"], r["op"]) for r in rows) == sorted(
        [
            ("paid-held", "confirm"),
            ("paid-held", "confirm"),
            ("paid-expired", "confirm"),
            ("refunded-sold", "cancel"),
        ]
    )


async def test_paid_not_sold_when_stock_is_gone(
    redis: Any, engine: StockEngine, psettings: Settings, tmp_path: Path
) -> None:
    await engine.set_stock("A", 1)
    await engine.reserve("late", [{"sku": "A", "qty": 1}], ttl_s=1)
    await asyncio.sleep(1.1)
    await Reaper(engine.redis, psettings).reap_once()
    await engine.deduct("other", [{"sku": "A", "qty": 1}])  # the unit went to someone else
    status, report = await _run(
        engine, psettings.database_url, export(tmp_path / "e.csv", [("late", "paid")]), repair=True
    )
    assert status == 1
    assert report[0] == {"order_id": "late", "outcome": "paid_not_sold", "action": "refund_needed"}
    assert (await engine.get_stock("A")).sold == 1


async def test_an_order_of_several_rows_is_decided_once(
    engine: StockEngine, psettings: Settings, tmp_path: Path
) -> None:
    """Per order the latest ``paid``/``refunded`` row wins (by the ``time`` column, not
    the file's order); a ``failed`` row undoes no payment. Run twice, the second run
    changes nothing (issue 20 item 9: run 1 confirmed paid-refunded, run 2 cancelled it)."""
    await engine.set_stock("A", 10)
    await engine.set_stock("B", 0)
    for order_id in ("paid-refunded", "refunded-paid", "paid-failed"):
        await engine.reserve(order_id, [{"sku": "A", "qty": 1}])
    path = tmp_path / "several.csv"
    path.write_text(
        "order_id,status,time\n"
        "paid-refunded,refunded,2026-12-01T10:05:00Z\n"  # listed first, happened last
        "paid-refunded,paid,2026-12-01T10:00:00Z\n"
        "refunded-paid,paid,2026-12-01T11:00:00+01:00\n"  # 10:00 UTC
        "refunded-paid,refunded,2026-12-01T09:00:00\n"  # no zone: UTC
        "paid-failed,paid,2026-12-01T09:00:00Z\n"
        "paid-failed,failed,2026-12-01T09:30:00Z\n"  # a later failed try of a paid order
    )
    runs = []
    for _ in range(2):
        _status, report = await _run(engine, psettings.database_url, path, repair=True)
        runs.append(({r["order_id"]: r["action"] for r in report}, await _levels(engine)))
    first, second = runs
    assert first[0] == {
        "paid-refunded": "none",  # refunded: nothing sold, nothing to undo (not confirmed)
        "refunded-paid": "confirmed",
        "paid-failed": "confirmed",
    }
    assert second[1] == first[1], "the second run changed stock"
    assert set(second[0].values()) == {"none"}
    assert (await engine.get_order("paid-refunded"))["lines"][0].state == "reserved"
    a = first[1][0]
    assert (a.available, a.reserved, a.sold) == (7, 1, 2)


async def test_bad_file_stops_before_any_change(
    engine: StockEngine, psettings: Settings, tmp_path: Path
) -> None:
    await engine.set_stock("A", 5)
    await engine.reserve("o1", [{"sku": "A", "qty": 1}])
    bad = tmp_path / "bad.csv"
    bad.write_text("order_id,status\no1,paid\no2,shipped\n")
    with pytest.raises(InvalidRequest, match=r"bad.csv:3"):
        await _run(engine, psettings.database_url, bad, repair=True)
    assert (await engine.get_stock("A")).reserved == 1  # o1 was not confirmed
    bad.write_text("order_id,status,time\no1,paid,2026-12-01T10:00:00Z\no1,refunded,soon\n")
    with pytest.raises(InvalidRequest, match=r"bad.csv:3: not an ISO 8601 time: 'soon'"):
        await _run(engine, psettings.database_url, bad, repair=True)
    assert (await engine.get_stock("A")).reserved == 1
    no_header = tmp_path / "nohead.csv"
    no_header.write_text("order,state\no1,paid\n")
    with pytest.raises(InvalidRequest, match="order_id, status"):
        await _run(engine, psettings.database_url, no_header)


@pytest.mark.parametrize("settings", ["standalone"], indirect=True)
async def test_hundred_thousand_rows_well_under_a_minute(
    engine: StockEngine, psettings: Settings, tmp_path: Path
) -> None:
    rows = [(f"order-{i}", "failed") for i in range(100_000)]
    path = export(tmp_path / "big.csv", rows)
    progress = io.StringIO()
    started = time.monotonic()
    status = await reconcile_payments(
        engine, psettings.database_url, path, out=io.StringIO(), progress=progress
    )
    took = time.monotonic() - started
    assert status == 0  # unknown orders that failed to pay: nothing to do
    assert took < 60, f"{took:.1f} s"
    if took > 2:
        assert "orders checked" in progress.getvalue()
