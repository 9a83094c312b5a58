"""Drill: client timeouts and retries of the same ``order_id`` during HTTP load.

Bounded in requests and time; ends with the invariants of tests/support/drills.py."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from stock.app.embedded import free_port
from stock.core.config import Settings
from tests.support.drills import (
    call,
    check_conservation,
    check_holders,
    holdings,
    levels,
    order_states,
    pg_checks,
    put_stock,
    reserve_body,
    serve_env,
    serving,
)

pytestmark = pytest.mark.faults


# -- 5. client timeouts and retries of the same order_id ------------------------------------


async def test_client_timeouts_and_retries_count_each_order_once(
    settings: Settings, redis: Any, dsn: str, tmp_path: Path
) -> None:
    rng = random.Random(5)
    skus = [f"TO-{i}" for i in range(3)]
    loaded = dict.fromkeys(skus, 150)
    orders = {
        f"to-{i}": reserve_body(f"to-{i}", [(rng.choice(skus), rng.randint(1, 2))], 600)
        for i in range(450)
    }
    confirm = {o for o in orders if rng.random() < 0.5}  # these also confirm, with retries
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    buyers = Buyers(rng, base, orders, confirm)
    async with serving(serve_env(settings, port, dsn), tmp_path / "serve.log"):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as http:
            await put_stock(http, base, loaded)
            sem = asyncio.Semaphore(50)

            async def buyer(order_id: str) -> None:
                async with sem:
                    await buyers.buy(http, order_id)

            await asyncio.gather(*(buyer(o) for o in orders))
            states = await order_states(http, base, orders)
            checks = buyers.check_states(states)
            reserved, sold = holdings(states)
            counters = await levels(redis, settings, skus)
            checks += check_conservation(counters, loaded)
            checks += check_holders(counters, reserved, sold)
        checks += await pg_checks(redis, settings, dsn, skus)
    tally = buyers.tally
    assert tally["client timeouts"] > 50, tally
    holding = sum(1 for s in states.values() if s)
    print(
        f"\n  client timeouts: {len(orders)} orders ({len(buyers.confirmed)} confirmed too),"
        f" {dict(tally)}; {holding} orders hold stock, each counted once"
        f" (sold+reserved == their units); {checks} invariant checks"
    )


class Buyers:
    """Clients that reserve (and confirm some) with tiny timeouts and retries of the
    same request; what each was answered in the end, and a tally of what happened."""

    def __init__(
        self, rng: random.Random, base: str, orders: dict[str, Any], confirm: set[str]
    ) -> None:
        self.rng, self.base, self.orders, self.confirm = rng, base, orders, confirm
        self.tally: Counter[str] = Counter()
        self.final: dict[str, int] = {}
        self.confirmed: dict[str, int] = {}

    async def buy(self, http: aiohttp.ClientSession, order_id: str) -> None:
        base = self.base
        status, reply = await self.until_definite(
            http, "reserve", f"{base}/v1/reservations", self.orders[order_id]
        )
        assert status in (200, 201, 409), (status, reply)
        if status == 409:
            assert reply["error"] == "insufficient_stock", reply
        self.final[order_id] = status
        if status != 409 and order_id in self.confirm:
            status, reply = await self.until_definite(
                http, "confirm", f"{base}/v1/reservations/{order_id}/confirm", None
            )
            assert (status, reply["status"]) == (200, "confirmed"), reply
            self.confirmed[order_id] = status

    async def until_definite(
        self, http: aiohttp.ClientSession, op: str, url: str, body: dict[str, Any] | None
    ) -> tuple[int, Any]:
        """Tiny client timeouts at first (the answer is often lost), then a normal one;
        the same request every time, until a definite answer."""
        tally = self.tally
        for attempt in range(50):
            timeout = self.rng.uniform(0.001, 0.02) if attempt < 3 else 10.0
            tally["attempts"] += 1
            try:
                status, reply = await call(http, "POST", url, timeout=timeout, json=body)
            except TimeoutError:
                tally["client timeouts"] += 1
                continue
            except aiohttp.ClientError:
                tally["connection errors"] += 1
                continue
            if status == 503:
                tally["503"] += 1
                await asyncio.sleep(0.05)
                continue
            if attempt:
                tally[f"{op} retry answered {status}"] += 1
            return status, reply
        raise AssertionError(f"no definite answer for {url}")

    def check_states(self, states: dict[str, Any]) -> int:
        """Each order as its last answer says: refused, confirmed or reserved."""
        checks = 0
        for order_id, state in states.items():
            final = self.final[order_id]
            held = "confirmed" if order_id in self.confirmed else "reserved"
            want = None if final == 409 else held
            assert (state and state["status"]) == want, (order_id, final, state)
            checks += 1
        return checks
