"""The writer: every event lands in PostgreSQL exactly once, on both backends."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import asyncpg

from persist.events import encode
from persist.migrate import migrate, migration_files
from persist.writer import Writer
from stock.core import keys
from stock.core.config import Settings
from stock.loops.reaper import Reaper
from stock.orders.engine import StockEngine
from tests.persist.helpers import mixed_load, sku_names, stock_up, wait_persisted


async def test_migrate_twice_and_concurrently(dsn: str, pg: asyncpg.Connection) -> None:
    results = await asyncio.gather(migrate(dsn), migrate(dsn))
    assert results == [[], []]  # the fixture applied everything already
    versions = await pg.fetch("SELECT version FROM schema_migrations")
    assert sorted(r["version"] for r in versions) == [v for v, _ in migration_files()]


async def test_concurrent_load_lands_exactly_once(
    redis: Any, engine: StockEngine, psettings: Settings, pg: asyncpg.Connection
) -> None:
    skus = sku_names(50)
    await stock_up(engine, skus, 150)
    stop = asyncio.Event()
    writer = Writer(redis, psettings, psettings.database_url)
    reaper = Reaper(redis, replace(psettings, reaper_period_s=0.05))
    tasks = [asyncio.create_task(writer.run(stop)), asyncio.create_task(reaper.run(stop))]
    done = await mixed_load(engine, skus, 10_000)
    assert done > 5_000
    await asyncio.sleep(1.2)  # let the short reservations expire too
    await wait_persisted(redis, psettings, pg, skus)
    stop.set()
    await asyncio.gather(*tasks)
    assert writer.stats.events_total == await pg.fetchval("SELECT count(*) FROM stock_ledger")
    ops = {r["op"] for r in await pg.fetch("SELECT DISTINCT op FROM stock_ledger")}
    assert {"set", "reserve", "confirm", "release", "deduct", "cancel", "expire"} <= ops
    assert writer.stats.batch_sizes and max(writer.stats.batch_sizes) <= psettings.writer_batch


async def test_two_writers_split_nothing_twice(
    redis: Any, engine: StockEngine, psettings: Settings, pg: asyncpg.Connection
) -> None:
    skus = sku_names(20)
    await stock_up(engine, skus, 100)
    stops = [asyncio.Event(), asyncio.Event()]
    writers = [Writer(redis, psettings, psettings.database_url, rebalance_s=0.1) for _ in "ab"]
    tasks = [asyncio.create_task(w.run(s)) for w, s in zip(writers, stops, strict=True)]
    await mixed_load(engine, skus, 1_000, workers=8, seed=2)
    owned = [len(w.owned) for w in writers]
    assert sorted(owned) == [0, psettings.buckets]  # the first takes all, the other stands by
    stops[owned.index(psettings.buckets)].set()  # its buckets pass to the other one
    await mixed_load(engine, skus, 1_000, workers=8, seed=3)
    await wait_persisted(redis, psettings, pg, skus)
    # The stopped writer may have flushed everything itself; its locks go when its
    # connection closes, and the other takes them at its next rebalance (0.1 s).
    for _ in range(40):
        if sum(len(w.owned) for w in writers) == psettings.buckets:
            break
        await asyncio.sleep(0.05)
    assert sum(len(w.owned) for w in writers) == psettings.buckets
    for stop in stops:
        stop.set()
    await asyncio.gather(*tasks)


async def test_writer_that_lost_its_lock_cannot_make_the_next_skip(
    redis: Any, engine: StockEngine, psettings: Settings, pg: asyncpg.Connection
) -> None:
    """A writer whose PostgreSQL session died still reads once before it notices;
    the entries it took stay pending, and the new owner must not skip past them."""
    skus = sku_names(8)
    await stock_up(engine, skus, 100)
    old = Writer(redis, psettings, psettings.database_url)
    await _drain_with(old)
    assert old.conn is not None
    old.conn.terminate()  # its locks go with the session; it does not know yet
    new = Writer(redis, psettings, psettings.database_url)
    await new.step()  # takes every bucket, finds nothing pending
    assert len(new.owned) == psettings.buckets
    await mixed_load(engine, skus, 200, workers=4, seed=5)
    stolen = await old._read()  # delivered to the group, never written
    assert sum(len(r.fresh.entries) for r in stolen if r.fresh) > 0
    await mixed_load(engine, skus, 200, workers=4, seed=6)
    await _drain_with(new)
    assert new.stats.gaps > 0
    await new.aclose()
    await old.durable.client.aclose()
    await wait_persisted(redis, psettings, pg, skus, wait_s=5)


async def _drain_with(writer: Writer) -> None:
    while True:
        was_pending = bool(writer.pending) or not writer.owned
        count, more = await writer.step()
        if not count and not more and not was_pending:
            return


async def test_graceful_stop_flushes_what_is_waiting(
    redis: Any, engine: StockEngine, psettings: Settings, pg: asyncpg.Connection
) -> None:
    """SIGTERM (the stop event) with events waiting: the writer flushes them first."""
    skus = sku_names(5)
    await stock_up(engine, skus, 100)
    for i in range(200):
        await engine.reserve(f"stop-{i}", [{"sku": skus[i % 5], "qty": 1}])
    stop = asyncio.Event()
    stop.set()  # already stopping when it starts: only the final flush runs
    await Writer(redis, psettings, psettings.database_url).run(stop)
    assert await pg.fetchval("SELECT count(*) FROM stock_ledger WHERE op = 'reserve'") == 200
    levels = await pg.fetch("SELECT sku, reserved FROM stock_levels ORDER BY sku")
    assert [(r["sku"], r["reserved"]) for r in levels] == [(s, 40) for s in sorted(skus)]


async def test_event_text_with_separators(
    redis: Any, engine: StockEngine, psettings: Settings, pg: asyncpg.Connection
) -> None:
    """Order ids and customer ids may hold '|' and '\\', reasons anything: they reach
    the ledger and the lines as sent."""
    await engine.set_stock("A", 10, reason="count|2\ttab\\slash\nline")
    await engine.reserve("o|1\\x", [{"sku": "A", "qty": 2}], customer_id="c|1\\y")
    await engine.adjust("A", -1, reason="")
    await _drain_with(Writer(redis, psettings, psettings.database_url))
    rows = await pg.fetch(
        "SELECT op, order_id, qty, available, reserved, sold, seq, reason, customer_id,"
        " expires_at FROM stock_ledger WHERE sku = 'A' ORDER BY seq"
    )
    assert [tuple(r)[:-1] for r in rows] == [
        ("set", "", 10, 10, 0, 0, 1, "count|2\ttab\\slash\nline", None),
        ("reserve", "o|1\\x", 2, 8, 2, 0, 2, "", "c|1\\y"),
        ("adjust", "", -1, 7, 2, 0, 3, "", None),
    ]
    assert rows[1]["expires_at"] is not None and rows[0]["expires_at"] is None
    line = await pg.fetchrow(
        "SELECT state, kind, customer_id FROM reservation_lines WHERE order_id = 'o|1\\x'"
    )
    assert tuple(line) == ("reserved", "reserve", "c|1\\y")


async def test_customers_and_limits_reach_postgres(
    redis: Any, engine: StockEngine, psettings: Settings, pg: asyncpg.Connection
) -> None:
    """Every event of a customer's line carries the customer into the ledger and
    reservation_lines; a limit change is an event that lands in stock_levels."""
    for sku in ("L", "N"):
        await engine.set_stock(sku, 10)
    await engine.set_limit("L", 3)
    assert await engine.set_limit("L", 3) == 3  # unchanged: no event
    await engine.reserve("o1", [{"sku": "L", "qty": 2}, {"sku": "N", "qty": 1}], customer_id="c1")
    await engine.confirm("o1")
    await engine.reserve("o2", [{"sku": "L", "qty": 1}], customer_id="c2")
    await engine.release("o2")
    await engine.reserve("o3", [{"sku": "N", "qty": 1}])  # no customer
    await _drain_with(Writer(redis, psettings, psettings.database_url))
    ledger = await pg.fetch(
        "SELECT op, order_id, qty, customer_id FROM stock_ledger WHERE sku = 'L' ORDER BY seq"
    )
    assert [tuple(r) for r in ledger] == [
        ("set", "", 10, None),
        ("limit", "", 3, None),
        ("reserve", "o1", 2, "c1"),
        ("confirm", "o1", 2, "c1"),
        ("reserve", "o2", 1, "c2"),
        ("release", "o2", 1, "c2"),
    ]
    lines = await pg.fetch(
        "SELECT order_id, sku, state, customer_id FROM reservation_lines ORDER BY order_id, sku"
    )
    assert [tuple(r) for r in lines] == [
        ("o1", "L", "confirmed", "c1"),
        ("o1", "N", "confirmed", "c1"),
        ("o2", "L", "released", "c2"),
        ("o3", "N", "reserved", None),
    ]
    limits = "SELECT sku, limit_per_customer FROM stock_levels ORDER BY sku"
    assert [tuple(r) for r in await pg.fetch(limits)] == [("L", 3), ("N", None)]
    await engine.set_limit("L", None)
    await engine.reserve("o4", [{"sku": "L", "qty": 1}])  # a batch without a limit event
    await _drain_with(Writer(redis, psettings, psettings.database_url))
    assert [tuple(r) for r in await pg.fetch(limits)] == [("L", None), ("N", None)]
    await engine.set_limit("L", 5)
    await _drain_with(Writer(redis, psettings, psettings.database_url))
    await engine.adjust("L", 1)  # the limit stays when a later batch has none
    await _drain_with(Writer(redis, psettings, psettings.database_url))
    assert [tuple(r) for r in await pg.fetch(limits)] == [("L", 5), ("N", None)]
    await wait_persisted(redis, psettings, pg, ["L", "N"], wait_s=5)
    await pg.execute(
        "INSERT INTO webhook_subscriptions (url, events, secret)"
        " VALUES ('http://127.0.0.1:9/', '{stock.changed}', 's')"
    )
    await engine.set_limit("L", 6)  # changes no counters: no stock.changed
    await _drain_with(Writer(redis, psettings, psettings.database_url))
    assert await pg.fetchval("SELECT limit_per_customer FROM stock_levels WHERE sku = 'L'") == 6
    assert await pg.fetchval("SELECT count(*) FROM webhook_deliveries") == 0


async def test_poison_events_are_quarantined_and_the_rest_flow_on(
    redis: Any, engine: StockEngine, psettings: Settings, pg: asyncpg.Connection
) -> None:
    """Events that cannot be decoded or inserted (a NUL byte, a truncated entry, bytes
    that are not UTF-8), written straight into a bucket stream, each go to the
    quarantine table with their raw form; the good events after them reach PostgreSQL
    and the writer keeps going."""
    await engine.set_stock("P1", 5)
    stream = keys.events_key(keys.bucket_of("P1", psettings.buckets))
    stop = asyncio.Event()
    writer = Writer(redis, psettings, psettings.database_url)
    task = asyncio.create_task(writer.run(stop))
    try:
        await wait_persisted(redis, psettings, pg, ["P1"])
        good = {"op": "set", "qty": 1, "available": 1, "seq": 1, "at": 1, "sku": "P1"}
        bad_ids = [
            await redis.xadd(stream, encode({**good, "reason": "nul\x00here"})),
            await redis.xadd(stream, {"e": "set|1|1"}),  # truncated
            await redis.xadd(stream, {"e": b"set|1|1|0|0|1|1|0|P\xff\xfe|"}),  # not UTF-8
        ]
        await engine.adjust("P1", 2, None, "after the poison")
        for _ in range(200):
            level = await pg.fetchval("SELECT available FROM stock_levels WHERE sku = 'P1'")
            if level == 7 or task.done():
                break
            await asyncio.sleep(0.05)
        assert level == 7, "the good event after the poison did not reach PostgreSQL"
        assert not task.done()
        rows = await pg.fetch(
            "SELECT stream, stream_id, raw, error FROM event_quarantine ORDER BY id"
        )
        assert [(r["stream"], r["stream_id"]) for r in rows] == [(stream, i) for i in bad_ids]
        assert b"nul\x00here" in b"".join(rows[0]["raw"]), rows[0]
        assert b"P\xff\xfe" in b"".join(rows[2]["raw"]), rows[2]
        assert writer.stats.quarantined == 3
        await engine.adjust("P1", 1, None, "later")  # and it goes on
        await wait_persisted(redis, psettings, pg, ["P1"])
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    ledger = await pg.fetchval("SELECT count(*) FROM stock_ledger WHERE sku = 'P1'")
    assert ledger == 3  # set, adjust, adjust: nothing of the poison
