"""Resync (Redis rebuilt from PostgreSQL, with fencing) and reconcile, on both backends."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
from dataclasses import replace
from typing import Any

import asyncpg
import pytest

from persist.fences import Fences
from persist.reconcile import reconcile
from persist.resync import resync
from stock.app.embedded import stock_env
from stock.core import keys
from stock.core.config import Settings
from stock.core.errors import FenceBusy, FenceLost, LimitExceeded, Unavailable, UnknownReply
from stock.core.formats import parse_line
from stock.loops.reaper import Reaper
from stock.orders.engine import StockEngine
from stock.redis.scripts import Scripts
from tests.conftest import flush
from tests.persist.helpers import drain, wait_persisted
from tests.test_multibucket import skus_on_distinct_nodes

SKUS = ["A", "B", "C", "D"]


async def _shop(engine: StockEngine) -> None:
    """Some of everything: held, sold, released, refunded, multi-item orders."""
    for sku in SKUS:
        await engine.set_stock(sku, 20)
    await engine.reserve("held-1", [{"sku": "A", "qty": 2}])
    await engine.reserve("held-2", [{"sku": "A", "qty": 1}, {"sku": "C", "qty": 3}])
    await engine.reserve("short", [{"sku": "B", "qty": 4}], ttl_s=1)
    await engine.reserve("paid", [{"sku": "B", "qty": 1}])
    await engine.confirm("paid")
    await engine.reserve("gone", [{"sku": "C", "qty": 2}])
    await engine.release("gone")
    await engine.deduct("buy", [{"sku": "D", "qty": 5}])
    await engine.deduct("refund", [{"sku": "D", "qty": 1}])
    await engine.cancel("refund")


async def _snapshot(redis: Any, settings: Settings) -> dict[str, Any]:
    """Counters, RESERVED lines with expiry and order records: what resync must restore."""
    state: dict[str, Any] = {}
    for sku in SKUS:
        values = await redis.hmget(
            keys.sku_key(sku, settings.buckets), "available", "reserved", "sold"
        )
        state[sku] = values
    for order_id, sku in [("held-1", "A"), ("held-2", "A"), ("held-2", "C"), ("short", "B")]:
        line = keys.line_keys(sku, order_id, settings.buckets)
        value = await redis.get(line.line)
        state[f"{order_id}|{sku}"] = (
            value and parse_line(value)[:3],  # state, qty, expiry: not the attempts' tag
            await redis.zscore(line.due, keys.line_member(sku, order_id)),
        )
        state[order_id] = await redis.get(keys.order_key(order_id))
    return state


async def test_flushall_then_resync(
    redis: Any, engine: StockEngine, psettings: Settings, pg: asyncpg.Connection
) -> None:
    dsn = psettings.database_url
    await _shop(engine)
    await drain(redis, psettings, dsn)
    before = await _snapshot(redis, psettings)
    await flush(redis)

    out = io.StringIO()
    assert await resync(redis, psettings, dsn, None, dry_run=True, out=out) == 0
    assert "A: redis missing -> postgres 17/3/0" in out.getvalue()
    assert await _snapshot(redis, psettings) != before
    assert await redis.hgetall(keys.sku_key("A", psettings.buckets)) == {}  # dry run: no change

    assert await resync(redis, psettings, dsn, None, out=io.StringIO()) == 0
    assert await _snapshot(redis, psettings) == before
    for sku in SKUS:
        assert await redis.hget(keys.sku_key(sku, psettings.buckets), "fenced") is None

    confirmed = await engine.confirm("held-2")  # a restored reservation confirms
    assert [line.state for line in confirmed.lines] == ["confirmed", "confirmed"]
    await engine.release("held-1")
    await asyncio.sleep(1.0)  # "short" (ttl 1 s) expires as it would have
    assert await Reaper(redis, psettings).reap_once() == 1
    stock = {s: await engine.get_stock(s) for s in SKUS}
    assert (stock["A"].available, stock["A"].reserved, stock["A"].sold) == (19, 0, 1)
    assert (stock["B"].available, stock["B"].reserved, stock["B"].sold) == (19, 0, 1)
    assert (stock["C"].available, stock["C"].reserved, stock["C"].sold) == (17, 0, 3)
    await drain(redis, psettings, dsn)
    await wait_persisted(redis, psettings, pg, SKUS, wait_s=5)
    assert await reconcile(redis, psettings, dsn, None, out=io.StringIO()) == 0


async def test_resync_restores_limits_and_customer_counts(
    redis: Any, engine: StockEngine, psettings: Settings, pg: asyncpg.Connection
) -> None:
    """After Redis is lost and resynced a customer at the limit is still refused,
    another is not, and a release gives the allowance back (DESIGN §9)."""
    dsn = psettings.database_url
    await engine.set_stock("A", 20)
    await engine.set_limit("A", 2)
    await engine.reserve("c1-held", [{"sku": "A", "qty": 1}], customer_id="c1")
    await engine.deduct("c1-bought", [{"sku": "A", "qty": 1}], customer_id="c1")
    await engine.reserve("c2-gone", [{"sku": "A", "qty": 2}], customer_id="c2")
    await engine.release("c2-gone")
    await engine.reserve("c3-held", [{"sku": "A", "qty": 1}], customer_id="c3|x")
    await drain(redis, psettings, dsn)
    await flush(redis)

    out = io.StringIO()
    assert await resync(redis, psettings, dsn, None, dry_run=True, out=out) == 0
    assert "; limit none -> 2" in out.getvalue()
    assert await resync(redis, psettings, dsn, None, out=io.StringIO()) == 0
    assert await engine.get_limit("A") == 2
    with pytest.raises(LimitExceeded) as refused:
        await engine.reserve("c1-more", [{"sku": "A", "qty": 1}], customer_id="c1")
    assert refused.value.details["items"] == [{"sku": "A", "limit": 2, "held": 2}]
    with pytest.raises(LimitExceeded):  # "|" in an id: the customer is still known
        await engine.reserve("c3-more", [{"sku": "A", "qty": 2}], customer_id="c3|x")
    await engine.reserve("c2-again", [{"sku": "A", "qty": 2}], customer_id="c2")
    await engine.release("c1-held")  # its unit goes back to c1's allowance
    await engine.reserve("c1-more", [{"sku": "A", "qty": 1}], customer_id="c1")
    stock = await engine.get_stock("A")
    assert (stock.available, stock.reserved, stock.sold) == (15, 4, 1)
    line = await redis.get(keys.line_keys("A", "c3-held", psettings.buckets).line)
    # (tag '*': a committed order's line, which no later attempt's undo deletes)
    assert line.startswith("R|1|") and line.endswith("|*|c3|x")

    # drift in Redis: a count PostgreSQL does not know, a limit set behind its back
    await drain(redis, psettings, dsn)
    sku_key = keys.sku_key("A", psettings.buckets)
    await redis.hset(sku_key, mapping={"c:ghost": 7, "limit": 9, "c:c1": 1})
    assert await resync(redis, psettings, dsn, ["A"], out=io.StringIO()) == 0
    held = {k: v for k, v in (await redis.hgetall(sku_key)).items() if k.startswith("c:")}
    assert held == {"c:c1": "2", "c:c2": "2", "c:c3|x": "1"}
    assert await engine.get_limit("A") == 2
    await drain(redis, psettings, dsn)
    resynced = await pg.fetch(
        "SELECT op, qty FROM stock_ledger WHERE sku = 'A' AND reason = 'resync' ORDER BY seq"
    )  # the limit restored after FLUSHALL, then the one set behind PostgreSQL's back
    assert [tuple(r) for r in resynced] == [
        ("resync", 17),
        ("limit", 2),
        ("resync", 0),
        ("limit", 2),
    ]
    limit = "SELECT limit_per_customer FROM stock_levels WHERE sku = 'A'"
    assert await pg.fetchval(limit) == 2
    assert await reconcile(redis, psettings, dsn, None, out=io.StringIO()) == 0


async def test_fenced_sku_is_unavailable(
    redis: Any, engine: StockEngine, psettings: Settings
) -> None:
    await engine.set_stock("A", 5)
    fences = Fences(Scripts(redis), psettings)
    await fences.take(["A", "B"])
    with pytest.raises(Unavailable):
        await engine.reserve("o1", [{"sku": "A", "qty": 1}])
    with pytest.raises(Unavailable):
        await engine.adjust("A", 1)
    with pytest.raises(Unavailable):
        await engine.set_limit("A", 1)
    other = Fences(Scripts(redis), replace(psettings, fence_ttl_s=0.3))
    with pytest.raises(FenceBusy):  # all or none: B is not taken either
        await other.take(["C", "B"])
    await other.lift(["A"])  # not its fence: stays
    with pytest.raises(Unavailable):
        await engine.set_stock("A", 1)
    await fences.lift()
    await engine.reserve("o1", [{"sku": "A", "qty": 1}])
    await other.take(["A"])  # a fence that is not renewed ends by itself
    with pytest.raises(Unavailable):
        await engine.release("o1")
    await asyncio.sleep(0.35)
    await engine.release("o1")
    with pytest.raises(FenceLost):
        await other.renew()


async def test_unflushed_events_refuse_unless_forced(
    redis: Any, engine: StockEngine, psettings: Settings, pg: asyncpg.Connection
) -> None:
    dsn = psettings.database_url
    await engine.set_stock("A", 10)
    await drain(redis, psettings, dsn)
    await engine.reserve("late", [{"sku": "A", "qty": 4}])  # not flushed yet
    out = io.StringIO()
    status = await resync(redis, psettings, dsn, ["A"], wait_s=0.3, out=out)
    assert status == 1 and "refused" in out.getvalue()
    assert await redis.hget(keys.sku_key("A", psettings.buckets), "fenced") is None
    assert (await engine.get_stock("A")).reserved == 4  # untouched

    assert await resync(redis, psettings, dsn, ["A"], force=True, out=io.StringIO()) == 0
    stock = await engine.get_stock("A")
    assert (stock.available, stock.reserved) == (10, 0)  # PostgreSQL's view wins
    await drain(redis, psettings, dsn)  # the older "reserve" event must not win over it
    await wait_persisted(redis, psettings, pg, ["A"], wait_s=5)


@pytest.mark.parametrize("settings", ["standalone"], indirect=True)
async def test_a_write_refused_with_an_unknown_code_is_a_typed_error(
    redis: Any, engine: StockEngine, psettings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """resync.lua answering a code resync does not know (a script of another version)
    ends the run with a stock error that names it, not a RuntimeError."""
    dsn = psettings.database_url
    await engine.set_stock("A", 10)
    await drain(redis, psettings, dsn)
    call = Scripts.__call__

    async def newer(self: Scripts, name: str, keys_: Any, args: Any, **kw: Any) -> Any:
        reply = await call(self, name, keys_, args, **kw)
        return ["REFUSED_LATER", "A"] if name == "resync" else reply

    monkeypatch.setattr(Scripts, "__call__", newer)
    with pytest.raises(UnknownReply, match="answered 'REFUSED_LATER'"):
        await resync(redis, psettings, dsn, ["A"], out=io.StringIO())


async def test_reconcile_reports_drift_until_resync(
    redis: Any, engine: StockEngine, psettings: Settings
) -> None:
    dsn = psettings.database_url
    await _shop(engine)
    await drain(redis, psettings, dsn)
    await engine.reserve("unflushed", [{"sku": "B", "qty": 1}])  # counted, not drift
    assert await reconcile(redis, psettings, dsn, None, out=io.StringIO()) == 0
    await redis.hset(keys.sku_key("C", psettings.buckets), "available", 999)  # drift
    out = io.StringIO()
    assert await reconcile(redis, psettings, dsn, None, out=out) == 1
    assert "drift C: redis 999/" in out.getvalue() and "1 drifting" in out.getvalue()
    await drain(redis, psettings, dsn)
    assert await resync(redis, psettings, dsn, ["C"], out=io.StringIO()) == 0
    assert await reconcile(redis, psettings, dsn, ["C", "B"], out=io.StringIO()) == 0
    assert (await engine.get_stock("C")).available == 17


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*WRITER_PREFIX, *args],
        env=stock_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )


WRITER_PREFIX = [sys.executable, "-m", "stock.app.cli"]


@pytest.mark.parametrize("settings", ["standalone"], indirect=True)
async def test_cli_commands(redis: Any, engine: StockEngine, psettings: Settings) -> None:
    await _shop(engine)
    assert _cli(psettings, "migrate").returncode == 0  # already migrated: a no-op
    await drain(redis, psettings, psettings.database_url)
    await redis.hset(keys.sku_key("D", psettings.buckets), "sold", 0)
    drift = _cli(psettings, "reconcile")
    assert drift.returncode == 1 and "drift D" in drift.stdout
    dry = _cli(psettings, "resync", "--dry-run", "D")
    assert dry.returncode == 0 and "D: redis 15/0/0" in dry.stdout
    assert _cli(psettings, "reconcile", "D").returncode == 1
    assert _cli(psettings, "resync", "D").returncode == 0
    assert _cli(psettings, "reconcile").returncode == 0


async def test_redis_lost_with_a_writer_running(
    redis: Any, engine: StockEngine, psettings: Settings, pg: asyncpg.Connection
) -> None:
    """The runbook's path: Redis comes back empty under a live writer, resync, carry on."""
    from persist.writer import Writer

    dsn = psettings.database_url
    stop = asyncio.Event()
    writer = Writer(redis, psettings, dsn)
    task = asyncio.create_task(writer.run(stop))
    await _shop(engine)
    await wait_persisted(redis, psettings, pg, SKUS, wait_s=10)
    await flush(redis)  # streams and consumer groups gone too
    assert await resync(redis, psettings, dsn, None, out=io.StringIO()) == 0
    await engine.confirm("held-1")  # traffic goes on: new events on new streams
    await engine.reserve("after", [{"sku": "D", "qty": 2}])
    await wait_persisted(redis, psettings, pg, SKUS, wait_s=10)
    assert await reconcile(redis, psettings, dsn, None, out=io.StringIO()) == 0
    stop.set()
    await task


@pytest.mark.parametrize("settings", ["standalone"], indirect=True)
async def test_resync_prints_progress_for_many_skus(
    redis: Any,
    engine: StockEngine,
    psettings: Settings,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import persist.resync

    monkeypatch.setattr(persist.resync, "CHUNK", 2)
    await _shop(engine)
    await drain(redis, psettings, psettings.database_url)
    await flush(redis)
    assert await resync(redis, psettings, psettings.database_url, None, out=io.StringIO()) == 0
    progress = capsys.readouterr().err.splitlines()
    assert progress == ["resync: 2/4 SKUs", "resync: 4/4 SKUs"]
    assert (await engine.get_stock("D")).sold == 5


@pytest.mark.parametrize("redis_lost", [False, True])
async def test_resync_keeps_a_multi_group_deducts_kind(
    redis: Any, engine: StockEngine, psettings: Settings, redis_lost: bool
) -> None:
    """A deduct over several bucket groups is held (event ``reserve``) then confirmed on a
    cluster; a resync (after a Redis loss too) must not turn its directory into a
    reserve: a retry of the deduct still replays (issue 20 item 6)."""
    dsn = psettings.database_url
    skus = skus_on_distinct_nodes(redis)
    for sku in skus:
        await engine.set_stock(sku, 5)
    items = [{"sku": sku, "qty": 1} for sku in skus]
    await engine.deduct("multi", items)
    await drain(redis, psettings, dsn)
    if redis_lost:
        await flush(redis)
    assert await resync(redis, psettings, dsn, None, out=io.StringIO()) == 0
    assert (await engine.get_order("multi"))["kind"] == "deduct"
    assert (await engine.deduct("multi", items)).replay
