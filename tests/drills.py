"""Shared parts of the fault drills (tests/test_fault_*.py): the invariants checked
after every drill, and `stock serve` driven over HTTP."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from persist.events import named
from stock.core import keys
from stock.core.config import Settings
from tests.persist.helpers import wait_persisted
from tests.servers import stock_env

TOKEN = "drill-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


# -- shared: invariants ------------------------------------------------------------


async def levels(redis: Any, settings: Settings, skus: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """Each SKU's (available, reserved, sold) in Redis."""
    pipe = redis.pipeline(transaction=False)
    skus = list(skus)
    for sku in skus:
        pipe.hmget(keys.sku_key(sku, settings.buckets), "available", "reserved", "sold")
    return {
        sku: tuple(int(v or 0) for v in values)
        for sku, values in zip(skus, await pipe.execute(), strict=True)
    }


def check_conservation(counters: dict[str, tuple[int, ...]], loaded: dict[str, int]) -> int:
    """available + reserved + sold == loaded, nothing negative, sold <= loaded; returns
    how many checks passed."""
    checks = 0
    for sku, total in loaded.items():
        available, reserved, sold = counters[sku]
        assert min(available, reserved, sold) >= 0, (sku, counters[sku])
        assert available + reserved + sold == total, (sku, counters[sku], total)
        assert sold <= total and reserved <= total, (sku, counters[sku], total)
        checks += 3
    return checks


def check_holders(
    counters: dict[str, tuple[int, ...]],
    reserved: dict[str, int],
    sold: dict[str, int] | None = None,
) -> int:
    """The reserved (and sold) counters equal the quantities of the order lines that
    hold stock: a unit counted twice, or held by no order, shows up here."""
    checks = 0
    for sku, (_available, held, gone) in counters.items():
        assert held == reserved.get(sku, 0), (sku, counters[sku], reserved.get(sku, 0))
        checks += 1
        if sold is not None:
            assert gone == sold.get(sku, 0), (sku, counters[sku], sold.get(sku, 0))
            checks += 1
    return checks


async def stream_matches_counters(redis: Any, settings: Settings, skus: list[str]) -> int:
    """Per SKU the bucket stream holds events seq 1..n, n == the counters' seq, and the
    last event's counters are Redis's: no change without its event, none without its
    change (nothing was trimmed: no writer ran)."""
    events: dict[str, list[dict[str, str]]] = defaultdict(list)
    for bucket in sorted({keys.bucket_of(s, settings.buckets) for s in skus}):
        for _id, fields in await redis.xrange(keys.events_key(bucket)):
            event = named(fields)
            events[event["sku"]].append(event)
    checks = 0
    for sku in skus:
        values = await redis.hmget(
            keys.sku_key(sku, settings.buckets), "available", "reserved", "sold", "seq"
        )
        available, reserved, sold, seq = (int(v or 0) for v in values)
        mine = events[sku]
        assert [int(e["seq"]) for e in mine] == list(range(1, seq + 1)), sku
        last = mine[-1]
        assert (int(last["available"]), int(last["reserved"]), int(last["sold"])) == (
            available,
            reserved,
            sold,
        ), sku
        checks += 2
    return checks


# -- shared: `stock serve` over HTTP ---------------------------------------------------


def serve_env(settings: Settings, port: int, dsn: str = "", **extra: str) -> dict[str, str]:
    return stock_env(settings, port, dsn, TOKEN, **extra)


async def start_serve(
    env: dict[str, str], log: Path, timeout: float = 30
) -> subprocess.Popen[bytes]:
    """``stock serve`` as a child process (its log appended to ``log``), once /healthz
    answers."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stock.app.cli", "serve"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{env['STOCK_PORT']}"
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"stock serve exited: {log.read_text()[-2000:]}")
            with suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(f"{base}/healthz", timeout=aiohttp.ClientTimeout(1)) as r:
                    if r.status == 200:
                        return proc
            assert time.monotonic() < deadline, "stock serve did not come up"
            await asyncio.sleep(0.1)


def stop_serve(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@asynccontextmanager
async def serving(env: dict[str, str], log: Path) -> AsyncIterator[subprocess.Popen[bytes]]:
    proc = await start_serve(env, log)
    try:
        yield proc
    finally:
        stop_serve(proc)


async def call(
    http: aiohttp.ClientSession, method: str, url: str, timeout: float = 30, **kw: Any
) -> tuple[int, Any]:
    async with http.request(method, url, timeout=aiohttp.ClientTimeout(total=timeout), **kw) as r:
        return r.status, await r.json(content_type=None)


def reserve_body(order_id: str, items: list[tuple[str, int]], ttl_s: int) -> dict[str, Any]:
    return {"order_id": order_id, "items": [{"sku": s, "qty": q} for s, q in items], "ttl_s": ttl_s}


async def put_stock(http: aiohttp.ClientSession, base: str, loaded: dict[str, int]) -> None:
    for sku, units in loaded.items():
        status, _ = await call(
            http, "PUT", f"{base}/v1/stock/{sku}", json={"available": units}, headers=ADMIN
        )
        assert status == 200


async def retry_until_definite(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any] | None, deadline: float
) -> tuple[int, Any, int]:
    """POST until the answer is definite (not a 503 or a transport error); returns
    (status, body, attempts)."""
    attempts = 0
    while True:
        attempts += 1
        try:
            status, answer = await call(http, "POST", url, timeout=10, json=body)
            if status != 503:
                return status, answer, attempts
        except (aiohttp.ClientError, TimeoutError):
            pass
        assert time.monotonic() < deadline, f"no definite answer for {url} {body}"
        await asyncio.sleep(0.2)


async def order_states(
    http: aiohttp.ClientSession, base: str, order_ids: Iterable[str]
) -> dict[str, dict[str, Any] | None]:
    """GET /v1/reservations/{id} for each order (None when unknown)."""
    sem = asyncio.Semaphore(32)

    async def one(order_id: str) -> tuple[str, dict[str, Any] | None]:
        async with sem:
            status, body = await call(http, "GET", f"{base}/v1/reservations/{order_id}")
        assert status in (200, 404), (order_id, status, body)
        return order_id, body if status == 200 else None

    return dict(await asyncio.gather(*(one(o) for o in order_ids)))


def holdings(states: dict[str, dict[str, Any] | None]) -> tuple[dict[str, int], dict[str, int]]:
    """Per SKU, the units held by lines in state reserved and confirmed."""
    reserved: dict[str, int] = Counter()
    sold: dict[str, int] = Counter()
    for order in states.values():
        for item in (order or {}).get("items", []):
            if item["state"] == "reserved":
                reserved[item["sku"]] += item["qty"]
            elif item["state"] == "confirmed":
                sold[item["sku"]] += item["qty"]
    return reserved, sold


async def pg_checks(
    redis: Any, settings: Settings, dsn: str, skus: list[str], wait_s: float = 60
) -> int:
    """After the writer drains: stock_levels == Redis with seq, one ledger row per event
    (count == distinct seq == max seq), reservation_lines == Redis lines, and no
    order line has two rows of the same op (unless an undo, op ``abort``, took the line
    away in between: a cluster attempt undone, then its retry)."""
    conn = await asyncpg.connect(dsn)
    try:
        await wait_persisted(redis, settings, conn, skus, wait_s)
        history = await conn.fetch(
            "SELECT order_id, sku, op FROM stock_ledger WHERE order_id <> ''"
            " AND op IN ('reserve', 'deduct', 'confirm', 'release', 'expire', 'cancel', 'abort')"
            " ORDER BY sku, order_id, seq"
        )
        rows = await conn.fetchval("SELECT count(*) FROM stock_ledger")
    finally:
        await conn.close()
    twice, seen, line = [], set[str](), ("", "")
    for r in history:
        if (r["order_id"], r["sku"]) != line:
            line, seen = (r["order_id"], r["sku"]), set()
        if r["op"] == "abort":
            seen.clear()
        elif r["op"] in seen:
            twice.append((*line, r["op"]))
        seen.add(r["op"])
    assert twice == [], f"an order line applied the same op twice: {twice[:5]}"
    print(f"  postgres: stock_levels == redis for {len(skus)} SKUs, ledger rows {rows}")
    return 4 * len(skus) + 1


async def call_text(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with http.get(url, timeout=aiohttp.ClientTimeout(total=10)) as r:
        return r.status, await r.text()


def metric(text: str, name: str) -> float:
    """The sum of a metric's samples in Prometheus text."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total
