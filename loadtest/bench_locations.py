"""Row 11 of ``make bench``: ``StockEngine.reserve`` of one unit on a SKU with 8 locations
(priority, split on: DESIGN §13) against the same reserve on a SKU without locations,
alternating; the summary's ``locations/plain`` (goal >= 0.8: the allocation is decided
inside the reservation's one script call, no second round trip).

``python -m loadtest.bench --only locations`` runs it alone."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from loadtest.bench_report import Report, log, print_table, samples, summary_line
from loadtest.bench_support import BIG_STOCK, fresh, hammer, run_async, set_hot
from loadtest.common import BENCH_AOF
from stock.app.embedded import Valkey
from stock.core.config import Settings
from stock.core.validate import Item
from stock.orders.engine import StockEngine
from stock.orders.locations import Locations
from stock.redis.client import connect

PLAIN, LOCATED = "PLAIN-1", "LOCATED-1"
PLACES = [f"store-{i}" for i in range(8)]


async def _setup(settings: Settings) -> None:
    await set_hot(settings, [PLAIN])
    client = connect(settings)
    try:
        locs = Locations(StockEngine(client, settings))
        for name in PLACES:  # the first in priority order is the last by name
            await locs.set(LOCATED, name, BIG_STOCK // 8, reason="bench")
        await locs.set_allocation(LOCATED, "priority", list(reversed(PLACES)), True)
    finally:
        await client.aclose()


async def _reserve_rate(
    settings: Settings, sku: str, concurrency: int, seconds: float
) -> tuple[float, float]:
    """Reserves/s, and the server's µs per EVALSHA (``INFO commandstats``: the
    script's own cost, which a loaded machine disturbs far less than a rate)."""
    client = connect(settings)
    try:
        engine = StockEngine(client, settings)
        items = [Item(sku, 1)]

        async def call(w: int, i: int) -> None:
            await engine.reserve(f"{sku}-{w}-{i}", items)

        await client.config_resetstat()
        count, elapsed = await hammer(call, concurrency, seconds, warmup=0.7)
        stats = await client.info("commandstats")
        usec = float(stats.get("cmdstat_evalsha", {}).get("usec_per_call", 0.0))
    finally:
        await client.aclose()
    return count / elapsed, usec


Runs = list[tuple[float, float]]  # (reserves/s, server µs per EVALSHA) per run


def measure(settings: Settings, concurrency: int, seconds: float, repeat: int) -> tuple[Runs, Runs]:
    """(located runs, plain runs), alternating."""
    located: Runs = []
    plain: Runs = []
    for _ in range(repeat):
        fresh(settings).close()
        run_async(_setup(settings))
        plain.append(run_async(_reserve_rate(settings, PLAIN, concurrency, seconds)))
        located.append(run_async(_reserve_rate(settings, LOCATED, concurrency, seconds)))
        log(f"locations: {located[-1][0]:.0f}/s, plain {plain[-1][0]:.0f}/s")
    return located, plain


def add_row(report: Report, settings: Settings, args: argparse.Namespace) -> None:
    located, plain = measure(settings, args.concurrency, args.seconds, args.repeat)
    best_l, best_p = max(r for r, _ in located), max(r for r, _ in plain)
    ratio = best_l / best_p
    usec_l, usec_p = min(u for _, u in located), min(u for _, u in plain)
    report.summary["locations/plain"] = ratio
    report.add(
        "11. library: reserve on a SKU with 8 locations",
        best_l,
        "ops/s",
        f"priority, split on, {args.concurrency} coroutines; {samples([r for r, _ in located])};"
        f" plain SKU {best_p:.0f}/s ({samples([r for r, _ in plain])}); locations/plain = "
        f"{ratio:.2f}; server µs per EVALSHA {usec_l:.1f} vs {usec_p:.1f}",
    )


def run_alone(args: argparse.Namespace) -> int:
    """``python -m loadtest.bench --only locations``: row 11 on its own valkey-server."""
    workdir = Path(tempfile.mkdtemp(prefix="stock-bench-locations-"))
    valkey = Valkey(workdir / "valkey", None, *BENCH_AOF).start()
    report = Report()
    try:
        settings = Settings(
            redis_url=valkey.url, redis_max_connections=max(128, 2 * args.concurrency)
        )
        add_row(report, settings, args)
    finally:
        valkey.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print_table(report, args)
    print(summary_line(report.summary), flush=True)
    return 0
