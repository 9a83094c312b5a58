"""One lifecycle per API process (issue 21): every background loop supervised and
counted, one PostgreSQL pool shared by the readiness check, the console, the
webhook routes, the writer and the dispatcher."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from persist import ops
from persist.dispatcher import Dispatcher
from stock.app.wiring import create_app
from stock.core.config import Settings
from stock.http.api import BACKGROUND
from tests.support.poll import until

TOKEN = "life-admin"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


async def metric_line(client: TestClient[Any, Any], start: str, within_s: float = 10) -> str:
    """The first line of /metrics that starts with ``start``, once there is one."""
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        text = await (await client.get("/metrics")).text()
        found = [line for line in text.splitlines() if line.startswith(start)]
        if found:
            return found[0]
        assert asyncio.get_running_loop().time() < deadline, f"no metric {start}"
        await asyncio.sleep(0.05)


async def test_the_dispatcher_runs_supervised(
    psettings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dispatcher whose loop ends on a bug is started again and counted, like the
    reaper and the writer."""
    polls = 0
    poll = Dispatcher.poll

    async def buggy(self: Dispatcher) -> bool:
        nonlocal polls
        polls += 1
        if polls == 1:
            raise RuntimeError("a bug in the dispatcher")
        return await poll(self)

    monkeypatch.setattr(Dispatcher, "poll", buggy)
    app = create_app(replace(psettings, admin_token=TOKEN), run_reaper=False, run_writer=True)
    async with TestClient(TestServer(app)) as client:
        line = await metric_line(client, 'stock_loop_restarts_total{loop="webhooks"}')
        assert line.endswith(" 1.0")
        await until(lambda: polls >= 3, 10, "the dispatcher polls again")


async def test_the_console_gauges_loop_counts_its_errors(
    psettings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(client: Any) -> dict[str, Any]:
        raise ValueError("a bad reconcile record")

    monkeypatch.setattr(ops, "last_reconcile", broken)
    app = create_app(psettings, run_reaper=False, run_writer=False)
    async with TestClient(TestServer(app)) as client:
        await metric_line(client, 'stock_loop_errors_total{loop="console-gauges"}')


async def test_one_postgres_pool_per_process(
    psettings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The readiness check, the console, the webhook routes, the writer and the
    dispatcher all use the process's one pool: no other pool, no lone connection."""
    pools: list[Any] = []
    connections: list[Any] = []
    create_pool, connect = asyncpg.create_pool, asyncpg.connect

    def counted_pool(*args: Any, **kwargs: Any) -> Any:
        pools.append(args)
        return create_pool(*args, **kwargs)

    async def counted_connect(*args: Any, **kwargs: Any) -> Any:
        connections.append(args)
        return await connect(*args, **kwargs)

    monkeypatch.setattr(asyncpg, "create_pool", counted_pool)
    monkeypatch.setattr(asyncpg, "connect", counted_connect)
    app = create_app(replace(psettings, admin_token=TOKEN), run_reaper=False, run_writer=True)
    async with TestClient(TestServer(app)) as client:
        writer = app[BACKGROUND]["writer"]
        await until(lambda: writer.stats.owned_buckets > 0, 10, "the writer holds buckets")
        ready = await client.get("/readyz")
        assert ready.status == 200, await ready.text()
        assert (await ready.json())["postgres"] == "ok"
        for path in ("/v1/webhooks", "/v1/stock/A/ledger", "/v1/admin/health"):
            response = await client.get(path, headers=ADMIN)
            assert response.status == 200, (path, await response.text())
        assert app[BACKGROUND]["webhooks"].stats is not None
    assert (len(pools), connections) == (1, [])
