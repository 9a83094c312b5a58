"""Writer benchmark: how many events per second the writer moves into PostgreSQL.

Fills the bucket streams with N events shaped like the scripts' (reserve then
confirm or release of one-line orders over a set of SKUs, per-SKU seq), then
times one writer draining them: ledger rows, stock_levels, reservation_lines
and offsets, one transaction per batch.

    .venv/bin/python loadtest/bench_writer.py                 # throwaway servers, best of 3
    .venv/bin/python loadtest/bench_writer.py --events 100000 --batch 10000 \\
        --redis-url redis://127.0.0.1:6379/0 --database-url postgresql://...

Without URLs it starts a throwaway valkey-server and PostgreSQL (the same
embedded packages as ``stock dev``) and removes them afterwards. With URLs it
uses (and empties) the given Redis database and creates its tables if needed.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import psutil

from persist import webhooks
from persist.events import encode
from persist.migrate import migrate
from persist.writer import Writer
from stock.core import keys
from stock.core.config import Settings
from stock.redis.client import connect

FILL_CHUNK = 5_000


def synthetic_events(count: int, skus: int, seed: int = 7) -> list[tuple[str, dict[str, Any]]]:
    """(stream, fields) in append order: reserve then confirm/release per order."""
    rng = random.Random(seed)
    counters = {f"SKU-{i:05d}": [1_000_000, 0, 0, 0] for i in range(skus)}  # a, r, s, seq
    names = list(counters)
    now = int(time.time() * 1000)
    out: list[tuple[str, dict[str, Any]]] = []
    open_orders: list[tuple[str, str, int]] = []
    while len(out) < count:
        if open_orders and rng.random() < 0.5:
            order, sku, qty = open_orders.pop(rng.randrange(len(open_orders)))
            op = rng.choice(("confirm", "release"))
            c = counters[sku]
            c[1] -= qty
            c[0 if op == "release" else 2] += qty
        else:
            sku, qty, order = rng.choice(names), rng.randint(1, 3), f"o-{len(out)}"
            op = "reserve"
            c = counters[sku]
            c[0] -= qty
            c[1] += qty
            open_orders.append((order, sku, qty))
        c[3] += 1
        fields = encode(
            {
                "op": op,
                "sku": sku,
                "order": order,
                "qty": qty,
                "available": c[0],
                "reserved": c[1],
                "sold": c[2],
                "seq": c[3],
                "at": now,
                "exp": now + 900_000,
            }
        )
        out.append((sku, fields))
    return out


async def fill(client: Any, settings: Settings, count: int, skus: int) -> None:
    events = synthetic_events(count, skus)
    for start in range(0, len(events), FILL_CHUNK):
        pipe = client.pipeline(transaction=False)
        for sku, fields in events[start : start + FILL_CHUNK]:
            pipe.xadd(keys.events_key(keys.bucket_of(sku, settings.buckets)), fields)
        await pipe.execute()


async def bench(settings: Settings, count: int, skus: int, hooks: int = 0) -> float:
    """Fill, drain, check; returns events per second. ``hooks`` webhook subscriptions
    to every event type make the writer fill the outbox too (nothing is sent)."""
    await migrate(settings.database_url)
    conn = await asyncpg.connect(settings.database_url)
    await conn.execute("TRUNCATE stock_ledger, stock_levels, reservation_lines, stream_offsets")
    await conn.execute("TRUNCATE webhook_subscriptions, webhook_deliveries, webhook_throttle")
    for _ in range(hooks):
        await webhooks.subscribe(conn, "http://127.0.0.1:9/bench", list(webhooks.EVENT_TYPES), "b")
    client = connect(settings)
    await client.flushdb()
    await fill(client, settings, count, skus)
    writer = Writer(client, settings, settings.database_url)
    backend = psutil.Process(await (await writer._connect()).fetchval("SELECT pg_backend_pid()"))
    cpu = (time.process_time(), _cpu(backend), await _redis_cpu(client))
    started = time.perf_counter()
    applied = 0
    while applied < count:
        n, _more = await writer.step()
        applied += n
    elapsed = time.perf_counter() - started
    used = (time.process_time() - cpu[0], _cpu(backend) - cpu[1], await _redis_cpu(client) - cpu[2])
    await writer.aclose()
    rows = await conn.fetchval("SELECT count(*) FROM stock_ledger")
    offered = await conn.fetchval("SELECT count(*) FROM webhook_deliveries")
    await conn.close()
    await client.aclose()
    assert rows == count, f"ledger has {rows} rows for {count} events"
    sizes = writer.stats.batch_sizes
    print(
        f"writer: {count} events in {elapsed:.2f} s = {count / elapsed:,.0f} events/s "
        f"({writer.stats.batches_total} transactions, up to {max(sizes)} events each; CPU s: "
        f"writer {used[0]:.2f}, PostgreSQL backend {used[1]:.2f}, Redis {used[2]:.2f})"
        + (f"; {offered} webhook deliveries offered" if hooks else "")
    )
    return count / elapsed


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


async def _redis_cpu(client: Any) -> float:
    info = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _runs(settings: Settings, args: argparse.Namespace) -> None:
    rates = [
        asyncio.run(bench(settings, args.events, args.skus, args.webhooks))
        for _ in range(args.repeat)
    ]
    runs = " / ".join(f"{r:,.0f}" for r in rates)
    print(f"writer/s={max(rates):.0f} (best of {len(rates)}: {runs}; batch {args.batch})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--skus", type=int, default=1_000)
    parser.add_argument(
        "--batch", type=int, default=Settings().writer_batch, help="STOCK_WRITER_BATCH"
    )
    parser.add_argument("--buckets", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3, help="runs; the best is reported")
    parser.add_argument(
        "--webhooks", type=int, default=0, help="webhook subscriptions to every event type"
    )
    parser.add_argument("--redis-url")
    parser.add_argument("--database-url")
    args = parser.parse_args()
    settings = Settings(writer_batch=args.batch, buckets=args.buckets)
    if args.redis_url and args.database_url:
        settings = replace(settings, redis_url=args.redis_url, database_url=args.database_url)
        _runs(settings, args)
        return
    from loadtest.common import BENCH_AOF
    from stock.app.embedded import Valkey, start_postgres

    workdir = Path(tempfile.mkdtemp(prefix="stock-bench-"))
    valkey = Valkey(workdir / "valkey", None, *BENCH_AOF)
    postgres: Any = None
    try:
        valkey.start()
        postgres = start_postgres(workdir)
        settings = replace(settings, redis_url=valkey.url, database_url=postgres.get_uri())
        _runs(settings, args)
    finally:
        if postgres is not None:
            postgres.cleanup()
        valkey.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
