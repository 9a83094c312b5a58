"""Drill: PostgreSQL down for 10 s during HTTP load.

Bounded in requests and time; ends with the invariants of tests/drills.py."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from stock.app.embedded import free_port
from stock.core.config import Settings
from tests.drills import (
    call,
    call_text,
    check_conservation,
    check_holders,
    holdings,
    levels,
    metric,
    order_states,
    pg_checks,
    put_stock,
    reserve_body,
    serve_env,
    serving,
)
from tests.postgres import Postgres

pytestmark = pytest.mark.faults


# -- 4. PostgreSQL down for 10 s during HTTP load -------------------------------------------

PG_DOWN_S = 10


async def test_postgres_down_ten_seconds_during_http_load(
    settings: Settings, redis: Any, dsn: str, postgres: Postgres, tmp_path: Path
) -> None:
    skus = [f"PG-{i}" for i in range(6)]
    loaded = dict.fromkeys(skus, 100_000)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # (orders, by phase) -> HTTP statuses; each order: reserve, then confirm or release
    statuses: dict[str, Counter[int]] = defaultdict(Counter)
    final: dict[str, str] = {}
    phase = "before"
    ready: list[tuple[str, int, dict[str, Any]]] = []
    async with serving(serve_env(settings, port, dsn), tmp_path / "serve.log"):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32)) as http:
            await put_stock(http, base, loaded)
            stop = asyncio.Event()

            async def worker(w: int) -> None:
                n = 0
                while not stop.is_set() and n < 2_000:  # bounded: 12 workers x 2000 orders
                    order_id = f"pg-{w}-{n}"
                    n += 1
                    sku = skus[(w + n) % len(skus)]
                    body = reserve_body(order_id, [(sku, 1)], 600)
                    status, _ = await call(http, "POST", f"{base}/v1/reservations", json=body)
                    statuses[phase][status] += 1
                    if status != 201:
                        continue
                    final[order_id] = "reserved"
                    op = ("confirm", "release", "keep")[n % 3]
                    if op != "keep":
                        status, _ = await call(
                            http, "POST", f"{base}/v1/reservations/{order_id}/{op}"
                        )
                        statuses[phase][status] += 1
                        if status == 200:
                            final[order_id] = {"confirm": "confirmed", "release": "released"}[op]
                    await asyncio.sleep(0.01)

            async def readiness() -> tuple[int, dict[str, Any]]:
                status, body = await call(http, "GET", f"{base}/readyz", timeout=10)
                ready.append((phase, status, body))
                return status, body

            load = [asyncio.create_task(worker(w)) for w in range(12)]
            try:
                await asyncio.sleep(1.0)
                assert (await readiness())[0] == 200
                await asyncio.to_thread(postgres.stop)
                phase = "down"
                down_at = time.monotonic()
                try:
                    while True:  # /readyz reports it (bounded poll)
                        status, body = await readiness()
                        if status == 503:
                            break
                        assert time.monotonic() - down_at < PG_DOWN_S, ready[-1]
                        await asyncio.sleep(0.2)
                    while time.monotonic() - down_at < PG_DOWN_S:
                        status, body = await readiness()
                        assert status == 503 and body["redis"] == "ok", body
                        assert body["postgres"].startswith("error"), body
                        await asyncio.sleep(1.0)
                    _, text = await call_text(http, f"{base}/metrics")
                    lag_down = metric(text, "stock_writer_flush_lag_seconds")
                    pg_errors = metric(text, "stock_postgres_errors_total")
                    assert pg_errors > 0, "the writer's PostgreSQL errors are not in /metrics"
                finally:
                    await asyncio.to_thread(postgres.start)
                phase = "after"
                deadline = time.monotonic() + 30
                while (await readiness())[0] != 200:
                    assert time.monotonic() < deadline, ready[-1]
                    await asyncio.sleep(0.2)
                await asyncio.sleep(1.0)
            finally:
                stop.set()
                await asyncio.gather(*load)

            # The API kept serving: every call in every phase succeeded.
            for name, seen in statuses.items():
                assert set(seen) <= {200, 201}, (name, seen)
            assert statuses["down"][201] > 100, statuses["down"]
            states = await order_states(http, base, final)
            for order_id, want in final.items():
                assert states[order_id] is not None and states[order_id]["status"] == want
            reserved, sold = holdings(states)
            counters = await levels(redis, settings, skus)
            checks = check_conservation(counters, loaded)
            checks += check_holders(counters, reserved, sold) + len(final)

        # Nothing lost: the writer drains, stock_levels == Redis, one ledger row per
        # event, and every order's line is in PostgreSQL in its final state.
        checks += await pg_checks(redis, settings, dsn, skus)
        async with aiohttp.ClientSession() as http:
            _, text = await call_text(http, f"{base}/metrics")
        conn = await asyncpg.connect(dsn)
        try:
            rows = {
                r["order_id"]: r["state"]
                for r in await conn.fetch("SELECT order_id, state FROM reservation_lines")
            }
        finally:
            await conn.close()
        assert rows == final
        checks += len(final)
    lag = metric(text, "stock_writer_flush_lag_seconds")
    print(
        f"\n  postgres down {PG_DOWN_S} s: {sum(sum(c.values()) for c in statuses.values())}"
        f" HTTP calls { ({k: dict(v) for k, v in statuses.items()}) }; /readyz while down"
        f" {[s for p, s, _ in ready if p == 'down']}, after {[s for p, s, _ in ready][-1]};"
        f" {len(final)} orders all in PostgreSQL; stock_writer_flush_lag_seconds at the end"
        f" of the outage {lag_down:.2f}, after the drain {lag:.2f}; stock_postgres_errors_total"
        f" {pg_errors:.0f};"
        f" {checks} invariant checks"
    )
