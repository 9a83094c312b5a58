"""The client layer's one retry: an idempotent order operation that failed inside
redis-py itself (not with a RedisError: a connection another call closed, as redis-py
8.1's cluster client does when it reloads its slot map) runs once more; a second such
failure is a typed RedisError, and a failure of our own code is never retried."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Connection
from redis.exceptions import RedisError

from stock.app.wiring import create_app
from stock.core.config import Settings
from stock.core.errors import StoreUnavailable
from stock.http.api import ENGINE
from stock.orders.engine import StockEngine
from stock.redis.client import ClientFailure, raised_in_redis_client
from tests.conftest import flush

TOKEN = "s3cret-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


async def fail_inside_redis_py() -> None:
    """What a call meets in redis-py 8.1 when another task closed its connection
    under it: AttributeError 'NoneType' object has no attribute 'writelines'."""
    await Connection()._send_packed_command([b"PING\r\n"])  # never connected


class FailingScripts:
    """The engine's scripts, the first ``failures`` calls of the reserve and confirm
    scripts failing with ``fault`` before they are sent (on a cluster the engine's
    other calls, such as the undo of a failed reserve, go through)."""

    def __init__(self, scripts: Any, failures: int, fault: Any = fail_inside_redis_py) -> None:
        self.scripts, self.failures, self.fault, self.calls = scripts, failures, fault, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.scripts, name)

    async def __call__(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if name not in ("reserve", "confirm"):
            return await self.scripts(name, *args, **kwargs)
        self.calls += 1
        if self.failures:
            self.failures -= 1
            await self.fault()
        return await self.scripts(name, *args, **kwargs)


async def our_own_bug() -> None:
    raise AttributeError("a bug of the service, not of redis-py")


async def test_the_fault_is_raised_inside_redis_py() -> None:
    with pytest.raises(AttributeError) as caught:
        await fail_inside_redis_py()
    assert raised_in_redis_client(caught.value)
    with pytest.raises(AttributeError) as ours:
        await our_own_bug()
    assert not raised_in_redis_client(ours.value)


async def test_an_order_operation_failed_inside_redis_py_runs_once_more(
    engine: StockEngine,
) -> None:
    await engine.set_stock("RT-A", 5)
    engine.scripts = FailingScripts(engine.scripts, failures=1)  # type: ignore[assignment]
    reserved = await engine.reserve("rt-1", [{"sku": "RT-A", "qty": 2}])
    assert (reserved.status, reserved.replay) == ("reserved", False)
    assert engine.retry.retries == 1
    engine.scripts.failures = 1  # type: ignore[attr-defined]
    confirmed = await engine.confirm("rt-1")
    assert (confirmed.status, confirmed.replay) == ("confirmed", False)
    assert engine.retry.retries == 2
    counters = await engine.get_stock("RT-A")
    assert (counters.available, counters.reserved, counters.sold) == (3, 0, 2)


async def test_a_second_failure_is_a_redis_error(engine: StockEngine) -> None:
    """... which leaves the engine as StoreUnavailable (its boundary), the cause kept."""
    await engine.set_stock("RT-B", 5)
    engine.scripts = FailingScripts(engine.scripts, failures=2)  # type: ignore[assignment]
    with pytest.raises(StoreUnavailable) as caught:
        await engine.reserve("rt-2", [{"sku": "RT-B", "qty": 1}])
    failure = caught.value.__cause__
    assert isinstance(failure, ClientFailure) and isinstance(failure, RedisError)
    assert isinstance(failure.__cause__, AttributeError)
    assert engine.retry.retries == 1
    assert (await engine.get_stock("RT-B")).available == 5


async def test_our_own_failure_is_not_retried(engine: StockEngine) -> None:
    await engine.set_stock("RT-C", 5)
    failing = FailingScripts(engine.scripts, failures=1, fault=our_own_bug)
    engine.scripts = failing  # type: ignore[assignment]
    with pytest.raises(AttributeError, match="a bug of the service"):
        await engine.reserve("rt-3", [{"sku": "RT-C", "qty": 1}])
    assert (failing.calls, engine.retry.retries) == (1, 0)


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[TestClient[Any, Any]]:
    app = create_app(replace(settings, admin_token=TOKEN), run_reaper=False, run_writer=False)
    async with TestClient(TestServer(app)) as client:
        await flush(app[ENGINE].redis)
        yield client


def redis_errors(text: str) -> float:
    (line,) = [x for x in text.splitlines() if x.startswith("stock_redis_errors_total ")]
    return float(line.split()[1])


async def test_the_api_answers_as_before(api: TestClient[Any, Any]) -> None:
    """One failure inside redis-py: 201 (counted in stock_redis_errors); two: 503
    ``unavailable`` (the outcome is unknown, the client retries); ours: 500."""
    engine = api.app[ENGINE]  # type: ignore[index]
    assert (await api.put("/v1/stock/RT-D", json={"available": 5}, headers=ADMIN)).status == 200
    body = {"order_id": "rt-4", "items": [{"sku": "RT-D", "qty": 1}]}
    engine.scripts = FailingScripts(engine.scripts, failures=1)
    first = await api.post("/v1/reservations", json=body)
    assert first.status == 201, await first.text()
    assert redis_errors(await (await api.get("/metrics")).text()) == 1
    engine.scripts.failures = 2
    lost = await api.post("/v1/reservations/rt-4/confirm")
    assert lost.status == 503
    assert (await lost.json())["error"] == "unavailable"
    assert redis_errors(await (await api.get("/metrics")).text()) == 3
    engine.scripts.fault, engine.scripts.failures = our_own_bug, 1
    bug = await api.post("/v1/reservations/rt-4/confirm")
    assert (bug.status, (await bug.json())["error"]) == (500, "internal")
    again = await api.post("/v1/reservations/rt-4/confirm")
    assert (again.status, (await again.json())["status"]) == (200, "confirmed")


async def test_any_operation_failed_inside_redis_py_is_typed(
    engine: StockEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not only the retried order operations: a read that failed inside redis-py
    leaves the engine as StoreUnavailable (the boundary is typed, so the API's front
    classifies by type and walks no traceback); our own bug stays what it is."""
    await engine.set_stock("RT-E", 5)

    async def failing(*args: Any) -> Any:
        await fail_inside_redis_py()

    monkeypatch.setattr(engine.core, "hmget", failing)
    with pytest.raises(StoreUnavailable) as caught:
        await engine.get_stock("RT-E")
    assert isinstance(caught.value.__cause__, ClientFailure)
    assert isinstance(caught.value.__cause__.__cause__, AttributeError)

    async def buggy(*args: Any) -> Any:
        await our_own_bug()

    monkeypatch.setattr(engine.core, "hmget", buggy)
    with pytest.raises(AttributeError, match="a bug of the service"):
        await engine.get_stock("RT-E")


async def test_readiness_and_health_type_a_failure_inside_redis_py(
    api: TestClient[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The routes that call Redis outside the engine say "error" (503 unready, the
    health's redis field) for a failure inside redis-py, as for a RedisError."""
    engine = api.app[ENGINE]  # type: ignore[index]

    async def failing(*args: Any, **kwargs: Any) -> Any:
        await fail_inside_redis_py()

    monkeypatch.setattr(engine.redis, "ping", failing)
    ready = await api.get("/readyz")
    assert (ready.status, (await ready.json())["redis"][:6]) == (503, "error:")
    monkeypatch.setattr(engine.redis, "time", failing)
    health = await api.get("/v1/admin/health", headers=ADMIN)
    assert health.status == 200, await health.text()
    assert (await health.json())["redis"].startswith("error:")
