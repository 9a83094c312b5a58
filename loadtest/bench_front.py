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

import asyncio
import os
import re
import statistics
import subprocess
import sys
from dataclasses import replace
from typing import Any

from loadtest.baselines import server_cpu
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
PRIORITY_ORDERS = 30_000  # held orders per confirm run (10 connections, a few seconds)


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


async def _hold_orders(settings: Settings, prefix: str, count: int) -> None:
    """``count`` reserved orders ``<prefix><n>`` on the hot SKU, for the confirms."""
    from stock.core.validate import Item
    from stock.orders.engine import StockEngine
    from stock.redis.client import connect

    client = connect(settings)
    try:
        engine, items, queue = StockEngine(client, settings), [Item(HOT, 1)], iter(range(count))

        async def worker() -> None:
            for n in queue:
                await engine.reserve(f"{prefix}{n}", items)

        await asyncio.gather(*(worker() for _ in range(50)))
    finally:
        await client.aclose()


async def _flood_and_confirm(
    port: int, connections: int, seconds: float, row: str, confirmers: int
) -> tuple[LoadResult, LoadResult]:
    """Reserves on ``connections`` and confirms of held orders on ``confirmers``."""
    confirms = drive(
        port,
        confirmers,
        seconds,
        lambda n: b"",
        warmup=0.5,
        path_of=lambda n: f"/v1/reservations/{row}-{n}/confirm",
    )
    if not connections:
        return LoadResult(seconds), await confirms
    reserves = drive(port, connections, seconds, reserve_body(HOT, f"{row}r-"), warmup=0.5)
    flood, confirmed = await asyncio.gather(reserves, confirms)
    return flood, confirmed


def bench_overload(
    settings: Settings, connections: int, seconds: float, repeat: int
) -> dict[str, list[Any]]:
    """Capacity (C connections) and 4x (4C) against the process as configured by default
    (queue-delay admission, STOCK_MAX_INFLIGHT=256), 4C against the old fixed bound
    (STOCK_MAX_INFLIGHT=64, no queue target) and against no bound; runs alternating.
    Each run's entry: (LoadResult, server CPU seconds per answer)."""
    serve = [sys.executable, "-m", "stock.app.cli", "serve", "--no-writer", "--no-reaper"]
    servers = {
        "front": stock_env(settings),
        "fixed": stock_env(replace(settings, max_inflight=OVERLOAD_LIMIT, queue_target_ms=0)),
        "unbounded": stock_env(replace(settings, max_inflight=0, queue_target_ms=0)),
    }
    fresh(settings).close()
    run_async(set_hot(settings, [HOT]))
    procs: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    runs: dict[str, list[Any]] = {row: [] for row in ("capacity", "overload", "fixed", "unbounded")}
    plan = [
        ("capacity", "front", 1),
        ("overload", "front", 4),
        ("fixed", "fixed", 4),
        ("unbounded", "unbounded", 4),
    ]
    try:
        for name, env in servers.items():
            port = free_port()
            procs[name] = (serve_http([*serve, "--port", str(port)], port, env), port)
        for i in range(repeat):
            for row, server, factor in plan:
                proc, port = procs[server]
                body = reserve_body(HOT, f"{row}{i}-")
                before = server_cpu(proc)
                result = run_async(drive(port, connections * factor, seconds, body, warmup=0.5))
                answers = max(1, result.count()) * (seconds + 0.5) / seconds  # with warm-up
                cpu = (server_cpu(proc) - before) / answers
                runs[row].append((result, cpu))
                log(f"overload {row} ({connections * factor} connections): {_brief(result)}")
        runs["confirm"] = _priority_runs(settings, procs["fixed"][1], connections, seconds, repeat)
    finally:
        for proc, _port in procs.values():
            stop_process(proc)
    return runs


def _priority_runs(
    settings: Settings, port: int, connections: int, seconds: float, repeat: int
) -> list[Any]:
    """Confirms of held orders on 10 connections, alone and during a 4C reserve flood
    against the fixed bound (reserves shed): (alone, flood, confirms under the flood)."""
    out = []
    for i in range(repeat):
        alone_row, flood_row = f"pa{i}", f"pf{i}"
        for row in (alone_row, flood_row):
            run_async(_hold_orders(settings, f"{row}-", PRIORITY_ORDERS))
        _none, alone = run_async(_flood_and_confirm(port, 0, seconds, alone_row, 10))
        flood, confirmed = run_async(
            _flood_and_confirm(port, 4 * connections, seconds, flood_row, 10)
        )
        log(f"confirms alone: {_brief(alone, 200)}; under the flood: {_brief(confirmed, 200)}")
        out.append((alone, flood, confirmed))
    return out


def _brief(result: LoadResult, ok: int = 201) -> str:
    p50, p99 = result.percentile(ok, 0.5), result.percentile(ok, 0.99)
    other = result.count() - result.count(ok) - result.count(503)
    return (
        f"{ok} {result.rate(ok):,.0f}/s p50 {p50 * 1e3:.1f} ms p99 {p99 * 1e3:.1f} ms, "
        f"503 {result.rate(503):,.0f}/s, older than {CLIENT_TIMEOUT_S:.0f} s: "
        f"{result.older_than(CLIENT_TIMEOUT_S)}, other {other}"
    )


def _median(values: list[float]) -> float:
    return statistics.median(values)


def add_front_rows(report: Report, settings: Settings, args: Any) -> None:
    """Rows 8 and 9 and the summary's soldout/bare, overload_p99/capacity_p99 and
    goodput_4x/capacity."""
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
    rows_overload(report, settings, args)


DEFAULTS = "defaults (STOCK_MAX_INFLIGHT=256, STOCK_QUEUE_TARGET_MS=200)"
FIXED = f"STOCK_MAX_INFLIGHT={OVERLOAD_LIMIT}, no queue target"
SETUPS = {
    "capacity": ("9a. at capacity", 1, DEFAULTS),
    "overload": ("9b. 4x", 4, DEFAULTS),
    "fixed": ("9c. 4x, old fixed bound", 4, FIXED),
    "unbounded": ("9d. 4x, no bound", 4, "STOCK_MAX_INFLIGHT=0, no queue target"),
}  # fmt: skip


def rows_overload(report: Report, settings: Settings, args: Any) -> None:
    """Rows 9a-9e and the summary's overload_p99/capacity_p99 and goodput_4x/capacity."""
    c, secs, rep = args.concurrency, args.seconds, args.repeat
    log("9 overload: capacity vs 4x connections, latency of the 201s (loadtest/httpload.py)")
    runs = bench_overload(settings, c, secs, rep)
    confirms = runs.pop("confirm")
    pick = {row: [r for r, _cpu in rs] for row, rs in runs.items()}
    p99 = {row: _median([r.percentile(201, 0.99) for r in rs]) for row, rs in pick.items()}
    p50 = {row: _median([r.percentile(201, 0.5) for r in rs]) for row, rs in pick.items()}
    ok = {row: _median([r.rate(201) for r in rs]) for row, rs in pick.items()}
    shed = {row: _median([r.rate(503) for r in rs]) for row, rs in pick.items()}
    cpu = {row: _median([x for _r, x in rs]) for row, rs in runs.items()}
    late = {row: sum(r.older_than(CLIENT_TIMEOUT_S) for r in rs) for row, rs in pick.items()}
    report.summary["overload_p99/capacity_p99"] = p99["overload"] / p99["capacity"]
    report.summary["goodput_4x/capacity"] = ok["overload"] / ok["capacity"]
    for row, (label, factor, setup) in SETUPS.items():
        note = (
            f"{factor * c} connections, {setup}: p50 {p50[row] * 1e3:.1f} ms, "
            f"201 {ok[row]:,.0f}/s, 503 {shed[row]:,.0f}/s, server CPU "
            f"{cpu[row] * 1e6:.0f} µs per answer, older than {CLIENT_TIMEOUT_S:.0f} s: "
            f"{late[row]}; median of {rep}"
        )
        if row != "capacity":
            note += (
                f"; p99/capacity p99 = {p99[row] / p99['capacity']:.2f}, "
                f"goodput/capacity = {ok[row] / ok['capacity']:.2f}"
            )
        report.add(f"{label}: p99 of 201 answers", p99[row] * 1e3, "ms", note)
    alone = _median([a.percentile(200, 0.99) for a, _f, _c in confirms])
    under = _median([x.percentile(200, 0.99) for _a, _f, x in confirms])
    note = (
        f"10 connections confirming held orders while {4 * c} resend reserves at "
        f"STOCK_MAX_INFLIGHT={OVERLOAD_LIMIT}: confirms "
        f"{_median([x.rate(200) for _a, _f, x in confirms]):,.0f}/s, their 503s "
        f"{sum(x.count(503) for _a, _f, x in confirms)}, reserves shed "
        f"{_median([f.rate(503) for _a, f, _x in confirms]):,.0f}/s; confirm p99 alone "
        f"{alone * 1e3:.1f} ms; median of {rep}"
    )
    report.add("9e. confirms during a 4x reserve flood: p99", under * 1e3, "ms", note)


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
