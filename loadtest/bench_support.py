"""What the bench's rows share: the hot SKU, a load loop, fresh servers' data, a
reserve call built by the scripts' own layout, and starting an HTTP server."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis as redis_sync
import uvloop

from loadtest.common import stop_process, wait_http
from stock.core.config import Settings
from stock.core.formats import items_spec
from stock.core.validate import Item
from stock.orders.engine import StockEngine
from stock.redis.client import connect
from stock.redis.scripts import WITH_RECORD, line_call

HOT = "HOT-1"
BIG_STOCK = 10**12
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def tools_present() -> bool:
    missing = [tool for tool in ("redis-benchmark", "wrk") if shutil.which(tool) is None]
    if missing:
        print(
            f"bench: {' and '.join(missing)} not found. On Debian/Ubuntu: "
            "apt-get install -y redis-tools wrk (make bench does it when run as root).",
            file=sys.stderr,
        )
    return not missing


def run_async(coro: Awaitable[Any]) -> Any:
    """Run one stage's coroutine on a fresh uvloop loop."""

    async def wrap() -> Any:
        return await coro

    return uvloop.run(wrap())


async def hammer(
    call: Callable[[int, int], Awaitable[Any]], concurrency: int, seconds: float, warmup: float
) -> tuple[int, float]:
    """``concurrency`` coroutines calling ``call(worker, i)`` in a loop; returns the calls
    completed during ``seconds`` after ``warmup`` and the measured time."""
    done = 0
    stop = False

    async def worker(w: int) -> None:
        nonlocal done
        i = 0
        while not stop:
            await call(w, i)
            i += 1
            done += 1

    tasks = [asyncio.create_task(worker(w)) for w in range(concurrency)]
    await asyncio.sleep(warmup)
    start_count, started = done, time.perf_counter()
    await asyncio.sleep(seconds)
    count, elapsed = done - start_count, time.perf_counter() - started
    stop = True
    await asyncio.gather(*tasks)
    return count, elapsed


def fresh(settings: Settings) -> redis_sync.Redis:
    """A sync client to the bench server, after FLUSHALL."""
    client = redis_sync.Redis.from_url(settings.redis_url, decode_responses=True)
    client.flushall()
    return client


async def set_hot(settings: Settings, skus: list[str], available: int = BIG_STOCK) -> None:
    client = connect(settings)
    try:
        engine = StockEngine(client, settings)
        for sku in skus:
            await engine.set_stock(sku, available, reason="bench")
    finally:
        await client.aclose()


ReserveCall = Callable[[str, str, int, int], tuple[list[str], list[str]]]


def reserve_builder(engine: StockEngine) -> ReserveCall:
    """``(order_id, sku, qty, ttl_ms) -> (KEYS, ARGV)`` of a single-item standalone reserve,
    made by the scripts' own ``line_call``, so the raw calls follow the layout (and
    ``bench_raw`` checks that they reserved stock)."""

    def build(order_id: str, sku: str, qty: int, ttl_ms: int) -> tuple[list[str], list[str]]:
        items = [Item(sku, qty)]
        keys_, args = line_call(
            buckets=engine.settings.buckets,
            retention_ms=engine.core.retention_ms,
            mode=WITH_RECORD,
            order_id=order_id,
            items=items,
            spec=items_spec(items),
            ttl_ms=ttl_ms,
            may_create=True,
            order_kind="reserve",
        )
        return [str(k) for k in keys_], [str(a) for a in args]

    return build


def serve_http(command: list[str], port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start an HTTP server process and wait for its ``/healthz``."""
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
    except Exception:
        stop_process(proc)
        raise
    return proc
