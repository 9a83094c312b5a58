"""The auto-pipeline: one batch per tick, each caller gets its own reply or error."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.exceptions import ResponseError

from stock.client import connect
from stock.config import Settings
from stock.pipeline import AutoPipeline
from tests.servers import ServerProcess


@pytest.fixture
async def client(standalone_server: ServerProcess) -> AsyncIterator[Any]:
    redis = connect(Settings(redis_url=standalone_server.url))
    await redis.flushall()
    yield redis
    await redis.aclose()


async def test_calls_of_one_tick_share_a_batch(client: Any) -> None:
    pipeline = AutoPipeline(client)
    replies = await asyncio.gather(*(pipeline.execute("INCR", "n") for _ in range(300)))
    assert sorted(replies) == list(range(1, 301))
    assert pipeline.commands == 300
    assert pipeline.batches == 1
    assert await client.get("n") == "300"


async def test_batches_are_capped(client: Any) -> None:
    pipeline = AutoPipeline(client, max_batch=100)
    await asyncio.gather(*(pipeline.execute("INCR", "n") for _ in range(250)))
    assert pipeline.batches == 3


async def test_an_error_stays_with_its_caller(client: Any) -> None:
    pipeline = AutoPipeline(client)
    await client.set("text", "abc")
    results = await asyncio.gather(
        pipeline.execute("INCR", "a"),
        pipeline.execute("INCR", "text"),
        pipeline.execute("INCR", "a"),
        return_exceptions=True,
    )
    assert results[0] == 1 and results[2] == 2
    assert isinstance(results[1], ResponseError)


async def test_a_dead_server_fails_every_caller(tmp_path: Any) -> None:
    server = ServerProcess(tmp_path / "dying").start()
    redis = connect(Settings(redis_url=server.url))
    pipeline = AutoPipeline(redis)
    try:
        assert await pipeline.execute("PING") == "PONG"  # raw replies: no redis-py callbacks
        server.kill()
        results = await asyncio.gather(
            *(pipeline.execute("PING") for _ in range(5)), return_exceptions=True
        )
        assert all(isinstance(r, Exception) for r in results)
    finally:
        await redis.aclose()
        server.stop()


async def test_no_server_fails_every_caller() -> None:
    redis = connect(Settings(redis_url="redis://127.0.0.1:1/0"))
    pipeline = AutoPipeline(redis)
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(pipeline.execute("PING") for _ in range(3)), return_exceptions=True),
            timeout=30,
        )
        assert all(isinstance(r, Exception) for r in results)
    finally:
        await redis.aclose()
