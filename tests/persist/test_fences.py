"""Resync fences (issue 12 item 3): an owner and an end, renewal, owner-checked lifting,
the reaper passing fenced lines by, and a resync that dies half-way."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import time
from dataclasses import replace
from typing import Any

import asyncpg
import pytest

from persist.fences import Fences
from persist.resync import Resync, resync
from stock.app.embedded import stock_env
from stock.core import keys
from stock.core.config import Settings
from stock.core.errors import NotFound, Unavailable
from stock.loops.reaper import Reaper
from stock.orders.engine import StockEngine
from tests.conftest import flush
from tests.persist.helpers import drain


def one(sku: str, qty: int = 1) -> list[dict[str, Any]]:
    return [{"sku": sku, "qty": qty}]


async def _until_fenced(redis: Any, settings: Settings, sku: str, wait_s: float = 20) -> None:
    deadline = time.monotonic() + wait_s
    while await redis.hget(keys.sku_key(sku, settings.buckets), "fenced") is None:
        assert time.monotonic() < deadline, f"{sku} was never fenced"
        await asyncio.sleep(0.02)


async def _reserve_when_open(engine: StockEngine, order_id: str, sku: str, wait_s: float) -> float:
    """Reserve as soon as the SKU answers; returns how long it stayed unavailable."""
    started = time.monotonic()
    while True:
        try:
            await engine.reserve(order_id, one(sku))
            return time.monotonic() - started
        except Unavailable:
            waited = time.monotonic() - started
            assert waited < wait_s, f"{sku} still unavailable {waited:.1f} s later"
            await asyncio.sleep(0.02)


@pytest.mark.faults
@pytest.mark.parametrize("settings", ["standalone"], indirect=True)
async def test_killed_resync_fence_runs_out(
    redis: Any, engine: StockEngine, psettings: Settings
) -> None:
    """SIGKILL of ``stock resync`` while it holds its fences: the SKU answers 503 until
    the fence's end (STOCK_FENCE_TTL_S), then works again; a rerun completes."""
    dsn = psettings.database_url
    await engine.set_stock("A", 10)
    await drain(redis, psettings, dsn)
    await engine.reserve("late", one("A"))  # unflushed: the resync waits for it, fenced
    env = stock_env(psettings, STOCK_FENCE_TTL_S="1")
    command = [sys.executable, "-m", "stock.app.cli", "resync", "--wait", "60", "A"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    try:
        await _until_fenced(redis, psettings, "A")
        with pytest.raises(Unavailable):
            await engine.reserve("o1", one("A"))
    finally:
        proc.kill()
        proc.wait(10)
    closed = await _reserve_when_open(engine, "o1", "A", wait_s=5)
    print(f"SKU unavailable for {closed:.2f} s after the SIGKILL (fence ttl 1 s)")
    assert closed <= 1.5
    await drain(redis, psettings, dsn)
    assert await resync(redis, psettings, dsn, ["A"], out=io.StringIO()) == 0
    stock = await engine.get_stock("A")
    assert (stock.available, stock.reserved) == (8, 2)
    assert await redis.hget(keys.sku_key("A", psettings.buckets), "fenced") is None


async def test_concurrent_resyncs_do_not_unfence_each_other(
    redis: Any, engine: StockEngine, psettings: Settings, pg: asyncpg.Connection
) -> None:
    dsn = psettings.database_url
    await engine.set_stock("A", 10)
    await drain(redis, psettings, dsn)
    await engine.reserve("late", one("A"))  # the first resync waits for it, fenced
    renewing = replace(psettings, fence_ttl_s=0.5)  # renewed every ~0.17 s while it works
    first = asyncio.create_task(resync(redis, renewing, dsn, ["A"], wait_s=30, out=io.StringIO()))
    await _until_fenced(redis, psettings, "A")
    await asyncio.sleep(1.2)  # past two fence lifetimes: still held, by renewal
    out = io.StringIO()
    status = await resync(redis, psettings, dsn, ["A"], wait_s=0.2, out=out)
    with pytest.raises(Unavailable):  # the first one's fence still holds
        await engine.reserve("o1", one("A"))
    assert status == 3 and "fenced by another resync" in out.getvalue(), out.getvalue()
    from stock.core.errors import FenceBusy

    with pytest.raises(FenceBusy):  # the typed error under the exit status
        await Resync(redis, psettings, pg).run(["A"])
    with pytest.raises(Unavailable):
        await engine.reserve("o1", one("A"))
    await drain(redis, psettings, dsn)  # "late" is flushed: the first one goes on
    assert await asyncio.wait_for(first, 15) == 0
    await engine.reserve("o1", one("A"))
    assert (await engine.get_stock("A")).reserved == 2


def _same_bucket(buckets: int) -> tuple[str, str]:
    bucket = keys.bucket_of("FENCED", buckets)
    other = next(f"FREE{i}" for i in range(1000) if keys.bucket_of(f"FREE{i}", buckets) == bucket)
    return "FENCED", other


async def test_fenced_head_lines_do_not_starve_the_bucket(
    redis: Any, engine: StockEngine, settings: Settings
) -> None:
    """The first due lines of a bucket belong to a fenced SKU (more than a reaper batch):
    the other SKU's lines of that bucket still come back within 1 s of their expiry."""
    fenced, free = _same_bucket(settings.buckets)
    fast = replace(settings, reaper_batch=10, reaper_period_s=0.05)
    await engine.set_stock(fenced, 100)
    await engine.set_stock(free, 100)
    await asyncio.gather(*(engine.reserve(f"f{i}", one(fenced), ttl_s=1) for i in range(40)))
    await asyncio.sleep(0.05)  # the free SKU's lines are due after them
    held = await asyncio.gather(*(engine.reserve(f"g{i}", one(free), ttl_s=1) for i in range(5)))
    run = Resync(redis, settings, conn=None)  # type: ignore[arg-type]  # fences only
    await run.fences.take([fenced])
    reaper = Reaper(redis, fast)
    stop = asyncio.Event()
    task = asyncio.create_task(reaper.run(stop))
    try:
        deadline = time.monotonic() + 5
        while (await engine.get_stock(free)).reserved:
            assert time.monotonic() < deadline, "the free SKU's lines never expired"
            await asyncio.sleep(0.02)
        late_ms = await reaper.server_ms() - max(h.expires_ms for h in held)
        assert (await engine.get_stock(fenced)).reserved == 40  # fenced: left alone
        await run.fences.lift()
        deadline = time.monotonic() + 5
        while (await engine.get_stock(fenced)).reserved:
            assert time.monotonic() < deadline, "the fenced SKU's lines never expired"
            await asyncio.sleep(0.02)
    finally:
        stop.set()
        await task
    print(f"free SKU's lines back {late_ms} ms after their expiry behind 40 fenced lines")
    assert late_ms <= 1000


async def test_failed_resync_leaves_no_half_restored_sku(
    redis: Any, engine: StockEngine, psettings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resync that dies between SKUs (the second SKU's write fails and the process is
    gone before it lifts its fences): a SKU is either as before or fully restored
    (counters, lines, and the order records its lines need); the fences end by
    themselves; a rerun completes."""
    dsn = psettings.database_url
    for sku in ("A", "B"):
        await engine.set_stock(sku, 10)
        await engine.reserve(f"held-{sku}", one(sku, 2))
    await drain(redis, psettings, dsn)
    await flush(redis)  # Redis lost: everything comes back from PostgreSQL
    original = Resync._write_sku
    written: list[str] = []

    async def fail_second(self: Resync, plan: Any) -> Any:
        written.append(plan.sku)
        if len(written) == 2:
            raise ConnectionError("lost Redis half-way")
        return await original(self, plan)

    async def dead(self: Fences, skus: list[str]) -> None:
        """The process died: nobody lifts the fences."""

    monkeypatch.setattr(Resync, "_write_sku", fail_second)
    monkeypatch.setattr(Fences, "_lift_quietly", dead)
    short = replace(psettings, fence_ttl_s=0.5)
    with pytest.raises(ConnectionError):
        await resync(redis, short, dsn, ["A", "B"], out=io.StringIO())
    done, failed = written
    with pytest.raises(Unavailable):  # still fenced: the run is gone, its fences not yet
        await engine.confirm(f"held-{done}")
    deadline = time.monotonic() + 2
    while True:  # the first SKU is restored with its order record: its reservation confirms
        try:
            assert (await engine.confirm(f"held-{done}")).status == "confirmed"
            break
        except Unavailable:
            assert time.monotonic() < deadline, "the fence never ended"
            await asyncio.sleep(0.02)
    with pytest.raises(NotFound):  # the second is as it was (lost), not half-restored
        await engine.get_stock(failed)
    monkeypatch.undo()
    await drain(redis, psettings, dsn)
    assert await resync(redis, psettings, dsn, [failed], out=io.StringIO()) == 0
    assert (await engine.confirm(f"held-{failed}")).status == "confirmed"
    stock = await engine.get_stock(failed)
    assert (stock.available, stock.reserved, stock.sold) == (8, 0, 2)
