"""What the bench compares the project with, each driven as hard as ours:

1. the raw ceiling: the project's reserve script by EVALSHA from ``redis-benchmark``
   on a hot SKU, a new order per call (and pipelined, ``-P``);
3. the bare aiohttp+uvloop+orjson handler (``loadtest/bare_app.py``) driven by ``wrk``,
   alternating with ``stock serve``;
4. what teams write first: a PostgreSQL row-lock decrement with asyncpg.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import redis as redis_sync

from loadtest.bench_report import log
from loadtest.bench_support import (
    BIG_STOCK,
    HERE,
    HOT,
    fresh,
    hammer,
    reserve_builder,
    run_async,
    serve_http,
    set_hot,
)
from loadtest.common import stop_process
from stock.app.embedded import free_port, stock_env
from stock.core.config import Settings
from stock.orders.engine import StockEngine
from stock.redis.client import connect
from stock.redis.pipeline import MAX_BATCH
from stock.redis.scripts import load_sources

PIPELINE = MAX_BATCH  # redis-benchmark -P: the auto-pipeline's batch size

# -- 1. raw ceiling ------------------------------------------------------------


async def _raw_call(settings: Settings, ttl_ms: int) -> tuple[list[str], list[str]]:
    client = connect(settings)
    try:
        build = reserve_builder(StockEngine(client, settings))
        return build("o__rand_int__", HOT, 1, ttl_ms)
    finally:
        await client.aclose()


def redis_benchmark(
    port: int, concurrency: int, requests: int, command: list[str], pipeline: int = 1
) -> float:
    out = subprocess.run(
        [
            "redis-benchmark",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-c",
            str(concurrency),
            "-n",
            str(requests),
            "-r",
            "2000000000",
            "-P",
            str(pipeline),
            "--csv",
            *command,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    lines = [line for line in out.splitlines() if line.strip()]
    return float(lines[-1].split(",")[1].strip('"'))


def raw_command(settings: Settings) -> tuple[list[str], str]:
    """The redis-benchmark command line of one reserve by EVALSHA, and the hot SKU's key."""
    client = redis_sync.Redis.from_url(settings.redis_url, decode_responses=True)
    sha = client.script_load(load_sources()["reserve"])
    client.close()
    keys_, args = run_async(_raw_call(settings, settings.reservation_ttl_s * 1000))
    return ["EVALSHA", sha, str(len(keys_)), *keys_, *args], keys_[1]


def bench_raw(
    settings: Settings, port: int, concurrency: int, requests: int, pipeline: int = 1
) -> float:
    """One redis-benchmark run of ``requests`` reserves, checked against the counters;
    ``pipeline`` > 1 sends that many calls per write on each connection (-P)."""
    client = fresh(settings)
    run_async(set_hot(settings, [HOT]))
    command, sku_key = raw_command(settings)
    rps = redis_benchmark(port, concurrency, requests, command, pipeline)
    made = int(client.hget(sku_key, "reserved") or 0)
    client.close()
    if made < requests * 0.99:
        raise SystemExit(f"raw: only {made} of {requests} EVALSHA calls reserved stock")
    log(f"raw: {requests} calls, {made} reserved, {rps:.0f}/s")
    return rps


def raw_requests(settings: Settings, port: int, concurrency: int, seconds: float) -> int:
    """Warm up and size the raw runs so that each lasts about ``seconds``."""
    fresh(settings).close()
    run_async(set_hot(settings, [HOT]))
    probe = redis_benchmark(port, concurrency, 20_000, raw_command(settings)[0])
    return max(50_000, int(probe * seconds))


# -- 3. HTTP ---------------------------------------------------------------------


def wrk(port: int, threads: int, connections: int, seconds: float, prefix: str) -> float:
    env = dict(os.environ, BENCH_SKU=HOT, BENCH_PREFIX=prefix)
    out = subprocess.run(
        [
            "wrk",
            "-t",
            str(threads),
            "-c",
            str(connections),
            "-d",
            f"{seconds:.0f}s",
            "-s",
            str(HERE / "wrk_reserve.lua"),
            f"http://127.0.0.1:{port}/v1/reservations",
        ],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=120,
    ).stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    statuses = re.search(r"statuses: created=(\d+) other=(\d+)", out)
    if not rate or not statuses:
        raise SystemExit(f"wrk: unexpected output\n{out}")
    if int(statuses.group(2)) > int(statuses.group(1)) * 0.001:
        raise SystemExit(f"wrk: answers other than 201 on port {port}\n{out}")
    log(f"wrk {prefix}: {rate.group(1)} req/s, {statuses.group(0)}")
    return float(rate.group(1))


def bench_http(
    settings: Settings, threads: int, connections: int, seconds: float, repeat: int
) -> dict[str, list[float]]:
    """``stock serve`` (one process, and ``--workers 2``) and the bare app side by side,
    runs alternating; req/s samples by server."""
    env = stock_env(settings)
    servers = {
        "api": [sys.executable, "-m", "stock.app.cli", "serve", "--no-writer", "--no-reaper"],
        "bare": [sys.executable, "-m", "loadtest.bare_app"],
        "api2": [
            sys.executable,
            "-m",
            "stock.app.cli",
            "serve",
            "--no-writer",
            "--no-reaper",
            "--workers",
            "2",
        ],
    }
    procs: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    samples: dict[str, list[float]] = {name: [] for name in servers}
    try:
        for name, command in servers.items():
            port = free_port()
            procs[name] = (serve_http([*command, "--port", str(port)], port, env), port)
        for i in range(repeat):
            for name, (_proc, port) in procs.items():
                fresh(settings).close()
                run_async(set_hot(settings, [HOT]))
                if i == 0:
                    wrk(port, threads, connections, 1, f"warm-{name}-")
                samples[name].append(wrk(port, threads, connections, seconds, f"{name}{i}-"))
    finally:
        for proc, _port in procs.values():
            stop_process(proc)
    return samples


# -- 4. PostgreSQL row lock ------------------------------------------------------


async def pg_row_lock(
    dsn: str, concurrency: int, seconds: float, repeat: int
) -> tuple[list[float], str]:
    """Decrements/s of one row by ``UPDATE``, ``repeat`` runs, and the server's settings."""
    import asyncpg

    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute("DROP TABLE IF EXISTS stock")
        await admin.execute("CREATE TABLE stock (sku text PRIMARY KEY, available bigint NOT NULL)")
        await admin.execute("INSERT INTO stock VALUES ($1, $2)", HOT, BIG_STOCK)
        shown = []
        for name in ("fsync", "synchronous_commit", "shared_buffers"):
            shown.append(f"{name}={await admin.fetchval(f'SHOW {name}')}")
        settings = ", ".join(shown)
    finally:
        await admin.close()
    pool = await asyncpg.create_pool(dsn, min_size=concurrency, max_size=concurrency)
    sql = "UPDATE stock SET available = available - 1 WHERE sku = $1 AND available >= 1"
    try:

        async def call(w: int, i: int) -> None:
            async with pool.acquire() as conn:
                status = await conn.execute(sql, HOT)
            if status != "UPDATE 1":
                raise RuntimeError(f"pg: {status}")

        rates = []
        for _ in range(repeat):
            count, elapsed = await hammer(call, concurrency, seconds, warmup=0.7)
            rates.append(count / elapsed)
            log(f"pg: {rates[-1]:.0f}/s")
    finally:
        await pool.close()
    return rates, settings
