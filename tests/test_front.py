"""The flash-sale front (DESIGN §10): the overload bound and the sold-out fast path."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from stock.app.embedded import free_port
from stock.app.wiring import create_app
from stock.core.config import Settings
from stock.core.validate import Item
from stock.http.api import FRONT, SOLDOUT
from stock.loops.soldout import SoldOut
from stock.redis.client import connect
from tests import servers
from tests.conftest import BUCKETS, flush
from tests.servers import ServerProcess

TOKEN = "front-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
Client = TestClient[Any, Any]


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


async def app_client(settings: Settings, run_reaper: bool = False) -> Client:
    client: Client = TestClient(
        TestServer(create_app(settings, run_reaper=run_reaper, run_writer=False))
    )
    await client.start_server()
    return client


def order(order_id: str, sku: str = "HOT", **extra: Any) -> dict[str, Any]:
    return {"order_id": order_id, "items": [{"sku": sku, "qty": 1}], **extra}


async def put(api: Any, base_url: str, sku: str, available: int) -> None:
    async with api.put(
        f"{base_url}/v1/stock/{sku}", json={"available": available}, headers=ADMIN
    ) as response:
        assert response.status == 200, await response.text()


# -- overload ----------------------------------------------------------------------


async def test_past_the_limit_requests_get_503_at_once(base: Settings, clean: Any) -> None:
    """Redis paused for writes holds 4 reserves in flight (the limit); more requests are
    answered 503 overloaded with Retry-After at once, and the health, readiness and
    metrics routes still answer; the held ones complete once Redis is back."""
    # deadlines past the pause, so that the held requests wait for Redis, not time out
    api = await app_client(
        replace(base, max_inflight=4, redis_timeout_s=30.0, request_timeout_s=30.0)
    )
    try:
        await put(api, "", "HOT", 100)
        await clean.execute_command("CLIENT", "PAUSE", "10000", "WRITE")  # scripts wait
        held = [
            asyncio.create_task(api.post("/v1/reservations", json=order(f"held-{i}")))
            for i in range(4)
        ]
        deadline = time.monotonic() + 5
        while api.app[FRONT].inflight < 4:
            assert time.monotonic() < deadline, "the held requests never got in flight"
            await asyncio.sleep(0.01)
        started = time.monotonic()
        extra = await asyncio.gather(
            *(api.post("/v1/reservations", json=order(f"x-{i}")) for i in range(10))
        )
        elapsed = time.monotonic() - started
        for response in extra:
            assert response.status == 503
            assert response.headers["Retry-After"] == "1"
            body = await response.json()
            assert (body["error"], body["retry_after_s"]) == ("overloaded", 1)
            assert body["message"]
        assert elapsed < 1.0, f"10 overloaded answers took {elapsed:.2f} s"
        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await api.get(path)).status == 200, path
        text = await (await api.get("/metrics")).text()
        assert (
            'stock_http_requests_total{method="POST",route="/v1/reservations",'
            'status="503"} 10.0' in text
        )
        assert all(not task.done() for task in held)
        await clean.execute_command("CLIENT", "UNPAUSE")
        assert [(await task).status for task in held] == [201] * 4
        assert api.app[FRONT].inflight == 0
        assert (await api.post("/v1/reservations", json=order("after"))).status == 201
    finally:
        await api.close()


# -- sold-out fast path -----------------------------------------------------------


def test_soldout_memory_ends_at_sent_plus_window(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    memory = SoldOut(500)
    memory.refused([{"sku": "A", "available": 0}, {"sku": "B", "available": 3}], sent=99.8)
    assert memory.short([Item("A", 1), Item("B", 1)]) == ["A"]
    now[0] = 100.29
    assert memory.short([Item("A", 1)]) == ["A"]
    now[0] = 100.3  # 99.8 + 0.5: no longer
    assert memory.short([Item("A", 1)]) == []
    memory.seen("A", 0, sent=100.3)
    memory.back(["A"])
    assert memory.short([Item("A", 1)]) == []


@pytest.fixture
def other_process(base: Settings, clean: Any) -> Iterator[str]:
    """``stock serve`` as another process with the fast path on (1 s)."""
    port = free_port()
    env = servers.stock_env(base, port, "", TOKEN, STOCK_SOLDOUT_CACHE_MS="1000")
    proc = subprocess.Popen(
        [sys.executable, "-m", "stock.app.cli", "serve", "--no-reaper"], env=env
    )
    url = f"http://127.0.0.1:{port}"
    try:
        servers_wait(url, proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def servers_wait(url: str, proc: subprocess.Popen[Any]) -> None:
    import urllib.request

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, "stock serve exited"
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=1) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("stock serve never answered")


async def fast_answers(http: aiohttp.ClientSession, url: str) -> float:
    async with http.get(f"{url}/metrics") as response:
        text = await response.text()
    found = re.search(r"^stock_soldout_fast_answers_total (\S+)$", text, re.M)
    assert found, "no stock_soldout_fast_answers_total"
    return float(found.group(1))


async def sold_out_until(http: aiohttp.ClientSession, url: str, back_at: float) -> float:
    """Reserve (a new order each time) through ``url`` until 201; every 409 must have been
    sent before ``back_at`` + 1 s (the setting). Returns the seconds from ``back_at``."""
    for i in range(10_000):
        sent = time.monotonic()
        async with http.post(f"{url}/v1/reservations", json=order(f"poll-{sent}-{i}")) as reply:
            if reply.status == 201:
                return time.monotonic() - back_at
            assert reply.status == 409, await reply.text()
            late = sent - back_at
            assert late < 1.0, f"answered sold-out {late:.3f} s after stock came back"
        await asyncio.sleep(0.005)
    raise AssertionError("never answered 201")


async def test_staleness_bound_across_processes(
    base: Settings, clean: Any, other_process: str
) -> None:
    """Two processes with a 1 s window see HOT sold out. Stock that comes back through
    one of them (a release, then an adjust) is sold at once there, and the other stops
    answering sold-out from memory within the window."""
    here = await app_client(replace(base, soldout_cache_ms=1000))
    url_here, there = str(here.make_url("")).rstrip("/"), other_process
    async with aiohttp.ClientSession() as http:
        try:
            await put(http, url_here, "HOT", 1)
            for url in (url_here, there):  # both learn that HOT is sold out
                async with http.post(f"{url}/v1/reservations", json=order("first")) as reply:
                    assert reply.status in (201, 200)
                async with http.post(f"{url}/v1/reservations", json=order(f"no-{url}")) as r:
                    assert (r.status, (await r.json())["items"]) == (
                        409,
                        [{"sku": "HOT", "available": 0}],
                    )
            hits_there = await fast_answers(http, there)
            async with http.post(f"{there}/v1/reservations", json=order("memo")) as reply:
                assert reply.status == 409
            assert await fast_answers(http, there) == hits_there + 1  # from memory

            # 1. a release through this process
            back_at = time.monotonic()
            async with http.post(f"{url_here}/v1/reservations/first/release") as reply:
                assert reply.status == 200
            async with http.post(f"{url_here}/v1/reservations", json=order("here-1")) as reply:
                assert reply.status == 201, "the releasing process still answered sold-out"
            async with http.post(f"{url_here}/v1/reservations/here-1/release") as reply:
                assert reply.status == 200
            waited = await sold_out_until(http, there, back_at)
            assert await fast_answers(http, there) > hits_there + 1  # memory was in use
            assert waited < 1.0 + 0.5, f"the other process sold out for {waited:.2f} s"

            # 2. sold out again, then an adjust through the other process
            for url in (there, url_here):
                async with http.post(f"{url}/v1/reservations", json=order(f"n2-{url}")) as r:
                    assert r.status == 409
            back_at = time.monotonic()
            async with http.post(
                f"{there}/v1/stock/HOT/adjust", json={"delta": 1}, headers=ADMIN
            ) as reply:
                assert reply.status == 200
            async with http.post(f"{there}/v1/reservations", json=order("there-2")) as reply:
                assert reply.status == 201, "the adjusting process still answered sold-out"
            async with http.post(f"{there}/v1/reservations/there-2/release") as reply:
                assert reply.status == 200
            waited = await sold_out_until(http, url_here, back_at)
            assert waited < 1.0 + 0.5, f"this process sold out for {waited:.2f} s"
            assert here.app[SOLDOUT] is not None and here.app[SOLDOUT].hits > 0
        finally:
            await here.close()


async def test_own_expiry_ends_sold_out_at_once(base: Settings, clean: Any) -> None:
    """With a 30 s window, a reservation this process's reaper expires makes the SKU
    sellable again here at once (within the TTL plus a few reaper periods)."""
    settings = replace(base, soldout_cache_ms=30_000, reaper_period_s=0.05)
    api = await app_client(settings, run_reaper=True)
    try:
        await put(api, "", "HOT", 1)
        assert (await api.post("/v1/reservations", json=order("a", ttl_s=1))).status == 201
        started = time.monotonic()
        while True:
            reply = await api.post("/v1/reservations", json=order(f"b-{time.monotonic()}"))
            if reply.status == 201:
                break
            assert reply.status == 409
            assert time.monotonic() - started < 3.0, "still sold out 3 s after a 1 s TTL"
            await asyncio.sleep(0.02)
        memory = api.app[SOLDOUT]
        assert memory is not None and memory.hits > 0
    finally:
        await api.close()


async def test_fast_path_keeps_validation_and_deducts(base: Settings, clean: Any) -> None:
    api = await app_client(replace(base, soldout_cache_ms=5000))
    try:
        await put(api, "", "HOT", 0)  # set to 0: sold out from here on
        memory = api.app[SOLDOUT]
        assert memory is not None
        bad = await api.post("/v1/deductions", json={"order_id": "", "items": []})
        assert (bad.status, (await bad.json())["field"]) == (400, "order_id")
        reply = await api.post("/v1/deductions", json=order("d1"))
        assert (reply.status, memory.hits) == (409, 1)
        assert await reply.json() == {
            "error": "insufficient_stock",
            "message": "not enough stock for HOT",
            "items": [{"sku": "HOT", "available": 0}],
        }
        await put(api, "", "HOT", 2)
        assert (await api.post("/v1/deductions", json=order("d2"))).status == 201
    finally:
        await api.close()


@pytest.mark.parametrize("op", ["deductions", "reservations"])
async def test_a_retry_that_sold_replays_while_its_sku_is_sold_out(
    base: Settings, clean: Any, op: str
) -> None:
    """The order took the last unit, another buyer was refused (HOT remembered sold out):
    a retry of the order gets its replay (200), not a 409 from memory (issue 20 item 8)."""
    api = await app_client(replace(base, soldout_cache_ms=5000))
    try:
        await put(api, "", "HOT", 1)
        assert (await api.post(f"/v1/{op}", json=order("sold"))).status == 201
        assert (await api.post(f"/v1/{op}", json=order("late"))).status == 409
        memory = api.app[SOLDOUT]
        assert memory is not None and memory.short([Item("HOT", 1)])
        retry = await api.post(f"/v1/{op}", json=order("sold"))
        assert retry.status == 200, await retry.text()
        assert (await api.post(f"/v1/{op}", json=order("other"))).status == 409
        text = await (await api.get("/metrics")).text()
        found = re.search(r"^stock_soldout_fast_answers_total (\S+)$", text, re.M)
        assert found and float(found.group(1)) == 1  # "other" only: from memory
    finally:
        await api.close()
