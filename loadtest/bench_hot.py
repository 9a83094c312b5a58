"""Row 10 of ``make bench``: one hot SKU, sharded over a 3-master cluster (issue 22).

A one-SKU flash sale of single-item reserves from C coroutines on one uvloop loop:
on standalone the SKU is ordinary; on the 3-master cluster it has 3x the masters
in shards (DESIGN §12). Same concurrency, alternating, best of ``--repeat``:

- 10a/10b orders/s and this process's CPU per order on each backend;
- 10c the script calls each master ran during the cluster run (``INFO
  commandstats``, reset before it): the busiest master's share of them;
- 10d script calls per order on the cluster (EVALSHA + EVAL over orders);
- 10e the undersell check: a sale of a few thousand units run to the end, each
  buyer stopping at its first refusal; the units left then (must be 0);
- the capacity model (README, "Hot SKUs"): one-SKU orders/s predicted at 1, 3,
  8 and 16 masters from the server time per script call, calls per order, the
  balance and the client CPU per order measured here.

    python -m loadtest.bench --only hot                # this row alone, about a minute
    python -m loadtest.bench_hot [--seconds 2 --repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from loadtest.bench_report import Report, log, samples
from loadtest.bench_support import hammer, run_async
from loadtest.common import BENCH_AOF
from stock.app.embedded import Valkey
from stock.core.config import Settings
from stock.core.errors import InsufficientStock
from stock.orders.engine import StockEngine
from stock.redis.client import connect
from tests.support.servers import Cluster

SKU = "FLASH"
MASTERS = 3
SHARDS = 3 * MASTERS
UNDERSELL_UNITS = 3000
SUMMARY_KEYS = ("hot_sku_cluster/standalone", "busiest_master_share", "calls_per_hot_order")


@dataclass
class Sale:
    rate: float  # orders/s
    cpu_us: float  # this process's CPU per order
    scripts: list[int]  # script calls per master during the run
    script_us: float  # server time per script call (usec_per_call, weighted)
    orders: int  # every order completed, warm-up included


async def _flush(client: Any, cluster: bool) -> None:
    if cluster:
        await client.flushall(target_nodes=client.PRIMARIES)
    else:
        await client.flushall()


async def _script_stats(masters: list[Redis]) -> tuple[list[int], float]:
    """Script calls per master and the mean server time per call (us)."""
    calls, usec = [], 0.0
    for m in masters:
        stats = await m.info("commandstats")
        n = sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha", "eval"))
        calls.append(n)
        usec += sum(
            float(stats.get(f"cmdstat_{c}", {}).get("usec", 0)) for c in ("evalsha", "eval")
        )
    return calls, usec / max(1, sum(calls))


async def _sale(settings: Settings, urls: list[str], concurrency: int, seconds: float) -> Sale:
    shards = SHARDS if settings.redis_cluster else 1
    client = connect(settings)
    masters = [Redis.from_url(u, decode_responses=True) for u in urls]
    try:
        await _flush(client, settings.redis_cluster)
        engine = StockEngine(client, settings)
        await engine.set_stock(SKU, 10**12, reason="bench")
        if shards > 1:
            await engine.set_shards(SKU, shards)
        for m in masters:
            await m.config_resetstat()
        orders = 0

        async def call(w: int, i: int) -> None:
            nonlocal orders
            await engine.reserve(f"h-{w}-{i}", [{"sku": SKU, "qty": 1}])
            orders += 1

        cpu = time.process_time()
        count, elapsed = await hammer(call, concurrency, seconds, warmup=0.7)
        cpu = time.process_time() - cpu
        scripts, script_us = await _script_stats(masters)
        reserved = (await engine.get_stock(SKU)).reserved
    finally:
        for m in masters:
            await m.aclose()
        await client.aclose()
    if reserved != orders:
        raise SystemExit(f"hot bench: {orders} orders but {reserved} units reserved")
    return Sale(count / elapsed, cpu / orders * 1e6, scripts, script_us, orders)


async def _undersell(settings: Settings, concurrency: int) -> tuple[int, int]:
    """(units sold, units left once every buyer met its first refusal)."""
    client = connect(settings)
    try:
        await _flush(client, settings.redis_cluster)
        engine = StockEngine(client, settings)
        await engine.set_stock(SKU, UNDERSELL_UNITS, reason="bench")
        if settings.redis_cluster:
            await engine.set_shards(SKU, SHARDS)
        sold = 0

        async def buyer(w: int) -> None:
            nonlocal sold
            i = 0
            while True:
                i += 1
                try:
                    await engine.reserve(f"u-{w}-{i}", [{"sku": SKU, "qty": 1}])
                except InsufficientStock:
                    return
                sold += 1

        await asyncio.gather(*(buyer(w) for w in range(concurrency)))
        left = (await engine.get_stock(SKU)).available
    finally:
        await client.aclose()
    return sold, left


def capacity(one: Sale, three: Sale) -> dict[int, tuple[float, float]]:
    """Predicted one-SKU orders/s at 1, 3, 8 and 16 masters with 3x shards:
    (server-bound, with this one client process). The busiest master bounds the
    server side: orders/s x script calls/order x its share x server time/call <= 1 s
    per s (its share as measured at 3 masters, scaled as 1/N); one client process
    does at most 1 s / its CPU per order. (The directory's SET on the order's
    master, spread by order id, is left out: a few us against a script's tens.)"""
    calls = sum(three.scripts) / max(1, three.orders)
    imbalance = max(three.scripts) / max(1, sum(three.scripts)) * MASTERS
    out = {}
    for n in (1, 3, 8, 16):
        sale = one if n == 1 else three
        share = 1.0 if n == 1 else min(1.0, imbalance / n)
        server = 1e6 / ((1.0 if n == 1 else calls) * sale.script_us * share)
        out[n] = (server, min(server, 1e6 / sale.cpu_us))
    return out


def measure(
    report: Report, workdir: Path, concurrency: int, seconds: float, repeat: int
) -> dict[str, float]:
    """Both backends, alternating; the rows; returns the summary figures."""
    standalone = Valkey(workdir / "standalone", None, *BENCH_AOF).start()
    cluster = Cluster(workdir / "cluster", options=BENCH_AOF).start()
    size = max(128, 2 * concurrency)
    backends = {
        "standalone": (
            Settings(redis_url=standalone.url, redis_max_connections=size),
            [standalone.url],
        ),
        "cluster": (
            Settings(redis_url=cluster.url, redis_cluster=True, redis_max_connections=size),
            [n.url for n in cluster.nodes],
        ),
    }
    runs: dict[str, list[Sale]] = {"standalone": [], "cluster": []}
    try:
        for _ in range(repeat):
            for name, (settings, urls) in backends.items():
                sale = run_async(_sale(settings, urls, concurrency, seconds))
                runs[name].append(sale)
                log(
                    f"hot row: {name}: {sale.rate:.0f}/s, client CPU {sale.cpu_us:.0f} us/order, "
                    f"scripts per master {sale.scripts}"
                )
        sold, left = run_async(_undersell(backends["cluster"][0], concurrency))
    finally:
        cluster.stop()
        standalone.stop()
    return add_rows(report, runs, concurrency, sold, left)


def add_rows(
    report: Report, runs: dict[str, list[Sale]], concurrency: int, sold: int, left: int
) -> dict[str, float]:
    """Rows 10a-10f from the runs; returns the summary figures."""
    one = max(runs["standalone"], key=lambda s: s.rate)
    three = max(runs["cluster"], key=lambda s: s.rate)
    ratio = three.rate / one.rate
    share = max(three.scripts) / max(1, sum(three.scripts))
    per_order = sum(three.scripts) / max(1, three.orders)
    report.add(
        "10a. hot SKU, standalone (unsharded): reserve",
        one.rate,
        "orders/s",
        f"1 SKU, {concurrency} coroutines; {samples([s.rate for s in runs['standalone']])}; "
        f"client CPU {one.cpu_us:.0f} us/order",
    )
    report.add(
        f"10b. hot SKU, 3-master cluster, shards={SHARDS}: reserve",
        three.rate,
        "orders/s",
        f"same load; {samples([s.rate for s in runs['cluster']])}; client CPU "
        f"{three.cpu_us:.0f} us/order; hot_sku cluster/standalone = {ratio:.2f}",
    )
    report.add(
        "10c. hot SKU: busiest master's share of script calls",
        share,
        "share",
        f"script calls per master {three.scripts} (INFO commandstats); goal <= 0.40",
    )
    report.add(
        "10d. hot SKU: script calls per order (cluster)",
        per_order,
        "calls",
        f"{sum(three.scripts)} calls / {three.orders} orders; "
        f"server {three.script_us:.1f} us/call; goal <= 1.1",
    )
    report.add(
        "10e. hot SKU: units left when the last buyer was refused",
        left,
        "units",
        f"{UNDERSELL_UNITS} units over {SHARDS} shards, {concurrency} buyers until refused: "
        f"{sold} sold; goal 0",
    )
    model = capacity(one, three)
    bound = ", ".join(f"{n}: {v[0]:,.0f}/s" for n, v in model.items())
    alone = f"1: {model[1][1]:,.0f}/s, 3: {model[3][1]:,.0f}/s"
    log(f"hot SKU capacity model, server-bound (enough client processes): {bound}")
    report.add(
        "10f. hot SKU capacity model: 16 masters, server-bound",
        model[16][0],
        "orders/s",
        f"server-bound {bound}; with this one client process {alone}; "
        f"measured 1: {one.rate:,.0f}/s, 3: {three.rate:,.0f}/s",
    )
    return {
        "hot_sku_cluster/standalone": ratio,
        "busiest_master_share": share,
        "calls_per_hot_order": per_order,
        "hot_sku_undersell": float(left),
    }


def run(concurrency: int, seconds: float, repeat: int) -> dict[str, float]:
    """This row alone: its own servers in a temporary directory."""
    workdir = Path(tempfile.mkdtemp(prefix="stock-bench-hot-"))
    report = Report()
    try:
        figures = measure(report, workdir, concurrency, seconds, repeat)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for row in report.rows:
        print(f"{row.what}: {row.value:,.2f} {row.unit} ({row.note})", flush=True)
    print("bench: " + " ".join(f"{k}={v:.2f}" for k, v in figures.items()), flush=True)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description="one hot SKU over a 3-master cluster (issue 22)")
    parser.add_argument("--concurrency", "-c", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    run(args.concurrency, args.seconds, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
