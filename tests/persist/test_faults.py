"""Fault drills for the writer: SIGKILL mid-batch, PostgreSQL down for a while."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
from dataclasses import replace
from typing import Any

import asyncpg
import pytest

from persist.writer import GROUP, Writer
from stock.app.embedded import stock_env
from stock.core import keys
from stock.core.config import Settings
from stock.orders.engine import StockEngine
from tests.persist.conftest import WRITER_COMMAND
from tests.persist.helpers import mixed_load, sku_names, stock_up, wait_persisted
from tests.postgres import Postgres

pytestmark = pytest.mark.faults

KILLS = 20


async def _load_until(engine: StockEngine, skus: list[str], done: asyncio.Event) -> int:
    """Rounds of mixed load until ``done`` is set; returns the operations run."""
    total, seed = 0, 100
    while not done.is_set():
        total += await mixed_load(engine, skus, 400, workers=16, seed=seed)
        seed += 1
    return total


async def _ledger_rows(pg: asyncpg.Connection) -> int:
    return int(await pg.fetchval("SELECT count(*) FROM stock_ledger"))


async def _pending(redis: Any, settings: Settings) -> int:
    """Entries delivered to the writer and not acknowledged, over every bucket."""
    total = 0
    for bucket in range(settings.buckets):
        info = await redis.xpending(keys.events_key(bucket), GROUP)
        total += int(info["pending"])
    return total


async def _spawn(settings: Settings) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *WRITER_COMMAND,
        env=stock_env(settings),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def test_writer_sigkilled_during_load(
    redis: Any, engine: StockEngine, psettings: Settings, pg: asyncpg.Connection
) -> None:
    settings = replace(psettings, writer_batch=100, writer_interval_ms=5)
    skus = sku_names(50)
    await stock_up(engine, skus, 300)
    rng = random.Random(4)
    done = asyncio.Event()
    load = asyncio.create_task(_load_until(engine, skus, done))
    kills = mid_batch = 0
    try:
        while kills < KILLS:
            before = await _ledger_rows(pg)
            proc = await _spawn(settings)
            for _ in range(500):  # until it has flushed something (bounded)
                if await _ledger_rows(pg) > before:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(rng.uniform(0, 0.05))  # a random moment while it works
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            kills += 1
            mid_batch += await _pending(redis, settings) > 0
    finally:
        done.set()
        ops = await load
    assert kills >= KILLS and ops > 2_000
    print(f"writer SIGKILLed {kills} times, {mid_batch} with a batch read but not acknowledged")
    proc = await _spawn(settings)
    try:  # a backlog of batches of 100: generous on a loaded machine, not a speed bound
        await wait_persisted(redis, settings, pg, skus, wait_s=120)
    finally:
        proc.terminate()
        assert await proc.wait() == 0  # SIGTERM: a clean stop


async def test_postgres_down_for_five_seconds(
    redis: Any,
    engine: StockEngine,
    psettings: Settings,
    dsn: str,
    postgres: Postgres,
) -> None:
    skus = sku_names(30)
    await stock_up(engine, skus, 300)
    stop = asyncio.Event()
    writer = Writer(redis, psettings, dsn)
    task = asyncio.create_task(writer.run(stop))
    done = asyncio.Event()
    load = asyncio.create_task(_load_until(engine, skus, done))
    await asyncio.sleep(0.5)
    await asyncio.to_thread(postgres.stop)
    await asyncio.sleep(5)
    lag_while_down = writer.stats.flush_lag_s
    await asyncio.to_thread(postgres.start)
    done.set()
    await load
    pg = await asyncpg.connect(dsn)
    try:
        await wait_persisted(redis, psettings, pg, skus)
    finally:
        await pg.close()
    stop.set()
    await task
    assert writer.stats.pg_errors > 0
    assert lag_while_down > 0  # the backlog's age shows while PostgreSQL is away
    assert writer.stats.flush_lag_s == 0
