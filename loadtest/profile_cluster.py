"""Where the library's CPU per order goes, on a 3-master cluster and on standalone
(issue 23 item 4): cProfile over a loop of reserves and confirms.

The same load as row 7 of ``make bench`` (``loadtest/bench_cluster.py``: 64 SKUs,
C coroutines on one uvloop loop), with a confirm after each reserve when asked;
prints the CPU per order and the profile's top lines by own time.

    python -m loadtest.profile_cluster [--items 1|2] [--confirm] [--backend cluster]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loadtest.bench_cluster import SKUS, STOCK, _flush
from loadtest.bench_support import hammer, run_async
from loadtest.common import BENCH_AOF
from stock.app.embedded import Valkey
from stock.core.config import Settings
from stock.core.validate import Item
from stock.orders.engine import StockEngine
from stock.redis.client import connect
from tests.servers import Cluster


async def _loop(
    settings: Settings, size: int, confirm: bool, seconds: float, profile: cProfile.Profile | None
) -> tuple[float, float]:
    """User and system CPU us per order of ``size``-item reserves (and confirms)."""
    client = connect(settings)
    try:
        await _flush(client, settings.redis_cluster)
        engine = StockEngine(client, settings)
        for sku in SKUS:
            await engine.set_stock(sku, STOCK, reason="bench")
        n, calls, phase = len(SKUS), 0, "warm"

        async def call(w: int, i: int) -> None:
            nonlocal calls
            calls += 1
            first = (w * 13 + i * 7) % n
            items = [Item(SKUS[first], 1)]
            if size == 2:
                items.append(Item(SKUS[(first + 1 + (w + i) % (n - 1)) % n], 1))
            await engine.reserve(f"pr-{phase}-{w}-{i}", items)
            if confirm:
                await engine.confirm(f"pr-{phase}-{w}-{i}")

        await hammer(call, 50, 0.5, warmup=0.2)  # warm: scripts loaded, connections open
        pipe, phase = engine.scripts.pipeline, "run"
        calls, before, sent = 0, os.times(), (pipe.batches, pipe.commands)
        if profile is not None:
            profile.enable()
        await hammer(call, 50, seconds, warmup=0.0)
        if profile is not None:
            profile.disable()
        after = os.times()
        batches, commands = pipe.batches - sent[0], pipe.commands - sent[1]
        each = f"{commands / calls:.2f} calls and {batches / calls:.2f} writes each"
        print(f"   {calls} orders: {each}", flush=True)
        user, system = after.user - before.user, after.system - before.system
        return user / calls * 1e6, system / calls * 1e6
    finally:
        await client.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, choices=(1, 2), default=1)
    parser.add_argument("--confirm", action="store_true", help="confirm after each reserve")
    parser.add_argument("--backend", choices=("cluster", "standalone", "both"), default="both")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--sort", default="tottime", help="pstats key: tottime, ncalls, ...")
    parser.add_argument("--no-profile", action="store_true", help="the CPU per order only")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="stock-profile-cluster-"))
    servers: list[Any] = []
    try:
        backends: dict[str, Settings] = {}
        if args.backend in ("standalone", "both"):
            standalone = Valkey(workdir / "standalone", None, *BENCH_AOF).start()
            servers.append(standalone)
            backends["standalone"] = Settings(redis_url=standalone.url, redis_max_connections=128)
        if args.backend in ("cluster", "both"):
            cluster = Cluster(workdir / "cluster", options=BENCH_AOF).start()
            servers.append(cluster)
            backends["cluster"] = Settings(
                redis_url=cluster.url, redis_cluster=True, redis_max_connections=128
            )
        for name, settings in backends.items():
            profile = None if args.no_profile else cProfile.Profile(time.process_time)
            run = _loop(settings, args.items, args.confirm, args.seconds, profile)
            user, system = run_async(run)
            what = "reserve+confirm" if args.confirm else "reserve"
            print(
                f"== {name}: {args.items}-item {what}: {user + system:.1f} us CPU/order "
                f"(user {user:.1f}, system {system:.1f})",
                flush=True,
            )
            if profile is not None:
                stats = pstats.Stats(profile).strip_dirs().sort_stats("tottime")
                stats.sort_stats(args.sort).print_stats(args.top)
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
