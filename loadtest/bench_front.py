"""``make bench`` rows of the flash-sale front (issue 16, DESIGN §10).

8. sold-out fast path: 409 answers/s on a sold-out SKU through ``stock serve``
   with ``STOCK_SOLDOUT_CACHE_MS=1000`` against the bare aiohttp handler
   answering the same 409 body (``loadtest/bare_app.py --sold-out``), wrk,
   alternating; and, for context, ``stock serve`` without the fast path (every
   409 from Redis);
9. overload: ``stock serve`` with ``STOCK_MAX_INFLIGHT=64`` driven by
   ``loadtest/httpload.py`` (closed loop, a 503 is re-sent at once) at C
   connections (capacity: C saturates one process) and at 4C; p50/p99 of the
   201 answers, 503s/s, answers older than the client timeout; and, for
   context, 4C against ``STOCK_MAX_INFLIGHT=0`` (no bound).
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
from dataclasses import replace
from typing import Any

from loadtest.bench_report import Report, log, samples
from loadtest.bench_support import HERE, HOT, fresh, run_async, serve_http, set_hot
from loadtest.common import stop_process
from loadtest.httpload import LoadResult, drive, reserve_body
from stock.app.embedded import free_port, stock_env
from stock.core.config import Settings

SOLD = "SOLD-1"
SOLDOUT_CACHE_MS = 1000
OVERLOAD_LIMIT = 64  # STOCK_MAX_INFLIGHT of the overload rows
CLIENT_TIMEOUT_S = 1.0


def wrk_expect(
    port: int, threads: int, connections: int, seconds: float, prefix: str, sku: str, expect: int
) -> float:
    """wrk's req/s; aborts unless (nearly) every answer had status ``expect``."""
    env = dict(os.environ, BENCH_SKU=sku, BENCH_PREFIX=prefix, BENCH_EXPECT=str(expect))
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
    total = re.search(r"(\d+) requests in", out)
    expected = re.search(r"expected: status=\d+ count=(\d+)", out)
    if not rate or not total or not expected:
        raise SystemExit(f"wrk: unexpected output\n{out}")
    if int(expected.group(1)) < int(total.group(1)) * 0.999:
        raise SystemExit(f"wrk: answers other than {expect} on port {port}\n{out}")
    log(f"wrk {prefix}: {rate.group(1)} req/s, {expected.group(0)}")
    return float(rate.group(1))


def bench_soldout(
    settings: Settings, threads: int, connections: int, seconds: float, repeat: int
) -> dict[str, list[float]]:
    """409/s on a sold-out SKU: fast path, bare, and no fast path; runs alternating."""
    serve = [sys.executable, "-m", "stock.app.cli", "serve", "--no-writer", "--no-reaper"]
    bare = [sys.executable, "-m", "loadtest.bare_app", "--sold-out", SOLD]
    servers = {
        "fast": (serve, stock_env(replace(settings, soldout_cache_ms=SOLDOUT_CACHE_MS))),
        "bare": (bare, stock_env(settings)),
        "redis": (serve, stock_env(replace(settings, soldout_cache_ms=0))),
    }
    fresh(settings).close()
    run_async(set_hot(settings, [SOLD], 0))
    procs: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    rates: dict[str, list[float]] = {name: [] for name in servers}
    try:
        for name, (command, env) in servers.items():
            port = free_port()
            procs[name] = (serve_http([*command, "--port", str(port)], port, env), port)
        for i in range(repeat):
            for name, (_proc, port) in procs.items():
                if i == 0:
                    wrk_expect(port, threads, connections, 1, f"warm-{name}-", SOLD, 409)
                rate = wrk_expect(port, threads, connections, seconds, f"{name}{i}-", SOLD, 409)
                rates[name].append(rate)
    finally:
        for proc, _port in procs.values():
            stop_process(proc)
    return rates


def bench_overload(
    settings: Settings, connections: int, seconds: float, repeat: int
) -> dict[str, list[LoadResult]]:
    """Capacity (C connections) and 4x (4C) against the bounded process, and 4C against
    an unbounded one; runs alternating."""
    serve = [sys.executable, "-m", "stock.app.cli", "serve", "--no-writer", "--no-reaper"]
    servers = {
        "bounded": stock_env(replace(settings, max_inflight=OVERLOAD_LIMIT)),
        "unbounded": stock_env(replace(settings, max_inflight=0)),
    }
    fresh(settings).close()
    run_async(set_hot(settings, [HOT]))
    procs: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    runs: dict[str, list[LoadResult]] = {"capacity": [], "overload": [], "unbounded": []}
    plan = [("capacity", "bounded", 1), ("overload", "bounded", 4), ("unbounded", "unbounded", 4)]
    try:
        for name, env in servers.items():
            port = free_port()
            procs[name] = (serve_http([*serve, "--port", str(port)], port, env), port)
        for i in range(repeat):
            for row, server, factor in plan:
                port = procs[server][1]
                body = reserve_body(HOT, f"{row}{i}-")
                result = run_async(drive(port, connections * factor, seconds, body, warmup=0.5))
                runs[row].append(result)
                log(f"overload {row} ({connections * factor} connections): {_brief(result)}")
    finally:
        for proc, _port in procs.values():
            stop_process(proc)
    return runs


def _brief(result: LoadResult) -> str:
    p50, p99 = result.percentile(201, 0.5), result.percentile(201, 0.99)
    other = result.count() - result.count(201) - result.count(503)
    return (
        f"201 {result.rate(201):,.0f}/s p50 {p50 * 1e3:.1f} ms p99 {p99 * 1e3:.1f} ms, "
        f"503 {result.rate(503):,.0f}/s, older than {CLIENT_TIMEOUT_S:.0f} s: "
        f"{result.older_than(CLIENT_TIMEOUT_S)}, other {other}"
    )


def _median(values: list[float]) -> float:
    return statistics.median(values)


def add_front_rows(report: Report, settings: Settings, args: Any) -> None:
    """Rows 8 and 9 and the summary's soldout/bare and overload_p99/capacity_p99."""
    c, secs, rep = args.concurrency, args.seconds, args.repeat
    log("8 sold-out fast path: stock serve vs bare aiohttp, 409s, wrk, alternating")
    sold = bench_soldout(settings, args.wrk_threads, c, secs, rep)
    fast, bare, off = max(sold["fast"]), max(sold["bare"]), max(sold["redis"])
    report.summary["soldout/bare"] = fast / bare
    report.add(
        "8a. sold out: POST /v1/reservations 409 (fast path)",
        fast,
        "req/s",
        f"STOCK_SOLDOUT_CACHE_MS={SOLDOUT_CACHE_MS}, wrk -c{c}; {samples(sold['fast'])}; "
        f"soldout/bare = {fast / bare:.2f}",
    )
    report.add(
        "8b. sold out: bare aiohttp 409",
        bare,
        "req/s",
        f"same body in and out; {samples(sold['bare'])}",
    )
    report.add(
        "8c. sold out, fast path off (409 from Redis)",
        off,
        "req/s",
        f"context; {samples(sold['redis'])}; this/bare = {off / bare:.2f}",
    )
    log("9 overload: capacity vs 4x connections, latency of the 201s (loadtest/httpload.py)")
    runs = bench_overload(settings, c, secs, rep)
    p99 = {row: _median([r.percentile(201, 0.99) for r in rs]) for row, rs in runs.items()}
    p50 = {row: _median([r.percentile(201, 0.5) for r in rs]) for row, rs in runs.items()}
    ok = {row: _median([r.rate(201) for r in rs]) for row, rs in runs.items()}
    shed = {row: _median([r.rate(503) for r in rs]) for row, rs in runs.items()}
    late = {row: sum(r.older_than(CLIENT_TIMEOUT_S) for r in rs) for row, rs in runs.items()}
    report.summary["overload_p99/capacity_p99"] = p99["overload"] / p99["capacity"]
    for row, label, conns in (
        ("capacity", "9a. at capacity", c),
        ("overload", "9b. 4x", 4 * c),
        ("unbounded", "9c. 4x, no bound (STOCK_MAX_INFLIGHT=0)", 4 * c),
    ):
        limit = "0" if row == "unbounded" else str(OVERLOAD_LIMIT)
        note = (
            f"{conns} connections, STOCK_MAX_INFLIGHT={limit}: p50 {p50[row] * 1e3:.1f} ms, "
            f"201 {ok[row]:,.0f}/s, 503 {shed[row]:,.0f}/s, answers older than "
            f"{CLIENT_TIMEOUT_S:.0f} s: {late[row]}; median of {rep}"
        )
        if row != "capacity":
            note += f"; p99/capacity p99 = {p99[row] / p99['capacity']:.2f}"
        report.add(f"{label}: p99 of 201 answers", p99[row] * 1e3, "ms", note)


def run_alone(args: Any) -> int:
    """``python -m loadtest.bench --only front``: rows 8 and 9 on their own valkey-server."""
    import shutil
    import tempfile
    from pathlib import Path

    from loadtest.bench_report import print_table, summary_line
    from loadtest.bench_support import tools_present
    from loadtest.common import BENCH_AOF
    from stock.app.embedded import Valkey

    if not tools_present():
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="stock-bench-front-"))
    valkey = Valkey(workdir / "valkey", None, *BENCH_AOF).start()
    report = Report()
    try:
        settings = Settings(
            redis_url=valkey.url, redis_max_connections=max(128, 2 * args.concurrency)
        )
        add_front_rows(report, settings, args)
    finally:
        valkey.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print_table(report, args)
    print(summary_line(report.summary), flush=True)
    return 0
