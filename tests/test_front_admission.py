"""The front's admission (DESIGN §10): what completes a purchase goes ahead of new
reserves, the queue-delay signal, one deadline mechanism, per-caller rate limits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest

from stock.core.config import Settings
from stock.http.admission import QueueDelay
from stock.http.api import FRONT
from stock.redis.client import connect
from tests.conftest import BUCKETS, flush
from tests.support.servers import ServerProcess
from tests.test_front import TOKEN, app_client, order, put


@pytest.fixture
def base(standalone_server: ServerProcess) -> Settings:
    return Settings(redis_url=standalone_server.url, buckets=BUCKETS, admin_token=TOKEN)


@pytest.fixture
async def clean(base: Settings) -> AsyncIterator[Any]:
    client = connect(base)
    await flush(client)
    yield client
    await client.execute_command("CLIENT", "UNPAUSE")
    await client.aclose()


async def test_confirms_go_ahead_of_new_reserves(base: Settings, clean: Any) -> None:
    """4 reserves held in flight (Redis paused for writes) fill STOCK_MAX_INFLIGHT=4: a
    new reserve is shed with 503, a confirm and a release of held orders are not."""
    api = await app_client(
        replace(base, max_inflight=4, redis_timeout_s=30.0, request_timeout_s=30.0)
    )
    try:
        await put(api, "", "HOT", 100)
        for name in ("keep", "drop"):
            assert (await api.post("/v1/reservations", json=order(name))).status == 201
        await clean.execute_command("CLIENT", "PAUSE", "10000", "WRITE")
        held = [
            asyncio.create_task(api.post("/v1/reservations", json=order(f"held-{i}")))
            for i in range(4)
        ]
        deadline = time.monotonic() + 5
        while api.app[FRONT].inflight < 4:
            assert time.monotonic() < deadline, "the held requests never got in flight"
            await asyncio.sleep(0.01)
        assert (await api.post("/v1/reservations", json=order("new"))).status == 503
        completing = [
            asyncio.create_task(api.post("/v1/reservations/keep/confirm")),
            asyncio.create_task(api.post("/v1/reservations/drop/release")),
        ]
        while api.app[FRONT].inflight < 6:
            assert time.monotonic() < deadline, "the confirm and release were not admitted"
            await asyncio.sleep(0.01)
        await clean.execute_command("CLIENT", "UNPAUSE")
        assert [(await task).status for task in completing] == [200, 200]
        assert [(await task).status for task in held] == [201] * 4
    finally:
        await api.close()


async def test_request_deadline_answers_503_and_serving_goes_on(base: Settings, clean: Any) -> None:
    """A request still waiting for Redis at STOCK_REQUEST_TIMEOUT_S is answered 503
    unavailable by the one deadline sweep, and the connection serves the next one."""
    api = await app_client(replace(base, redis_timeout_s=30.0, request_timeout_s=0.3))
    try:
        await put(api, "", "HOT", 100)
        await clean.execute_command("CLIENT", "PAUSE", "1500", "WRITE")
        started = time.monotonic()
        reply = await api.post("/v1/reservations", json=order("late"))
        waited = time.monotonic() - started
        assert (reply.status, (await reply.json())["error"]) == (503, "unavailable")
        assert 0.3 <= waited < 0.8, waited
        await clean.execute_command("CLIENT", "UNPAUSE")
        assert (await api.post("/v1/reservations", json=order("next"))).status == 201
        assert api.app[FRONT].inflight == 0 and not api.app[FRONT].deadlines.pending
    finally:
        await api.close()


def test_queue_delay_stands_only_for_a_whole_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    delay = QueueDelay(0.05, interval_s=0.1)
    delay.completed(0.2, 100.0)  # closes the first (empty) interval
    assert not delay.shedding()
    for i in range(10):
        delay.completed(0.2, 100.01 + i * 0.001)
    delay.completed(0.01, 100.08)  # one fast answer in the interval: a burst, not standing
    delay.completed(0.2, 100.1)
    assert not delay.shedding()
    delay.completed(0.3, 100.15)  # one slow answer is no queue
    delay.completed(0.3, 100.2)
    assert not delay.shedding()
    for i in range(10):
        delay.completed(0.06, 100.21 + i * 0.001)  # every answer above 50 ms
    delay.completed(0.07, 100.3)
    assert delay.shedding()
    now[0] = 100.41  # an interval with no completion (all shed): admit again
    assert not delay.shedding()
    assert not QueueDelay(0).standing  # 0: off


# -- per-caller rate limits --------------------------------------------------------


async def test_a_customer_past_its_limit_gets_429_others_are_served(
    base: Settings, clean: Any
) -> None:
    """One customer at 10x its limit (5/second) gets 429 rate_limited with Retry-After
    and retry_after_s, before any script ran (no order was made); another customer in
    the same second is served."""
    api = await app_client(replace(base, rate_limit_per_customer="5/second"))
    try:
        await put(api, "", "HOT", 1000)
        replies = await asyncio.gather(
            *(
                api.post("/v1/reservations", json=order(f"a-{i}", customer_id="A"))
                for i in range(50)
            )
        )
        statuses = [reply.status for reply in replies]
        assert statuses.count(201) <= 10 and statuses.count(429) >= 40, statuses
        other = await api.post("/v1/reservations", json=order("b-1", customer_id="B"))
        assert other.status == 201
        refused = next(reply for reply in replies if reply.status == 429)
        body = await refused.json()
        assert body["error"] == "rate_limited" and body["retry_after_s"] == 1
        assert refused.headers["Retry-After"] == "1"
        for i, status in enumerate(statuses):
            if status == 429:  # no script ran for it: the order does not exist
                assert (await api.get(f"/v1/reservations/a-{i}")).status == 404
        deduct = await api.post("/v1/deductions", json=order("d-1", customer_id="A"))
        assert deduct.status in (201, 429)
    finally:
        await api.close()


async def test_an_address_past_its_limit_gets_429(base: Settings, clean: Any) -> None:
    api = await app_client(replace(base, rate_limit_per_address="3/minute"))
    try:
        await put(api, "", "HOT", 1000)
        statuses = [
            (await api.post("/v1/reservations", json=order(f"x-{i}", customer_id=f"c{i}"))).status
            for i in range(5)
        ]
        assert statuses == [201, 201, 201, 429, 429]
        reply = await api.post("/v1/deductions", json=order("d", customer_id="z"))
        assert reply.status == 429 and 1 <= int(reply.headers["Retry-After"]) <= 60
        assert (await api.post("/v1/reservations/x-0/confirm")).status == 200  # not counted
    finally:
        await api.close()
