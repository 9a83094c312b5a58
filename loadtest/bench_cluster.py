"""Row 7 of ``make bench``: the library on a 3-master cluster against standalone (issue 10),
and the client's own CPU per order on each (issue 23: ``cluster_cpu/standalone_cpu``,
the worse of single- and two-item orders, goal <= 1.5).

The same ``StockEngine.reserve`` from C coroutines on one uvloop loop, over 64
SKUs (spread over the buckets, so over the cluster's three masters), first with
single-item orders, then with two-item orders (two SKUs, almost always two
bucket groups), on a standalone valkey-server and on a 3-master cluster started
from the same binary with the same persistence (AOF every second). The runs
alternate between the two backends and the best of ``--repeat`` counts. On a
2-core machine the three masters share the cores with the client, so the ratio
mostly measures the client's own cost per order.

    python -m loadtest.bench --only cluster       # this row alone, well under a minute
    python -m loadtest.bench_cluster [--seconds 2 --repeat 3]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loadtest.bench_report import Report, log, met, samples
from loadtest.bench_support import hammer, run_async
from loadtest.common import BENCH_AOF
from stock.app.embedded import Valkey
from stock.core.config import Settings
from stock.core.validate import Item
from stock.orders.engine import StockEngine
from stock.redis.client import connect
from tests.servers import Cluster

SKUS = [f"C-{i:03d}" for i in range(64)]
STOCK = 10**12


async def _flush(client: Any, cluster: bool) -> None:
    if cluster:
        await client.flushall(target_nodes=client.PRIMARIES)
    else:
        await client.flushall()


async def _orders(
    settings: Settings, size: int, concurrency: int, seconds: float
) -> tuple[float, float]:
    """Reserves per second of ``size``-item orders over the 64 SKUs, checked against
    the counters afterwards, and this process's CPU time per order (us): on a shared
    machine the rate depends on what else runs, the CPU per order much less."""
    client = connect(settings)
    try:
        await _flush(client, settings.redis_cluster)
        engine = StockEngine(client, settings)
        for sku in SKUS:
            await engine.set_stock(sku, STOCK, reason="bench")
        n = len(SKUS)
        calls = 0

        async def call(w: int, i: int) -> None:
            nonlocal calls
            calls += 1
            first = (w * 13 + i * 7) % n
            items = [Item(SKUS[first], 1)]
            if size == 2:
                items.append(Item(SKUS[(first + 1 + (w + i) % (n - 1)) % n], 1))
            await engine.reserve(f"cl-{w}-{i}", items)

        cpu = time.process_time()
        count, elapsed = await hammer(call, concurrency, seconds, warmup=0.7)
        cpu = time.process_time() - cpu
        reserved = sum([(await engine.get_stock(sku)).reserved for sku in SKUS])
    finally:
        await client.aclose()
    if reserved < count * size:
        raise SystemExit(f"cluster bench: {count} orders of {size} but {reserved} units reserved")
    return count / elapsed, cpu / calls * 1e6


def measure(
    report: Report, workdir: Path, concurrency: int, seconds: float, repeat: int
) -> tuple[float, float]:
    """Start both backends, run the four series alternating, add the rows; returns
    the (single-item, two-item) cluster/standalone ratios."""
    standalone = Valkey(workdir / "standalone", None, *BENCH_AOF).start()
    cluster = Cluster(workdir / "cluster", options=BENCH_AOF).start()
    size = max(128, 2 * concurrency)
    backends = {
        "standalone": Settings(redis_url=standalone.url, redis_max_connections=size),
        "cluster": Settings(redis_url=cluster.url, redis_cluster=True, redis_max_connections=size),
    }
    rates: dict[tuple[str, int], list[float]] = {}
    cpus: dict[tuple[str, int], list[float]] = {}
    try:
        for _ in range(repeat):
            for items in (1, 2):
                for name, settings in backends.items():
                    rate, cpu = run_async(_orders(settings, items, concurrency, seconds))
                    rates.setdefault((name, items), []).append(rate)
                    cpus.setdefault((name, items), []).append(cpu)
                    log(
                        f"cluster row: {name}, {items}-item orders: {rate:.0f}/s, "
                        f"client CPU {cpu:.0f} us/order"
                    )
    finally:
        cluster.stop()
        standalone.stop()
    best = {key: max(values) for key, values in rates.items()}
    least = {key: min(values) for key, values in cpus.items()}
    ratios, cpu_ratios = [], []
    for items, label in ((1, "single-item"), (2, "two-item")):
        ratio = best["cluster", items] / best["standalone", items]
        ratios.append(ratio)
        cpu_ratios.append(least["cluster", items] / least["standalone", items])
        report.add(
            f"7{'ac'[items - 1]}. library, standalone: {label} reserve",
            best["standalone", items],
            "orders/s",
            f"{len(SKUS)} SKUs, {concurrency} coroutines; "
            f"{samples(rates['standalone', items])}; "
            f"client CPU {least['standalone', items]:.0f} us/order",
        )
        report.add(
            f"7{'bd'[items - 1]}. library, 3-master cluster: {label} reserve",
            best["cluster", items],
            "orders/s",
            f"same load; {samples(rates['cluster', items])}; "
            f"client CPU {least['cluster', items]:.0f} us/order "
            f"({cpu_ratios[-1]:.2f}x standalone's); cluster/standalone = {ratio:.2f}",
        )
    # issue 23: the client's own CPU per order, the worse of the two order sizes
    report.summary["cluster_cpu/standalone_cpu"] = max(cpu_ratios)
    return ratios[0], ratios[1]


def run(concurrency: int, seconds: float, repeat: int) -> tuple[float, float]:
    """This row alone: its own servers in a temporary directory, table lines printed."""
    workdir = Path(tempfile.mkdtemp(prefix="stock-bench-cluster-"))
    report = Report()
    try:
        single, double = measure(report, workdir, concurrency, seconds, repeat)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    cpu = report.summary["cluster_cpu/standalone_cpu"]
    verdict = "met" if met("cluster_cpu/standalone_cpu", cpu) else "NOT met"
    print(
        f"bench: cluster/standalone={single:.2f} (two-item {double:.2f}) "
        f"cluster_cpu/standalone_cpu={cpu:.2f} ({verdict})",
        flush=True,
    )
    return single, double


def main() -> int:
    parser = argparse.ArgumentParser(description="cluster against standalone (issue 10)")
    parser.add_argument("--concurrency", "-c", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    run(args.concurrency, args.seconds, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
