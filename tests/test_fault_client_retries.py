"""Drill: client timeouts and retries of the same ``order_id`` during HTTP load.

Bounded in requests and time; ends with the invariants of tests/drills.py."""

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
from tests.drills import (
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
    tally: Counter[str] = Counter()
    final: dict[str, int] = {}
    confirmed: dict[str, int] = {}

    async def until_definite(
        http: aiohttp.ClientSession, op: str, url: str, body: dict[str, Any] | None
    ) -> tuple[int, Any]:
        """Tiny client timeouts at first (the answer is often lost), then a normal one;
        the same request every time, until a definite answer."""
        for attempt in range(50):
            timeout = rng.uniform(0.001, 0.02) if attempt < 3 else 10.0
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

    async with serving(serve_env(settings, port, dsn), tmp_path / "serve.log"):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as http:
            await put_stock(http, base, loaded)
            sem = asyncio.Semaphore(50)

            async def buyer(order_id: str) -> None:
                async with sem:
                    status, reply = await until_definite(
                        http, "reserve", f"{base}/v1/reservations", orders[order_id]
                    )
                    assert status in (200, 201, 409), (status, reply)
                    if status == 409:
                        assert reply["error"] == "insufficient_stock", reply
                    final[order_id] = status
                    if status != 409 and order_id in confirm:
                        status, reply = await until_definite(
                            http, "confirm", f"{base}/v1/reservations/{order_id}/confirm", None
                        )
                        assert (status, reply["status"]) == (200, "confirmed"), reply
                        confirmed[order_id] = status

            await asyncio.gather(*(buyer(o) for o in orders))
            states = await order_states(http, base, orders)
            checks = 0
            for order_id, state in states.items():
                want = (
                    None
                    if final[order_id] == 409
                    else "confirmed"
                    if order_id in confirmed
                    else "reserved"
                )
                assert (state and state["status"]) == want, (order_id, final[order_id], state)
                checks += 1
            reserved, sold = holdings(states)
            counters = await levels(redis, settings, skus)
            checks += check_conservation(counters, loaded)
            checks += check_holders(counters, reserved, sold)
        checks += await pg_checks(redis, settings, dsn, skus)
    assert tally["client timeouts"] > 50, tally
    holding = sum(1 for s in states.values() if s)
    print(
        f"\n  client timeouts: {len(orders)} orders ({len(confirmed)} confirmed too),"
        f" {dict(tally)}; {holding} orders hold stock, each counted once"
        f" (sold+reserved == their units); {checks} invariant checks"
    )
