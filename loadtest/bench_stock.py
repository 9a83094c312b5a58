"""The bench rows that measure the project's own code (2, 5 and 6): ``StockEngine.reserve``
from C coroutines, Redis memory per active reservation, the reaper's expiries/s and
the writer's events/s."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from loadtest.bench_report import log
from loadtest.bench_support import HOT, fresh, hammer, reserve_builder, run_async, set_hot
from stock.core import keys
from stock.core.config import Settings
from stock.core.validate import Item
from stock.orders.engine import StockEngine
from stock.redis.client import connect
from stock.redis.scripts import load_sources

# -- 2. our library ------------------------------------------------------------


async def _library(settings: Settings, concurrency: int, seconds: float) -> float:
    await set_hot(settings, [HOT])
    client = connect(settings)
    try:
        engine = StockEngine(client, settings)
        items = [Item(HOT, 1)]

        async def call(w: int, i: int) -> None:
            await engine.reserve(f"lib-{w}-{i}", items)

        count, elapsed = await hammer(call, concurrency, seconds, warmup=0.7)
        reserved = (await engine.get_stock(HOT)).reserved
    finally:
        await client.aclose()
    if reserved < count:
        raise SystemExit(f"library: {count} reserves counted but only {reserved} reserved")
    return count / elapsed


def bench_library(settings: Settings, concurrency: int, seconds: float) -> float:
    fresh(settings).close()
    rate = float(run_async(_library(settings, concurrency, seconds)))
    log(f"library: {rate:.0f}/s")
    return rate


# -- 5. memory -------------------------------------------------------------------


async def measure_memory(
    settings: Settings, concurrency: int, count: int
) -> tuple[float, float, tuple[int, int]]:
    """Bytes per active reservation, with the event stream deleted and kept, and the
    ``MEMORY USAGE`` of one order record and one line."""
    await set_hot(settings, [HOT])
    client = connect(settings)
    try:
        engine = StockEngine(client, settings)
        items = [Item(HOT, 1)]

        async def fill(prefix: str, n: int) -> None:
            queue = iter(range(n))

            async def worker() -> None:
                for i in queue:
                    await engine.reserve(f"{prefix}{i:07d}", items)

            await asyncio.gather(*(worker() for _ in range(concurrency)))

        async def used() -> int:
            """used_memory once lazy frees and the keyspace's incremental rehash settle."""
            for _ in range(100):
                if int((await client.info("memory")).get("lazyfree_pending_objects", 0)) == 0:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            return int((await client.info("memory"))["used_memory"])

        await fill("warm-", 1000)  # scripts, connections and buffers in place first
        before = await used()
        await fill("mem-", count)
        with_stream = await used()
        await client.delete(*(f"stock:{{b{b}}}:events" for b in range(settings.buckets)))
        without = await used()
        reserved = (await engine.get_stock(HOT)).reserved
        sample = "mem-0000000"
        parts = (
            int(await client.memory_usage(keys.order_key(sample)) or 0),
            int(await client.memory_usage(keys.line_keys(HOT, sample, settings.buckets).line) or 0),
        )
    finally:
        await client.aclose()
    if reserved != count + 1000:
        raise SystemExit(f"memory: expected {count + 1000} reservations, Redis holds {reserved}")
    return (without - before) / count, (with_stream - before) / count, parts


# -- 6. reaper and writer --------------------------------------------------------


def reaper_skus(count: int) -> list[str]:
    return [f"R-{i:04d}" for i in range(count)]


async def measure_reaper(settings: Settings, count: int, sku_count: int) -> tuple[float, int]:
    """Expiries/s of a ``Reaper.reap_once`` loop over ``count`` due lines."""
    from stock.loops.reaper import Reaper

    skus = reaper_skus(sku_count)
    await set_hot(settings, skus)
    client = connect(settings)
    try:
        sha = await client.script_load(load_sources()["reserve"])
        build = reserve_builder(StockEngine(client, settings))
        for start in range(0, count, 2000):
            pipe = client.pipeline(transaction=False)
            for i in range(start, min(count, start + 2000)):
                keys_, args = build(f"rp-{i:07d}", skus[i % sku_count], 1, 1000)
                pipe.evalsha(sha, len(keys_), *keys_, *args)
            for reply in await pipe.execute():
                if reply[0] != "OK":
                    raise SystemExit(f"reaper: reserve refused: {reply}")
        await asyncio.sleep(1.2)  # every reservation is due now (ttl 1 s)
        reaper = Reaper(client, settings)
        expired = 0
        started = time.perf_counter()
        deadline = started + 300
        while expired < count and time.perf_counter() < deadline:
            expired += await reaper.reap_once()
        elapsed = time.perf_counter() - started
    finally:
        await client.aclose()
    if expired != count:
        raise SystemExit(f"reaper: expired {expired} of {count}")
    return count / elapsed, expired


async def measure_writer(
    settings: Settings, dsn: str, database: str, wdsn: str, max_s: float
) -> tuple[float, int, int]:
    """Drain the streams' backlog into a fresh database with one Writer, for at most
    ``max_s``; returns (events/s, events applied, backlog)."""
    import asyncpg

    from persist.migrate import migrate
    from persist.writer import Writer

    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}"')
        await admin.execute(f'CREATE DATABASE "{database}"')
    finally:
        await admin.close()
    await migrate(wdsn)
    client = connect(settings)
    try:
        pipe = client.pipeline(transaction=False)
        for b in range(settings.buckets):
            pipe.xlen(keys.events_key(b))
        backlog = sum(await pipe.execute())
        writer = Writer(client, settings, wdsn)
        applied = 0
        started = time.perf_counter()
        deadline = started + max_s
        while applied < backlog and time.perf_counter() < deadline:
            n, _more = await writer.step()
            applied += n
        elapsed = time.perf_counter() - started
        await writer.close()
        conn = await asyncpg.connect(wdsn)
        try:
            ledger = await conn.fetchval("SELECT count(*) FROM stock_ledger")
        finally:
            await conn.close()
    finally:
        await client.aclose()
    if ledger != applied or (applied < backlog and elapsed < max_s):
        raise SystemExit(f"writer: backlog {backlog}, applied {applied}, ledger rows {ledger}")
    return applied / elapsed, applied, backlog


def bench_writer_external(settings: Settings, dsn: str, events: int) -> tuple[float, str] | None:
    """``loadtest/bench_writer.py``'s ``bench(settings, count, skus)``, when it is there:
    it fills the streams with ``events`` synthetic events and times one writer draining
    them. None when the module or the function is missing or fails (then ours runs)."""
    import inspect

    try:
        from loadtest import bench_writer
    except ImportError:
        return None
    measure = getattr(bench_writer, "bench", None)
    if measure is None or not inspect.iscoroutinefunction(measure):
        return None
    try:
        rate = run_async(measure(replace(settings, database_url=dsn), events, 1000))
    except Exception as exc:  # theirs failed: say so and measure with ours
        log(f"loadtest/bench_writer.py failed ({exc!r}); using the reaper backlog instead")
        return None
    return float(rate), f"{events} synthetic events over 1000 SKUs (loadtest/bench_writer.py)"
