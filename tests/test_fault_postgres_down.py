"""Drill: PostgreSQL down for 10 s during HTTP load.

Bounded in requests and time; ends with the invariants of tests/support/drills.py."""

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
from tests.support.drills import (
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
from tests.support.postgres import Postgres

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
    async with serving(serve_env(settings, port, dsn), tmp_path / "serve.log"):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32)) as http:
            await put_stock(http, base, loaded)
            shop = Shop(http, base, skus)
            load = [asyncio.create_task(shop.worker(w)) for w in range(12)]
            try:
                await asyncio.sleep(1.0)
                assert (await shop.readiness())[0] == 200
                lag_down, pg_errors = await shop.outage(postgres)
                await shop.ready_again()
            finally:
                shop.stop.set()
                await asyncio.gather(*load)
            statuses, final = shop.statuses, shop.final
            shop.check_served()
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
        assert await pg_lines(dsn) == final
        checks += len(final)
    lag = metric(text, "stock_writer_flush_lag_seconds")
    ready = shop.ready
    print(
        f"\n  postgres down {PG_DOWN_S} s: {sum(sum(c.values()) for c in statuses.values())}"
        f" HTTP calls { ({k: dict(v) for k, v in statuses.items()}) }; /readyz while down"
        f" {[s for p, s, _ in ready if p == 'down']}, after {[s for p, s, _ in ready][-1]};"
        f" {len(final)} orders all in PostgreSQL; stock_writer_flush_lag_seconds at the end"
        f" of the outage {lag_down:.2f}, after the drain {lag:.2f}; stock_postgres_errors_total"
        f" {pg_errors:.0f};"
        f" {checks} invariant checks"
    )


class Shop:
    """Buyers under load (each order: reserve, then confirm, release or keep) and
    /readyz, every answer tallied by phase (``before``, ``down``, ``after``)."""

    def __init__(self, http: aiohttp.ClientSession, base: str, skus: list[str]) -> None:
        self.http, self.base, self.skus = http, base, skus
        self.statuses: dict[str, Counter[int]] = defaultdict(Counter)
        self.final: dict[str, str] = {}
        self.phase = "before"
        self.ready: list[tuple[str, int, dict[str, Any]]] = []
        self.stop = asyncio.Event()

    async def worker(self, w: int) -> None:
        http, base, skus = self.http, self.base, self.skus
        n = 0
        while not self.stop.is_set() and n < 2_000:  # bounded: 12 workers x 2000 orders
            order_id = f"pg-{w}-{n}"
            n += 1
            sku = skus[(w + n) % len(skus)]
            body = reserve_body(order_id, [(sku, 1)], 600)
            status, _ = await call(http, "POST", f"{base}/v1/reservations", json=body)
            self.statuses[self.phase][status] += 1
            if status != 201:
                continue
            self.final[order_id] = "reserved"
            op = ("confirm", "release", "keep")[n % 3]
            if op != "keep":
                status, _ = await call(http, "POST", f"{base}/v1/reservations/{order_id}/{op}")
                self.statuses[self.phase][status] += 1
                if status == 200:
                    self.final[order_id] = {"confirm": "confirmed", "release": "released"}[op]
            await asyncio.sleep(0.01)

    async def readiness(self) -> tuple[int, dict[str, Any]]:
        status, body = await call(self.http, "GET", f"{self.base}/readyz", timeout=10)
        self.ready.append((self.phase, status, body))
        return status, body

    async def outage(self, postgres: Postgres) -> tuple[float, float]:
        """PostgreSQL down for PG_DOWN_S: /readyz says so (Redis ok), the writer's
        errors reach /metrics. Returns the flush lag and PostgreSQL errors then."""
        await asyncio.to_thread(postgres.stop)
        self.phase = "down"
        down_at = time.monotonic()
        try:
            while True:  # /readyz reports it (bounded poll)
                status, body = await self.readiness()
                if status == 503:
                    break
                assert time.monotonic() - down_at < PG_DOWN_S, self.ready[-1]
                await asyncio.sleep(0.2)
            while time.monotonic() - down_at < PG_DOWN_S:
                status, body = await self.readiness()
                assert status == 503 and body["redis"] == "ok", body
                assert body["postgres"].startswith("error"), body
                await asyncio.sleep(1.0)
            _, text = await call_text(self.http, f"{self.base}/metrics")
            lag_down = metric(text, "stock_writer_flush_lag_seconds")
            pg_errors = metric(text, "stock_postgres_errors_total")
            assert pg_errors > 0, "the writer's PostgreSQL errors are not in /metrics"
        finally:
            await asyncio.to_thread(postgres.start)
        return lag_down, pg_errors

    async def ready_again(self) -> None:
        self.phase = "after"
        deadline = time.monotonic() + 30
        while (await self.readiness())[0] != 200:
            assert time.monotonic() < deadline, self.ready[-1]
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)

    def check_served(self) -> None:
        """The API kept serving: every call in every phase succeeded."""
        for name, seen in self.statuses.items():
            assert set(seen) <= {200, 201}, (name, seen)
        assert self.statuses["down"][201] > 100, self.statuses["down"]


async def pg_lines(dsn: str) -> dict[str, str]:
    """Every order's line in PostgreSQL: order id -> state."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT order_id, state FROM reservation_lines")
    finally:
        await conn.close()
    return {r["order_id"]: r["state"] for r in rows}
