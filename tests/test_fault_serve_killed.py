"""Drill: ``stock serve`` SIGKILLed during HTTP load and restarted.

Bounded in requests and time; ends with the invariants of tests/drills.py."""

from __future__ import annotations

import asyncio
import random
import time
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
    retry_until_definite,
    serve_env,
    start_serve,
    stop_serve,
)

pytestmark = pytest.mark.faults


# -- 3. `stock serve` SIGKILLed during HTTP load ------------------------------------------


async def test_serve_sigkilled_during_http_load(
    settings: Settings, redis: Any, dsn: str, tmp_path: Path
) -> None:
    rng = random.Random(3)
    skus = [f"SK-{i}" for i in range(5)]
    loaded = dict.fromkeys(skus, 60)
    # Even orders: the client retries them whatever happened (long TTL). Odd orders:
    # abandoned checkouts (ttl 2 s), never retried: the reaper must return them.
    bodies = {
        f"sk-{i}": reserve_body(f"sk-{i}", [(rng.choice(skus), 1)], 600 if i % 2 == 0 else 2)
        for i in range(500)
    }
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = serve_env(settings, port, dsn)
    log = tmp_path / "serve.log"
    first: dict[str, tuple[int, Any]] = {}
    proc = await start_serve(env, log)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as http:
            await put_stock(http, base, loaded)

            async def send(order_id: str) -> None:
                try:
                    first[order_id] = await call(
                        http, "POST", f"{base}/v1/reservations", json=bodies[order_id]
                    )
                except (aiohttp.ClientError, TimeoutError):
                    first[order_id] = (0, None)  # no answer: the service died under it

            load = [asyncio.create_task(send(o)) for o in bodies]
            deadline = time.monotonic() + 30
            while len(first) < 120:  # SIGKILL once some answers are out, most in flight
                assert time.monotonic() < deadline
                await asyncio.sleep(0.002)
            proc.kill()
            proc.wait(10)
            await asyncio.gather(*load)
            proc = await start_serve(env, log)  # same port, same Redis, same database

            answered = Counter(status for status, _ in first.values())
            assert set(answered) <= {0, 201, 409}, answered
            assert answered[0] > 0, "nothing was in flight at the SIGKILL"
            # The client retries every even order with the same request.
            retried: Counter[int] = Counter()
            final: dict[str, int] = {}
            deadline = time.monotonic() + 30
            for order_id, body in bodies.items():
                if body["ttl_s"] == 600:
                    status, reply, _n = await retry_until_definite(
                        http, f"{base}/v1/reservations", body, deadline
                    )
                    retried[status] += 1
                    final[order_id] = status
                    before = first[order_id]
                    assert status in (200, 201, 409), (order_id, status, reply)
                    if before[0] == 201:  # acknowledged before the crash: a replay
                        assert (status, reply) == (200, before[1]), order_id
                    if status == 409:
                        assert reply["error"] == "insufficient_stock", reply

            # The reaper returns every abandoned reservation (ttl 2 s), the ones that were
            # in flight at the SIGKILL included.
            deadline = time.monotonic() + 30
            while True:
                states = await order_states(http, base, bodies)
                reserved, sold = holdings(states)
                abandoned_held = sum(
                    1
                    for o, s in states.items()
                    if s
                    and bodies[o]["ttl_s"] == 2
                    and any(i["state"] == "reserved" for i in s["items"])
                )
                if not abandoned_held or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            assert abandoned_held == 0, "the reaper left abandoned reservations"
            for order_id, state in states.items():
                if order_id in final:  # retried: reserved, or refused and unknown
                    want = "reserved" if final[order_id] in (200, 201) else None
                    assert (state and state["status"]) == want, (order_id, state)
                elif state is not None:  # abandoned: expired, or (cluster) a record
                    # opened before the SIGKILL whose line was never written
                    assert {i["state"] for i in state["items"]} <= {"expired", "unknown"}, state
            counters = await levels(redis, settings, skus)
            checks = check_conservation(counters, loaded)
            checks += check_holders(counters, reserved, sold) + len(states)
    finally:
        stop_serve(proc)
    checks += await pg_checks(redis, settings, dsn, skus)
    expired = sum(
        1 for o, s in states.items() if s and o not in final and s["items"][0]["state"] == "expired"
    )
    print(
        f"\n  stock serve SIGKILLed: {len(bodies)} orders, 1 SIGKILL with {answered[0]} in"
        f" flight; first answers {dict(answered)}; retries of the even orders"
        f" {dict(retried)}; abandoned orders returned by the reaper {expired};"
        f" {checks} invariant checks"
    )
